"""LaVin-DiT's joint diffusion transformer (J-DiT) as megatron modules (one chunk per virtual
pipeline stage).

Architecture ("LaVin-DiT: Large Vision Diffusion Transformer", Wang et al., CVPR 2025; official
repository DerrickWang005/LaVin-DiT, ``lib/model/dit.py``, ``lib/model/blocks.py``). Two token
streams over ST-VAE latents cut into 2 x 2 patches: the *condition* (the latents of K example
(input, output) pairs and the query, concatenated along time) and the *target* (the noised
latent of the query's output). Each stream has its own patch embedder (Linear + LayerNorm), its
own conditioning vector (the timestep embedding plus a learned ``prompt_embed`` / ``answer_embed``)
and, in every block, its own q/k/v/out projections and SwiGLU MLP::

    scale_a, gate_a, scale_m, gate_m = Linear(SiLU(t_stream))                # per stream
    y = RMSNorm(x) * (1 + scale_a)                                           # no affine
    q, k, v = RMSNorm_q(W_q y), RMSNorm_k(W_k y), W_v y                      # full-width q/k norms
    attention over [condition ; target] jointly (GQA, non-causal), 3D RoPE over the joint
        (T_cond + T_target, H, W) grid
    x = x + tanh(gate_a) * RMSNorm(W_out a)                                  # sandwich norm
    x = x + tanh(gate_m) * RMSNorm(SwiGLU(RMSNorm(x) * (1 + scale_m)))

The final layer (target stream only) is RMSNorm, ``(1 + scale)`` from ``t_target``, and a
zero-initialised linear back to patches. Module and parameter names are the release's
(``blocks.N.joint_attn.cond_q.weight`` ...), so released weights load without renaming.

The release's RoPE shifts the frame positions of a one-frame grid by a random offset; a joint
grid always has at least two frames (condition and target), so that never applies here.

Parallelism. Tensor parallel: q/k/v, the SwiGLU gate/up projections column-parallel (whole
query and key/value heads per rank), the output and down projections row-parallel; the q/k
RMSNorms normalise over the full projection width, so each rank's sum of squares is all-reduced
over TP (:class:`FullWidthRMSNorm`). Embedders, modulation and the final layer are replicated.
Sequence parallel (with TP): each stream's tokens are split over the TP ranks between blocks;
a block gathers a stream once for q, k and v (and once for the MLP), and its row-parallel
outputs reduce-scatter back; the per-sample modulation is applied to a slice of the tokens, so
its gradient is summed over TP. Pipeline: blocks are split over stages; a stage sends
[condition tokens ; target tokens ; t_cond ; t_target] (:mod:`fmtrain.models.dit` packing).

Objective (:mod:`fmtrain.objectives.flow_matching`, drawn in :mod:`.family`): the last stage
returns per-sample error sums of the target stream's velocity against the target, or the
prediction itself when the inputs carry no target (sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from fmtrain.config import Config
from fmtrain.models.adaln import timestep_sinusoid
from fmtrain.models.dit import (
    local_video_tokens,
    pack_stage_output,
    patchify,
    unpack_stage_input,
    unpatchify,
)
from fmtrain.models.init import InitRule
from fmtrain.models.lavin_dit.sizes import TIMESTEP_FEATURES
from fmtrain.models.layers import StageChunk, run_blocks, scatter_to_sequence_parallel
from fmtrain.models.linear import parallel_linear
from fmtrain.models.megatron_config import shared_transformer_kwargs
from fmtrain.models.rope import apply_rope_3d, rope_3d_cos_sin
from fmtrain.objectives import flow_matching as fm

CONDITIONING_ROWS = 2
"""Rows of the pipeline tensor carrying the two streams' conditioning vectors."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class JointInputs:
    """One microbatch as every pipeline stage sees it (tensors on the model's device)."""

    cond_grid: tuple[int, int, int]
    """Condition token grid (T_cond, H/p, W/p)."""
    target_grid: tuple[int, int, int]
    """Target token grid (T_target, H/p, W/p)."""
    t: torch.Tensor
    """[b] flow time in [0, 1]."""
    condition: torch.Tensor | None = None
    """[b, C, T_cond, H, W] clean condition latents (first stage)."""
    x_t: torch.Tensor | None = None
    """[b, C, T_target, H, W] noised target latents (first stage)."""
    target: torch.Tensor | None = None
    """[b, C, T_target, H, W] velocity target (last stage); None: return the prediction."""
    pipeline_rows: int | None = None
    """Rows of the tensor sent between pipeline stages (this TP rank's), when padded."""


