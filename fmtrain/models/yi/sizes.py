"""The Yi family's sizes: parameters, FLOPs, and the workload ``fmtrain info`` and
``fmtrain plan`` estimate memory and time with. Plain arithmetic on the config (no torch), so the
planner runs without importing the model code."""

from __future__ import annotations

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


def workload(cfg: Config, on_gpu: bool) -> Workload:
    """The Yi decoder for ``fmtrain plan``: SwiGLU with megatron's fused kernel on a GPU (unless
    ``model.fused_kernels=off``), untied unless ``model.tie_embeddings``; a DPO sample is two
    sequences, its FLOPs include the reference's forward and a co-located reference's weights
    sit beside the policy's; megatron's ``local`` attention backend stores the score matrix."""
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
        score_matrix=m.attention_backend == "local",
        frozen_copy=cfg.objective.name == "dpo" and not cfg.objective.reference_offload,
    )
