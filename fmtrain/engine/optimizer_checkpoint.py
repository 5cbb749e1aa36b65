"""The distributed optimizer's state in a checkpoint, written by every data-parallel rank itself.

megatron-core's ``fully_reshardable`` format stores, for every model parameter of shape
(X, Y, ...), optimizer tensors of the same shape (``optimizer.state.{param,exp_avg,exp_avg_sq}.
<parameter key>``), so a checkpoint loads under any (TP, PP, VPP, DP). To build them it
all-gathers the whole optimizer state over the data-parallel group on every save and has data-
parallel rank 0 write it: the training loop waits for that gather, and one rank writes what all
of them hold.

:func:`sharded_param_state` writes the same global tensors without any exchange. Each
data-parallel rank owns a contiguous range of every parameter's flattened elements (its shard of
the distributed optimizer's buffer); that range of a row-major tensor is a few boxes
(:func:`flat_range_boxes`), and each box is one piece of the global tensor, written by the rank
that holds it (megatron-core's uneven sharding, which torch.distributed.checkpoint reads back by
overlap). The checkpoint is then indistinguishable, tensor for tensor, from a gathered
``fully_reshardable`` one: megatron's loader for that format reads it under any layout, and older
gathered checkpoints keep loading.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import replace

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding, extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""(offset, size) per dimension."""

