"""The Yi family's sizes: parameters, FLOPs, the memory estimate of ``fmtrain info`` and the
workload ``fmtrain plan`` ranks layouts with. Plain arithmetic on the config (no torch), so the
planner runs without importing the model code."""

from __future__ import annotations

from dataclasses import replace

from fmtrain.config import Config, family_settings
from fmtrain.models import sizes
from fmtrain.models.workload import Workload, dense_transformer
from fmtrain.models.yi.config import YiModelConfig
from fmtrain.objectives.sections import reference_flops_factor


def _check_family(cfg: Config) -> None:
    try:
        section = family_settings(cfg.model.family).model
    except ValueError:
        section = None
    if section is None or not issubclass(section, YiModelConfig):
        raise ValueError(
            f"model.family={cfg.model.family!r}: the FLOP/parameter formulas here assume a "
            "decoder-only SwiGLU transformer (the Yi family's model section)"
        )


def _shape_args(cfg: Config) -> dict:
    _check_family(cfg)
    m = cfg.model
    return dict(
        num_layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        ffn=m.ffn_hidden_size,
        vocab=m.vocab_size,
    )


def flops_per_token(cfg: Config) -> int:
    """Training FLOPs per token (SwiGLU, causal attention counted half)."""
    return sizes.transformer_training_flops_per_token(
        **_shape_args(cfg), seq_len=cfg.model.seq_length, swiglu=True, causal=True
    )


def flops_per_sample(cfg: Config) -> float:
    """Training FLOPs of one sample: a sequence, or (DPO) a pair of sequences through the policy
    (forward and backward) plus a co-located reference's forward (a third of that)."""
    return cfg.model.seq_length * cfg.objective.ROWS_PER_SAMPLE * flops_per_token(cfg) * reference_flops_factor(cfg)


def param_count(cfg: Config) -> int:
    """Exact parameter count (untied unless model.tie_embeddings)."""
    return sizes.transformer_param_count(**_shape_args(cfg), swiglu=True, tied=cfg.model.tie_embeddings)


def memory_estimate(
    cfg: Config,
    dp: int,
    num_microbatches: int | None = None,
    flash_attention: bool | None = None,
    bf16: bool | None = None,
) -> sizes.MemoryEstimate:
    """:func:`fmtrain.models.sizes.memory_per_gpu` for a config and a data-parallel size.

    ``flash_attention`` defaults to every backend but ``local`` (megatron's own core attention
    materialises the score matrix; TE and SDPA fused kernels do not). ``bf16`` defaults to the
    configured precision, ``auto`` counting as bf16 (GPU). Under DPO a microbatch is twice as
    many sequences and the co-located reference's weights are added."""
    m, p = cfg.model, cfg.parallel
    shape = _shape_args(cfg)
    if flash_attention is None:
        flash_attention = m.attention_backend != "local"
    if bf16 is None:
        bf16 = cfg.train.precision != "fp32"
    estimate = sizes.memory_per_gpu(
        **shape,
        seq_len=m.seq_length,
        micro_batch_size=cfg.train.micro_batch_size * cfg.objective.ROWS_PER_SAMPLE,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        dp=dp,
        cp=p.cp,
        sequence_parallel=p.sequence_parallel,
        recompute=m.recompute,
        flash_attention=flash_attention,
        distributed_optimizer=p.distributed_optimizer,
        bf16=bf16,
        num_microbatches=num_microbatches,
        swiglu=True,
        tied=m.tie_embeddings,
    )
    if cfg.objective.name != "dpo" or cfg.objective.reference_offload:
        return estimate
    # DPO's co-located reference: the same weights per GPU, 16-bit (bf16) or fp32, no gradients
    # or optimizer state; its forward-only activations are freed before the policy's forward.
    reference = estimate.params_per_gpu * (2 if bf16 else 4)
    return replace(
        estimate,
        weights_grads_optimizer_bytes=estimate.weights_grads_optimizer_bytes + reference,
        total_bytes=estimate.total_bytes + reference,
    )


def workload(cfg: Config, on_gpu: bool) -> Workload:
    """The Yi decoder for ``fmtrain plan``: SwiGLU with megatron's fused kernel on a GPU (unless
    ``model.fused_kernels=off``), untied unless ``model.tie_embeddings``; a DPO sample is two
    sequences and its FLOPs include the reference's forward."""
    m = cfg.model
    shape = _shape_args(cfg)
    return dense_transformer(
        layers=shape.pop("num_layers"),
        **shape,
        seq=m.seq_length,
        swiglu=True,
        fused=on_gpu and m.fused_kernels != "off",
        causal=True,
        tied=m.tie_embeddings,
        family="yi",
        context_parallel=cfg.objective.CONTEXT_PARALLEL,
        rows_per_sample=cfg.objective.ROWS_PER_SAMPLE,
        model_flops_per_sample=flops_per_sample(cfg),
    )
