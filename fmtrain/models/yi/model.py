"""The Yi model as megatron-core ``GPTModel`` chunks (one per virtual pipeline stage).

Architecture (Hugging Face config of ``01-ai/Yi-6B``): pre-norm RMSNorm (eps 1e-5),
grouped-query attention, RoPE (theta 5e6, rotate-half layout as in Llama), SwiGLU MLP, no
biases, untied input embedding and output layer. Core attention runs on Transformer Engine
when importable, otherwise on SDPA (:mod:`fmtrain.models.attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.config import Config, ConfigError
from fmtrain.models.attention import SDPACoreAttention
from fmtrain.models.init import InitRule
from fmtrain.models.layers import RMSNorm
from fmtrain.models.megatron_config import (
    fused_kernels_enabled,
    shared_transformer_kwargs,
    transformer_engine_available,
)
from fmtrain.models.yi.config import batch_positions


def resolve_attention_backend(cfg: Config) -> str:
    backend = cfg.model.attention_backend
    if backend == "auto":
        # Context parallelism is fmtrain's Ulysses around SDPA (megatron's needs TE's attention
        # with its own load-balanced split of the sequence).
        # Per-document positions and masks (data.reset_*, objective.packing) are applied there too.
        fmtrain_attention = cfg.parallel.cp > 1 or batch_positions(cfg)
        return "te" if transformer_engine_available() and not fmtrain_attention else "sdpa"
    if backend == "te" and not transformer_engine_available():
        raise ConfigError("model.attention_backend=te but transformer_engine is not importable")
    return backend


def transformer_config(cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    m = cfg.model
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[m.recompute]
    fused = fused_kernels_enabled(cfg, use_cpu=use_cpu)
    return TransformerConfig(
        **shared_transformer_kwargs(cfg, params_dtype=params_dtype),
        num_query_groups=m.num_query_groups,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        # SwiGLU as one compiled function with a hand-written backward (megatron's jit fuser).
        bias_activation_fusion=fused,
        # The vocab-parallel cross entropy with one all-reduce for both softmax statistics. Its
        # backward always returns a bf16 gradient, which is what bf16 logits get anyway but
        # would silently round an fp32 run's: bf16 only.
        cross_entropy_loss_fusion=fused and params_dtype == torch.bfloat16,
        cross_entropy_fusion_impl="native",
        # megatron's only fused RoPE is Transformer Engine's.
        apply_rope_fusion=fused and resolve_attention_backend(cfg) == "te",
        **recompute,
    )


def layer_spec(cfg: Config, tconfig: TransformerConfig) -> ModuleSpec:
    backend = resolve_attention_backend(cfg)
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = RMSNorm
    layer.pre_mlp_layernorm = RMSNorm
    if backend == "sdpa":
        # RoPE moves into the core attention (see fmtrain.models.attention), compiled with the
        # other fused kernels.
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=SDPACoreAttention,
            params={"rotary_base": cfg.model.rotary_base, "compile_rope": tconfig.bias_activation_fusion},
        )
    return spec


def build_chunk(
    cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
) -> torch.nn.Module:
    m = cfg.model
    # A block spec (not just a layer spec) so the final norm is fmtrain's RMSNorm too.
    block = TransformerBlockSubmodules(
        layer_specs=[layer_spec(cfg, tconfig)] * get_num_layers_to_build(tconfig, vp_stage=vp_stage), layer_norm=RMSNorm
    )
    rope_in_core_attention = resolve_attention_backend(cfg) == "sdpa"
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="none" if rope_in_core_attention else "rope",
        rotary_percent=1.0,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )


def init_rule(cfg: Config) -> Callable[[str], InitRule]:
    """megatron's GPT initialisation: N(0, std), output projections scaled by 1/sqrt(2L)."""
    std = cfg.model.init_method_std
    scaled = std / math.sqrt(2.0 * cfg.model.num_layers)

    def rule(key: str) -> InitRule:
        if key.endswith(("layer_norm_weight", "layernorm.weight", "norm.weight")):
            return InitRule("ones")
        if key.endswith("bias"):
            return InitRule("zeros")
        if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            return InitRule("normal", scaled)
        return InitRule("normal", std)

    return rule
