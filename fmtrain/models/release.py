"""What every family's release / Hugging Face converter shares (the converters themselves are
the families' own: :mod:`fmtrain.models.yi.convert`, :mod:`fmtrain.models.step_video.convert`;
:mod:`fmtrain.checkpoint.hf.convert` drives them).

A converter is a pure mapping between a family's global (unsharded) checkpoint tensors and the
release's tensors, plus the translation of the release's ``config.json``. It reads a checkpoint
only through the object it is handed (:class:`fmtrain.checkpoint.hf.io.HFCheckpoint`: ``names``,
``info(name)``, ``read_slice(name, region)``, ``ckpt[name]``), so it needs no file code here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fmtrain.config import Config, ConfigError


class HFCheckpointError(RuntimeError):
    """A Hugging Face / release checkpoint that cannot be read, written or mapped, naming the
    file and the reason."""


def weights_dir(path: Path, conv) -> Path:
    """Where ``config.json`` and the weights of a release directory are: ``PATH/SUBDIR`` for a
    family whose release nests them (Step-Video: ``transformer/``), else ``PATH`` itself
    (which may also be given directly); a converter with ``weights_path`` decides itself (the
    Video-VAE's release directory holds two files)."""
    path = Path(path)
    if hasattr(conv, "weights_path"):
        return conv.weights_path(path)
    if conv.WEIGHTS_SUBDIR and (path / conv.WEIGHTS_SUBDIR).is_dir():
        return path / conv.WEIGHTS_SUBDIR
    return path


def read_config_json(file: Path, missing: str) -> dict:
    """A checkpoint's ``config.json``; ConfigError with ``missing`` when absent, or naming bad JSON."""
    if not file.is_file():
        raise ConfigError(missing)
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None


def check_architecture(
    cfg: Config, want: dict, source_fields: dict[str, str], source: str, shown: dict | None = None
) -> None:
    """Raise ConfigError naming the first ``model.*`` field whose value differs from ``want``
    (what the checkpoint's config fixes); ``source_fields`` names the config.json field behind
    each, ``shown`` replaces an expected value in the message."""
    for name, field_name in source_fields.items():
        expected = want[name]
        have = cfg.head_dim if name == "model.head_dim" else getattr(cfg.model, name.split(".", 1)[1])
        same = math.isclose(have, expected, rel_tol=1e-9) if isinstance(expected, float) else have == expected
        if not same:
            raise ConfigError(
                f"{name}={have!r} does not match the checkpoint: {source} has "
                f"{field_name}={(shown or {}).get(name, expected)!r}"
            )


def overrides_as_args(overrides: dict[str, Any]) -> list[str]:
    """``{"model.x": v}`` -> ``["model.x=v"]`` for :func:`fmtrain.config.load_config` (booleans
    lower-case, lists as YAML flow lists)."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def check_tensor_names(ckpt, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose tensors are not exactly ``expected`` (name -> shape), naming a few
    missing or unexpected tensors, or the first tensor of another shape, before anything is read."""
    present = set(ckpt.names)
    missing = [name for name in expected if name not in present]
    extra = sorted(present - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
        raise HFCheckpointError(f"{ckpt.path}: does not match the model: {'; '.join(parts)}")
    for name, shape in expected.items():
        found = tuple(ckpt.info(name)[0])
        if found != shape:
            raise HFCheckpointError(f"{ckpt.path}: tensor {name} has shape {found}, the model expects {shape}")


class SameNameTensors:
    """The tensor mapping of a release whose tensor names and shapes are fmtrain's checkpoint keys
    (the VAEs, whose modules carry the official names): one to one, whole tensors, in the order of
    the model's state dict. ``what`` names the format in messages."""

    def __init__(self, what: str):
        self.what = what

    def piece_reader(self, ckpt, shapes: dict[str, tuple[int, ...]]):
        def piece(key: str, index: tuple[int, ...], offset: tuple[int, ...], shape: tuple[int, ...]):
            if index or key not in shapes:
                raise HFCheckpointError(f"fmtrain tensor {key} has no {self.what} counterpart")
            return ckpt.read_slice(key, tuple(slice(o, o + n) for o, n in zip(offset, shape)))

        return piece

    def export_order(self, shapes: dict[str, tuple[int, ...]], present) -> list[tuple[str, tuple]]:
        return [(name, ()) for name in shapes]

    def hf_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return dict(shapes)

    def hf_tensors_from_megatron(self, key: str, index: tuple[int, ...], t, shapes) -> dict:
        return {key: t}


__all__ = [
    "HFCheckpointError",
    "SameNameTensors",
    "check_architecture",
    "check_tensor_names",
    "overrides_as_args",
    "read_config_json",
    "weights_dir",
]