# ----------------------------------------------------------------------------- layers


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without affine over the last dimension, in fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def enter_tensor_parallel(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """A stream's full input to the column-parallel projections that read it (which run with
    their own input handling disabled): gathered from the sequence-parallel slices (backward:
    reduce-scatter), or under plain TP copied (backward: all-reduce of the partial gradients)."""
    if sequence_parallel:
        return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return tensor_parallel.copy_to_tensor_model_parallel_region(x)
    return x


def _column(config: TransformerConfig, in_features: int, out_features: int) -> ColumnParallelLinear:
    """A column-parallel projection of an input :func:`enter_tensor_parallel` prepared, so q, k
    and v (or gate and up) of one stream share one gather."""
    layer = ColumnParallelLinear(
        in_features,
        out_features,
        config=config,
        init_method=config.init_method,
        bias=False,
        gather_output=False,
        disable_grad_reduce=True,
    )
    layer.sequence_parallel = False
    return layer


def _row(config: TransformerConfig, in_features: int, out_features: int) -> RowParallelLinear:
    return RowParallelLinear(
        in_features,
        out_features,
        config=config,
        init_method=config.output_layer_init_method,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )


class FullWidthRMSNorm(torch.nn.Module):
    """RMSNorm over a projection's full width (all heads: the release normalises q and k before
    splitting them into heads) while each tensor-parallel rank holds its own heads: the sum of
    squares is all-reduced over TP (forward and backward), and the weight is split with the heads."""

    def __init__(self, config: TransformerConfig, full_width: int, eps: float):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.full_width, self.eps, self.tp = full_width, eps, tp
        self.weight = torch.nn.Parameter(torch.ones(full_width // tp, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        squares = xf.square().sum(dim=-1, keepdim=True)
        if self.tp > 1:
            from torch.distributed.nn.functional import all_reduce

            squares = all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        normed = xf * torch.rsqrt(squares / self.full_width + self.eps)
        return normed.to(x.dtype) * self.weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(keep_vars=True), prefix, {"weight": 0}, sharded_offsets
        )


class JointAttention(MegatronModule):
    """Per-stream q/k/v (GQA) with full-width q/k RMSNorm, attention over both streams at once,
    per-stream output projections (``joint_attn.{cond,x}_{q,k,v,qnorm,knorm,proj}``)."""

    def __init__(self, config: TransformerConfig, axes: tuple[int, int, int], eps: float):
        super().__init__(config=config)
        h, d = config.hidden_size, config.kv_channels
        heads, groups = config.num_attention_heads, config.num_query_groups
        self.head_dim, self.axes = d, axes
        self.sequence_parallel = config.sequence_parallel
        for stream in ("cond", "x"):
            self.add_module(f"{stream}_q", _column(config, h, heads * d))
            self.add_module(f"{stream}_k", _column(config, h, groups * d))
            self.add_module(f"{stream}_v", _column(config, h, groups * d))
            self.add_module(f"{stream}_qnorm", FullWidthRMSNorm(config, heads * d, eps))
            self.add_module(f"{stream}_knorm", FullWidthRMSNorm(config, groups * d, eps))
            self.add_module(f"{stream}_proj", _row(config, heads * d, h))

    def _qkv(self, stream: str, x: torch.Tensor, *, queries: bool = True):
        """[S, b, h] -> q [S, b, heads_local, d] (None without ``queries``), k and v
        [S, b, groups_local, d]."""
        full = enter_tensor_parallel(x, self.sequence_parallel)
        s, b = full.shape[:2]

        def project(name: str) -> torch.Tensor:
            return parallel_linear(getattr(self, f"{stream}_{name}"), full)

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(s, b, -1, self.head_dim)

        k = heads(getattr(self, f"{stream}_knorm")(project("k")))
        v = heads(project("v"))
        if not queries:
            return None, k, v
        q = heads(getattr(self, f"{stream}_qnorm")(project("q")))
        return q, k, v

    def forward(
        self, cond: torch.Tensor, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *, cond_out: bool = True
    ):
        """(condition stream's output, or None when ``cond_out`` is false, target stream's output).
        Without ``cond_out`` only the target's tokens query (the condition still gives keys and
        values), which is all a last block needs."""
        cq, ck, cv = self._qkv("cond", cond, queries=cond_out)
        xq, xk, xv = self._qkv("x", x)
        n_cond = ck.shape[0]
        cos, sin = rope
        if cond_out:
            q = apply_rope_3d(torch.cat([cq, xq]), cos, sin, self.axes)
        else:
            q = apply_rope_3d(xq, cos[n_cond:], sin[n_cond:], self.axes)
        k = apply_rope_3d(torch.cat([ck, xk]), cos, sin, self.axes)
        v = torch.cat([cv, xv])
        q, k, v = (y.permute(1, 2, 0, 3) for y in (q, k, v))  # [b, heads, S, d]
        # Query head i reads key/value head i // (heads / groups), on every TP rank alike.
        attended = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        attended = attended.permute(2, 0, 1, 3).flatten(2)  # [S_q, b, heads_local * d]
        if not cond_out:
            return None, parallel_linear(self.x_proj, attended)
        return parallel_linear(self.cond_proj, attended[:n_cond]), parallel_linear(self.x_proj, attended[n_cond:])


class SwiGLU(MegatronModule):
    """``down_proj(SiLU(gate_proj(x)) * up_proj(x))``, no bias."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        h, f = config.hidden_size, config.ffn_hidden_size
        self.sequence_parallel = config.sequence_parallel
        self.gate_proj = _column(config, h, f)
        self.down_proj = _row(config, f, h)
        self.up_proj = _column(config, h, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = enter_tensor_parallel(x, self.sequence_parallel)
        hidden = F.silu(parallel_linear(self.gate_proj, full)) * parallel_linear(self.up_proj, full)
        return parallel_linear(self.down_proj, hidden)


def _modulation(hidden: int, chunks: int, dtype) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden, chunks * hidden, dtype=dtype))


class JointBlock(MegatronModule):
    """One J-DiT block. The model's last block (``last``) updates only the target stream: its
    condition-stream output feeds nothing (the final layer reads the target), so its output
    projection and MLP are skipped (their weights, unused in the release too, get no gradient)."""

    def __init__(self, config: TransformerConfig, axes: tuple[int, int, int], eps: float, *, last: bool = False):
        super().__init__(config=config)
        h, dtype = config.hidden_size, config.params_dtype
        self.eps, self.last = eps, last
        self.sequence_parallel = config.sequence_parallel
        self.joint_attn = JointAttention(config, axes, eps)
        self.cond_mlp = SwiGLU(config)
        self.x_mlp = SwiGLU(config)
        self.cond_modulation = _modulation(h, 4, dtype)
        self.x_modulation = _modulation(h, 4, dtype)

    def _scales_and_gates(self, modulation: torch.nn.Module, t: torch.Tensor):
        """t [1, b, h] -> (scale_attn, gate_attn, scale_mlp, gate_mlp), each [1, b, h], gates tanh'd."""
        mod = modulation(t)
        if self.sequence_parallel:
            # The vectors modulate this rank's slice of the tokens: sum their gradient over TP.
            mod = tensor_parallel.copy_to_tensor_model_parallel_region(mod)
        scale_a, gate_a, scale_m, gate_m = mod.view(*t.shape[:2], 4, -1).unbind(2)
        return scale_a, gate_a.tanh(), scale_m, gate_m.tanh()

    def forward(self, cond, x, t_cond, t_x, rope_cos, rope_sin):
        """cond [S_c, b, h], x [S_x, b, h] (this rank's slices under SP); t_* [1, b, h]."""
        c_scale_a, c_gate_a, c_scale_m, c_gate_m = self._scales_and_gates(self.cond_modulation, t_cond)
        x_scale_a, x_gate_a, x_scale_m, x_gate_m = self._scales_and_gates(self.x_modulation, t_x)
        cond_a, x_a = self.joint_attn(
            _rms(cond, self.eps) * (1 + c_scale_a),
            _rms(x, self.eps) * (1 + x_scale_a),
            (rope_cos, rope_sin),
            cond_out=not self.last,
        )
        x = x + x_gate_a * _rms(x_a, self.eps)
        x = x + x_gate_m * _rms(self.x_mlp(_rms(x, self.eps) * (1 + x_scale_m)), self.eps)
        if self.last:
            return cond, x
        cond = cond + c_gate_a * _rms(cond_a, self.eps)
        return cond + c_gate_m * _rms(self.cond_mlp(_rms(cond, self.eps) * (1 + c_scale_m)), self.eps), x


class TimestepMLP(torch.nn.Module):
    """``t_embedder``: the 256-wide sinusoid of t in [0, 1] ([cos, sin], max period 1e4) ->
    ``mlp.0`` -> SiLU -> ``mlp.2``."""

    def __init__(self, hidden: int, dtype):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(TIMESTEP_FEATURES, hidden, dtype=dtype),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden, dtype=dtype),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, TIMESTEP_FEATURES).to(self.mlp[0].weight.dtype))


