"""Host copies of a checkpoint's tensors in buffers that live as long as the run.

A save's only in-loop copy: every tensor on the GPU is copied into a pinned host buffer (all
copies issued without waiting, one synchronisation at the end), and every host tensor that is a
view into a larger storage (the distributed optimizer's pieces, DDP's flat parameter buffer) into
a host buffer of its own. The buffers are allocated on the first save and reused by every later
one, so a save neither allocates nor page-faults gigabytes of host memory; megatron-core's writer
then finds host tensors that own their storage and writes them as they are (it would otherwise
copy every GPU tensor, and clone every host view, in the training loop on every save).

A host tensor that owns its storage is not copied: a synchronous save writes it before training
continues, and an asynchronous save's forked writer holds a copy-on-write snapshot of it.
The cost is host memory: one buffer per staged tensor, the size of this rank's share of the
checkpoint on a GPU, less on the CPU.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


class HostStaging:
    """Reusable host buffers for the tensors of one rank's checkpoints (one per writer)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, sharded_state_dict: dict) -> dict:
        """Point every ShardedTensor of ``sharded_state_dict`` (its factories applied first, in
        place) at a host tensor that owns its storage, copying where it is on the GPU or a view."""
        apply_factories(sharded_state_dict)
        on_gpu = False
        for item in nested_values(sharded_state_dict):
            if not isinstance(item, ShardedTensor) or item.data is None or not is_main_replica(item.replica_id):
                continue  # another rank writes a replica
            data = item.data.detach()
            if data.device.type == "cpu" and _owns_storage(data):
                continue
            key = (item.key, item.global_offset, tuple(data.shape), data.dtype)
            buffer = self._buffers.get(key)
            if buffer is None:
                pin = data.device.type == "cuda"
                buffer = self._buffers[key] = torch.empty(data.shape, dtype=data.dtype, pin_memory=pin)
            on_gpu |= data.device.type == "cuda"
            buffer.copy_(data, non_blocking=data.device.type == "cuda")
            item.data = buffer
        if on_gpu:
            torch.cuda.synchronize()
        return sharded_state_dict
