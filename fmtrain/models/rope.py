"""Rotary position embeddings: 1D for the LLMs, and over 3D (frame, height, width) token grids.

1D (Yi, as Llama / megatron): channel j and j + head_dim/2 form a pair rotated by angle
``pos * theta^(-2j/head_dim)``, computed in fp32 as megatron-core and transformers do (a
released model's positions mean what its training code computed).

The head channels are split into one chunk per axis (Step-Video: 64/32/32 of 128); each chunk
is rotated by the token's position along its axis with the rotate-half layout
(``x * cos + rotate_half(x) * sin``, frequencies ``theta^(-2i/D_axis)``). Tokens are ordered
frame-major, then row, then column, as a [T, H, W] grid flattens. Shared by the video DiTs
(Step-Video, LaVin-DiT).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def grid_positions(shape: Sequence[int], device=None) -> torch.Tensor:
    """[T*H*W, 3] integer (t, h, w) positions of a flattened grid."""
    axes = [torch.arange(n, device=device) for n in shape]
    return torch.cartesian_prod(*axes).reshape(-1, len(shape))


@functools.lru_cache(maxsize=32)
def _cos_sin_cached(shape: tuple[int, ...], axes: tuple[int, ...], theta: float, device: str):
    pos = grid_positions(shape, device=device).double()
    angles = []
    for i, dim in enumerate(axes):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        freqs = pos[:, i : i + 1] * inv_freq[None, :]  # [S, dim/2]
        angles.append(torch.cat([freqs, freqs], dim=-1))  # rotate-half pairs channel j with j + dim/2
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def rope_3d_cos_sin(
    shape: Sequence[int], axes: Sequence[int], theta: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [T*H*W, sum(axes)] in fp32 (cached per grid)."""
    return _cos_sin_cached(tuple(int(n) for n in shape), tuple(int(a) for a in axes), float(theta), str(device))


@functools.lru_cache(maxsize=16)
def _cos_sin_1d_cached(seq_len: int, dim: int, theta: float, device: str, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angle = torch.cat([freqs, freqs], dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rope_1d_cos_sin(
    seq_len: int, dim: int, theta: float, device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [seq_len, dim] for positions 0..seq_len-1, computed in fp32 and stored
    in ``dtype`` (cached)."""
    return _cos_sin_1d_cached(int(seq_len), int(dim), float(theta), str(device), dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Rotate ``x`` [S, b, heads, head_dim] (sequence first) by per-token angles [S, head_dim].

    Each axis chunk is rotated on its own (rotate-half inside the chunk). Computed in fp32."""
    cos = cos[:, None, None, :]
    sin = sin[:, None, None, :]
    xf = x.float()
    out = []
    start = 0
    for dim in axes:
        chunk = xf[..., start : start + dim]
        out.append(chunk * cos[..., start : start + dim] + rotate_half(chunk) * sin[..., start : start + dim])
        start += dim
    if start < x.shape[-1]:  # channels beyond the rotated ones pass through
        out.append(xf[..., start:])
    return torch.cat(out, dim=-1).to(x.dtype)
