"""The Step-Video-T2V family: a video DiT trained with flow matching, as megatron modules.

Architecture (REFERENCE.md; official inference repo stepfun-ai/Step-Video-T2V). Latents
[C, T, H, W] (64 channels from the Video-VAE) are cut into patch_size x patch_size patches
per frame (patch 1 for Step-Video) and embedded linearly (``pos_embed.proj``). Each block::

    shift1, scale1, gate1, shift2, scale2, gate2 = block.scale_shift_table + AdaLN-single(t)
    x = x + gate1 * SelfAttn(LayerNorm(x) * (1 + scale1) + shift1)  # fused qkv, q/k RMSNorm, 3D RoPE
    x = x + CrossAttn(x, text)                                        # q/k RMSNorm, no modulation
    x = x + gate2 * FFN(LayerNorm(x) * (1 + scale2) + shift2)        # GELU(tanh), 4x, no bias

The text context is the concatenation [CLIP-style (1024-d) -> linear ; LLM-style (6144-d) ->
LayerNorm -> linear -> GELU(tanh) -> linear], with a key mask. The final layer is a LayerNorm
without affine, shift/scale from a global table plus the embedded timestep, and a linear
projection back to patches. Module and parameter names are the released checkpoint's
(``transformer_blocks.N.attn1.wqkv`` ...), so export is a renaming-free copy
(:mod:`fmtrain.checkpoint.hf.step_video`). Fused projections are laid out per head
(``wqkv``: [heads, (q, k, v), head_dim]; ``wkv``: [heads, (k, v), head_dim]), as the release
reads them, which is also what lets megatron's column-parallel split hand whole heads to each
tensor-parallel rank.

Parallelism. Tensor parallel: qkv / q / kv / FFN-in are column-parallel, the output
projections row-parallel; the timestep and text embedders, norms and final layer are
replicated. Sequence parallel (with TP): video tokens are split over the TP ranks between
blocks, gathered by the column-parallel projections; gradients of parameters applied to a
sequence slice (norms, block tables) are summed over TP by megatron (``sequence_parallel``
attribute), and those of the per-sample modulation by ``copy_to_tensor_model_parallel_region``.
Pipeline: blocks are split over stages; megatron's schedules pass one tensor between stages,
so a stage sends [video tokens ; text context ; 6 modulation rows ; embedded timestep ; padding]
([rows, b, hidden]) and the next one unpacks it (every stage reads the same batch, so it knows
the sizes). Gradients of the context and the modulation flow back to the first stage's
embedders through the same tensor. Microbatches of one step may have different latent shapes
(one shape per microbatch, from the bucketing loader); under PP the tensor is padded to the
step's longest (``pipeline_rows``).

Objective (:mod:`fmtrain.objectives.flow_matching`): per sample, t and the noise come from
generators seeded by the sample's ``sample_seed``, so any layout, and a resumed run, draws the
same numbers. The last stage returns per-sample error sums; the loss is their weighted sum over
the global element count (the exact batch mean).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import get_attr_wrapped_model

from fmtrain.config import Config, ConfigError, rope_axes
from fmtrain.models.adaln import AdaLNSingle, modulate
from fmtrain.models.init import InitRule
from fmtrain.models.layers import HeadRMSNorm
from fmtrain.models.megatron_config import shared_transformer_kwargs
from fmtrain.models.registry import ModelFamily, register
from fmtrain.models.rope import apply_rope_3d, rope_3d_cos_sin
from fmtrain.objectives import flow_matching as fm
from fmtrain.train.flops import (
    MemoryEstimate,
    activation_bytes_per_layer,
    in_flight_layer_microbatches,
    state_bytes_per_param,
)

BLOCK_NORM_EPS = 1e-5
"""LayerNorm eps inside the blocks (the release's block default)."""
OUTER_NORM_EPS = 1e-6
"""LayerNorm eps of the caption and final norms, and of the q/k RMSNorms."""
MODULATION_ROWS = 7
"""Rows of the pipeline tensor carrying the conditioning: 6 modulation vectors + the embedded timestep."""

# Salts of the per-sample generators (independent draws from one sample seed).
_SALT_TIME, _SALT_NOISE, _SALT_DROP = 1, 2, 3


# ----------------------------------------------------------------------------- inputs


@dataclass
class DiTInputs:
    """One microbatch as every pipeline stage sees it (tensors on the model's device)."""

    grid: tuple[int, int, int]
    """Token grid (T, H/p, W/p)."""
    t: torch.Tensor
    """[b] flow time in [0, 1]."""
    text_emb: torch.Tensor
    """[b, caption_tokens, caption_dim]."""
    text_mask: torch.Tensor
    """[b, caption_tokens] bool, True = attend."""
    clip_emb: torch.Tensor | None = None
    clip_mask: torch.Tensor | None = None
    x_t: torch.Tensor | None = None
    """[b, C, T, H, W] noised latents (first stage)."""
    target: torch.Tensor | None = None
    """[b, C, T, H, W] velocity target (last stage); None: return the prediction."""
    drop_text: torch.Tensor | None = None
    """[b] bool: replace the text condition by the null condition (CFG training)."""
    pipeline_rows: int | None = None
    """Rows of the tensor sent between pipeline stages (this TP rank's), when padded."""

    @property
    def batch(self) -> int:
        return self.t.shape[0]


def null_condition(
    text_emb: torch.Tensor,
    text_mask: torch.Tensor,
    clip_emb: torch.Tensor | None,
    clip_mask: torch.Tensor | None,
    drop: torch.Tensor,
):
    """The unconditional input of classifier-free guidance for the samples where ``drop``:
    zero embeddings with only the first token of each encoder attended (so attention stays
    defined). The sampler's unconditional branch uses the same function."""

    def apply(emb, mask):
        if emb is None:
            return None, None
        keep = ~drop.view(-1, 1, 1)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        return emb * keep.to(emb.dtype), torch.where(drop.view(-1, 1), null_mask, mask)

    text_emb, text_mask = apply(text_emb, text_mask)
    clip_emb, clip_mask = apply(clip_emb, clip_mask)
    return text_emb, text_mask, clip_emb, clip_mask


# ----------------------------------------------------------------------------- layers


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    """Parameters applied to a sequence slice: megatron sums their gradients over TP under SP."""
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


class _Sequence(MegatronModule):
    """A numbered container (``net.0``, ``net.2``) whose sharded state dict recurses properly
    (a ``torch.nn.ModuleList`` would be treated as replicated)."""

    def __init__(self, config: TransformerConfig, *modules: torch.nn.Module):
        super().__init__(config=config)
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def __getitem__(self, i: int) -> torch.nn.Module:
        return getattr(self, str(i))


class SelfAttention(MegatronModule):
    """Fused per-head qkv (column-parallel), q/k RMSNorm, 3D RoPE, SDPA, output (row-parallel)."""

    def __init__(self, config: TransformerConfig, axes: tuple[int, ...]):
        super().__init__(config=config)
        h, d = config.hidden_size, config.kv_channels
        self.head_dim, self.axes = d, axes
        self.wqkv = ColumnParallelLinear(
            h, 3 * h, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        self.wo = RowParallelLinear(
            h,
            h,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.q_norm = HeadRMSNorm(d, OUTER_NORM_EPS, dtype=config.params_dtype)
        self.k_norm = HeadRMSNorm(d, OUTER_NORM_EPS, dtype=config.params_dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv, _ = self.wqkv(x)  # [S, b, heads_local * 3 * d] (all tokens: SP gathers them)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, -1, 3 * self.head_dim).split(self.head_dim, dim=-1)
        q = apply_rope_3d(self.q_norm(q), *rope, self.axes)
        k = apply_rope_3d(self.k_norm(k), *rope, self.axes)
        # [S, b, n, d] -> [b, n, S, d]
        q, k, v = (y.permute(1, 2, 0, 3).contiguous() for y in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v)
        context = context.permute(2, 0, 1, 3).reshape(s, b, -1)
        out, _ = self.wo(context)
        return out


class CrossAttention(MegatronModule):
    """Video queries attend to the text context (q / per-head kv column-parallel, q/k RMSNorm)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        h, d = config.hidden_size, config.kv_channels
        self.head_dim = d
        self.wq = ColumnParallelLinear(
            h, h, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        self.wkv = ColumnParallelLinear(
            h, 2 * h, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        # The context is not split over the sequence (it is short and every rank holds all of
        # it): no all-gather on input, and the input gradient is all-reduced instead.
        self.wkv.sequence_parallel = False
        self.wkv.allreduce_dgrad = config.tensor_model_parallel_size > 1
        self.wo = RowParallelLinear(
            h,
            h,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.q_norm = HeadRMSNorm(d, OUTER_NORM_EPS, dtype=config.params_dtype)
        self.k_norm = HeadRMSNorm(d, OUTER_NORM_EPS, dtype=config.params_dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, _ = self.wq(x)  # [S, b, n*d]
        kv, _ = self.wkv(context)  # [L, b, n*2d]
        s, b = q.shape[:2]
        q = self.q_norm(q.view(s, b, -1, self.head_dim))
        k, v = kv.view(kv.shape[0], b, -1, 2 * self.head_dim).split(self.head_dim, dim=-1)
        k = self.k_norm(k)
        q, k, v = (y.permute(1, 2, 0, 3).contiguous() for y in (q, k, v))
        context_out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        out, _ = self.wo(context_out.permute(2, 0, 1, 3).reshape(s, b, -1))
        return out


class _GeluProjection(MegatronModule):
    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.proj = ColumnParallelLinear(
            config.hidden_size,
            config.ffn_hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )

    def forward(self, x):
        y, _ = self.proj(x)
        return F.gelu(y, approximate="tanh")


class FeedForward(MegatronModule):
    """``net.0.proj`` (column-parallel) -> GELU(tanh) -> ``net.2`` (row-parallel), no bias."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        down = RowParallelLinear(
            config.ffn_hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.net = _Sequence(config, _GeluProjection(config), torch.nn.Identity(), down)

    def forward(self, x):
        y, _ = self.net[2](self.net[0](x))
        return y


class StepVideoBlock(MegatronModule):
    def __init__(self, config: TransformerConfig, axes: tuple[int, ...]):
        super().__init__(config=config)
        h = config.hidden_size
        dtype = config.params_dtype
        self.norm1 = torch.nn.LayerNorm(h, eps=BLOCK_NORM_EPS, dtype=dtype)
        self.attn1 = SelfAttention(config, axes)
        self.norm2 = torch.nn.LayerNorm(h, eps=BLOCK_NORM_EPS, dtype=dtype)
        self.attn2 = CrossAttention(config)
        self.ff = FeedForward(config)
        self.scale_shift_table = torch.nn.Parameter(torch.zeros(6, h, dtype=dtype))
        for module in (self.norm1, self.norm2):
            _mark_sequence_parallel(module, config)
        self.scale_shift_table.sequence_parallel = config.sequence_parallel

    def forward(self, x, context, key_mask, modulation, rope_cos, rope_sin):
        """x [S_local, b, h]; context [L, b, h]; modulation [6, b, h]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[:, None, :] + modulation).unbind(0)
        x = x + gate1 * self.attn1(modulate(self.norm1(x), shift1, scale1), (rope_cos, rope_sin))
        x = x + self.attn2(x, context, key_mask)
        return x + gate2 * self.ff(modulate(self.norm2(x), shift2, scale2))


class _PatchEmbed(torch.nn.Module):
    """``pos_embed.proj``: a linear map of each (C, p, p) patch; the release stores it as the
    equivalent Conv2d weight [hidden, C, p, p] (reshaped on export/import)."""

    def __init__(self, in_features: int, hidden: int, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(in_features, hidden, dtype=dtype)


class _CaptionProjection(torch.nn.Module):
    def __init__(self, in_features: int, hidden: int, dtype):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, hidden, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """[b, C, T, H, W] -> [b, T*(H/p)*(W/p), C*p*p] (tokens frame-major, features (c, p, q))."""
    b, c, t, h, w = latent.shape
    x = latent.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], channels: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [b, S, C*p*p] -> [b, C, T, H, W]."""
    t, hp, wp = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, t, hp, wp, channels, p, p)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, channels, t, hp * p, wp * p)


class StepVideoDiT(MegatronModule):
    """One pipeline chunk of the DiT: embedders on the first stage, the final layer on the last."""

    def __init__(
        self, cfg: Config, config: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ):
        super().__init__(config=config)
        m = cfg.model
        h, dtype = config.hidden_size, config.params_dtype
        self.pre_process, self.post_process = pre_process, post_process
        # megatron's gradient finalisation asks every pipeline chunk about tied embeddings.
        self.share_embeddings_and_output_weights = False
        self.patch_size, self.in_channels = m.patch_size, m.in_channels
        self.axes = rope_axes(cfg)
        self.rope_theta = m.rotary_base
        self.recompute = m.recompute == "full"
        self.sequence_parallel = config.sequence_parallel
        self.tp = config.tensor_model_parallel_size
        self.input_tensor: torch.Tensor | None = None
        if pre_process:
            self.pos_embed = _PatchEmbed(m.in_channels * m.patch_size**2, h, dtype)
            self.adaln_single = AdaLNSingle(h, dtype=dtype)
            self.caption_norm = torch.nn.LayerNorm(
                m.caption_dim, eps=OUTER_NORM_EPS, elementwise_affine=m.caption_norm_affine, dtype=dtype
            )
            self.caption_projection = _CaptionProjection(m.caption_dim, h, dtype)
            self.clip_projection = torch.nn.Linear(m.clip_dim, h, dtype=dtype) if m.clip_dim else None
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        self.transformer_blocks = torch.nn.ModuleList(
            [StepVideoBlock(config, self.axes) for _ in range(get_num_layers_to_build(config, vp_stage=vp_stage))]
        )
        if post_process:
            self.norm_out = torch.nn.LayerNorm(h, eps=OUTER_NORM_EPS, elementwise_affine=False, dtype=dtype)
            self.scale_shift_table = torch.nn.Parameter(torch.zeros(2, h, dtype=dtype))
            self.proj_out = torch.nn.Linear(h, m.patch_size**2 * m.in_channels, dtype=dtype)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- checkpoint keys: blocks under their global index, whatever the pipeline layout

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # The TP group is passed explicitly: megatron only falls back to it when metadata is
        # absent, and replicated tensors need the TP rank in their replica id.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = {}
        for name, child in self.named_children():
            if name == "transformer_blocks":
                continue
            state.update(
                sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            )
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        if own:
            state.update(
                make_sharded_tensors_for_checkpoint(
                    own, prefix, {}, sharded_offsets, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]
                )
            )
        for local, block in enumerate(self.transformer_blocks):
            local_prefix = f"{prefix}transformer_blocks.{local}."
            block_state = block.sharded_state_dict(local_prefix, sharded_offsets, metadata)
            replace_prefix_for_sharding(
                block_state, local_prefix, f"{prefix}transformer_blocks.{self.layer_offset + local}."
            )
            state.update(block_state)
        return state

    # -- forward

    def _embed(self, inputs: DiTInputs):
        """First stage: tokens [S, b, h], context [L, b, h], key mask [b, L], modulation [6, b, h],
        embedded timestep [1, b, h]."""
        dtype = self.pos_embed.proj.weight.dtype
        tokens = self.pos_embed.proj(patchify(inputs.x_t.to(dtype), self.patch_size)).transpose(0, 1)
        modulation, embedded = self.adaln_single(inputs.t)
        b, h = embedded.shape
        text_emb, text_mask, clip_emb, clip_mask = inputs.text_emb, inputs.text_mask, inputs.clip_emb, inputs.clip_mask
        if inputs.drop_text is not None and bool(inputs.drop_text.any()):
            text_emb, text_mask, clip_emb, clip_mask = null_condition(
                text_emb, text_mask, clip_emb, clip_mask, inputs.drop_text
            )
        context = self.caption_projection(self.caption_norm(text_emb.to(dtype)))
        key_mask = text_mask
        if self.clip_projection is not None:
            context = torch.cat([self.clip_projection(clip_emb.to(dtype)), context], dim=1)
            key_mask = torch.cat([clip_mask, text_mask], dim=1)
        return (
            tokens,
            context.transpose(0, 1),
            key_mask,
            modulation.view(b, 6, h).transpose(0, 1),
            embedded.unsqueeze(0),
        )

    def _key_mask(self, inputs: DiTInputs) -> torch.Tensor:
        text_mask, clip_mask = inputs.text_mask, inputs.clip_mask
        if inputs.drop_text is not None and bool(inputs.drop_text.any()):
            _, text_mask, _, clip_mask = null_condition(
                inputs.text_emb, text_mask, inputs.clip_emb, clip_mask, inputs.drop_text
            )
        return torch.cat([clip_mask, text_mask], dim=1) if inputs.clip_emb is not None else text_mask

    def _local_tokens(self, inputs: DiTInputs) -> int:
        t, hp, wp = inputs.grid
        tokens = t * hp * wp
        if self.sequence_parallel:
            if tokens % self.tp:
                raise ValueError(
                    f"latent grid {inputs.grid} has {tokens} tokens, not divisible by "
                    f"parallel.tp={self.tp} (required by parallel.sequence_parallel)"
                )
            return tokens // self.tp
        return tokens

    def forward(self, inputs: DiTInputs) -> torch.Tensor:
        n_local = self._local_tokens(inputs)
        if self.pre_process:
            x, context, key_mask, modulation, embedded = self._embed(inputs)
            if self.sequence_parallel:
                x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        else:
            packed = self.input_tensor  # [rows, b, h] from the previous stage
            key_mask = self._key_mask(inputs)
            n_ctx = key_mask.shape[1]
            x = packed[:n_local]
            context = packed[n_local : n_local + n_ctx]
            modulation = packed[n_local + n_ctx : n_local + n_ctx + 6]
            embedded = packed[n_local + n_ctx + 6 : n_local + n_ctx + MODULATION_ROWS]
        # Under SP each rank modulates a slice of the tokens: sum the modulation's gradient over TP.
        block_modulation = (
            tensor_parallel.copy_to_tensor_model_parallel_region(modulation) if self.sequence_parallel else modulation
        )
        cos, sin = rope_3d_cos_sin(inputs.grid, self.axes, self.rope_theta, x.device)
        for block in self.transformer_blocks:
            if self.recompute and self.training:
                x = tensor_parallel.checkpoint(block, False, x, context, key_mask, block_modulation, cos, sin)
            else:
                x = block(x, context, key_mask, block_modulation, cos, sin)
        if not self.post_process:
            packed = torch.cat([x, context, modulation, embedded], dim=0)
            if inputs.pipeline_rows is not None and packed.shape[0] < inputs.pipeline_rows:
                pad = packed.new_zeros(inputs.pipeline_rows - packed.shape[0], *packed.shape[1:])
                packed = torch.cat([packed, pad], dim=0)
            return packed
        return self._final(x, embedded, inputs)

    def _final(self, x: torch.Tensor, embedded: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        if self.sequence_parallel:
            # Every TP rank runs the (replicated) final layer on all tokens: the backward of the
            # gather is a split, not a reduce-scatter of identical gradients.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        shift, scale = (self.scale_shift_table[:, None, :] + embedded).unbind(0)  # [b, h] each
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # [S, b, C*p*p]
        prediction = unpatchify(x.transpose(0, 1), inputs.grid, self.in_channels, self.patch_size)
        if inputs.target is None:
            return prediction.float()
        return fm.error_sums(prediction, inputs.target)


# ----------------------------------------------------------------------------- family hooks


def transformer_config(cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    # The DiT's blocks are fmtrain modules: megatron's fused activation / cross entropy do not apply.
    return TransformerConfig(
        **shared_transformer_kwargs(cfg, params_dtype=params_dtype), add_bias_linear=False, bias_activation_fusion=False
    )


def build_chunk(
    cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
) -> torch.nn.Module:
    return StepVideoDiT(cfg, tconfig, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def latent_grid(latent_shape, patch_size: int) -> tuple[int, int, int]:
    _, _, t, h, w = latent_shape
    return int(t), int(h) // patch_size, int(w) // patch_size


def make_inputs(
    cfg: Config, batch: dict, device, *, training: bool, need_x_t: bool, need_target: bool
) -> tuple[DiTInputs, torch.Tensor]:
    """The flow-matching draw of one microbatch: (inputs, per-sample loss weights)."""
    f = cfg.flow
    latent = batch["latent"].to(device, non_blocking=True)
    seeds = batch["sample_seed"]
    t = fm.sample_timesteps(
        fm.seeded_generators(seeds, device, _SALT_TIME),
        mode=f.timestep_sampling,
        logit_mean=f.logit_mean,
        logit_std=f.logit_std,
        shift=f.shift,
        device=device,
    )
    x_t = target = None
    if need_x_t or need_target:
        noise = fm.per_sample_noise(
            fm.seeded_generators(seeds, device, _SALT_NOISE), tuple(latent.shape[1:]), device=device
        )
        x_t = fm.interpolate(noise, latent, t) if need_x_t else None
        target = fm.velocity_target(noise, latent) if need_target else None
    drop = None
    if training and f.text_drop_prob > 0:
        drop = fm.drop_condition(fm.seeded_generators(seeds, device, _SALT_DROP), f.text_drop_prob, device=device)
    clip = batch.get("clip_emb")
    inputs = DiTInputs(
        grid=latent_grid(latent.shape, cfg.model.patch_size),
        t=t,
        text_emb=batch["text_emb"].to(device),
        text_mask=batch["text_mask"].to(device).bool(),
        clip_emb=clip.to(device) if clip is not None else None,
        clip_mask=batch["clip_mask"].to(device).bool() if clip is not None else None,
        x_t=x_t,
        target=target,
        drop_text=drop,
        pipeline_rows=batch.get("pipeline_rows"),
    )
    return inputs, fm.get_weighting(f.loss_weighting)(t)


def _loss(weights: torch.Tensor, l1_weight: float, output: torch.Tensor):
    loss_sum, count, reports = fm.loss_from_error_sums(output, weights, l1_weight)
    return loss_sum, count.to(torch.int), reports


def make_forward_step(cfg: Config):
    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        first = get_attr_wrapped_model(model, "pre_process")
        last = get_attr_wrapped_model(model, "post_process")
        # "predict_only" microbatches return the velocity prediction instead of error sums.
        inputs, weights = make_inputs(
            cfg,
            batch,
            device,
            training=model.training,
            need_x_t=first,
            need_target=last and not batch.get("predict_only", False),
        )
        output = model(inputs=inputs)
        return output, functools.partial(_loss, weights, cfg.flow.l1_weight)

    return forward_step


def pipeline_rows(cfg: Config, microbatches: list[dict]) -> int:
    """Rows per TP rank of the tensor passed between stages: the step's longest microbatch."""
    m, p = cfg.model, cfg.parallel
    ctx = m.caption_tokens + m.clip_tokens
    longest = 0
    for batch in microbatches:
        t, hp, wp = latent_grid(batch["latent"].shape, m.patch_size)
        tokens = t * hp * wp
        longest = max(longest, (tokens // p.tp if p.sequence_parallel else tokens) + ctx + MODULATION_ROWS)
    return longest


def prepare_pipeline_step(cfg: Config, microbatches: list[dict]) -> tuple[list[dict], int]:
    """(microbatches annotated with ``pipeline_rows``, the seq_length megatron's schedules expect)."""
    rows = pipeline_rows(cfg, microbatches)
    annotated = [{**batch, "pipeline_rows": rows} for batch in microbatches]
    return annotated, rows * (cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)


def init_rule(cfg: Config) -> Callable[[str], InitRule]:
    """N(0, std) for linear weights (output projections scaled by 1/sqrt(2L), as megatron's GPT),
    zeros for biases, ones for norm weights, N(0, 1/sqrt(hidden)) for the scale-shift tables
    (the release's initialisation of them)."""
    import math

    std = cfg.model.init_method_std
    scaled = std / math.sqrt(2.0 * cfg.model.num_layers)
    table = 1.0 / math.sqrt(cfg.model.hidden_size)

    def rule(key: str) -> InitRule:
        if key.endswith("bias"):
            return InitRule("zeros")
        if key.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight", "caption_norm.weight")):
            return InitRule("ones")
        if key.endswith("scale_shift_table"):
            return InitRule("normal", table)
        if key.endswith(("wo.weight", "net.2.weight")):
            return InitRule("normal", scaled)
        return InitRule("normal", std)

    return rule


# ----------------------------------------------------------------------------- sizes


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


def memory_estimate(cfg: Config, dp: int, num_microbatches: int | None = None) -> MemoryEstimate:
    """Peak memory of the first pipeline stage (it holds the most microbatches under 1F1B).

    Activations per block: Korthikanti's GPT-layer count with flash attention (SDPA never
    stores the score matrix) scaled by 42/34 for the cross-attention's extra stored tensors
    (its input, queries, output and the residual: about 8 s*b*h bytes); the video tokens play
    the sequence. An estimate, like the LLM one."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    k = _dims(cfg)
    bf16 = t.precision != "fp32"
    layers_per_stage = m.num_layers // p.pp
    block = block_param_count(k["h"], k["d"], k["ffn"])
    linear = block - (4 * k["h"] + 4 * k["d"] + 6 * k["h"])
    params = layers_per_stage * (linear // p.tp + block - linear)
    params += param_count(cfg) - m.num_layers * block  # embedders (first stage) and final layer, replicated
    per_layer = (
        activation_bytes_per_layer(
            m.seq_length,
            t.micro_batch_size,
            k["h"],
            m.num_attention_heads,
            p.tp,
            p.sequence_parallel,
            m.recompute,
            flash_attention=True,
        )
        * 42
        / 34
    )
    act = per_layer * in_flight_layer_microbatches(0, m.num_layers, p.pp, p.vpp, num_microbatches) * (1 if bf16 else 2)
    state = params * state_bytes_per_param(bf16, p.distributed_optimizer, dp)
    return MemoryEstimate(params, state, act, state + act)


def validate(cfg: Config) -> None:
    if cfg.model.recompute == "selective":
        raise ConfigError(
            "model.recompute=selective: the DiT's SDPA attention stores no score matrix, so "
            "there is nothing selective to recompute; use none or full"
        )
    fm.get_weighting(cfg.flow.loss_weighting)


# ----------------------------------------------------------------------------- sampling


def fit_tokens(emb: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, D] embedding (+ [L] mask) truncated or zero-padded to ``length`` tokens, with its mask."""
    if mask is None:
        mask = torch.ones(emb.shape[0], dtype=torch.bool)
    mask = mask.bool()
    if emb.shape[0] >= length:
        return emb[:length], mask[:length]
    pad = length - emb.shape[0]
    return (torch.cat([emb, emb.new_zeros(pad, emb.shape[1])]), torch.cat([mask, torch.zeros(pad, dtype=torch.bool)]))


@torch.no_grad()
def sample_latents(
    model: StepVideoDiT,
    cfg: Config,
    condition: dict,
    *,
    grid_shape: tuple[int, int, int],
    num: int,
    seed: int,
    steps: int,
    shift: float,
    guidance_scale: float,
    device,
) -> torch.Tensor:
    """Generate ``num`` latents [num, C, T, H, W] for one prompt by Euler integration of the
    predicted velocity from noise (t=0) to data (t=1), with classifier-free guidance against
    :func:`null_condition`. ``condition``: ``text_emb`` [caption_tokens, caption_dim],
    ``text_mask`` and, with a CLIP encoder, ``clip_emb`` / ``clip_mask`` (already fitted).
    The noise comes from one generator seeded by ``seed``: the same call gives the same latents."""
    m = cfg.model
    t_frames, height, width = grid_shape
    if height % m.patch_size or width % m.patch_size:
        raise ValueError(f"latent shape {grid_shape} is not divisible by model.patch_size={m.patch_size}")
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((num, m.in_channels, t_frames, height, width), generator=generator, device=device)

    def expand(name):
        value = condition.get(name)
        return None if value is None else value.to(device).unsqueeze(0).expand(num, *value.shape)

    base = dict(
        grid=(t_frames, height // m.patch_size, width // m.patch_size),
        text_emb=expand("text_emb"),
        text_mask=expand("text_mask"),
        clip_emb=expand("clip_emb"),
        clip_mask=expand("clip_mask"),
    )
    drop_all = torch.ones(num, dtype=torch.bool, device=device)

    def velocity(x, t):
        return model(inputs=DiTInputs(t=t, x_t=x, **base))

    def uncond_velocity(x, t):
        return model(inputs=DiTInputs(t=t, x_t=x, drop_text=drop_all, **base))

    return fm.euler_sample(
        velocity, x0, steps=steps, shift=shift, uncond_velocity=uncond_velocity, guidance_scale=guidance_scale
    )


def build_for_inference(cfg: Config, checkpoint: str | None, device) -> StepVideoDiT:
    """The whole DiT on one device (bf16 on GPU, fp32 on CPU) with a checkpoint's weights
    (any layout it was saved in), or the run seed's initial weights when ``checkpoint`` is None."""
    from fmtrain.checkpoint import load_model_weights
    from fmtrain.models.init import initialize_layout_invariant

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tconfig = transformer_config(cfg, params_dtype=dtype, use_cpu=device.type == "cpu")
    model = StepVideoDiT(cfg, tconfig, pre_process=True, post_process=True, vp_stage=None).to(device)
    if checkpoint:
        load_model_weights(checkpoint, model, cfg)
    else:
        initialize_layout_invariant([model], cfg.run.seed, init_rule(cfg))
    return model


def load_prompt_embedding(path: str, cfg: Config) -> dict:
    """A prompt's precomputed text embeddings from an ``.npz`` file: ``text_emb`` [L, caption_dim],
    optional ``text_mask`` [L], and with a CLIP encoder ``clip_emb`` [L2, clip_dim] (+ ``clip_mask``);
    fitted to the model's token counts. Read without pickle."""
    import numpy as np

    m = cfg.model
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt embedding {file} does not exist")
    try:
        data = dict(np.load(file, allow_pickle=False))
    except (ValueError, OSError) as exc:
        raise ValueError(f"prompt embedding {file}: not a readable .npz ({exc})") from None

    def get(key: str, dim: int, length: int, required: bool):
        if key not in data:
            if required:
                raise ValueError(
                    f"prompt embedding {file}: no '{key}' array (has: {', '.join(sorted(data)) or 'none'})"
                )
            return None, None
        emb = torch.from_numpy(np.asarray(data[key], dtype=np.float32))
        if emb.dim() == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.dim() != 2 or emb.shape[1] != dim:
            raise ValueError(f"prompt embedding {file}: '{key}' has shape {tuple(emb.shape)}, expected [tokens, {dim}]")
        mask_key = key.replace("_emb", "_mask")
        mask = torch.from_numpy(np.asarray(data[mask_key]).astype(bool)).reshape(-1) if mask_key in data else None
        return fit_tokens(emb, mask, length)

    text_emb, text_mask = get("text_emb", m.caption_dim, m.caption_tokens, True)
    condition = {"text_emb": text_emb, "text_mask": text_mask}
    if m.clip_dim:
        clip_emb, clip_mask = get("clip_emb", m.clip_dim, m.clip_tokens, True)
        condition.update(clip_emb=clip_emb, clip_mask=clip_mask)
    return condition


def sample(
    cfg: Config, *, checkpoint: str | None, prompt_file: str, shape: tuple[int, int, int], num: int, seed: int, device
) -> torch.Tensor:
    """``fmtrain sample``: latents for one prompt embedding file, with the flow.* sampler settings."""
    f = cfg.flow
    model = build_for_inference(cfg, checkpoint, device)
    return sample_latents(
        model,
        cfg,
        load_prompt_embedding(prompt_file, cfg),
        grid_shape=shape,
        num=num,
        seed=seed,
        steps=f.sample_steps,
        shift=f.sample_shift,
        guidance_scale=f.guidance_scale,
        device=device,
    )


def prepare_data(cfg: Config, topo, run_dir):
    from fmtrain.data.latents import prepare_latent_data

    return prepare_latent_data(cfg, topo, run_dir)


STEP_VIDEO = register(
    ModelFamily(
        name="step_video",
        transformer_config=transformer_config,
        build_chunk=build_chunk,
        make_forward_step=make_forward_step,
        init_rule=init_rule,
        flops_per_sample=lambda cfg: training_flops(cfg, cfg.model.seq_length),
        tokens_per_sample=lambda cfg: cfg.model.seq_length,
        param_count=param_count,
        memory_estimate=memory_estimate,
        prepare_data=prepare_data,
        prepare_step=prepare_pipeline_step,
        validate=validate,
        sample=sample,
    )
)
