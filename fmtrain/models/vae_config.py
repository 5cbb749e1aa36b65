"""Config rules the VAE families share (``video_vae``, ``st_vae``): the codec's chunk and tile
options, and the clip shapes that give whole latent frames. Imports nothing heavier than
:mod:`fmtrain.config`, as a family's config module must."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtrain.config import Config, ConfigError, ModelConfig


def check_at_least_one(model_cfg, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(model_cfg, name) < 1:
            raise ConfigError(f"model.{name}={getattr(model_cfg, name)} must be at least 1")


def check_codec_options(model_cfg, release_chunk: str) -> None:
    """``tile_size`` / ``tile_overlap`` multiples of the spatial compression, the overlap below the
    tile; ``chunk_frames`` 0 or 1 + a multiple of the temporal compression (``release_chunk``:
    what the release uses, for the message)."""
    m = model_cfg
    s = m.spatial_compression
    for name in ("tile_size", "tile_overlap"):
        if getattr(m, name) < 0 or getattr(m, name) % s:
            raise ConfigError(
                f"model.{name}={getattr(m, name)} must be a non-negative multiple of the spatial compression {s}"
            )
    if m.tile_size and m.tile_overlap >= m.tile_size:
        raise ConfigError(f"model.tile_overlap={m.tile_overlap} must be below model.tile_size={m.tile_size}")
    c = m.temporal_compression
    if m.chunk_frames < 0 or (m.chunk_frames and (m.chunk_frames - 1) % c):
        raise ConfigError(
            f"model.chunk_frames={m.chunk_frames} must be 1 + a multiple of the temporal "
            f"compression {c} (the release: {release_chunk}), or 0"
        )


@dataclass
class VAEModelConfig(ModelConfig):
    """The ``model.*`` fields every VAE family has, with one meaning each; a family adds its
    architecture (with ``z_channels``, ``spatial_compression``, ``temporal_compression``) and its
    codec's ``chunk_frames``, ``tile_size`` and ``tile_overlap``, whose release values differ."""

    in_channels: int = 3
    """Pixel channels."""
    init_gain: float = 1.0
    """Conv and linear weights are drawn N(0, (gain / sqrt(fan_in))^2) (layout-invariant)."""
    recompute: str = "none"
    """Activation checkpointing of every ResNet (and attention) block: none | full."""
    discriminator_channels: int = 64
    """Width of the PatchGAN discriminator's first layer (trained with objective.gan_weight > 0)."""
    discriminator_layers: int = 3

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"recompute": ("none", "full")}

    def check(self, cfg: Config) -> None:
        check_at_least_one(self, ("in_channels", "discriminator_channels", "discriminator_layers"))


def validate(cfg: Config) -> None:
    """Rules across sections of a VAE family: clips of whole latent frames and pixels; no adaptive
    GAN weight under ZeRO-3."""
    m, d = cfg.model, cfg.data
    if d.video_size % m.spatial_compression:
        raise ConfigError(
            f"data.video_size={d.video_size} is not a multiple of the spatial compression {m.spatial_compression}"
        )
    if (d.video_frames - 1) % m.temporal_compression:
        raise ConfigError(
            f"data.video_frames={d.video_frames} must be 1 + a multiple of the temporal compression "
            f"{m.temporal_compression} ({1 + 2 * m.temporal_compression}, say), so every latent frame is whole"
        )
    e = cfg.engine
    if e.backend == "deepspeed" and e.zero_stage == 3 and cfg.objective.gan_weight > 0:
        # The adaptive GAN weight differentiates the decoder's last layer inside the loss, after
        # its forward, when ZeRO-3 has already released that parameter's gathered copy.
        raise ConfigError(
            f"objective.gan_weight={cfg.objective.gan_weight} with engine.zero_stage=3: the adaptive GAN weight "
            "needs the decoder's last-layer weight after its forward, which ZeRO-3 has partitioned again; use "
            "engine.zero_stage=2 (or objective.gan_weight=0)"
        )


__all__ = ["VAEModelConfig", "check_at_least_one", "check_codec_options", "validate"]
