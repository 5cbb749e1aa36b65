"""The Step-Video-T2V Video-VAE as trainable torch modules, parameter names equal to the release's.

Architecture (official repository stepfun-ai/Step-Video-T2V, ``stepvideo/vae/vae.py``,
``AutoencoderKL``; "Step-Video-T2V Technical Report", arXiv 2502.10248, section 4.1). Tensors
are [B, C, T, H, W] with pixels in [-1, 1]. Every convolution over time is causal (the time
padding is all in front), every GroupNorm normalises each frame on its own (v2) and the
mid-block attention is causal over the frame-major token order, so a latent frame depends only
on the frames up to its own.

Encoder (ch 32, mults 4, 8, 16, 16; two ResNet blocks per level)::

    conv_in -> [level 0: 2 blocks, 2D stride-2 down] [level 1: blocks, 3D stride-2 down]
            -> [level 2: blocks, 3D down] [level 3: blocks] -> mid (block, attention, block)
    v2:  GroupNorm+SiLU -> conv_patchify (conv, 3D pixel unshuffle x2) + shortcut_pathify
         (pixel unshuffle, channel averaging) -> conv_out + shortcut_out (channel averaging)
    v1:  GroupNorm+SiLU -> conv_out

so a frame count 1 + 8k becomes 1 + k latent frames and 16x16 pixels one latent pixel (v2;
v1: 1 + 4k -> 1 + k, 8x8). The output is [B, 2 z, T', H', W']: mean and log-variance of a
diagonal Gaussian (log-variance clamped to [-30, 20] as the release does).

Decoder (ch 128, mults 1, 2, 4, 4; three ResNet blocks per level), the mirror: v2 conv_in +
shortcut_in (channel duplication) -> conv_unpatchify (conv, 3D pixel shuffle) +
shortcut_unpathify (duplication, shuffle) -> mid -> levels 3, 2 (3D nearest up + a residual
conv pair), level 1 (2D up), level 0 -> GroupNorm+SiLU -> conv_out, dropping the first three
output frames (what causal time upsampling adds in front).

Checkpoint keys are the module names of the official code, with one exception the release
itself makes: ``decoder.conv_out`` holds its weight directly (the official loader renames
``decoder.conv_out.`` to ``decoder.conv_out.conv.``), so ``vae_v2.safetensors`` loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmtrain.models.vae_modules import LOGVAR_RANGE, NORM_GROUPS, LatentVAE, PatchDiscriminator3D, per_frame, run_block


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


class CausalConv(nn.Module):
    """Conv3d whose time padding is all in front (``dilation * (k - 1)`` frames, plus one less
    stride-1 frame), spatial padding ``k // 2`` on both sides; the weight is ``conv.weight``."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size, stride=1):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        stride = stride if isinstance(stride, (tuple, list)) else (stride, 1, 1)
        time_pad = kt - 1 + max(1 - stride[0], 0)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, time_pad, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class CausalConvFlat(nn.Conv3d):
    """:class:`CausalConv` holding its weight itself (the release's ``decoder.conv_out``)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int):
        super().__init__(chan_in, chan_out, kernel_size)
        k = kernel_size
        self.causal_padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_padding))


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, per_frame: bool, silu: bool = False) -> torch.Tensor:
    """GroupNorm of [B, C, T, H, W], over each frame on its own (v2) or over the whole clip (v1).

    Through the norm's own forward: ZeRO-3 gathers a module's parameters for its forward only."""
    if per_frame:
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        out = norm(frames)
        out = out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
    else:
        out = norm(x)
    return F.silu(out) if silu else out


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, causal 3x3x3 conv, twice, plus the input (a 1x1x1 conv when widths differ)."""

    def __init__(self, chan_in: int, chan_out: int, per_frame_norm: bool):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.norm1 = nn.GroupNorm(NORM_GROUPS, chan_in)
        self.conv1 = CausalConv(chan_in, chan_out, 3)
        self.norm2 = nn.GroupNorm(NORM_GROUPS, chan_out)
        self.conv2 = CausalConv(chan_out, chan_out, 3)
        if chan_in != chan_out:
            self.nin_shortcut = CausalConv(chan_in, chan_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm(x, self.norm1, self.per_frame_norm, silu=True))
        h = self.conv2(group_norm(h, self.norm2, self.per_frame_norm, silu=True))
        return h + (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """One-head attention over all tokens of the clip, causal in frame-major raster order."""

    def __init__(self, channels: int, per_frame_norm: bool):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.norm = nn.GroupNorm(NORM_GROUPS, channels)
        self.q = CausalConv(channels, channels, 1)
        self.k = CausalConv(channels, channels, 1)
        self.v = CausalConv(channels, channels, 1)
        self.proj_out = CausalConv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = group_norm(x, self.norm, self.per_frame_norm)
        b, c, t, hh, ww = h.shape
        # [B, C, T, H, W] -> [B, 1, T*H*W, C]
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, t, hh, ww)
        return x + self.proj_out(out)


