"""The Video-VAE family's registry entry: the autoencoder (primary part) and, with
``objective.gan_weight``, a 3D PatchGAN discriminator trained beside it with its own optimizer;
the training steps, sizes and data are the VAE families' shared ones
(:mod:`fmtrain.models.vae_family`).
"""

from __future__ import annotations

from fmtrain.config import Config
from fmtrain.models.vae_family import (
    build_discriminator,
    latent_shape,
    posterior_noise,
    training_pixels,
    vae_family,
)
from fmtrain.models.video_vae import codec, convert
from fmtrain.models.video_vae.model import VideoVAE


def vae_kwargs(cfg: Config) -> dict:
    m = cfg.model
    return dict(
        in_channels=m.in_channels,
        z_channels=m.z_channels,
        version=m.version,
        encoder_ch=m.encoder_channels,
        encoder_ch_mult=m.encoder_channel_mult,
        decoder_ch=m.decoder_channels,
        decoder_ch_mult=m.decoder_channel_mult,
        num_res_blocks=m.num_res_blocks,
        temporal_down_levels=m.temporal_down_levels,
        temporal_up_levels=m.temporal_up_levels,
    )


def build_vae(cfg: Config, megatron_config=None, *, pre_process=True, post_process=True, vp_stage=None) -> VideoVAE:
    vae = VideoVAE(**vae_kwargs(cfg))
    vae.set_recompute(cfg.model.recompute == "full")
    return vae


FAMILY = vae_family(
    "video_vae",
    build_vae=build_vae,
    converter=convert,
    latent_codec=codec.LATENT_CODEC,
)
"""Parameters: the released v2 model has 498,818,819."""

parts = FAMILY.parts
param_count = FAMILY.param_count

__all__ = [
    "FAMILY",
    "build_discriminator",
    "build_vae",
    "latent_shape",
    "param_count",
    "parts",
    "posterior_noise",
    "training_pixels",
    "vae_kwargs",
]
