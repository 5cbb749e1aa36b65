"""Pixels <-> the latents LaVin-DiT's DiT sees, with a loaded ST-VAE.

The release (official repository DerrickWang005/LaVin-DiT, ``inference.py``) encodes every image
as a clip of one frame, samples the posterior and normalises ``(z - 0.032470703125) *
1.08936170213``; decoding undoes that first. Here the shift and scale are the config's
``model.latent_shift`` / ``model.latent_scale``, and the clip goes through the shared codec
(:mod:`fmtrain.models.vae_codec`) in chunks of ``model.chunk_frames`` that share their boundary
frame, as the release's ``tiled_encode`` / ``tiled_decode`` (0: one pass, as its untiled
``encode``), with ``model.tile_size`` spatial tiles.

    from fmtrain.models.st_vae import codec
    z = codec.encode(cfg, vae, pixels)                 # [B, 3, T, H, W] -> [B, 16, 1 + (T-1)/4, H/8, W/8]
    z = codec.encode(cfg, vae, pixels, generator=g)    # a posterior sample, as the release draws
    pixels = codec.decode(cfg, vae, z)

``cfg`` is the ST-VAE's config (:func:`fmtrain.checkpoint.pretrained.pretrained_config` gives it
for a checkpoint or a release), ``vae`` the loaded module
(:func:`fmtrain.checkpoint.pretrained.load_pretrained`), in eval mode.
"""

from __future__ import annotations

import torch

from fmtrain.config import Config
from fmtrain.models.st_vae.model import STVAE
from fmtrain.models.vae_codec import LatentCodec

LATENT_CODEC = LatentCodec(seam="shared", normalised=True)
"""The family's ``latent_codec``."""


def encode(cfg: Config, vae: STVAE, pixels: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """pixels [B, C, T, H, W] in [-1, 1] (T = 1 + 4 k; an image: T = 1) -> normalised latents
    [B, z, 1 + k, H / 8, W / 8]: the posterior mean, or a sample drawn with ``generator``."""
    return LATENT_CODEC.encode(cfg, vae, pixels, generator=generator)


def decode(cfg: Config, vae: STVAE, latents: torch.Tensor) -> torch.Tensor:
    """normalised latents [B, z, 1 + k, h, w] -> pixels [B, C, 1 + 4 k, 8 h, 8 w] in about [-1, 1]."""
    return LATENT_CODEC.decode(cfg, vae, latents)


def normalise(cfg: Config, z: torch.Tensor) -> torch.Tensor:
    """The VAE's raw latents (a posterior mean or sample) -> the DiT's scale."""
    return LATENT_CODEC.normalise(cfg, z)


def denormalise(cfg: Config, latents: torch.Tensor) -> torch.Tensor:
    """The DiT's scale -> the VAE's raw latents."""
    return LATENT_CODEC.denormalise(cfg, latents)


__all__ = ["LATENT_CODEC", "decode", "denormalise", "encode", "normalise"]
