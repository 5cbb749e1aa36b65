"""The VAE objective (``objective.name=vae``) as pure functions of tensors.

Pixels are in [-1, 1], videos [B, C, T, H, W] (an image is a clip of one frame). Every term is
per sample, so a microbatch's loss is a sum of per-sample terms the engine divides by the
global sample count: the exact mean of the global batch whatever the layout.

- reconstruction: ``mean |x - x_hat|`` (L1, as Open-Sora and CV-VAE train video VAEs) and,
  optionally, ``mean (x - x_hat)^2``;
- KL to N(0, I) of the diagonal Gaussian posterior, summed over the latent and divided by the
  sample's pixel values (LDM's weighting of it, Rombach et al. 2022);
- SSIM (Wang et al. 2004) per frame, from pytorch-msssim (differentiable, no weights to download);
- PSNR for validation;
- the PatchGAN hinge losses (Lim & Ye 2017) and the adaptive generator weight of Esser et al.
  2021 ("Taming Transformers for High-Resolution Image Synthesis", eq. 7): the ratio of the
  gradient norms of the reconstruction and the generator losses at the decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtrain.objectives.sections import VAEConfig

CONFIG = VAEConfig
"""This objective's config section (declared in :mod:`fmtrain.objectives.sections`)."""

PIXEL_RANGE = 2.0
"""Pixels span [-1, 1]."""


def l1_per_sample(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[B] mean absolute error."""
    return (recon.float() - x.float()).abs().flatten(1).mean(1)


def mse_per_sample(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[B] mean squared error."""
    return (recon.float() - x.float()).pow(2).flatten(1).mean(1)


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """[B] KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent, divided by ``pixels``."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1) / pixels


def psnr_per_sample(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[B] peak signal-to-noise ratio in dB, the clip's mean squared error against the [-1, 1] range
    (the reconstruction clamped to it, as a decoded video is)."""
    mse = (recon.float().clamp(-1, 1) - x.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(PIXEL_RANGE**2 / mse.clamp_min(1e-12))


def ssim_per_sample(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """[B] SSIM averaged over a clip's frames (11x11 Gaussian window; frames smaller than the
    window are compared with it cropped, as pytorch-msssim does)."""
    from pytorch_msssim import ssim

    b, c, t, h, w = x.shape
    win = min(11, h, w)
    win -= 1 - win % 2  # odd, and no larger than the frame
    frames = lambda v: v.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # noqa: E731
    values = ssim(
        (frames(recon).clamp(-1, 1) + 1) / 2, (frames(x) + 1) / 2, data_range=1.0, size_average=False, win_size=win
    )
    return values.view(b, t).mean(1)


def hinge_discriminator(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """[B] ``mean relu(1 - D(x)) + mean relu(1 + D(x_hat))`` over each sample's patches."""
    return F.relu(1.0 - logits_real.float()).flatten(1).mean(1) + F.relu(1.0 + logits_fake.float()).flatten(1).mean(1)


def generator_adversarial(logits_fake: torch.Tensor) -> torch.Tensor:
    """[B] ``-mean D(x_hat)``: the generator's hinge term."""
    return -logits_fake.float().flatten(1).mean(1)


def adaptive_weight(nll: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor, maximum: float) -> torch.Tensor:
    """``||d nll / d W|| / (||d g / d W|| + 1e-4)`` at the decoder's last weight W, clamped to
    [0, maximum], as a constant (no gradient flows through it)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, maximum).detach()


__all__ = [
    "CONFIG",
    "VAEConfig",
    "adaptive_weight",
    "generator_adversarial",
    "hinge_discriminator",
    "kl_per_sample",
    "l1_per_sample",
    "psnr_per_sample",
    "ssim_per_sample",
]
