"""The Step-Video DiT's sizes: parameters, FLOPs, and the workload ``fmtrain info`` and
``fmtrain plan`` estimate memory and time with. Plain arithmetic on the config (no torch), so the
planner runs without importing the model code."""

from __future__ import annotations

from fmtrain.config import Config
from fmtrain.models.workload import AttentionCore, Block, Matmul, SavedValues, Workload
from fmtrain.objectives.sections import reference_flops_factor


def _dims(cfg: Config) -> dict:
    m = cfg.model
    return dict(
        layers=m.num_layers,
        h=m.hidden_size,
        d=cfg.head_dim,
        ffn=m.ffn_hidden_size,
        patch=m.in_channels * m.patch_size**2,
        cap=m.caption_dim,
        clip=m.clip_dim,
        ctx=m.caption_tokens + m.clip_tokens,
        cap_tokens=m.caption_tokens,
        clip_tokens=m.clip_tokens,
    )


def block_param_count(h: int, d: int, ffn: int) -> int:
    linear = 3 * h * h + h * h + h * h + 2 * h * h + h * h + 2 * h * ffn
    return linear + 4 * h + 4 * d + 6 * h  # norm1/norm2 (weight+bias), 4 q/k norms, scale_shift_table


def param_count(cfg: Config) -> int:
    """Exact parameter count of the DiT (checked against the built module in tests)."""
    k = _dims(cfg)
    h = k["h"]
    embed = k["patch"] * h + h
    adaln = (256 * h + h) + (h * h + h) + (h * 6 * h + 6 * h)
    caption = (2 * k["cap"] if cfg.model.caption_norm_affine else 0) + (k["cap"] * h + h) + (h * h + h)
    clip = k["clip"] * h + h if k["clip"] else 0
    final = 2 * h + h * k["patch"] + k["patch"]
    return embed + adaln + caption + clip + k["layers"] * block_param_count(h, k["d"], k["ffn"]) + final


def training_flops(cfg: Config, video_tokens: int) -> float:
    """Model FLOPs (forward + backward = 3x forward) of one sample with ``video_tokens`` tokens.

    Per layer and video token: self-attention projections 2*4h^2, cross-attention q and out
    2*2h^2, FFN 2*2*h*ffn, attention cores 2*2*S*h (non-causal: the whole score matrix) and
    2*2*L*h over the L context tokens; per layer and sample the context's k/v projection
    2*2h^2*L. Plus patch embedding and output projection per token, and the text projections."""
    k = _dims(cfg)
    h, s, ctx = k["h"], video_tokens, k["ctx"]
    per_token = 2 * 4 * h * h + 2 * 2 * h * h + 2 * 2 * h * k["ffn"] + 2 * 2 * s * h + 2 * 2 * ctx * h
    per_layer = s * per_token + 2 * 2 * h * h * ctx
    outer = s * 2 * 2 * k["patch"] * h
    text = 2 * k["cap_tokens"] * (k["cap"] * h + h * h) + 2 * k["clip_tokens"] * k["clip"] * h
    return 3.0 * (k["layers"] * per_layer + outer + text)


def workload(cfg: Config, on_gpu: bool) -> Workload:
    """The DiT for ``fmtrain plan``: per block a self-attention over the video tokens (RoPE,
    q/k norms), a cross-attention over the L text tokens, a GELU MLP, adaLN-single modulation.

    Saved per video token (measured with saved-tensor hooks, fmtrain's block): 9h whole (two
    LayerNorms' inputs and outputs, the modulated inputs, the gated residual terms) and four
    fp32 norm statistics; 15h split over TP (self-attention q/k/v and their normed and rotated
    copies, both attentions' outputs and output-projection inputs, the cross-attention's
    queries), 2 ffn (the MLP's GELU input and output) and five fp32 values per head (q/k-norm
    reciprocals, two softmax log-sum-exps). Per text token: the cross-attention's keys and
    values and their normed copies (5h split). Full recompute keeps each block's input. The
    first stage keeps the patch embedding's input per video token."""
    k = _dims(cfg)
    h, d, ffn, heads = k["h"], k["d"], k["ffn"], cfg.model.num_attention_heads
    block = block_param_count(h, d, ffn)
    linear = block - (4 * h + 4 * d + 6 * h)
    matmuls = (
        Matmul("attn1.qkv", h, 3 * h),
        Matmul("attn1.out", h, h, "row"),
        Matmul("attn2.q", h, h),
        Matmul("attn2.kv", h, 2 * h, rows="context"),
        Matmul("attn2.out", h, h, "row"),
        Matmul("ff.fc1", h, ffn),
        Matmul("ff.fc2", ffn, h, "row"),
    )
    final = 2 * h + h * k["patch"] + k["patch"]
    return Workload(
        family="step_video",
        layers=cfg.model.num_layers,
        hidden=h,
        heads=heads,
        kv_heads=heads,
        tokens=cfg.model.seq_length,
        block=Block(
            matmuls=matmuls,
            attention=(AttentionCore(heads, d), AttentionCore(heads, d, keys="context")),
            saved=SavedValues(whole=9 * h, split=15 * h + 2 * ffn, fp32_whole=4, fp32_split=5 * heads),
            saved_selective=None,
            saved_input=SavedValues(whole=h),
            split_params=linear,
            whole_params=block - linear,
            tp_reductions=3,
            elementwise_whole=16 * h,  # two norms, two modulations, two gated residual adds
            elementwise_split=12 * h + 2 * ffn,  # q/k norms and RoPE, the GELU
            saved_context=SavedValues(split=5 * h, fp32_split=heads),
        ),
        first_params_whole=param_count(cfg) - cfg.model.num_layers * block - final,
        last_params_whole=final,
        head_matmuls=(Matmul("proj_out", h, k["patch"], "none"),),
        tables_per_token=2 * d,
        first_saved=SavedValues(gathered=k["patch"]),
        # the final layer runs on the tokens gathered from the SP ranks: every rank keeps the
        # final norm's input and output, proj_out's input, the norm's fp32 statistics and the
        # fp32 error the loss squares, for all tokens
        last_saved=SavedValues(gathered=3 * h, fp32_gathered=2 + k["patch"]),
        context_tokens=k["ctx"],
        rows_per_sample=cfg.objective.ROWS_PER_SAMPLE,
        model_flops_per_sample=training_flops(cfg, cfg.model.seq_length)
        * cfg.objective.ROWS_PER_SAMPLE
        * reference_flops_factor(cfg),
        context_parallel=cfg.objective.CONTEXT_PARALLEL,
        frozen_copy=cfg.objective.name == "video_dpo" and not cfg.objective.reference_offload,
    )
