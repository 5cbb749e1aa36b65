"""The Video-VAE family's config section and rules.

Defaults are the released v2 model's (official repository stepfun-ai/Step-Video-T2V,
``stepvideo/vae/vae.py``, ``AutoencoderKL(z_channels=64, version=2)``; 498,818,819 parameters).
``version: 1`` is the first release's 16-channel, 8x8 spatial / 4x temporal variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmtrain.config import Config, ConfigError, FamilySettings
from fmtrain.models.vae_config import VAEModelConfig, check_at_least_one, check_codec_options, validate


@dataclass
class VideoVAEModelConfig(VAEModelConfig):
    """``model.*`` of the Video-VAE (the encoder, the decoder and, with ``objective.gan_weight``,
    the discriminator)."""

    version: int = 2
    """2: 16x16 spatial, 8x temporal compression (3D pixel-unshuffle patchify with shortcuts,
    per-frame GroupNorm); 1: 8x8 spatial, 4x temporal."""
    z_channels: int = 64
    """Latent channels (the release: 64 for v2, 16 for v1)."""
    encoder_channels: int = 32
    encoder_channel_mult: list[int] = field(default_factory=lambda: [4, 8, 16, 16])
    decoder_channels: int = 128
    decoder_channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_down_levels: list[int] = field(default_factory=lambda: [1, 2])
    """Encoder levels whose downsampling is 3D (time too); the others downsample each frame."""
    temporal_up_levels: list[int] = field(default_factory=lambda: [2, 3])
    """Decoder levels whose upsampling is 3D."""
    chunk_frames: int = 17
    """Frames encoded at a time, each chunk causally and on its own (the release: 17 -> 3
    latent frames); decoding goes chunk-wise with the release's seam blending. 0: one chunk."""
    tile_size: int = 0
    """Spatial tiling of encode and decode, in pixels (a multiple of the spatial compression):
    clips larger than this go through overlapping tiles blended linearly, so memory is bounded
    for any resolution; 0: no tiling."""
    tile_overlap: int = 64
    """Pixels two neighbouring tiles share (a multiple of the spatial compression)."""

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_channel_mult) - 1) * (2 if self.version == 2 else 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** len(self.temporal_down_levels) * (2 if self.version == 2 else 1)

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.version not in (1, 2):
            raise ConfigError(f"model.version={self.version} must be 1 or 2")
        check_at_least_one(self, ("z_channels", "encoder_channels", "decoder_channels", "num_res_blocks"))
        widths = [("encoder", self.encoder_channels * m) for m in self.encoder_channel_mult]
        widths += [("decoder", self.decoder_channels * m) for m in self.decoder_channel_mult]
        for where, width in widths:
            if width % 32:
                raise ConfigError(
                    f"model.{where}_channels x {where}_channel_mult gives a width of {width}, "
                    "which GroupNorm(32) cannot split: use multiples of 32"
                )
        if self.version == 2:
            patch = 4 * self.z_channels * 2**3  # the channels of the 3D pixel-(un)shuffle patchify
            for where, width in (
                ("encoder", widths[len(self.encoder_channel_mult) - 1][1]),
                ("decoder", widths[-1][1]),
            ):
                if (width * 8) % patch:
                    raise ConfigError(
                        f"model.z_channels={self.z_channels}: the {where}'s top width {width} x 8 must be "
                        f"a multiple of the patchify's 32 x z_channels = {patch} channels (its shortcut "
                        "averages / duplicates channels in whole groups)"
                    )
        if len(self.encoder_channel_mult) != len(self.decoder_channel_mult):
            raise ConfigError(
                f"model.encoder_channel_mult={self.encoder_channel_mult} and "
                f"model.decoder_channel_mult={self.decoder_channel_mult} must have as many levels"
            )
        last = len(self.encoder_channel_mult) - 1
        if any(not 0 <= level < last for level in self.temporal_down_levels):
            raise ConfigError(
                f"model.temporal_down_levels={self.temporal_down_levels}: levels 0..{last - 1} "
                "downsample (the last one does not)"
            )
        if any(not 0 < level <= last for level in self.temporal_up_levels) or (
            len(self.temporal_up_levels) != len(self.temporal_down_levels)
        ):
            raise ConfigError(
                f"model.temporal_up_levels={self.temporal_up_levels} must name as many of the "
                f"levels 1..{last} as model.temporal_down_levels has"
            )
        check_codec_options(self, release_chunk="17")


SETTINGS = FamilySettings(model=VideoVAEModelConfig, objectives=("vae",), parallel=frozenset(), validate=validate)
