"""Layout-invariant weight initialisation.

megatron's own initialisers draw from per-rank generators, so the same seed gives different
full weights at TP=1 and at TP=2 x PP=2. Here every tensor is drawn as its *full, unsharded*
value from a generator seeded by (run seed, checkpoint key, layer index), and each rank keeps
the slice it owns. The slice is found through the model's ``sharded_state_dict()``: the same
global shapes and offsets distributed checkpoints use, so "same weights" here means the same
checkpoint whatever the (TP, PP, VPP) layout.

Cost: one full layer-tensor is generated at a time on the rank's device (for Yi-34B the
largest is the embedding, 64000 x 7168).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


def _sharded_tensors(state: dict) -> Iterable[ShardedTensor]:
    for value in state.values():
        if isinstance(value, dict):
            yield from _sharded_tensors(value)
        elif isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (built if isinstance(built, list) else _sharded_tensors(built))


@torch.no_grad()
def initialize_layout_invariant(model_chunks: list[torch.nn.Module], seed: int, rule: InitRuleFn) -> int:
    """Overwrite every parameter of ``model_chunks`` from its full-tensor draw; returns the count."""
    seen: set[int] = set()
    count = 0
    for chunk in model_chunks:
        for sh in _sharded_tensors(chunk.sharded_state_dict()):
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
            seen.add(id(sh.data))
            count += 1
    return count


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
    full = torch.empty(full_shape, dtype=torch.float32, device=sh.data.device)
    draw(full, gen)
    piece = full[tuple(slice(o, o + n) for o, n in zip(own_offset, own_shape))]
    sh.data.copy_(piece.to(sh.data.dtype))
