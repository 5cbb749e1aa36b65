"""The Step-Video-T2V DiT as megatron modules (one chunk per virtual pipeline stage).

Architecture ("Step-Video-T2V Technical Report", arXiv 2502.10248; official inference
repository stepfun-ai/Step-Video-T2V, ``stepvideo/modules/model.py``). Latents
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
(:mod:`fmtrain.models.step_video.convert`). Fused projections are laid out per head
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

Objective (:mod:`fmtrain.objectives.flow_matching`, drawn in :mod:`.family`): the last stage
returns per-sample error sums against the velocity target, or the prediction itself when the
inputs carry no target (sampling, forward-only outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.config import Config
from fmtrain.models.adaln import AdaLNSingle, modulate
from fmtrain.models.attention import UlyssesAttention
from fmtrain.models.dit import (
    local_video_tokens,
    pack_stage_output,
    patchify,
    unpack_stage_input,
    unpatchify,
)
from fmtrain.models.init import InitRule
from fmtrain.models.layers import HeadRMSNorm, StageChunk, run_blocks, scatter_to_sequence_parallel
from fmtrain.models.megatron_config import shared_transformer_kwargs
from fmtrain.models.rope import apply_rope_3d, rope_3d_cos_sin
from fmtrain.objectives import flow_matching as fm
from fmtrain.parallel import context as context_parallel

BLOCK_NORM_EPS = 1e-5
"""LayerNorm eps inside the blocks (the release's block default)."""
OUTER_NORM_EPS = 1e-6
"""LayerNorm eps of the caption and final norms, and of the q/k RMSNorms."""
MODULATION_ROWS = 7
"""Rows of the pipeline tensor carrying the conditioning: 6 modulation vectors + the embedded timestep."""


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
    """Fused per-head qkv (column-parallel), q/k RMSNorm, 3D RoPE, SDPA, output (row-parallel).
    Under context parallelism (head-wise, as the Step-Video-T2V report trains it) the rank's
    token slice is rotated with its true positions, then DeepSpeed-Ulysses attends over all
    tokens for 1/cp of the heads."""

    def __init__(self, config: TransformerConfig, axes: tuple[int, ...]):
        super().__init__(config=config)
        self.ulysses = UlyssesAttention(_attend_all) if context_parallel.size() > 1 else None
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
        attended = _attend_all(q, k, v) if self.ulysses is None else self.ulysses(q, k, v)
        out, _ = self.wo(attended.reshape(s, b, -1))
        return out


def _attend_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA: [S, b, n, d] each -> [S, b, n, d]."""
    q, k, v = (y.permute(1, 2, 0, 3).contiguous() for y in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3)


class CrossAttention(MegatronModule):
    """Video queries attend to the text context (q / per-head kv column-parallel, q/k RMSNorm).
    Under context parallelism (sequence-wise) each rank's query slice attends to the whole
    context, which every rank holds: no exchange."""

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


class StepVideoDiT(StageChunk):
    """One pipeline chunk of the DiT: embedders on the first stage, the final layer on the last."""

    BLOCKS = "transformer_blocks"

    def __init__(
        self, cfg: Config, config: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ):
        super().__init__(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        m = cfg.model
        h, dtype = config.hidden_size, config.params_dtype
        self.patch_size, self.in_channels = m.patch_size, m.in_channels
        self.axes = tuple(m.rope_axes)
        self.rope_theta = m.rotary_base
        self.recompute = m.recompute == "full"
        self.sequence_parallel = config.sequence_parallel
        self.tp = config.tensor_model_parallel_size
        self.cp = context_parallel.size()
        if pre_process:
            self.pos_embed = _PatchEmbed(m.in_channels * m.patch_size**2, h, dtype)
            self.adaln_single = AdaLNSingle(h, dtype=dtype)
            self.caption_norm = torch.nn.LayerNorm(
                m.caption_dim, eps=OUTER_NORM_EPS, elementwise_affine=m.caption_norm_affine, dtype=dtype
            )
            self.caption_projection = _CaptionProjection(m.caption_dim, h, dtype)
            self.clip_projection = torch.nn.Linear(m.clip_dim, h, dtype=dtype) if m.clip_dim else None
        self.transformer_blocks = torch.nn.ModuleList(
            [StepVideoBlock(config, self.axes) for _ in range(self.num_stage_layers)]
        )
        if post_process:
            self.norm_out = torch.nn.LayerNorm(h, eps=OUTER_NORM_EPS, elementwise_affine=False, dtype=dtype)
            self.scale_shift_table = torch.nn.Parameter(torch.zeros(2, h, dtype=dtype))
            self.proj_out = torch.nn.Linear(h, m.patch_size**2 * m.in_channels, dtype=dtype)

    # -- forward

    def _embed(self, inputs: DiTInputs):
        """First stage: tokens [S, b, h], context [L, b, h], key mask [b, L], modulation [6, b, h],
        embedded timestep [1, b, h]."""
        dtype = self.pos_embed.proj.weight.dtype
        patches = context_parallel.split(
            patchify(inputs.x_t.to(dtype), self.patch_size), dim=1, what=f"latent grid {inputs.grid}"
        )
        tokens = self.pos_embed.proj(patches).transpose(0, 1)
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
        """Video tokens of this rank between blocks: the CP rank's slice, split over TP under SP."""
        return local_video_tokens(inputs.grid, cp=self.cp, tp=self.tp if self.sequence_parallel else 1)

    def forward(self, inputs: DiTInputs) -> torch.Tensor:
        n_local = self._local_tokens(inputs)
        if self.pre_process:
            x, context, key_mask, modulation, embedded = self._embed(inputs)
            if self.sequence_parallel:
                x = scatter_to_sequence_parallel(x)
        else:
            key_mask = self._key_mask(inputs)
            x, context, modulation, embedded = unpack_stage_input(
                self.input_tensor, (n_local, key_mask.shape[1], MODULATION_ROWS - 1, 1)
            )
        # Under SP each rank modulates a slice of the tokens: sum the modulation's gradient over TP.
        block_modulation = (
            tensor_parallel.copy_to_tensor_model_parallel_region(modulation) if self.sequence_parallel else modulation
        )
        # The positions of this CP rank's tokens (all of them at CP=1).
        cos, sin = (
            context_parallel.split(t, dim=0) for t in rope_3d_cos_sin(inputs.grid, self.axes, self.rope_theta, x.device)
        )
        x = run_blocks(
            self.transformer_blocks,
            x,
            context,
            key_mask,
            block_modulation,
            cos,
            sin,
            recompute=self.recompute and self.training,
        )
        if not self.post_process:
            return pack_stage_output([x, context, modulation, embedded], inputs.pipeline_rows)
        return self._final(x, embedded, inputs)

    def _final(self, x: torch.Tensor, embedded: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        if self.sequence_parallel:
            # Every TP rank runs the (replicated) final layer on all tokens: the backward of the
            # gather is a split, not a reduce-scatter of identical gradients.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        shift, scale = (self.scale_shift_table[:, None, :] + embedded).unbind(0)  # [b, h] each
        patches = self.proj_out(modulate(self.norm_out(x), shift, scale)).transpose(0, 1)  # [b, S/cp, C*p*p]
        if inputs.target is None:
            patches = context_parallel.gather(patches, dim=1)
            return unpatchify(patches, inputs.grid, self.in_channels, self.patch_size).float()
        # Errors over this CP rank's tokens: the sums add up over the CP group.
        target = context_parallel.split(patchify(inputs.target, self.patch_size), dim=1)
        return fm.error_sums(patches, target)


# ----------------------------------------------------------------------------- building


def transformer_config(cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    # The DiT's blocks are fmtrain modules: megatron's fused activation / cross entropy do not apply.
    return TransformerConfig(
        **shared_transformer_kwargs(cfg, params_dtype=params_dtype), add_bias_linear=False, bias_activation_fusion=False
    )


def build_chunk(
    cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
) -> torch.nn.Module:
    return StepVideoDiT(cfg, tconfig, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


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
