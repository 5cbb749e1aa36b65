"""The checkpoint layer's error type (its own module so every checkpoint module can raise it)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written, with the path and the reason."""
