"""LaVin-DiT's ST-VAE as trainable torch modules, parameter names equal to the release's.

Architecture (official repository DerrickWang005/LaVin-DiT, ``lib/model/vae3d.py``,
``AutoencoderKLSTVAE``; "LaVin-DiT: Large Vision Diffusion Transformer", Wang et al., CVPR
2025, arXiv 2411.11505): a CogVideoX-style causal 3D autoencoder. Tensors are [B, C, T, H, W],
pixels in [-1, 1].

- Causal convolution (``conv_in``, the ResNet convs, ``conv_out``): a 3x3x3 Conv3d whose time
  padding is the first frame repeated in front (no zero frames: a clip's first frame looks like
  a still image to the kernel), zeros around each frame.
- ResNet block: GroupNorm (eps 1e-6), SiLU, causal conv, twice, plus the input (a 1x1x1 Conv3d
  when the width changes). The decoder's blocks normalise with a spatial norm (CogVideoX's
  ``SpatialNorm3D``: GroupNorm of the features times ``conv_y(zq)`` plus ``conv_b(zq)``, where
  ``zq`` is the decoder's input latent resized to the features, first frame on its own).
- Encoder: ``conv_in``, then per level ``layers_per_block`` blocks and, but for the last level, a
  downsampler (pad right / bottom, 3x3 stride-2 Conv2d per frame); the first log2(temporal
  compression) levels first average frame pairs, keeping the first frame apart when the count is
  odd (17 -> 9 -> 5). Then two mid blocks, GroupNorm, SiLU, ``conv_out`` to 2 z channels: the
  mean and log-variance of a diagonal Gaussian.
- Decoder, the mirror: ``conv_in``, two mid blocks, per level ``layers_per_block + 1`` blocks and
  an upsampler (nearest x2, 3x3 Conv2d per frame), the deepest log2(temporal compression) ones
  nearest-doubling time too except the first frame (5 -> 9 -> 17); spatial norm, SiLU,
  ``conv_out``.

GroupNorm normalises over the whole clip (time included), as the release does, so within one
encode a latent frame's statistics see every frame of it: causality in time holds across the
codec's chunks (:mod:`.codec`), not inside one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmtrain.models.vae_modules import LatentVAE, per_frame, run_block

NORM_EPS = 1e-6


class CausalConv3d(nn.Module):
    """Conv3d (``conv``) over [B, C, T, H, W] whose time padding repeats the first frame
    ``k - 1`` times in front; spatial padding ``k // 2`` zeros on each side."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int):
        super().__init__()
        self.time_pad, self.space_pad = kernel_size - 1, kernel_size // 2
        self.conv = nn.Conv3d(chan_in, chan_out, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        if self.space_pad:
            p = self.space_pad
            x = F.pad(x, (p, p, p, p))
        return self.conv(x)


def resize_first_apart(zq: torch.Tensor, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-resize ``zq`` [B, C, T, h, w] to ``frames`` x ``size``; for an odd count of more
    than one frame the first frame is resized alone and the rest to the other frames, so the
    latent of a clip's first frame conditions exactly that frame."""
    if frames > 1 and frames % 2:
        first = F.interpolate(zq[:, :, :1], size=(1, *size))
        rest = F.interpolate(zq[:, :, 1:], size=(frames - 1, *size))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=(frames, *size))


class SpatialNorm3D(nn.Module):
    """``norm_layer(f) * conv_y(zq) + conv_b(zq)``, ``zq`` resized to ``f``'s frames and size."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = resize_first_apart(zq, f.shape[2], tuple(f.shape[-2:]))
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock3D(nn.Module):
    """(norm, SiLU, causal 3x3x3 conv) twice plus the input; a spatial norm when ``zq_channels``.
    Modules registered in the release's order (norms, convs, shortcut), so state dicts list
    tensors as the release file does."""

    def __init__(self, chan_in: int, chan_out: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, chan_in, eps=NORM_EPS)
            self.norm2 = nn.GroupNorm(groups, chan_out, eps=NORM_EPS)
        else:
            self.norm1 = SpatialNorm3D(chan_in, zq_channels, groups)
            self.norm2 = SpatialNorm3D(chan_out, zq_channels, groups)
        self.conv1 = CausalConv3d(chan_in, chan_out, 3)
        self.conv2 = CausalConv3d(chan_out, chan_out, 3)
        if chan_in != chan_out:
            self.conv_shortcut = nn.Conv3d(chan_in, chan_out, 1)

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return F.silu(norm(x) if zq is None else norm(x, zq))

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self._norm(self.norm1, x, zq))
        h = self.conv2(self._norm(self.norm2, h, zq))
        return (self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x) + h


def halve_time(x: torch.Tensor) -> torch.Tensor:
    """Average consecutive frame pairs of [B, C, T, H, W]; an odd count keeps the first frame as
    it is (1 + 2k -> 1 + k)."""
    if x.shape[2] % 2:
        if x.shape[2] == 1:
            return x
        first, rest = x[:, :, :1], x[:, :, 1:]
        return torch.cat([first, rest.unflatten(2, (-1, 2)).mean(3)], dim=2)
    return x.unflatten(2, (-1, 2)).mean(3)


class Downsample3D(nn.Module):
    """Per frame: pad right and bottom by one zero, 3x3 Conv2d with stride 2 (``conv``); before it,
    with ``compress_time``, :func:`halve_time`."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            x = halve_time(x)
        return per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class Upsample3D(nn.Module):
    """Nearest x2 of height and width and, with ``compress_time``, of the frames after the first
    (1 + k -> 1 + 2k), then a 3x3 Conv2d per frame (``conv``)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            first = per_frame(lambda f: F.interpolate(f, scale_factor=2.0), x[:, :, :1])
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        else:
            x = per_frame(lambda f: F.interpolate(f, scale_factor=2.0), x)
        return per_frame(self.conv, x)


class _Level(nn.Module):
    """A resolution level: ``resnets`` and, but for the last, ``downsamplers`` / ``upsamplers``."""

    def __init__(self, resnets: list[nn.Module], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if resample is not None:
            setattr(self, resample_name, nn.ModuleList([resample]))


class _Mid(nn.Module):
    def __init__(self, resnets: list[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)


def _time_levels(temporal_compression: int) -> int:
    return int(math.log2(temporal_compression))


class STVAEEncoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        z_channels: int,
        block_channels: list[int],
        layers: int,
        time_levels: int,
        groups: int,
    ):
        super().__init__()
        self.recompute = False
        self.conv_in = CausalConv3d(in_channels, block_channels[0], 3)
        self.down_blocks = nn.ModuleList()
        width = block_channels[0]
        for level, out in enumerate(block_channels):
            resnets = [ResnetBlock3D(width if i == 0 else out, out, groups) for i in range(layers)]
            last = level == len(block_channels) - 1
            down = None if last else Downsample3D(out, compress_time=level < time_levels)
            self.down_blocks.append(_Level(resnets, down, "downsamplers"))
            width = out
        self.mid_block = _Mid([ResnetBlock3D(width, width, groups) for _ in range(2)])
        self.norm_out = nn.GroupNorm(groups, width, eps=NORM_EPS)
        self.conv_out = CausalConv3d(width, 2 * z_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] pixels -> [B, 2z, T', H', W'] posterior moments (mean, log-variance)."""
        h = self.conv_in(x)
        for level in self.down_blocks:
            for block in level.resnets:
                h = run_block(block, self.recompute, h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
        for block in self.mid_block.resnets:
            h = run_block(block, self.recompute, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class STVAEDecoder(nn.Module):
    def __init__(
        self,
        *,
        out_channels: int,
        z_channels: int,
        block_channels: list[int],
        layers: int,
        time_levels: int,
        groups: int,
    ):
        super().__init__()
        self.recompute = False
        widths = list(reversed(block_channels))
        self.conv_in = CausalConv3d(z_channels, widths[0], 3)
        self.mid_block = _Mid([ResnetBlock3D(widths[0], widths[0], groups, z_channels) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        width = widths[0]
        for level, out in enumerate(widths):
            resnets = [ResnetBlock3D(width if i == 0 else out, out, groups, z_channels) for i in range(layers + 1)]
            last = level == len(widths) - 1
            up = None if last else Upsample3D(out, compress_time=level < time_levels)
            self.up_blocks.append(_Level(resnets, up, "upsamplers"))
            width = out
        self.norm_out = SpatialNorm3D(width, z_channels, groups)
        self.conv_out = CausalConv3d(width, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z, T', H', W'] latents -> [B, C, T, H, W] pixels."""
        h = self.conv_in(z)
        for block in self.mid_block.resnets:
            h = run_block(block, self.recompute, h, z)
        for level in self.up_blocks:
            for block in level.resnets:
                h = run_block(block, self.recompute, h, z)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(F.silu(self.norm_out(h, z)))


class STVAE(LatentVAE):
    """``encoder`` + ``decoder`` (the release's ``AutoencoderKLSTVAE`` without its
    ``quant_conv`` / ``post_quant_conv``, which the release leaves off); the posterior and the
    forward are :class:`~fmtrain.models.vae_modules.LatentVAE`'s, the chunked / tiled paths
    :mod:`.codec`."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        z_channels: int = 16,
        block_channels: list[int] = (128, 256, 256, 512),
        layers_per_block: int = 3,
        temporal_compression: int = 4,
        norm_groups: int = 32,
    ):
        super().__init__()
        shared = dict(
            z_channels=z_channels,
            block_channels=list(block_channels),
            layers=layers_per_block,
            time_levels=_time_levels(temporal_compression),
            groups=norm_groups,
        )
        self.encoder = STVAEEncoder(in_channels=in_channels, **shared)
        self.decoder = STVAEDecoder(out_channels=in_channels, **shared)
        self.z_channels = z_channels
        self.spatial_compression = 2 ** (len(block_channels) - 1)
        self.temporal_compression = temporal_compression

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.conv.weight


__all__ = [
    "CausalConv3d",
    "Downsample3D",
    "ResnetBlock3D",
    "STVAE",
    "STVAEDecoder",
    "STVAEEncoder",
    "SpatialNorm3D",
    "Upsample3D",
    "halve_time",
    "resize_first_apart",
]
