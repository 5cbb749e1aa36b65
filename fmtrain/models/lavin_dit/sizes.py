"""The J-DiT's sizes: every tensor's shape, parameters and FLOPs, and the workload ``fmtrain info``
and ``fmtrain plan`` estimate memory and time with. Plain arithmetic on the config (no torch), so
``fmtrain info``, the planner and the converter's shape checks import no model code."""

from __future__ import annotations

import math

from fmtrain.config import Config, ConfigError
from fmtrain.models.lavin_dit.config import SETTINGS
from fmtrain.models.workload import AttentionCore, Block, Matmul, SavedValues, Workload

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


def target_tokens(cfg: Config) -> int:
    """The target stream's share of ``model.seq_length`` (both streams): 1 of the 2K + 2 items of
    a sample with K = ``data.task_pairs`` example pairs."""
    return cfg.model.seq_length // (2 * cfg.data.task_pairs + 2)


def _mix(a: SavedValues, share_a: float, b: SavedValues, share_b: float) -> SavedValues:
    """Per token of both streams, ``share_a`` of the tokens keeping ``a`` and the rest ``b``."""
    names = ("whole", "split", "fp32_whole", "fp32_split", "gathered", "fp32_gathered")
    return SavedValues(**{n: share_a * getattr(a, n) + share_b * getattr(b, n) for n in names})


STAGE_ROWS = 2
"""Rows a pipeline stage sends beside the tokens: the two streams' conditioning vectors
(``model.CONDITIONING_ROWS``)."""


