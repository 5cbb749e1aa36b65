"""Global (unsharded) tensors in and out of this rank's model chunks, for any (TP, PP, VPP, DP).

Nothing here knows tensor or pipeline slicing rules: every local tensor is found through the
model's ``sharded_state_dict()`` (as :mod:`fmtrain.models.init` and distributed checkpoints
do), which gives its checkpoint key, the global indices of the prepended axes (the global
layer number for ``decoder.layers.*``), the full shape of one such tensor and where this
rank's piece sits in it. Converters therefore only describe *global* tensors; loading slices
them here, and exporting reassembles them here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)

GlobalName = tuple[str, tuple[int, ...]]
"""(checkpoint key with the layer axis removed, global indices along the prepended axes)."""


@dataclass(frozen=True)
class LocalShard:
    key: str
    """megatron checkpoint key, e.g. ``decoder.layers.mlp.linear_fc2.weight``."""
    index: tuple[int, ...]
    """Global indices along the prepended axes (the global layer number); () for none."""
    global_shape: tuple[int, ...]
    """Shape of the full tensor for this (key, index)."""
    offset: tuple[int, ...]
    """Where this rank's piece starts inside the full tensor."""
    data: torch.Tensor
    """This rank's piece: a view of the parameter, so writing into it sets the weight."""
    main_replica: bool
    """False for copies held by other tensor / data-parallel ranks (exported once)."""

    @property
    def name(self) -> GlobalName:
        return self.key, self.index

    def piece_of(self, full: torch.Tensor) -> torch.Tensor:
        return full[tuple(slice(o, o + n) for o, n in zip(self.offset, self.data.shape))]


def _sharded_tensors(state) -> Iterator[ShardedTensor]:
    values = state.values() if isinstance(state, dict) else state
    for value in values:
        if isinstance(value, (dict, list, tuple)):
            yield from _sharded_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors([value.build()])


def local_shards(chunks: Iterable[torch.nn.Module]) -> Iterator[LocalShard]:
    """Every tensor this rank holds, with its place in the global checkpoint layout."""
    for chunk in chunks:
        for sh in _sharded_tensors(chunk.sharded_state_dict()):
            if sh.flattened_range is not None:
                raise ValueError(f"{sh.key}: flattened shards are not expected in a model state dict")
            prepend = sh.prepend_axis_num
            if tuple(sh.data.shape) != tuple(sh.local_shape):
                raise ValueError(
                    f"{sh.key}: local tensor {tuple(sh.data.shape)} != shard shape {tuple(sh.local_shape)}"
                )
            yield LocalShard(
                key=sh.key,
                index=tuple(sh.global_offset[:prepend]),
                global_shape=tuple(sh.global_shape[prepend:]),
                offset=tuple(sh.global_offset[prepend:]),
                data=sh.data,
                main_replica=is_main_replica(sh.replica_id),
            )


FullTensorFn = Callable[[str, tuple[int, ...]], torch.Tensor]


@torch.no_grad()
def load_global_tensors(chunks: Iterable[torch.nn.Module], full_tensor: FullTensorFn) -> int:
    """Copy ``full_tensor(key, index)``'s slice into every local tensor; returns the count.

    Consecutive shards of one tensor (the gate and up halves of a SwiGLU ``linear_fc1``)
    reuse the last full tensor instead of building it again.
    """
    cached: tuple[GlobalName | None, torch.Tensor | None] = (None, None)
    count = 0
    for shard in local_shards(chunks):
        if cached[0] == shard.name:
            full = cached[1]
        else:
            full = full_tensor(shard.key, shard.index)
            cached = (shard.name, full)
        if tuple(full.shape) != shard.global_shape:
            where = f" (layer {shard.index[0]})" if shard.index else ""
            raise ValueError(
                f"{shard.key}{where}: converted tensor has shape {tuple(full.shape)}, "
                f"the model expects {shard.global_shape}"
            )
        shard.data.copy_(shard.piece_of(full).to(device=shard.data.device, dtype=shard.data.dtype))
        count += 1
    return count


PieceFn = Callable[[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]
"""(key, index, offset, shape) -> that region of the global tensor (key, index)."""


@torch.no_grad()
def load_global_pieces(chunks: Iterable[torch.nn.Module], piece: PieceFn) -> int:
    """Copy ``piece(key, index, offset, shape)`` into every local tensor; returns the count.

    Unlike :func:`load_global_tensors`, the source is asked only for the region this rank
    holds (its rows of a column-parallel weight, its columns of a row-parallel one), so a
    reader that can slice (safetensors ``get_slice``) never materialises a full tensor.
    """
    count = 0
    for shard in local_shards(chunks):
        data = piece(shard.key, shard.index, shard.offset, tuple(shard.data.shape))
        if tuple(data.shape) != tuple(shard.data.shape):
            where = f" (layer {shard.index[0]})" if shard.index else ""
            raise ValueError(
                f"{shard.key}{where}: the converter gave a piece of shape {tuple(data.shape)} "
                f"at offset {shard.offset}, the model holds {tuple(shard.data.shape)}"
            )
        shard.data.copy_(data.to(device=shard.data.device, dtype=shard.data.dtype))
        count += 1
    return count


def _assemble(
    pieces: Iterable[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], torch.Tensor]],
) -> dict[GlobalName, torch.Tensor]:
    full: dict[GlobalName, torch.Tensor] = {}
    filled: dict[GlobalName, int] = {}
    for key, index, global_shape, offset, data in pieces:
        name = (key, index)
        if name not in full:
            full[name] = torch.empty(global_shape, dtype=data.dtype)
            filled[name] = 0
        full[name][tuple(slice(o, o + n) for o, n in zip(offset, data.shape))].copy_(data)
        filled[name] += data.numel()
    for name, t in full.items():
        if filled[name] != t.numel():
            raise RuntimeError(
                f"{name[0]} {name[1]}: gathered {filled[name]} of {t.numel()} elements "
                "(main replicas do not tile the tensor)"
            )
    return full


@torch.no_grad()
def gather_global_tensors(
    chunks: Iterable[torch.nn.Module], *, dst: int = 0, group: dist.ProcessGroup | None = None
) -> dict[GlobalName, torch.Tensor] | None:
    """Full CPU tensors by (key, index) on rank ``dst`` of ``group``; None on the other ranks.

    Collective over ``group`` (default: all ranks) when torch.distributed is initialised. Each
    rank sends the main replicas of its shards (other TP / DP copies are skipped), so rank
    ``dst`` ends up holding the whole model once: fine for export, not for a hot path.
    """
    pieces = [
        (s.key, s.index, s.global_shape, s.offset, s.data.detach().cpu())
        for s in local_shards(chunks)
        if s.main_replica
    ]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return _assemble(pieces)
    rank = dist.get_rank(group)
    received = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(pieces, received, group=group, group_dst=dst)
    if rank != dst:
        return None
    return _assemble(p for rank_pieces in received for p in rank_pieces)


__all__ = [
    "LocalShard",
    "GlobalName",
    "local_shards",
    "load_global_tensors",
    "load_global_pieces",
    "gather_global_tensors",
]
