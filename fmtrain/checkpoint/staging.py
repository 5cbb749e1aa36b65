"""Host tensors for a checkpoint's write, with as little copying as possible.

megatron-core's writer needs host tensors that own exactly their bytes (it serialises a
tensor's whole storage, so it would clone every view, and copy every GPU tensor, in the
training loop on every save). Before a save, every tensor of the state is made one:

* a GPU tensor is copied into a pinned host buffer (all copies issued without waiting, one
  synchronisation at the end). The buffers are allocated on the first save and reused by every
  later one, so a save neither allocates nor page-faults gigabytes of host memory; they are a
  persistent host copy of this rank's share of the checkpoint;
* a contiguous host view (DDP's flat parameter buffer, the distributed optimizer's pieces)
  becomes an alias over exactly its bytes (a slice of its storage): no copy at all. A
  synchronous save writes it before training continues, and an asynchronous save's writer is a
  forked process whose copy-on-write memory is the snapshot;
* a non-contiguous host view is copied into a reused host buffer.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def _alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor over exactly the bytes of a contiguous ``view`` (shared memory, no copy); its
    storage slice keeps the whole original storage alive."""
    size = view.element_size()
    start = view.storage_offset() * size
    storage = view.untyped_storage()[start : start + view.numel() * size]
    return torch.empty(0, dtype=view.dtype).set_(storage, 0, view.shape, view.stride())


class HostStaging:
    """Reusable host buffers for the tensors of one rank's checkpoints (one per writer)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, sharded_state_dict: dict) -> dict:
        """Point every written ShardedTensor of ``sharded_state_dict`` (its factories applied first,
        in place) at a host tensor that owns exactly its bytes."""
        apply_factories(sharded_state_dict)
        on_gpu = False
        for item in nested_values(sharded_state_dict):
            if not isinstance(item, ShardedTensor) or item.data is None or not is_main_replica(item.replica_id):
                continue  # another rank writes a replica
            data = item.data.detach()
            if data.device.type == "cpu" and _owns_storage(data):
                continue
            if data.device.type == "cpu" and data.is_contiguous():
                item.data = _alias(data)
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
