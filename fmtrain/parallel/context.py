"""Context parallelism: the sequence of every sample split over ``parallel.cp`` ranks.

megatron-core's context-parallel groups (world = TP x CP x PP x DP) hold the layout; the ranks
of one CP group read the same microbatches (they share a data-parallel rank) and each keeps one
contiguous slice of the sequence (:func:`local_slice`) from the model's input on. Attention is
the only place a token needs the others: DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed
Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer
Models", arXiv 2309.14509) turns sequence-sharded q/k/v into head-sharded ones with an
all-to-all, attends over the whole sequence, and turns the result back
(:mod:`fmtrain.models.attention`). Everything else is per token, so per-token losses are sums
over each rank's slice, added over the CP group like any other rank's, and megatron's DDP
reduces gradients over DP x CP.

A contiguous split suits Ulysses: every rank attends over the whole (gathered) sequence, so a
causal mask costs all ranks the same and needs no zig-zag load balancing, unlike ring attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def size() -> int:
    """The context-parallel size (1 before megatron's groups exist)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def rank() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_context_parallel_rank()


def group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def local_slice(length: int, what: str = "sequence") -> slice:
    """This CP rank's contiguous part of ``length`` positions; ValueError naming ``what`` when
    ``length`` does not split evenly (Ulysses' all-to-all needs equal slices)."""
    cp = size()
    if length % cp:
        raise ValueError(f"{what} has {length} tokens, not divisible by parallel.cp={cp}")
    part = length // cp
    start = rank() * part
    return slice(start, start + part)


def split(tensor: torch.Tensor, dim: int, what: str = "sequence") -> torch.Tensor:
    """This CP rank's slice of ``tensor`` along ``dim`` (the tensor itself at CP=1)."""
    if size() == 1:
        return tensor
    index = [slice(None)] * tensor.dim()
    index[dim] = local_slice(tensor.shape[dim], what)
    return tensor[tuple(index)]


def gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The CP group's slices of ``tensor`` concatenated along ``dim``, in rank order (forward only:
    predictions for sampling and forward-only outputs)."""
    cp = size()
    if cp == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(cp)]
    dist.all_gather(parts, tensor.contiguous(), group=group())
    return torch.cat(parts, dim=dim)


def init_deepspeed_comm(backend: str) -> None:
    """DeepSpeed's communication layer on top of the process group torch.distributed already
    has (Ulysses' all-to-all goes through ``deepspeed.comm``)."""
    import deepspeed.comm

    if backend == "gloo":
        _without_shared_memory_op()
    deepspeed.comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _without_shared_memory_op() -> None:
    """On CPU, DeepSpeed's torch backend compiles its shared-memory all-reduce op (C++, one to
    three minutes on a machine's first use) as it starts. The all-to-all Ulysses needs goes to
    torch.distributed (gloo) either way, so the op is marked unavailable: the fallback DeepSpeed
    itself takes where the op cannot build. Nothing changes if DeepSpeed stops exposing the
    table."""
    import deepspeed.ops

    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    compatible["deepspeed_shm_comm"] = False
