"""VideoMAE V2 as megatron modules (one chunk per pipeline stage).

Architecture (official repository OpenGVLab/VideoMAEv2, ``models/modeling_pretrain.py`` and
``modeling_finetune.py``). A clip [3, T, H, W] is cut into 2 x p x p tubelets by a Conv3d
(``encoder.patch_embed.proj``) and given fixed sinusoidal positions; the encoder keeps only the
tokens its tube mask leaves visible and runs pre-norm blocks::

    x = x + Attn(LayerNorm(x))   # fused qkv without bias + learned q and v biases, SDPA, proj
    x = x + MLP(LayerNorm(x))    # fc1 -> GELU -> fc2, with biases

then ``encoder.norm``. ``encoder_to_decoder`` maps to the decoder width; the decoder gets the
visible tokens plus ``mask_token`` at every position it reconstructs (each with its sinusoidal
position), runs its own blocks, and ``decoder.norm`` + ``decoder.head`` predict the pixels of
the mask-token positions. Module and parameter names are the release's, so the official
checkpoints map by name; the fused ``qkv`` is stored per head ([heads, (q, k, v), head_dim])
so that megatron's column-parallel split hands whole heads to each TP rank (the release's
[(q, k, v), heads, head_dim] is permuted on import and export, :mod:`.convert`).

Parallelism. TP: qkv and fc1 column-parallel, proj and fc2 row-parallel, the q / v biases split
with the heads; the patch embedding, norms, ``encoder_to_decoder``, mask token and head are
replicated. SP (with TP): tokens are split over the TP ranks inside the encoder's and the
decoder's blocks; between the two towers every TP rank holds the whole sequence. PP: the
encoder's blocks are split over the stages; the last stage also holds the encoder's norm and
the whole decoder (it is small: 4 blocks of 384-512 wide for every released size), so the only
tensor between stages is the visible tokens [N_visible, b, hidden], the same shape for every
clip. Each stage draws the masks itself from the batch's sample seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from fmtrain.config import Config
from fmtrain.models.init import InitRule
from fmtrain.models.layers import (
    StageChunk,
    run_blocks,
    scatter_to_sequence_parallel,
    sharded_state_dict_with_global_blocks,
)
from fmtrain.models.linear import parallel_linear, runs_unsharded
from fmtrain.models.megatron_config import shared_transformer_kwargs
from fmtrain.models.videomae_v2.config import token_grid
from fmtrain.objectives import mae


@dataclass
class MAEInputs:
    """One microbatch as every pipeline stage sees it."""

    encoder_mask: torch.Tensor
    """[B, N] bool, True = hidden from the encoder (N = every token of the clip)."""
    decoder_mask: torch.Tensor
    """[B, N] bool, True = not reconstructed by the decoder."""
    video: torch.Tensor | None = None
    """[B, 3, T, H, W] normalised pixels (first stage)."""
    target: torch.Tensor | None = None
    """[B, N_decoder, D] reconstruction target of the decoder's tokens (last stage); None: return
    the prediction itself."""


def sinusoid_table(positions: int, width: int) -> torch.Tensor:
    """[positions, width] float32: ``pos / 10000^(2 (j // 2) / width)``, sin at even j, cos at odd
    (the release's ``get_sinusoid_encoding_table``, computed in float64)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(width, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / width)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


class Attention(MegatronModule):
    """Fused per-head qkv (column-parallel, no bias) + q and v biases, SDPA, ``proj`` (row-parallel)."""

    def __init__(self, config: TransformerConfig, qv_bias: bool):
        super().__init__(config=config)
        h, d = config.hidden_size, config.kv_channels
        self.head_dim = d
        self.heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.qkv = ColumnParallelLinear(
            h, 3 * h, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        self.q_bias = self.v_bias = None
        if qv_bias:
            for name in ("q_bias", "v_bias"):
                bias = torch.nn.Parameter(torch.zeros(self.heads * d, dtype=config.params_dtype))
                tensor_parallel.set_tensor_model_parallel_attributes(bias, True, 0, 1)
                setattr(self, name, bias)
        self.proj = RowParallelLinear(
            h,
            h,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return sharded_state_dict_with_global_blocks(
            self, prefix, sharded_offsets, metadata, tensor_parallel_axes={"q_bias": 0, "v_bias": 0}
        )

    def _qkv_bias(self) -> torch.Tensor:
        """The release's ``cat(q_bias, zeros, v_bias)`` in the per-head qkv layout, for the GEMM:
        no separate passes adding q's and v's biases (and none reducing their gradients)."""
        q = self.q_bias.view(self.heads, 1, self.head_dim)
        v = self.v_bias.view(self.heads, 1, self.head_dim)
        return torch.cat((q, torch.zeros_like(q), v), dim=1).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fuse_bias = self.q_bias is not None and runs_unsharded(self.qkv)
        # [S, b, heads_local * 3 * d] (all tokens: SP gathers them)
        qkv = parallel_linear(self.qkv, x, self._qkv_bias() if fuse_bias else None)
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, self.heads, 3, self.head_dim).unbind(3)
        if self.q_bias is not None and not fuse_bias:
            q = q + self.q_bias.view(self.heads, self.head_dim)
            v = v + self.v_bias.view(self.heads, self.head_dim)
        # [S, b, n, d] -> [b, n, S, d]: views on CPU (SDPA reads strides); copies on GPU, where some
        # SDPA backends have mishandled strided views (see fmtrain.models.attention).
        q, k, v = (y.permute(1, 2, 0, 3) for y in (q, k, v))
        if q.is_cuda:
            q, k, v = (y.contiguous() for y in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v)
        return parallel_linear(self.proj, context.permute(2, 0, 1, 3).reshape(s, b, -1))


class Mlp(MegatronModule):
    """``fc1`` (column-parallel) -> GELU -> ``fc2`` (row-parallel), with biases."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        h, f = config.hidden_size, config.ffn_hidden_size
        self.fc1 = ColumnParallelLinear(
            h, f, config=config, init_method=config.init_method, bias=True, gather_output=False
        )
        self.fc2 = RowParallelLinear(
            f,
            h,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x):
        return parallel_linear(self.fc2, F.gelu(parallel_linear(self.fc1, x)))


class Block(MegatronModule):
    def __init__(self, config: TransformerConfig, qv_bias: bool, eps: float):
        super().__init__(config=config)
        h, dtype = config.hidden_size, config.params_dtype
        self.norm1 = torch.nn.LayerNorm(h, eps=eps, dtype=dtype)
        self.attn = Attention(config, qv_bias)
        self.norm2 = torch.nn.LayerNorm(h, eps=eps, dtype=dtype)
        self.mlp = Mlp(config)
        for module in (self.norm1, self.norm2):
            _mark_sequence_parallel(module, config)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _gather_tokens(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    # Every TP rank continues with the whole sequence, computing the same replicated values, so
    # the gather's backward is a split (not a reduce-scatter of identical gradients).
    if not sequence_parallel:
        return x
    return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)


class _PatchEmbed(torch.nn.Module):
    def __init__(self, in_channels: int, hidden: int, tubelet: int, patch: int, dtype):
        super().__init__()
        kernel = (tubelet, patch, patch)
        self.proj = torch.nn.Conv3d(in_channels, hidden, kernel_size=kernel, stride=kernel, dtype=dtype)

    def forward(self, video: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, N, hidden], tokens in (t, h, w) order; with ``tokens`` ([n, B]
        indices of one token per sample per row), only those: [n, B, hidden].

        The tubelets do not overlap, so the Conv3d is a GEMM over them, and the encoder's
        visible tokens (10 % at the usual masking ratio) are embedded alone: their tubelets are
        gathered with the kernel's (C, tubelet, patch, patch) layout and multiplied by it.
        """
        b = video.shape[0]
        sample = None if tokens is None else torch.arange(b, device=tokens.device).expand_as(tokens)
        # DeepSpeed ZeRO-3 gathers the kernel only for the Conv3d's own forward.
        if tokens is None or hasattr(self.proj.weight, "ds_id"):
            every = self.proj(video).flatten(2).transpose(1, 2)
            return every if tokens is None else every[sample, tokens]
        tubelet, patch, _ = self.proj.kernel_size
        picked = mae.gather_tubelets(video, tokens, sample, tubelet, patch)  # [n, B, C, *kernel]
        return F.linear(picked.flatten(2), self.proj.weight.flatten(1), self.proj.bias)


class Encoder(MegatronModule):
    """The encoder part of one stage: patch embedding (first stage), this stage's blocks, the
    final norm (last stage)."""

    def __init__(self, cfg: Config, config: TransformerConfig, *, pre_process, post_process, vp_stage):
        super().__init__(config=config)
        m = cfg.model
        dtype = config.params_dtype
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        if pre_process:
            self.patch_embed = _PatchEmbed(m.in_channels, m.hidden_size, m.tubelet_size, m.patch_size, dtype)
        n = get_num_layers_to_build(config, vp_stage=vp_stage)
        self.blocks = torch.nn.ModuleList([Block(config, m.qv_bias, m.norm_epsilon) for _ in range(n)])
        if post_process:
            self.norm = torch.nn.LayerNorm(m.hidden_size, eps=m.norm_epsilon, dtype=dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return sharded_state_dict_with_global_blocks(
            self, prefix, sharded_offsets, metadata, blocks="blocks", layer_offset=self.layer_offset
        )


class Decoder(MegatronModule):
    def __init__(self, cfg: Config, config: TransformerConfig):
        super().__init__(config=config)
        m = cfg.model
        dtype = config.params_dtype
        self.blocks = torch.nn.ModuleList(
            [Block(config, m.qv_bias, m.norm_epsilon) for _ in range(m.decoder_num_layers)]
        )
        self.norm = torch.nn.LayerNorm(m.decoder_hidden_size, eps=m.decoder_norm_epsilon, dtype=dtype)
        outputs = m.in_channels * m.tubelet_size * m.patch_size**2
        self.head = torch.nn.Linear(m.decoder_hidden_size, outputs, dtype=dtype)

    @property
    def layers(self) -> torch.nn.ModuleList:
        # megatron's schedules take a chunk's ``decoder`` for a GPT decoder and tag each of its
        # ``layers`` with the current microbatch (harmless here).
        return self.blocks

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return sharded_state_dict_with_global_blocks(self, prefix, sharded_offsets, metadata, blocks="blocks")


def decoder_config(cfg: Config, config: TransformerConfig) -> TransformerConfig:
    """The encoder's megatron config at the decoder's width."""
    m = cfg.model
    return dataclasses.replace(
        config,
        hidden_size=m.decoder_hidden_size,
        num_attention_heads=m.decoder_num_attention_heads,
        num_query_groups=m.decoder_num_attention_heads,
        kv_channels=m.decoder_head_dim,
        ffn_hidden_size=m.decoder_ffn_hidden_size,
    )


class VideoMAE(StageChunk):
    """One pipeline chunk: the encoder's share of blocks, and on the last stage the decoder."""

    BLOCKS = None  # the encoder keys its own blocks globally

    def __init__(self, cfg: Config, config: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage):
        super().__init__(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        m = cfg.model
        self.sequence_parallel = config.sequence_parallel
        self.recompute = m.recompute == "full"
        t, h, w = token_grid(cfg)
        tokens = t * h * w
        self.encoder = Encoder(cfg, config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if pre_process:
            self.register_buffer("encoder_pos", sinusoid_table(tokens, m.hidden_size), persistent=False)
        if post_process:
            dtype = config.params_dtype
            self.encoder_to_decoder = torch.nn.Linear(m.hidden_size, m.decoder_hidden_size, bias=False, dtype=dtype)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, m.decoder_hidden_size, dtype=dtype))
            self.decoder = Decoder(cfg, decoder_config(cfg, config))
            self.register_buffer("decoder_pos", sinusoid_table(tokens, m.decoder_hidden_size), persistent=False)

    def forward(self, inputs: MAEInputs) -> torch.Tensor:
        if self.pre_process:
            x = self._embed_visible(inputs)  # [N_visible, b, h]
            if self.sequence_parallel:
                x = scatter_to_sequence_parallel(x)
        else:
            x = self.input_tensor
        x = run_blocks(self.encoder.blocks, x, recompute=self.recompute and self.training)
        if not self.post_process:
            return x
        return self._decode(_gather_tokens(x, self.sequence_parallel), inputs)

    def _embed_visible(self, inputs: MAEInputs) -> torch.Tensor:
        embed = self.encoder.patch_embed
        b = inputs.encoder_mask.shape[0]
        # [N_visible, b]: each clip's visible token indices in (t, h, w) order (as many per clip)
        visible = (~inputs.encoder_mask).nonzero()[:, 1].view(b, -1).t()
        x = embed(inputs.video.to(embed.proj.weight.dtype), visible)
        return x + self.encoder_pos.to(x.dtype)[visible]

    def _decode(self, x: torch.Tensor, inputs: MAEInputs) -> torch.Tensor:
        """Encoder output [N_visible, b, h] (whole) -> per-token errors [b, N_decoder], or the
        prediction [b, N_decoder, D] without a target."""
        x = self.encoder_to_decoder(self.encoder.norm(x)).transpose(0, 1)  # [b, N_visible, h_dec]
        b, _, c = x.shape
        pos = self.decoder_pos.to(x.dtype).expand(b, -1, -1)
        visible_pos = pos[~inputs.encoder_mask].reshape(b, -1, c)
        decoder_pos = pos[~inputs.decoder_mask].reshape(b, -1, c)
        n_out = decoder_pos.shape[1]
        full = torch.cat([x + visible_pos, self.mask_token.to(x.dtype) + decoder_pos], dim=1)
        full = full.transpose(0, 1).contiguous()  # [N_visible + N_decoder, b, h_dec]
        if self.sequence_parallel:
            full = scatter_to_sequence_parallel(full)
        full = run_blocks(self.decoder.blocks, full, recompute=self.recompute and self.training)
        full = _gather_tokens(full, self.sequence_parallel)
        prediction = self.decoder.head(self.decoder.norm(full[-n_out:])).transpose(0, 1)  # [b, N_decoder, D]
        if inputs.target is None:
            return prediction.float()
        return mae.token_errors(prediction, inputs.target)


# ----------------------------------------------------------------------------- building


def transformer_config(cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    # The blocks are fmtrain modules: megatron's fused activation / cross entropy do not apply.
    return TransformerConfig(
        **shared_transformer_kwargs(cfg, params_dtype=params_dtype), add_bias_linear=True, bias_activation_fusion=False
    )


def build_chunk(
    cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
) -> torch.nn.Module:
    return VideoMAE(cfg, tconfig, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def init_rule(cfg: Config):
    """The release's initialisation: Xavier-uniform linear weights (the fused qkv as one
    [3h, h] matrix), zero biases, LayerNorms at 1 / 0, the mask token N(0, std), and the
    patch embedding's Conv3d N(0, 1 / fan_in)."""
    std = cfg.model.init_method_std

    def rule(key: str) -> InitRule:
        if key == "mask_token":
            return InitRule("normal", std)
        if key.endswith("bias"):
            return InitRule("zeros")
        if key.split(".")[-2].startswith("norm"):
            return InitRule("ones")
        if key.endswith("patch_embed.proj.weight"):
            return InitRule("fan_in", 1.0)
        return InitRule("xavier_uniform", 1.0)

    return rule


__all__ = ["MAEInputs", "VideoMAE", "build_chunk", "init_rule", "sinusoid_table", "transformer_config"]
