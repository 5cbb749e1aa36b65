"""The ST-VAE family's config section and rules.

Defaults are the released model's (official repository DerrickWang005/LaVin-DiT,
``lib/model/vae3d.py``, ``AutoencoderKLSTVAE()`` with its defaults, weights ``stvae.pt``;
215,583,907 parameters): block channels (128, 256, 256, 512), three ResNet blocks per encoder
level (four per decoder level), 16 latent channels, 8x8 spatial and 4x temporal compression,
GroupNorm(32, eps 1e-6) everywhere. ``latent_shift`` / ``latent_scale`` are the normalisation
the release's ``inference.py`` applies between the VAE and the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmtrain.config import Config, ConfigError, FamilySettings
from fmtrain.models.vae_config import VAEModelConfig, check_at_least_one, check_codec_options, validate


@dataclass
class STVAEModelConfig(VAEModelConfig):
    """``model.*`` of the ST-VAE (the encoder, the decoder and, with ``objective.gan_weight``, the
    discriminator)."""

    z_channels: int = 16
    """Latent channels (the release's ``latent_channels``)."""
    block_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 512])
    """Widths of the encoder's levels (the decoder's, reversed); every level but the last halves
    height and width (the release's ``block_out_channels``)."""
    layers_per_block: int = 3
    """ResNet blocks per encoder level; the decoder has one more per level (as the release)."""
    temporal_compression: int = 4
    """Frames per latent frame after the first: the first log2 of it levels also halve time
    (keeping the first frame apart), so 1 + 4 k frames become 1 + k latent frames."""
    norm_groups: int = 32
    """GroupNorm groups of every norm, the decoder's spatial norms included (the release: 32)."""
    latent_shift: float = 0.032470703125
    """The DiT sees ``(z - latent_shift) * latent_scale`` (the release's inference.py)."""
    latent_scale: float = 1.08936170213
    chunk_frames: int = 0
    """Frames encoded at a time (1 + a multiple of the temporal compression): consecutive chunks
    share their boundary frame, as the release's ``tiled_encode`` (its inference.py sets 129);
    decoding goes in the matching latent chunks. 0: one chunk, the release's untiled encode."""
    tile_size: int = 0
    """Spatial tiling of encode and decode, in pixels (a multiple of 8): clips larger than this go
    through overlapping tiles blended linearly (the release's inference.py sets 512); 0: none."""
    tile_overlap: int = 128
    """Pixels two neighbouring tiles share (the release: a quarter of the tile)."""

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        check_at_least_one(self, ("z_channels", "layers_per_block", "norm_groups", "temporal_compression"))
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            raise ConfigError(f"model.block_channels={self.block_channels} must be one or more positive widths")
        for width in self.block_channels:
            if width % self.norm_groups:
                raise ConfigError(
                    f"model.block_channels={self.block_channels}: {width} is not a multiple of "
                    f"model.norm_groups={self.norm_groups} (GroupNorm splits channels into whole groups)"
                )
        t = self.temporal_compression
        levels = len(self.block_channels) - 1
        if t & (t - 1) or t > 2**levels:
            raise ConfigError(
                f"model.temporal_compression={t} must be a power of two up to 2^{levels} (one halving per "
                f"downsampling level of model.block_channels={self.block_channels})"
            )
        if self.latent_scale <= 0:
            raise ConfigError(f"model.latent_scale={self.latent_scale} must be positive (latents are divided by it)")
        if self.chunk_frames == 1:
            raise ConfigError("model.chunk_frames=1: chunks share their boundary frame, so they need 2 frames or more")
        check_codec_options(self, release_chunk="129 in inference.py")


SETTINGS = FamilySettings(model=STVAEModelConfig, objectives=("vae",), parallel=frozenset(), validate=validate)
