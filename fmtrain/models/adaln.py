"""Timestep conditioning for diffusion transformers: sinusoidal timestep features, the
timestep MLP, AdaLN-single (PixArt-alpha; Step-Video-T2V) and the modulation it drives.

AdaLN-single computes one modulation vector per sample (``6 * hidden``: shift, scale and gate
for attention and MLP) shared by every block; each block adds its own learned
``scale_shift_table`` [6, hidden]. Module names follow the released Step-Video checkpoint
(``adaln_single.emb.timestep_embedder.linear_{1,2}``, ``adaln_single.linear``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_sinusoid(
    t: torch.Tensor,
    dim: int = 256,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """[b] (fractional) timesteps -> [b, dim] fp32 features: frequencies
    ``max_period^(-i / (dim/2 - shift))``, [cos, sin] when ``flip_sin_to_cos`` (the DDPM / diffusers form)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(torch.nn.Module):
    """Sinusoid -> linear_1 -> SiLU -> linear_2."""

    def __init__(self, hidden: int, frequency_dim: int = 256, dtype=torch.float32):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = torch.nn.Linear(frequency_dim, hidden, dtype=dtype)
        self.linear_2 = torch.nn.Linear(hidden, hidden, dtype=dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoid(t, self.frequency_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class _Embeddings(torch.nn.Module):
    def __init__(self, hidden: int, dtype):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(hidden, dtype=dtype)


class AdaLNSingle(torch.nn.Module):
    """t in [0, 1] -> (modulation [b, 6*hidden], embedded timestep [b, hidden]).

    ``time_scale`` (1000) maps t to the range the sinusoid was designed for."""

    def __init__(self, hidden: int, *, chunks: int = 6, time_scale: float = 1000.0, dtype=torch.float32):
        super().__init__()
        self.time_scale = time_scale
        self.emb = _Embeddings(hidden, dtype)
        self.linear = torch.nn.Linear(hidden, chunks * hidden, dtype=dtype)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb.timestep_embedder(t.float() * self.time_scale)
        return self.linear(F.silu(embedded)), embedded


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (shift/scale broadcast over the sequence)."""
    return x * (1 + scale) + shift