class Downsample2D(nn.Module):
    """Per frame: pad right and bottom by one, 3x3 conv with stride 2 (``conv`` is a Conv2d)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class Downsample3D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv(channels, channels, 3, stride=(2, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Per frame: nearest x2, 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class Res3DBlockUpsample(nn.Module):
    """``silu(norm2(conv2(silu(norm1(conv1(x))))) + x) + x``: the residual pair after 3D upsampling."""

    def __init__(self, channels: int, per_frame_norm: bool):
        super().__init__()
        self.per_frame_norm = per_frame_norm
        self.conv1 = CausalConv(channels, channels, 3)
        self.norm1 = nn.GroupNorm(NORM_GROUPS, channels)
        self.conv2 = CausalConv(channels, channels, 3)
        self.norm2 = nn.GroupNorm(NORM_GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = group_norm(self.conv1(x), self.norm1, self.per_frame_norm, silu=True)
        h = group_norm(self.conv2(h), self.norm2, self.per_frame_norm)
        return F.silu(h + x) + x


class Upsample3D(nn.Module):
    """Nearest x2 in time, height and width, then :class:`Res3DBlockUpsample`."""

    def __init__(self, channels: int, per_frame_norm: bool):
        super().__init__()
        self.conv3d = Res3DBlockUpsample(channels, per_frame_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*f^3, (T+f-1)/f, H/f, W/f], time padded in front by f-1 zero frames
    (channel order: c, then the (t, h, w) offsets)."""
    x = F.pad(x, (0, 0, 0, 0, factor - 1, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor**3, t // factor, h // factor, w // factor)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse arrangement: [B, C*f^3, T, H, W] -> [B, C, T*f - (f-1), H*f, W*f] (the first
    f-1 frames, the causal padding, dropped)."""
    b, c, t, h, w = x.shape
    x = x.view(b, c // factor**3, factor, factor, factor, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // factor**3, t * factor, h * factor, w * factor)
    return x[:, :, factor - 1 :]


def unshuffle_average(x: torch.Tensor, channels_out: int, factor: int) -> torch.Tensor:
    """Pixel unshuffle, then the mean of consecutive channel groups down to ``channels_out``
    (the encoder's parameter-free shortcuts)."""
    x = pixel_unshuffle_3d(x, factor)
    b, c, t, h, w = x.shape
    return x.view(b, channels_out, c // channels_out, t, h, w).mean(dim=2)


def duplicate_shuffle(x: torch.Tensor, channels_out: int, factor: int) -> torch.Tensor:
    """Repeat every channel, then pixel shuffle to ``channels_out`` (the decoder's shortcuts)."""
    repeats = channels_out * factor**3 // x.shape[1]
    return pixel_shuffle_3d(x.repeat_interleave(repeats, dim=1), factor)


class ConvUnshuffle(nn.Module):
    """Causal 3x3x3 conv to ``channels_out / f^3``, then 3D pixel unshuffle (``conv_patchify``)."""

    def __init__(self, chan_in: int, channels_out: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, channels_out // factor**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_3d(self.conv(x), self.factor)


class ConvShuffle(nn.Module):
    """Causal 3x3x3 conv to ``channels_out * f^3``, then 3D pixel shuffle (``conv_unpatchify``)."""

    def __init__(self, chan_in: int, channels_out: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv(chan_in, channels_out * factor**3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), self.factor)


class _Level(nn.Module):
    """A resolution level: ``block`` (ResNet blocks), an empty ``attn`` (the release's slot) and
    ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, per_frame_norm: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, per_frame_norm)
        self.attn_1 = AttnBlock(channels, per_frame_norm)
        self.block_2 = ResnetBlock(channels, channels, per_frame_norm)


class VideoEncoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        temporal_down_levels: list[int],
        version: int,
    ):
        super().__init__()
        per_frame_norm = version == 2
        self.version, self.recompute = version, False
        self.conv_in = CausalConv(in_channels, ch, 3)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, per_frame_norm))
                block_in = block_out
            down = _Level(blocks)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample3D(block_in) if level in temporal_down_levels else Downsample2D(block_in)
            self.down.append(down)
        self.mid = _Mid(block_in, per_frame_norm)
        self.norm_out = nn.GroupNorm(NORM_GROUPS, block_in)
        self.z_out = 2 * z_channels
        if version == 2:
            self.patch_channels = 4 * z_channels * 2**3
            self.conv_patchify = ConvUnshuffle(block_in, self.patch_channels, 2)
            self.conv_out = CausalConv(self.patch_channels, self.z_out, 3)
        else:
            self.conv_out = CausalConv(block_in, self.z_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] pixels -> [B, 2z, T', H', W'] posterior moments (mean, log-variance)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = run_block(block, self.recompute, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_block(self.mid.block_1, self.recompute, h)
        h = run_block(self.mid.attn_1, self.recompute, h)
        h = run_block(self.mid.block_2, self.recompute, h)
        h = group_norm(h, self.norm_out, self.version == 2, silu=True)
        if self.version == 2:
            h = self.conv_patchify(h) + unshuffle_average(h, self.patch_channels, 2)
            return self.conv_out(h) + unshuffle_average(h, self.z_out, 1)
        return self.conv_out(h)


class VideoDecoder(nn.Module):
    def __init__(
        self,
        *,
        out_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        temporal_up_levels: list[int],
        version: int,
    ):
        super().__init__()
        per_frame_norm = version == 2
        self.version, self.recompute = version, False
        block_in = self.block_in = ch * ch_mult[-1]
        if version == 2:
            self.patch_channels = 4 * z_channels * 2**3
            self.conv_in = CausalConv(z_channels, self.patch_channels, 3)
            self.conv_unpatchify = ConvShuffle(self.patch_channels, block_in, 2)
        else:
            self.conv_in = CausalConv(z_channels, block_in, 3)
        self.mid = _Mid(block_in, per_frame_norm)
        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, per_frame_norm))
                block_in = block_out
            up = _Level(blocks)
            if level != 0:
                up.upsample = (
                    Upsample3D(block_in, per_frame_norm) if level in temporal_up_levels else Upsample2D(block_in)
                )
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(NORM_GROUPS, block_in)
        self.conv_out = CausalConvFlat(block_in, out_channels, 3)
        # What causal time upsampling puts in front: one frame less than the time compression.
        self.leading_frames = 2 ** len(temporal_up_levels) - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z, T', H', W'] latents -> [B, 3, T, H, W] pixels."""
        h = self.conv_in(z)
        if self.version == 2:
            h = h + duplicate_shuffle(z, self.patch_channels, 1)
            h = self.conv_unpatchify(h) + duplicate_shuffle(h, self.block_in, 2)
        h = run_block(self.mid.block_1, self.recompute, h)
        h = run_block(self.mid.attn_1, self.recompute, h)
        h = run_block(self.mid.block_2, self.recompute, h)
        for level in reversed(self.up):
            for block in level.block:
                h = run_block(block, self.recompute, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(group_norm(h, self.norm_out, self.version == 2, silu=True))
        return h[:, :, self.leading_frames :]


class VideoVAE(LatentVAE):
    """``encoder`` + ``decoder``; the posterior and the forward are :class:`~fmtrain.models.vae_modules.LatentVAE`'s,
    the chunked / tiled paths :mod:`fmtrain.models.vae_codec`."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        z_channels: int = 64,
        version: int = 2,
        encoder_ch: int = 32,
        encoder_ch_mult: list[int] = (4, 8, 16, 16),
        decoder_ch: int = 128,
        decoder_ch_mult: list[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_down_levels: list[int] = (1, 2),
        temporal_up_levels: list[int] = (2, 3),
    ):
        super().__init__()
        self.z_channels, self.version = z_channels, version
        self.encoder = VideoEncoder(
            in_channels=in_channels,
            z_channels=z_channels,
            ch=encoder_ch,
            ch_mult=list(encoder_ch_mult),
            num_res_blocks=num_res_blocks,
            temporal_down_levels=list(temporal_down_levels),
            version=version,
        )
        self.decoder = VideoDecoder(
            out_channels=in_channels,
            z_channels=z_channels,
            ch=decoder_ch,
            ch_mult=list(decoder_ch_mult),
            num_res_blocks=num_res_blocks,
            temporal_up_levels=list(temporal_up_levels),
            version=version,
        )
        spatial_down = 2 ** (len(encoder_ch_mult) - 1) * (2 if version == 2 else 1)
        temporal_down = 2 ** len(temporal_down_levels) * (2 if version == 2 else 1)
        self.spatial_compression, self.temporal_compression = spatial_down, temporal_down

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight


__all__ = [
    "AttnBlock",
    "CausalConv",
    "LOGVAR_RANGE",
    "PatchDiscriminator3D",
    "ResnetBlock",
    "VideoDecoder",
    "VideoEncoder",
    "VideoVAE",
    "pixel_shuffle_3d",
    "pixel_unshuffle_3d",
]
