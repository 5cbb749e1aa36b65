"""The J-DiT's sizes: every tensor's shape, parameters and FLOPs. Plain arithmetic on the config
(no torch), so ``fmtrain info`` and the converter's shape checks import no model code."""

from __future__ import annotations

import math

from fmtrain.config import Config, ConfigError

TIMESTEP_FEATURES = 256
"""Width of the sinusoidal timestep features (``t_embedder.mlp.0`` input)."""
STREAMS = ("cond", "x")
"""The condition and target streams, by their names in the release."""


def tensor_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the J-DiT (release name -> global shape), in the release module's
    state-dict order."""
    m = cfg.model
    if m.family != "lavin_dit":
        raise ConfigError(f"model.family={m.family!r}: these are the lavin_dit family's shapes")
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    pf = m.in_channels * m.patch_size**2
    out: dict[str, tuple[int, ...]] = {"prompt_embed": (1, h), "answer_embed": (1, h)}
    for s in STREAMS:
        out |= {f"{s}_embedder.0.weight": (h, pf), f"{s}_embedder.0.bias": (h,)}
        out |= {f"{s}_embedder.1.weight": (h,), f"{s}_embedder.1.bias": (h,)}
    out |= {"t_embedder.mlp.0.weight": (h, TIMESTEP_FEATURES), "t_embedder.mlp.0.bias": (h,)}
    out |= {"t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,)}
    block: dict[str, tuple[int, ...]] = {}
    for s in STREAMS:
        attn = f"joint_attn.{s}"
        block |= {f"{attn}_q.weight": (q, h), f"{attn}_k.weight": (kv, h), f"{attn}_v.weight": (kv, h)}
        block |= {f"{attn}_qnorm.weight": (q,), f"{attn}_knorm.weight": (kv,), f"{attn}_proj.weight": (h, q)}
    for s in STREAMS:
        block |= {f"{s}_mlp.gate_proj.weight": (f, h), f"{s}_mlp.down_proj.weight": (h, f)}
        block |= {f"{s}_mlp.up_proj.weight": (f, h)}
    for s in STREAMS:
        block |= {f"{s}_modulation.1.weight": (4 * h, h), f"{s}_modulation.1.bias": (4 * h,)}
    for n in range(m.num_layers):
        out |= {f"blocks.{n}.{key}": shape for key, shape in block.items()}
    out |= {"final_layer.linear.weight": (pf, h), "final_layer.linear.bias": (pf,)}
    out |= {"final_layer.adaLN_modulation.1.weight": (h, h), "final_layer.adaLN_modulation.1.bias": (h,)}
    return out


def param_count(cfg: Config) -> int:
    """Exact parameter count of the J-DiT (checked against the built module in tests)."""
    return sum(math.prod(shape) for shape in tensor_shapes(cfg).values())


def training_flops(cfg: Config, tokens: int, target_tokens: int) -> float:
    """Model FLOPs (forward + backward = 3x forward) of one sample with ``tokens`` tokens in both
    streams, ``target_tokens`` of them in the target stream.

    Per layer and token (either stream): q, k, v and output projections 2*(2*h*q + 2*h*kv), the
    SwiGLU 2*3*h*ffn, and the joint attention 2*2*S*q (non-causal: the whole score matrix); per
    layer and sample the two streams' modulation 2*2*4h^2. Plus the patch embedders on every
    token and the final projection on the target's."""
    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    pf = m.in_channels * m.patch_size**2
    per_token = 2 * (2 * h * q + 2 * h * kv) + 2 * 3 * h * f + 2 * 2 * tokens * q
    per_layer = tokens * per_token + 2 * 2 * 4 * h * h
    outer = tokens * 2 * pf * h + target_tokens * 2 * h * pf
    return 3.0 * (m.num_layers * per_layer + outer)


__all__ = ["STREAMS", "TIMESTEP_FEATURES", "param_count", "tensor_shapes", "training_flops"]
