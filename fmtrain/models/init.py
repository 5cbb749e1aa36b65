"""Layout-invariant weight initialisation.

megatron's own initialisers draw from per-rank generators, so the same seed gives different
full weights at TP=1 and at TP=2 x PP=2. Here every tensor is drawn as its *full, unsharded*
value from a generator seeded by (run seed, checkpoint key, layer index), and each rank keeps
the slice it owns. The slice is found through the model's ``sharded_state_dict()``: the same
global shapes and offsets distributed checkpoints use, so "same weights" here means the same
checkpoint whatever the (TP, PP, VPP) layout.

Cost: one full layer-tensor is generated at a time on the rank's device (for Yi-34B the
largest is the embedding, 64000 x 7168).

Partitioned parameters (DeepSpeed ZeRO-3 builds a model under ``deepspeed.zero.Init``: each
rank holds a flat 1/dp slice of every parameter, not its shape) are initialised through a
:class:`PartitionedParameters` the engine gives: the state dict is described while every
parameter shows its full shape without storage, and each tensor is written while its one
parameter is gathered, so a rank never holds more than that parameter whole.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


@dataclass(frozen=True)
class InitRule:
    """How one checkpoint key is initialised: ``normal`` with ``std``; ``fan_in``, normal with
    ``std / sqrt(fan_in)`` (``std`` is the gain; fan-in from the full tensor's shape: every
    dimension but the first, fan-out the first); ``xavier_uniform``, uniform in +-``std *
    sqrt(6 / (fan_in + fan_out))`` (Glorot & Bengio 2010, torch's ``xavier_uniform_``); or a
    constant."""

    kind: str  # "normal" | "fan_in" | "xavier_uniform" | "ones" | "zeros"
    std: float = 0.0


InitRuleFn = Callable[[str], InitRule]


def _stable_seed(seed: int, key: str, index: tuple[int, ...]) -> int:
    text = f"{key}|{','.join(map(str, index))}".encode()
    return (seed * 1_000_003 + zlib.crc32(text)) % (2**63 - 1)


class PartitionedParameters(Protocol):
    """How an engine that partitions parameters over the data-parallel ranks lets the
    initialiser see them whole."""

    def shapes(self, module: torch.nn.Module) -> AbstractContextManager:
        """For the duration, every partitioned parameter of ``module`` has its full shape and holds
        no data (what ``sharded_state_dict()`` needs: keys, shapes, offsets)."""
        ...

    def gathered(self, tensor: torch.Tensor) -> AbstractContextManager:
        """For the duration, ``tensor`` (a parameter, or a buffer) holds its full value; what is
        written into it is kept (collective over the data-parallel ranks)."""
        ...


def _entries(state: dict) -> Iterable[ShardedTensor | ShardedTensorFactory]:
    """The state dict's tensors, factories not yet built (building one views its data)."""
    for value in state.values():
        if isinstance(value, dict):
            yield from _entries(value)
        elif isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            yield value


def _sharded_tensors(entry: ShardedTensor | ShardedTensorFactory) -> Iterable[ShardedTensor]:
    if isinstance(entry, ShardedTensorFactory):
        built = entry.build()
        for value in built if isinstance(built, list) else _entries(built):
            yield from _sharded_tensors(value)
    elif isinstance(entry, ShardedTensor):
        yield entry


@torch.no_grad()
def initialize_layout_invariant(
    model_chunks: list[torch.nn.Module],
    seed: int,
    rule: InitRuleFn,
    partitioned: PartitionedParameters | None = None,
) -> int:
    """Overwrite every parameter of ``model_chunks`` from its full-tensor draw; returns the count.
    ``partitioned``: the chunks' parameters are partitioned by the engine (ZeRO-3), which gathers
    them one at a time (collective)."""
    count = 0
    for chunk in model_chunks:
        with partitioned.shapes(chunk) if partitioned else contextlib.nullcontext():
            state = chunk.sharded_state_dict()
        for entry in _entries(state):
            # A factory's tensors are views of its parameter: built while the parameter is whole.
            with partitioned.gathered(entry.data) if partitioned else contextlib.nullcontext():
                for sh in _sharded_tensors(entry):
                    _initialize(sh, seed, rule)
                    count += 1
    return count


def _initialize(sh: ShardedTensor, seed: int, rule: InitRuleFn) -> None:
    if sh.flattened_range is not None:
        raise ValueError(f"{sh.key}: flattened shards are not expected in a model state dict")
    init = rule(sh.key)
    if init.kind == "ones":
        sh.data.fill_(1.0)
    elif init.kind == "zeros":
        sh.data.zero_()
    elif init.kind == "normal":
        _fill_normal_slice(sh, seed, init.std)
    elif init.kind == "fan_in":
        fan_in = math.prod(sh.global_shape[sh.prepend_axis_num + 1 :]) or 1
        _fill_normal_slice(sh, seed, init.std / math.sqrt(fan_in))
    elif init.kind == "xavier_uniform":
        full = sh.global_shape[sh.prepend_axis_num :]
        bound = init.std * math.sqrt(6.0 / (math.prod(full[1:]) + full[0]))
        _fill_slice(sh, seed, lambda t, gen, a=bound: t.uniform_(-a, a, generator=gen))
    else:
        raise ValueError(f"{sh.key}: unknown init kind {init.kind!r}")


def _fill_normal_slice(sh: ShardedTensor, seed: int, std: float) -> None:
    _fill_slice(sh, seed, lambda t, gen: t.normal_(0.0, std, generator=gen))


def _fill_slice(sh: ShardedTensor, seed: int, draw: Callable[[torch.Tensor, torch.Generator], None]) -> None:
    """This rank's slice of the full tensor ``draw`` fills from the key's generator."""
    prepend = sh.prepend_axis_num
    full_shape = tuple(sh.global_shape[prepend:])
    own_offset = sh.global_offset[prepend:]
    # Leading (prepended) axes index whole layers: one draw per layer index.
    own_shape = tuple(sh.local_shape)  # excludes the prepended (layer) axes
    if tuple(sh.data.shape) != own_shape:
        raise ValueError(f"{sh.key}: local tensor {tuple(sh.data.shape)} != shard shape {own_shape}")
    lead = tuple(sh.global_offset[:prepend])
    gen = torch.Generator(device=sh.data.device)
    gen.manual_seed(_stable_seed(seed, sh.key, lead))
    if own_shape == full_shape and sh.data.dtype == torch.float32 and sh.data.is_contiguous():
        # The whole tensor is this rank's, in the draw's dtype and layout: the same values drawn in
        # place, without a second full-size tensor (a ZeRO-3 parameter is whole only while gathered).
        draw(sh.data, gen)
        return
    full = torch.empty(full_shape, dtype=torch.float32, device=sh.data.device)
    draw(full, gen)
    piece = full[tuple(slice(o, o + n) for o, n in zip(own_offset, own_shape))]
    sh.data.copy_(piece.to(sh.data.dtype))
