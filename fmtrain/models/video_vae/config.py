"""The Video-VAE family's config section and rules.

Defaults are the released v2 model's (official repository stepfun-ai/Step-Video-T2V,
``stepvideo/vae/vae.py``, ``AutoencoderKL(z_channels=64, version=2)``; 498,818,819 parameters).
``version: 1`` is the first release's 16-channel, 8x8 spatial / 4x temporal variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fmtrain.config import Config, ConfigError, FamilySettings, ModelConfig


@dataclass
class VideoVAEModelConfig(ModelConfig):
    """``model.*`` of the Video-VAE (the encoder, the decoder and, with ``objective.gan_weight``,
    the discriminator)."""

    version: int = 2
    """2: 16x16 spatial, 8x temporal compression (3D pixel-unshuffle patchify with shortcuts,
    per-frame GroupNorm); 1: 8x8 spatial, 4x temporal."""
    z_channels: int = 64
    """Latent channels (the release: 64 for v2, 16 for v1)."""
    in_channels: int = 3
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
    init_gain: float = 1.0
    """Conv and linear weights are drawn N(0, (gain / sqrt(fan_in))^2) (layout-invariant)."""
    recompute: str = "none"
    """Activation checkpointing of every ResNet and attention block: none | full."""
    discriminator_channels: int = 64
    discriminator_layers: int = 3

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"recompute": ("none", "full")}

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_channel_mult) - 1) * (2 if self.version == 2 else 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** len(self.temporal_down_levels) * (2 if self.version == 2 else 1)

    def check(self, cfg: Config) -> None:
        if self.version not in (1, 2):
            raise ConfigError(f"model.version={self.version} must be 1 or 2")
        for name in (
            "z_channels",
            "in_channels",
            "encoder_channels",
            "decoder_channels",
            "num_res_blocks",
            "discriminator_channels",
            "discriminator_layers",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
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
        s = self.spatial_compression
        for name in ("tile_size", "tile_overlap"):
            if getattr(self, name) < 0 or getattr(self, name) % s:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)} must be a non-negative multiple of the spatial compression {s}"
                )
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ConfigError(f"model.tile_overlap={self.tile_overlap} must be below model.tile_size={self.tile_size}")
        if self.chunk_frames < 0 or (self.chunk_frames and (self.chunk_frames - 1) % self.temporal_compression):
            raise ConfigError(
                f"model.chunk_frames={self.chunk_frames} must be 1 + a multiple of the temporal "
                f"compression {self.temporal_compression} (the release: 17), or 0"
            )


def validate(cfg: Config) -> None:
    m, d = cfg.model, cfg.data
    if d.video_size % m.spatial_compression:
        raise ConfigError(
            f"data.video_size={d.video_size} is not a multiple of the spatial compression {m.spatial_compression}"
        )
    if (d.video_frames - 1) % m.temporal_compression:
        raise ConfigError(
            f"data.video_frames={d.video_frames} must be 1 + a multiple of the temporal compression "
            f"{m.temporal_compression} (17 for the release), so every latent frame is whole"
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


SETTINGS = FamilySettings(model=VideoVAEModelConfig, objectives=("vae",), parallel=frozenset(), validate=validate)
