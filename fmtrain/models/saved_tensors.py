"""What autograd keeps for backward, counted: the planner traces a family's training step with
it (on the meta device) and the planner's tests measure real runs with it."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


class SavedStorageBytes:
    """Peak bytes of the distinct storages autograd keeps for backward, as saved-tensor hooks
    (``torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack)``): each storage
    counted from the first value saved on it until autograd releases the last one (views share
    their base's storage); parameters are not counted, nor tensors at the addresses of
    ``exclude``. Works on meta tensors: a storage is told apart by its implementation, not its
    address."""

    def __init__(self, exclude: Iterable[int] = ()):
        self.exclude = set(exclude)
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = self.largest = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or not tensor.numel() or tensor.data_ptr() in self.exclude:
            return tensor
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, storage.nbytes())
        self.refs[key] += 1
        # autograd keeps what pack returns: a detached alias lives exactly as long as the saved
        # value (the tensor itself may outlive it, and an op's own output handed back would hold
        # its node in a reference cycle)
        alias = tensor.detach()
        weakref.finalize(alias, self._release, key)
        return alias

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)


__all__ = ["SavedStorageBytes"]