class FinalLayer(torch.nn.Module):
    """``final_layer``: RMSNorm (no affine) scaled by ``1 + adaLN_modulation(t_target)``, then
    ``linear`` to the patch features."""

    def __init__(self, hidden: int, out_features: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.linear = torch.nn.Linear(hidden, out_features, dtype=dtype)
        self.adaLN_modulation = _modulation(hidden, 1, dtype)  # noqa: N815 (the release's name)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(_rms(x, self.eps) * (1 + self.adaLN_modulation(t)))


def _patch_embedder(in_features: int, hidden: int, eps: float, dtype) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden, dtype=dtype), torch.nn.LayerNorm(hidden, eps=eps, dtype=dtype)
    )


class LaVinDiT(StageChunk):
    """One pipeline chunk of the J-DiT: embedders on the first stage, the final layer on the last."""

    def __init__(
        self, cfg: Config, config: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ):
        super().__init__(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        m = cfg.model
        h, dtype = config.hidden_size, config.params_dtype
        self.patch_size, self.in_channels = m.patch_size, m.in_channels
        self.axes = m.axes
        self.rope_theta = m.rotary_base
        self.eps = m.norm_epsilon
        self.recompute = m.recompute == "full"
        self.sequence_parallel = config.sequence_parallel
        self.tp = config.tensor_model_parallel_size
        patch_features = m.in_channels * m.patch_size**2
        if pre_process:
            self.cond_embedder = _patch_embedder(patch_features, h, m.embed_norm_epsilon, dtype)
            self.x_embedder = _patch_embedder(patch_features, h, m.embed_norm_epsilon, dtype)
            self.prompt_embed = torch.nn.Parameter(torch.zeros(1, h, dtype=dtype))
            self.answer_embed = torch.nn.Parameter(torch.zeros(1, h, dtype=dtype))
            self.t_embedder = TimestepMLP(h, dtype)
        self.blocks = torch.nn.ModuleList(
            [
                JointBlock(config, self.axes, self.eps, last=self.layer_offset + i == m.num_layers - 1)
                for i in range(self.num_stage_layers)
            ]
        )
        if post_process:
            self.final_layer = FinalLayer(h, patch_features, self.eps, dtype)

    # -- forward

    def _local_tokens(self, grid: tuple[int, int, int], what: str) -> int:
        return local_video_tokens(grid, cp=1, tp=self.tp if self.sequence_parallel else 1, what=what)

    def _embed(self, inputs: JointInputs):
        """First stage: condition tokens [S_c, b, h], target tokens [S_x, b, h], and the two
        streams' conditioning vectors [1, b, h]."""
        dtype = self.x_embedder[0].weight.dtype
        p = self.patch_size
        cond = self.cond_embedder(patchify(inputs.condition.to(dtype), p, channels_last=True)).transpose(0, 1)
        x = self.x_embedder(patchify(inputs.x_t.to(dtype), p, channels_last=True)).transpose(0, 1)
        t = self.t_embedder(inputs.t)
        return cond, x, (t + self.prompt_embed).unsqueeze(0), (t + self.answer_embed).unsqueeze(0)

    def forward(self, inputs: JointInputs) -> torch.Tensor:
        n_cond = self._local_tokens(inputs.cond_grid, "condition latent grid")
        n_x = self._local_tokens(inputs.target_grid, "target latent grid")
        if self.pre_process:
            cond, x, t_cond, t_x = self._embed(inputs)
            if self.sequence_parallel:
                cond = scatter_to_sequence_parallel(cond)
                x = scatter_to_sequence_parallel(x)
        else:
            cond, x, t_cond, t_x = unpack_stage_input(self.input_tensor, (n_cond, n_x, 1, 1))
        tc, h, w = inputs.cond_grid
        joint_grid = (tc + inputs.target_grid[0], h, w)
        cos, sin = rope_3d_cos_sin(joint_grid, self.axes, self.rope_theta, x.device)
        cond, x = run_blocks(self.blocks, (cond, x), t_cond, t_x, cos, sin, recompute=self.recompute and self.training)
        if not self.post_process:
            return pack_stage_output([cond, x, t_cond, t_x], inputs.pipeline_rows)
        return self._final(x, t_x, inputs)

    def _final(self, x: torch.Tensor, t_x: torch.Tensor, inputs: JointInputs) -> torch.Tensor:
        if self.sequence_parallel:
            # Every TP rank runs the (replicated) final layer on all target tokens.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        patches = self.final_layer(x, t_x).transpose(0, 1)  # [b, S_x, C*p*p] in (p, q, c) order
        if inputs.target is None:
            return unpatchify(
                patches, inputs.target_grid, self.in_channels, self.patch_size, channels_last=True
            ).float()
        return fm.error_sums(patches, patchify(inputs.target, self.patch_size, channels_last=True))


# ----------------------------------------------------------------------------- building


def transformer_config(cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    # The J-DiT's blocks are fmtrain modules: megatron's fused activation / cross entropy do not apply.
    return TransformerConfig(
        **shared_transformer_kwargs(cfg, params_dtype=params_dtype),
        num_query_groups=cfg.model.num_query_groups,
        add_bias_linear=False,
        bias_activation_fusion=False,
    )


def build_chunk(
    cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
) -> torch.nn.Module:
    return LaVinDiT(cfg, tconfig, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


_ZERO_INIT = ("cond_modulation.1.weight", "x_modulation.1.weight", "final_layer.linear.weight")
_ZERO_INIT += ("final_layer.adaLN_modulation.1.weight",)


def init_rule(cfg: Config) -> Callable[[str], InitRule]:
    """The release's ``initialize_weights``: Xavier-uniform linear weights, zero biases, N(0, 0.02)
    for the type embeddings and the timestep MLP, zero modulation layers and final projection
    (each block starts as the identity and the model predicts zero), ones for norm weights."""
    std = cfg.model.init_method_std

    def rule(key: str) -> InitRule:
        if key.endswith("bias") or key.endswith(_ZERO_INIT):
            return InitRule("zeros")
        if key.endswith(("norm.weight", "embedder.1.weight")):  # q/k RMSNorms, the embedders' LayerNorms
            return InitRule("ones")
        if key in ("prompt_embed", "answer_embed") or key.startswith("t_embedder."):
            return InitRule("normal", std)
        return InitRule("xavier_uniform", 1.0)

    return rule


__all__ = [
    "CONDITIONING_ROWS",
    "FullWidthRMSNorm",
    "JointInputs",
    "LaVinDiT",
    "build_chunk",
    "init_rule",
    "transformer_config",
]
