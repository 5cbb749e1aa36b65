"""The masked-video-reconstruction objective (``objective.name=mae``) as pure functions.

Target (VideoMAE V2 ``engine_for_pretraining.py``; the same in transformers'
``VideoMAEForPreTraining``): the clip is un-normalised back to [0, 1], cut into tubelets
``(t p0)(h p1)(w p2)`` with features ordered (p0, p1, p2, c), and with ``norm_target`` each
token's pixels are normalised per channel over the tubelet, ``(x - mean) / (sqrt(unbiased
var) + 1e-6)``. The loss is the squared error averaged over a token's features, summed over the
tokens that count and divided by how many there are in the global batch (the engine divides
the step's sum by the step's count, so any layout gives the exact batch mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtrain.objectives.sections import MAEConfig

CONFIG = MAEConfig
"""This objective's config section (declared in :mod:`fmtrain.objectives.sections`)."""


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, tokens, tubelet*patch*patch, C], tokens in (t, h, w) order."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch, c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, tokens, tubelet*patch*patch, C] -> [B, C, T, H, W]."""
    t, h, w = grid
    b, c = tokens.shape[0], tokens.shape[-1]
    x = tokens.reshape(b, t, h, w, tubelet, patch, patch, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, c, t * tubelet, h * patch, w * patch)


def gather_tubelets(
    pixels: torch.Tensor, tokens: torch.Tensor, sample: torch.Tensor, tubelet: int, patch: int
) -> torch.Tensor:
    """The tubelet of token ``tokens[i]`` ((t, h, w) order) of clip ``sample[i]`` of ``pixels``
    [B, C, T, H, W], for index tensors of one shape S: [*S, C, tubelet, patch, patch] (the
    Conv3d kernel's layout), a new tensor."""
    b, c, t, h, w = pixels.shape
    t, h, w = t // tubelet, h // patch, w // patch
    tubelets = pixels.reshape(b, c, t, tubelet, h, patch, w, patch).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return tubelets[sample, tokens // (h * w), tokens // w % h, tokens % w]


def reconstruction_target(
    pixels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    tubelet: int,
    patch: int,
    norm: bool,
    tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, tokens, tubelet*patch*patch*C]: what the decoder predicts for each token, from clips
    normalised with per-channel ``mean`` / ``std`` (shape [C]). ``tokens`` ([B, n] indices in
    (t, h, w) order) computes only those: [B, n, tubelet*patch*patch*C]."""
    b, c, t, h, w = pixels.shape
    if tokens is None:
        tokens = torch.arange((t // tubelet) * (h // patch) * (w // patch), device=pixels.device).expand(b, -1)
    # Each token's tubelet gathered channel-major ([B, n, C, tubelet*patch*patch], a new tensor
    # updated in place), so the per-token statistics reduce contiguous memory; the features
    # are put in (p0, p1, p2, c) order last.
    sample = torch.arange(b, device=tokens.device).view(b, 1).expand_as(tokens)
    x = gather_tubelets(pixels, tokens, sample, tubelet, patch).flatten(3).float()
    x.mul_(std.view(c, 1).to(x.device)).add_(mean.view(c, 1).to(x.device))
    if norm:
        # Two passes (mean, then the norm of the centred values, which the output needs anyway):
        # the unbiased std of the release, several times faster than torch's Welford var on CPU.
        x.sub_(x.mean(dim=-1, keepdim=True))
        token_std = torch.linalg.vector_norm(x, dim=-1, keepdim=True).div_((x.shape[-1] - 1) ** 0.5)
        x.div_(token_std.add_(1e-6))
    return x.transpose(-1, -2).flatten(2)


def token_errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, N] squared error of each token, averaged over its features."""
    # One kernel for the squared difference and one for its gradient (sub + pow take two each).
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(-1)


__all__ = ["CONFIG", "gather_tubelets", "patchify", "reconstruction_target", "token_errors", "unpatchify"]