def workload(cfg: Config, on_gpu: bool) -> Workload:
    """The J-DiT for ``fmtrain plan``: every token of both streams goes through one stream's
    q/k/v/out and SwiGLU per block (the weights are per stream, the shapes per token are one
    stream's), one joint attention over all tokens (GQA, non-causal), two modulation linears
    per sample; the patch embedders and the timestep MLP on the first stage, the final layer on
    the last, over the target tokens only (1 of the 2K + 2 items of a sample). ``on_gpu`` does
    not matter: the J-DiT runs the same layers on either.

    Saved per token of a block (fmtrain's block, counted with saved-tensor hooks on fp32 runs;
    a bf16 run shows which values the block keeps in fp32): the four sandwich RMSNorms' inputs
    (``_rms`` upcasts before the norm keeps its input) with their reciprocals (fp32, 4h + 4,
    whole) and their outputs (4h, whole: two scaled by ``1 + scale``, two gated); the modulated
    inputs of q/k/v and of the MLP (2h), which the stream's column-parallel layers share and
    keep whole on every TP rank even under sequence parallelism (one gather per stream, no
    re-gather in backward), with the two full-width q/k norms' reciprocals over the gathered
    tokens (2 fp32). Split over TP: the q and k projections (upcast for the norms: q + kv
    fp32); the normed q and k, q and k after RoPE, the joint v and the attention output
    (3q + 3kv; the output projections read SDPA's output through a view, its memory being
    [b, S, heads, d]); the SwiGLU's gate, its SiLU, up and their product (4 ffn); the softmax
    log-sum-exp (one fp32 per head: SDPA's flash kernel stores no score matrix). The model's
    last block keeps per condition token only the first norm's input, reciprocal and output,
    the modulated input, the key projection with its normed and rotated copies and the value:
    its condition stream has no queries, output projection or MLP. Full recompute keeps each
    block's input (h). The first stage keeps per token the patches and the embedder
    LayerNorm's input (pf + h, on every TP rank: the embedders are replicated) and the
    LayerNorm's two fp32 statistics; the last stage per target token the final norm's input
    (fp32), reciprocal and output, the final linear's input and the loss's fp32 error
    (2h + (h + 1 + pf) fp32, on every TP rank). The RoPE tables (cos and sin, head_dim each)
    are fp32. The per-sample modulation values (about 10h per block) are not counted.
    """
    m = cfg.model
    h, f, heads, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.kv_channels
    q, kv = heads * d, m.num_query_groups * d
    pf = m.in_channels * m.patch_size**2
    target = target_tokens(cfg) / m.seq_length
    cond = 1.0 - target

    stream = SavedValues(
        whole=4 * h,
        split=3 * q + 3 * kv + 4 * f,
        fp32_whole=4 * h + 4,
        fp32_split=q + kv + heads,
        gathered=2 * h,
        fp32_gathered=2,
    )
    keys_only = SavedValues(whole=h, split=3 * kv, fp32_whole=h + 1, fp32_split=kv, gathered=h, fp32_gathered=1)

    def matmuls(queried: float) -> tuple[Matmul, ...]:
        return (
            Matmul("q", h, q, share=queried),
            Matmul("k", h, kv),
            Matmul("v", h, kv),
            Matmul("proj", q, h, "row", share=queried),
            Matmul("mlp.gate", h, f, share=queried),
            Matmul("mlp.up", h, f, share=queried),
            Matmul("mlp.down", f, h, "row", share=queried),
            Matmul("cond_modulation", h, 4 * h, "none", rows="sample"),
            Matmul("x_modulation", h, 4 * h, "none", rows="sample"),
        )

    # the q/k norm weights are split with their heads
    split_params = len(STREAMS) * (2 * h * q + 2 * h * kv + 3 * h * f + q + kv)
    whole_params = len(STREAMS) * (4 * h * h + 4 * h)  # the modulation linears
    # memory-bound work per token: four norms and four modulations (read, write), two residual
    # adds; q/k norms, RoPE, the joint q/k/v concatenation, the SwiGLU
    elementwise_whole = 8 * h + 8 * h + 6 * h
    elementwise_split = 2 * (q + kv) + 2 * (q + kv) + 2 * (q + 2 * kv) + 3 * f
    block = Block(
        matmuls=matmuls(1.0),
        attention=(AttentionCore(heads, d),),
        saved=stream,
        saved_selective=None,
        saved_input=SavedValues(whole=h),
        split_params=split_params,
        whole_params=whole_params,
        tp_reductions=2,
        elementwise_whole=elementwise_whole,
        elementwise_split=elementwise_split,
        tp_regather=False,
        tp_streams=len(STREAMS),
        tp_stat_values=2,
    )
    last_block = Block(
        matmuls=matmuls(target),
        attention=(AttentionCore(heads, d, queries=target),),
        saved=_mix(stream, target, keys_only, cond),
        saved_selective=None,
        saved_input=SavedValues(whole=h),
        split_params=split_params,  # the condition stream's unused layers still hold weights
        whole_params=whole_params,
        # the condition stream's keys and values: its input's gradient is reduced, nothing in forward
        tp_reductions=2 * target + 0.5 * cond,
        elementwise_whole=target * elementwise_whole + cond * 4 * h,
        elementwise_split=target * elementwise_split + cond * 8 * kv,
        tp_regather=False,
        tp_streams=len(STREAMS),
        tp_stat_values=2 * target + cond,
    )
    final = pf * h + pf + h * h + h
    per_block = split_params + whole_params
    return Workload(
        family="lavin_dit",
        layers=m.num_layers,
        hidden=h,
        heads=heads,
        kv_heads=m.num_query_groups,
        tokens=m.seq_length,
        block=block,
        last_block=last_block,
        first_params_whole=param_count(cfg) - m.num_layers * per_block - final,
        last_params_whole=final,
        head_matmuls=(Matmul("final_layer.linear", h, pf, "none", share=target),),
        tables_fp32_per_token=2 * d,
        first_saved=SavedValues(gathered=pf + h, fp32_gathered=2),
        last_saved=SavedValues(gathered=2 * h * target, fp32_gathered=(h + 1 + pf) * target),
        stage_rows=STAGE_ROWS,
        first_sp_scatter=1.0,
        last_sp_gather=target,
        rows_per_sample=cfg.objective.ROWS_PER_SAMPLE,
        model_flops_per_sample=training_flops(cfg, m.seq_length, target_tokens(cfg)) * cfg.objective.ROWS_PER_SAMPLE,
        context_parallel="cp" in SETTINGS.parallel,
    )


__all__ = [
    "STAGE_ROWS",
    "STREAMS",
    "TIMESTEP_FEATURES",
    "param_count",
    "target_tokens",
    "tensor_shapes",
    "training_flops",
    "workload",
]
