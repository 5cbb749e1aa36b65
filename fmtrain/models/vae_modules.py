"""What the VAE families' torch modules share (``video_vae``, ``st_vae``): the Gaussian-posterior
autoencoder interface the ``vae`` objective and the codec call, activation checkpointing of a
block, the per-frame application of a 2D layer, and the 3D PatchGAN discriminator.

A :class:`LatentVAE` has ``encoder`` (pixels [B, C, T, H, W] in [-1, 1] -> the posterior's mean
and log-variance stacked on channels, [B, 2 z, T', H', W']) and ``decoder`` (latents -> pixels),
the attributes ``z_channels``, ``spatial_compression`` and ``temporal_compression``, and
``last_layer()``: the decoder's last weight, where the adaptive GAN weight compares gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGVAR_RANGE = (-30.0, 20.0)
"""The posterior log-variance clamp of both releases (LDM's ``DiagonalGaussianDistribution``)."""
NORM_GROUPS = 32


def per_frame(module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module (or function of [N, C, H, W]) to every frame of [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    out = module(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def run_block(module: nn.Module, recompute: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``module(*args)``, its activations recomputed in backward when ``recompute`` (and training)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class LatentVAE(nn.Module):
    """The posterior and the training forward of a VAE family's autoencoder (subclasses build
    ``encoder`` and ``decoder``, whose ``recompute`` flags :meth:`set_recompute` sets)."""

    z_channels: int
    spatial_compression: int
    temporal_compression: int

    def set_recompute(self, on: bool) -> None:
        """Activation checkpointing of every ResNet (and attention) block, for training at large sizes."""
        self.encoder.recompute = self.decoder.recompute = on

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of the posterior of pixels [B, C, T, H, W], each [B, z, T', H', W']."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(reconstruction, mean, log-variance): decode the posterior sample ``mean + std * noise``
        (the mean when ``noise`` is None)."""
        mean, logvar = self.moments(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return self.decoder(z), mean, logvar


class PatchDiscriminator3D(nn.Module):
    """A 3D PatchGAN (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
    Networks", extended to video as Open-Sora's VAE discriminator is): stride-2 spatial convs with
    GroupNorm (BatchNorm is unstable at the small per-GPU batches video training runs at) and
    LeakyReLU, time kernel 3 with 'same' padding so a single image is a clip of one frame; one logit
    per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv3d(in_channels, channels, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = (1, 2, 2) if n < layers else (1, 1, 1)
            mods += [
                nn.Conv3d(width, out, (3, 4, 4), stride=stride, padding=(1, 1, 1), bias=False),
                nn.GroupNorm(NORM_GROUPS if out % NORM_GROUPS == 0 else 1, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        mods.append(nn.Conv3d(width, 1, (3, 4, 4), stride=1, padding=(1, 1, 1)))
        self.main = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


__all__ = ["LOGVAR_RANGE", "NORM_GROUPS", "LatentVAE", "PatchDiscriminator3D", "per_frame", "run_block"]
