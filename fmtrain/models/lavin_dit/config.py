"""The LaVin-DiT family's config section, size presets and rules.

Architecture ("LaVin-DiT: Large Vision Diffusion Transformer", Wang et al., CVPR 2025; official
repository DerrickWang005/LaVin-DiT, ``lib/model/dit.py`` and ``lib/model/blocks.py``): a joint
two-stream DiT (J-DiT) over ST-VAE latents (16 channels, 2 x 2 patches). The condition stream
holds the latents of K in-context (input, output) example pairs and the query; the target
stream the noised latent of the query's output. Each stream has its own q/k/v/out projections
and SwiGLU MLP; attention runs jointly over both streams. ``model.size`` picks the released
size; fields set in the recipe or on the command line win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtrain.config import Config, ConfigError, FamilySettings, TransformerModelConfig


def release_ffn_width(hidden: int) -> int:
    """The release's SwiGLU width: 2/3 of 4 x hidden, rounded down to a multiple of 64
    (``blocks.SwiGLU``); 6144 at hidden 2304."""
    return int((4 * hidden * 2 / 3) / 64) * 64


SIZES: dict[str, dict] = {
    # ``LaVinDiT_3B_2`` of lib/model/dit.py: depth 22, hidden 2304, 32 heads, kv_group 4
    # (32 / 4 = 8 key/value heads), patch 2. The paper's smaller sizes (down to 0.1B) have no
    # published widths.
    "3.4B": {
        "num_layers": 22,
        "hidden_size": 2304,
        "num_attention_heads": 32,
        "num_query_groups": 8,
        "ffn_hidden_size": release_ffn_width(2304),
        "patch_size": 2,
        "in_channels": 16,
    },
}


@dataclass
class LaVinDiTModelConfig(TransformerModelConfig):
    """``model.*`` of the J-DiT (the shared transformer fields plus these). ``model.seq_length``
    is the nominal token count of one sample, both streams (FLOPs, memory, MFU)."""

    size: str = ""
    """A released size (3.4B) whose architecture fields apply unless set explicitly."""
    in_channels: int = 16
    """Latent channels of the ST-VAE."""
    patch_size: int = 2
    """Spatial patch size over the latent (patch_size x patch_size latent pixels per token)."""
    rope_axes: list[int] | None = None
    """Head channels rotated by 3D RoPE for the frame, height and width positions; empty: thirds
    of the head dim, as the release (24 / 24 / 24 of 72)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-6
    """RMSNorm eps (sandwich, q/k and final norms)."""
    embed_norm_epsilon: float = 1e-5
    """LayerNorm eps of the two patch embedders (apex's FusedLayerNorm default in the release)."""

    PRESETS: ClassVar[dict[str, dict]] = SIZES

    @property
    def axes(self) -> tuple[int, int, int]:
        if self.rope_axes:
            return tuple(self.rope_axes)  # type: ignore[return-value]
        third = self.kv_channels // 3
        return third, third, third

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        for name in ("in_channels", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.hidden_size != self.num_attention_heads * self.kv_channels:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must equal num_attention_heads x head_dim = "
                f"{self.num_attention_heads} x {self.kv_channels}: the release's projections are hidden wide"
            )
        axes = self.axes
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.kv_channels:
            what = f"model.rope_axes={list(axes)}" if self.rope_axes else f"head dim {self.kv_channels}"
            raise ConfigError(
                f"{what}: 3D RoPE needs three positive even numbers summing to the head dim {self.kv_channels} "
                "(by default its thirds: a head dim divisible by 6)"
            )


def validate(cfg: Config) -> None:
    m, d, p = cfg.model, cfg.data, cfg.parallel
    if not d.shards and d.corpus == "synthetic:tasks":
        if d.task_latent_size % m.patch_size:
            raise ConfigError(
                f"data.task_latent_size={d.task_latent_size} is not divisible by model.patch_size={m.patch_size}"
            )
        tokens = (d.task_latent_size // m.patch_size) ** 2  # per item; the condition has 2K + 1 items
        if p.sequence_parallel and tokens % p.tp:
            raise ConfigError(
                f"data.task_latent_size={d.task_latent_size}: {tokens} tokens per item are not divisible by "
                f"parallel.tp={p.tp} (sequence parallelism splits each stream's tokens over TP)"
            )
    if m.recompute == "selective":
        raise ConfigError(
            "model.recompute=selective: the J-DiT's SDPA attention stores no score matrix, so there "
            "is nothing selective to recompute; use none or full"
        )
    if cfg.eval.sample_vae and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise ConfigError(
            f"eval.sample_vae: sampling at validation runs the whole J-DiT on rank 0, which needs "
            f"parallel.tp=1 and parallel.pp=1 (got {cfg.parallel.tp} and {cfg.parallel.pp}); sample a "
            "checkpoint with fmtrain sample instead"
        )


SETTINGS = FamilySettings(
    model=LaVinDiTModelConfig,
    objectives=("flow_matching",),
    parallel=frozenset({"tp", "sp", "pp", "vpp"}),
    validate=validate,
)
