"""The ST-VAE family's registry entry: the autoencoder (primary part) and, with
``objective.gan_weight``, a 3D PatchGAN discriminator trained beside it with its own optimizer;
the training steps, sizes and data are the VAE families' shared ones
(:mod:`fmtrain.models.vae_family`), the codec the shared one with chunks that share their
boundary frame and the DiT's normalisation (:mod:`.codec`).
"""

from __future__ import annotations

from fmtrain.config import Config
from fmtrain.models.init import InitRule
from fmtrain.models.st_vae import codec, convert
from fmtrain.models.st_vae.model import STVAE
from fmtrain.models.vae_family import init_rule as shared_init_rule
from fmtrain.models.vae_family import vae_family


def build_vae(cfg: Config, megatron_config=None, *, pre_process=True, post_process=True, vp_stage=None) -> STVAE:
    m = cfg.model
    vae = STVAE(
        in_channels=m.in_channels,
        z_channels=m.z_channels,
        block_channels=m.block_channels,
        layers_per_block=m.layers_per_block,
        temporal_compression=m.temporal_compression,
        norm_groups=m.norm_groups,
    )
    vae.set_recompute(m.recompute == "full")
    return vae


def init_rule(cfg: Config):
    """The shared VAE rule (conv weights N(0, (gain / sqrt(fan_in))^2), biases 0, GroupNorm weights 1),
    except the spatial norms' ``conv_y`` bias: 1, so ``norm(f) * conv_y(zq)`` starts as the plain
    GroupNorm scaled around 1 rather than around 0, and the decoder passes its signal at step 0."""
    shared = shared_init_rule(cfg)

    def rule(key: str) -> InitRule:
        if key.endswith("conv_y.conv.bias"):
            return InitRule("ones")
        return shared(key)

    return rule


def parameter_breakdown(cfg: Config) -> dict[str, int]:
    import torch

    with torch.device("meta"):
        vae = build_vae(cfg)
    return {part: sum(p.numel() for p in getattr(vae, part).parameters()) for part in ("encoder", "decoder")}


FAMILY = vae_family(
    "st_vae",
    build_vae=build_vae,
    converter=convert,
    latent_codec=codec.LATENT_CODEC,
    init=init_rule,
    parameter_breakdown=parameter_breakdown,
)
"""Parameters: the released model has 215,583,907 (encoder 92,215,456, decoder 123,368,451)."""

__all__ = ["FAMILY", "build_vae", "init_rule", "parameter_breakdown"]
