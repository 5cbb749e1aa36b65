"""The Step-Video-T2V family's config section and rules.

Defaults of the DiT-specific fields are the released 30B model's (``stepfun-ai/stepvideo-t2v``
``transformer/config.json``; "Step-Video-T2V Technical Report", arXiv 2502.10248): 64-channel
Video-VAE latents, patch 1, Step-LLM (6144-d, 320 tokens) and CLIP-style (1024-d, 77 tokens)
text embeddings, 3D RoPE over 64/32/32 head channels with theta 1e4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmtrain.config import Config, ConfigError, FamilySettings, TransformerModelConfig, latent_shapes


@dataclass
class StepVideoModelConfig(TransformerModelConfig):
    """``model.*`` of the Step-Video DiT (the shared transformer fields plus these).
    ``model.seq_length`` is the nominal video-token count per sample (FLOPs, memory, MFU)."""

    in_channels: int = 64
    """Latent channels of the video VAE."""
    patch_size: int = 1
    """Spatial patch size over the latent (patch_size x patch_size latent pixels per token)."""
    caption_dim: int = 6144
    """Width of the LLM-style text embedding (Step-LLM)."""
    caption_tokens: int = 320
    """LLM-style text embedding length (padded / truncated to it, with a mask)."""
    clip_dim: int = 1024
    """Width of the CLIP-style text embedding; 0 disables the second text encoder."""
    clip_tokens: int = 77
    """CLIP-style text embedding length."""
    rope_axes: list[int] = field(default_factory=lambda: [64, 32, 32])
    """Head channels rotated by 3D RoPE for the frame, height and width positions (sum =
    head_dim, each even)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    caption_norm_affine: bool = False
    """The LayerNorm on the LLM-style text embedding has a weight and bias."""

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        for name in ("in_channels", "patch_size", "caption_dim", "caption_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        axes = self.rope_axes
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.kv_channels:
            raise ConfigError(
                f"model.rope_axes={axes} must be three positive even numbers summing to the head dim {self.kv_channels}"
            )
        if self.num_query_groups != self.num_attention_heads:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups}: the Step-Video DiT uses plain multi-head "
                f"attention; set it to model.num_attention_heads={self.num_attention_heads}"
            )
        if self.clip_dim < 0 or self.clip_tokens < 0 or (self.clip_dim > 0) != (self.clip_tokens > 0):
            raise ConfigError(
                f"model.clip_dim={self.clip_dim} and model.clip_tokens={self.clip_tokens} must both be "
                "positive (two text encoders) or both 0 (one)"
            )


def validate(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    # Every rank holds an equal slice of a sample's tokens: CP ranks, and TP ranks under SP.
    split = p.cp * (p.tp if p.sequence_parallel else 1)
    for t, h, w in latent_shapes(cfg):
        if h % m.patch_size or w % m.patch_size:
            raise ConfigError(
                f"data.synthetic_latent_shapes: {[t, h, w]} is not divisible by model.patch_size={m.patch_size}"
            )
        tokens = t * (h // m.patch_size) * (w // m.patch_size)
        if p.cp > 1 and tokens % split:
            what = "parallel.cp x parallel.tp (sequence parallelism)" if p.sequence_parallel else "parallel.cp"
            raise ConfigError(
                f"data.synthetic_latent_shapes: {[t, h, w]} is {tokens} tokens, not divisible by {what} = {split}"
            )
    if cfg.eval.sample_vae and (p.tp > 1 or p.pp > 1 or p.cp > 1):
        raise ConfigError(
            f"eval.sample_vae: sampling at validation runs the whole DiT on rank 0, which needs "
            f"parallel.tp=1, parallel.pp=1 and parallel.cp=1 (got {p.tp}, {p.pp} and {p.cp}); sample a "
            "checkpoint with fmtrain sample --vae instead"
        )
    if m.recompute == "selective":
        raise ConfigError(
            "model.recompute=selective: the DiT's SDPA attention stores no score matrix, so "
            "there is nothing selective to recompute; use none or full"
        )


SETTINGS = FamilySettings(
    model=StepVideoModelConfig,
    objectives=("flow_matching", "video_dpo"),
    parallel=frozenset({"tp", "sp", "pp", "vpp", "cp"}),
    validate=validate,
)
