"""The megatron ``TransformerConfig`` fields every fmtrain family sets the same way.

A family's ``transformer_config`` adds its architecture (norm, activation, GLU, biases) to
these: the shape, the parallel layout, dtypes, initialisation and the per-token loss
convention, plus which of megatron's fused kernels this device runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from fmtrain.config import Config, ConfigError

# megatron's own fusions that need apex or a CUDA extension; fmtrain runs without them.
_APEX_ONLY_FUSIONS = dict(masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False)


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def torch_compile_missing(*, use_cpu: bool) -> list[str]:
    """What torch.compile (megatron's jit fuser) would lack here to generate its kernels."""
    missing = []
    if not any(shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c):
        missing.append("a C compiler (cc / gcc / clang)")
    if not use_cpu and importlib.util.find_spec("triton") is None:
        missing.append("triton")
    return missing


def fused_kernels_enabled(cfg: Config, *, use_cpu: bool) -> bool:
    """``model.fused_kernels`` resolved for this device (auto: CUDA, where torch.compile works)."""
    choice = cfg.model.fused_kernels
    if choice == "off":
        return False
    missing = torch_compile_missing(use_cpu=use_cpu)
    if choice == "on" and missing:
        raise ConfigError(
            f"model.fused_kernels=on: megatron compiles them with torch.compile, which "
            f"needs {' and '.join(missing)}; set model.fused_kernels=off"
        )
    return not missing and (choice == "on" or not use_cpu)


def shared_transformer_kwargs(cfg: Config, *, params_dtype: torch.dtype) -> dict:
    m, p = cfg.model, cfg.parallel
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # Layout: without these megatron silently builds every layer on every stage.
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # fmtrain.models.init redraws every weight layout-invariantly afterwards; megatron's
        # own (per-rank, local-shard) initialisation still runs because it is what marks the
        # parameters as tensor-parallel (perform_initialization=False skips that).
        perform_initialization=True,
        use_cpu_initialization=False,
        # The loss is a sum over tokens (or latent elements) divided by the step's count, so
        # any split into microbatches and data-parallel ranks gives the same number.
        calculate_per_token_loss=True,
        **_APEX_ONLY_FUSIONS,
    )