STATE_PREFIX = "optimizer.state"  # megatron's key prefix for the fully_reshardable tensors


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> Iterator[Box]:
    """The boxes that tile elements ``[start, stop)`` of a row-major tensor of ``shape``, in flat
    order: each box's elements are a contiguous run of the flat range (at most 2 x ndim - 1 boxes)."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield ((start,), (stop - start,)) if shape else ((), ())
        return
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # within one row of the outermost dimension
        for offset, size in flat_range_boxes(shape[1:], start - first * inner, stop - first * inner):
            yield (first, *offset), (1, *size)
        return
    row = first
    if start % inner:  # the partial first row
        for offset, size in flat_range_boxes(shape[1:], start % inner, inner):
            yield (first, *offset), (1, *size)
        row += 1
    whole_rows_end = stop // inner
    if whole_rows_end > row:
        yield (row, *(0 for _ in shape[1:])), (whole_rows_end - row, *shape[1:])
    if stop % inner:  # the partial last row
        for offset, size in flat_range_boxes(shape[1:], 0, stop % inner):
            yield (whole_rows_end, *offset), (1, *size)


def _without_dp(replica_id, instance_id: int):
    """A piece is held by one data-parallel rank: its replica id's DP coordinate is the optimizer
    instance's (as megatron's own per-rank formats do)."""
    if isinstance(replica_id, tuple) and len(replica_id) == 3:
        return (*replica_id[:2], instance_id)
    raise NotImplementedError(f"a replica id that is not (PP, TP, DP): {replica_id!r}")


def _regions(sharded: ShardedTensor | ShardedTensorFactory, key: str) -> list[tuple[ShardedTensor, int]]:
    """The global-tensor regions a parameter maps to, as (ShardedTensor named ``key``, flat start of
    its data within the parameter). A factory (SwiGLU's fused fc1, split into two global tensors)
    is built on a meta tensor, which tells where each of its outputs lies in the parameter."""
    if isinstance(sharded, ShardedTensor):
        return [(replace(sharded, key=key, data=None), 0)]
    probe = torch.empty(sharded.data.shape, device="meta")
    regions = []
    for output in nested_values(sharded.build_fn(key, probe, sharded.replica_id, None)):
        view = output.data if isinstance(output, ShardedTensor) else None
        if view is None or view._base is not probe or not view.is_contiguous():
            raise NotImplementedError(f"the sharded-tensor factory of {sharded.key} is not a split into views")
        regions.append((output, view.storage_offset()))
    if sum(math.prod(region.local_shape) for region, _ in regions) != probe.numel():
        raise NotImplementedError(f"the sharded-tensor factory of {sharded.key} does not cover its tensor")
    return regions


def sharded_param_state(optimizer: DistributedOptimizer, model_sharded_state_dict: dict) -> dict:
    """This data-parallel rank's optimizer state as pieces of the ``fully_reshardable`` tensors
    (no exchange, no copy: the pieces are views of the optimizer's own shards)."""
    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    by_param = {item.data: item for item in nested_values(sharded)}
    state: dict[int, dict[str, ShardedTensor]] = {}
    for buffer in optimizer.buffers:
        for model_param in buffer.param_index_map:
            where = optimizer.model_param_gbuf_map.get(model_param)  # the parameters this rank owns some of
            if where is None:
                continue
            gbuf, dtype, bucket = where
            owned = optimizer.gbuf_ranges[gbuf][dtype][bucket]["param_map"][model_param]["param"]
            if model_param not in by_param:
                shape = tuple(model_param.shape)
                raise ValueError(f"model parameter of shape {shape} missing from the model's sharded state dict")
            model_sharded = by_param[model_param]
            pieces: dict[str, ShardedTensor] = {}
            for state_key, flat in optimizer._get_main_param_and_optimizer_states(model_param).items():
                if state_key == "step":  # saved once, from the param groups
                    continue
                key, flat = f"{STATE_PREFIX}.{state_key}.{model_sharded.key}", flat.detach().view(-1)
                for region, region_start in _regions(model_sharded, key):
                    replica_id = _without_dp(region.replica_id, optimizer.distributed_optimizer_instance_id)
                    for piece in _pieces(region, region_start, flat, owned.start, owned.end, replica_id):
                        pieces[f"{state_key}.{len(pieces)}"] = piece
            state[len(state)] = pieces
    return state


def _pieces(region: ShardedTensor, region_start: int, flat: torch.Tensor, start: int, stop: int, replica_id):
    """The pieces of ``region`` (a global-tensor region whose data starts at flat index
    ``region_start`` of the parameter) that elements ``[start, stop)`` of the parameter, held
    in ``flat``, cover."""
    lo = max(start, region_start)
    hi = min(stop, region_start + math.prod(region.local_shape))
    k = region.prepend_axis_num
    for offset, size in flat_range_boxes(region.local_shape, lo - region_start, hi - region_start):
        numel = math.prod(size)
        # Prepended axes (stacked layers) become explicit unit axes: torch's checkpoint planner
        # sees an uneven piece's shape as it is.
        shape = (1,) * k + size
        yield ShardedTensor(
            key=region.key,
            data=flat[lo - start : lo - start + numel].view(shape),
            dtype=flat.dtype,
            local_shape=shape,
            global_shape=region.global_shape,
            global_offset=(*region.global_offset[:k], *(o + g for o, g in zip(offset, region.global_offset[k:]))),
            axis_fragmentations=None,
            replica_id=replica_id,
            allow_shape_mismatch=region.allow_shape_mismatch,
        )
        lo += numel


def sharded_state_dict_for_saving(optimizer, model_sharded_state_dict: dict, metadata: dict) -> dict:
    """``optimizer.sharded_state_dict(model_sharded_state_dict, metadata=metadata)`` for saving in
    the ``fully_reshardable`` format, with every DistributedOptimizer's tensors as this rank's own
    pieces (:func:`sharded_param_state`) instead of megatron's gather; the structure (param
    groups, steps, the ``chained_N.`` prefixes of a ChainedOptimizer of several) is megatron's, so
    megatron's loader reads it."""
    inners = getattr(optimizer, "chained_optimizers", None)
    if inners is None or len(inners) == 1:
        return _saving_state(inners[0] if inners else optimizer, model_sharded_state_dict, metadata)
    optimizer._synchronize_steps()
    state = {}
    for index, inner in enumerate(inners):
        inner_state = _saving_state(inner, model_sharded_state_dict, metadata)
        add_prefix_for_sharding(inner_state, f"chained_{index}.")  # as megatron's ChainedOptimizer names them
        state[index] = inner_state
    return state


def _saving_state(optimizer, model_sharded_state_dict: dict, metadata: dict) -> dict:
    if not isinstance(optimizer, DistributedOptimizer):  # model-space state already, nothing to gather
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False, metadata=metadata)
    if metadata.get("distrib_optim_sharding_type") != "fully_reshardable":
        raise ValueError(f"only the fully_reshardable format is written without exchange, not {metadata}")
    try:
        param_state = sharded_param_state(optimizer, model_sharded_state_dict)
    except NotImplementedError as reason:  # a model whose sharding this cannot split: megatron's own save
        warnings.warn(f"optimizer state saved through megatron's gather: {reason}", stacklevel=2)
        return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False, metadata=metadata)
    state = optimizer.state_dict()  # param groups and step: small, the same on every DP rank
    state["param_state"] = param_state
    state["param_state_sharding_type"] = "fully_reshardable"
    return state
