"""The VideoMAE V2 family's config section, size presets and rules.

Architecture ("VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking", Wang et al.,
CVPR 2023; official repository OpenGVLab/VideoMAEv2, ``models/modeling_pretrain.py``): a ViT
encoder over 2 x p x p tubelets (fixed sinusoidal positions, pre-norm blocks, LayerNorm eps
1e-6, GELU MLP, q and v biases but no k bias) that sees only the tokens the tube mask leaves
visible, and a narrower decoder that sees them plus mask tokens at the positions it
reconstructs. ``model.size`` picks a published size; fields set in the recipe or on the
command line win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtrain.config import Config, ConfigError, FamilySettings, TransformerModelConfig


def _vit(layers: int, hidden: int, heads: int, ffn: int, patch: int, decoder_hidden: int, decoder_heads: int) -> dict:
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "ffn_hidden_size": ffn,
        "patch_size": patch,
        "decoder_hidden_size": decoder_hidden,
        "decoder_num_attention_heads": decoder_heads,
        "decoder_ffn_hidden_size": 4 * decoder_hidden,
        "decoder_num_layers": 4,
    }


SIZES: dict[str, dict] = {
    # ``pretrain_videomae_{small,base,large,huge}_patch16_224`` and ``giant_patch14_224`` of
    # models/modeling_pretrain.py; decoder depth 4 as the pretraining scripts set it
    # (run_mae_pretraining.py --decoder_depth). ViT-g's FFN is 1408 x 48/11 = 6144.
    "S": _vit(12, 384, 6, 1536, 16, 192, 3),
    "B": _vit(12, 768, 12, 3072, 16, 384, 6),
    "L": _vit(24, 1024, 16, 4096, 16, 512, 8),
    "H": _vit(32, 1280, 16, 5120, 16, 512, 8),
    "g": _vit(40, 1408, 16, 6144, 14, 512, 8),
}


@dataclass
class VideoMAEModelConfig(TransformerModelConfig):
    """``model.*`` of VideoMAE V2. The shared transformer fields describe the encoder; the
    ``decoder_*`` fields the decoder. Clips are ``data.video_frames`` x ``data.video_size``^2."""

    size: str = ""
    """A published size (S, B, L, H, g) whose architecture fields apply unless set explicitly."""
    in_channels: int = 3
    patch_size: int = 16
    tubelet_size: int = 2
    """Frames per token (the Conv3d patch embedding's temporal kernel and stride)."""
    qv_bias: bool = True
    """Learned query and value biases (the key has none), as the release."""
    norm_epsilon: float = 1e-6
    """LayerNorm eps of every block and of the encoder's final norm."""
    decoder_num_layers: int = 4
    decoder_hidden_size: int = 384
    decoder_num_attention_heads: int = 6
    decoder_ffn_hidden_size: int = 1536
    decoder_norm_epsilon: float = 1e-6
    """LayerNorm eps of the decoder's final norm (the release: 1e-6; transformers'
    ``VideoMAEDecoder`` hard-codes 1e-5, which an import from it sets)."""
    init_method_std: float = 0.02
    """Std of the mask token (trunc-normal in the release); linear weights are Xavier-uniform."""

    PRESETS: ClassVar[dict[str, dict]] = SIZES

    @property
    def decoder_head_dim(self) -> int:
        return self.decoder_hidden_size // self.decoder_num_attention_heads

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        p = cfg.parallel
        if self.size and self.size not in SIZES:
            raise ConfigError(f"model.size={self.size!r} is not one of {', '.join(SIZES)} (or empty)")
        for name in (
            "in_channels",
            "patch_size",
            "tubelet_size",
            "decoder_num_layers",
            "decoder_hidden_size",
            "decoder_num_attention_heads",
            "decoder_ffn_hidden_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.num_query_groups != self.num_attention_heads:
            raise ConfigError(
                f"model.num_query_groups={self.num_query_groups}: VideoMAE uses plain multi-head attention; "
                f"set it to model.num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is not None and self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError("model.head_dim: VideoMAE's heads split model.hidden_size exactly; leave it unset")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ConfigError(
                f"model.decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                f"model.decoder_num_attention_heads={self.decoder_num_attention_heads}"
            )
        for name in ("decoder_num_attention_heads", "decoder_ffn_hidden_size"):
            if getattr(self, name) % p.tp:
                raise ConfigError(f"model.{name}={getattr(self, name)} is not divisible by parallel.tp={p.tp}")


def token_grid(cfg: Config) -> tuple[int, int, int]:
    """(T / tubelet, H / patch, W / patch) of the run's clips."""
    m, d = cfg.model, cfg.data
    return d.video_frames // m.tubelet_size, d.video_size // m.patch_size, d.video_size // m.patch_size


def encoder_visible_per_frame(tokens_per_frame: int, ratio: float) -> int:
    """Tokens per time slice the tube mask (:mod:`.masking`) leaves visible."""
    return tokens_per_frame - int(ratio * tokens_per_frame)


def decoder_visible_per_frame(h: int, w: int, encoder_ratio: float, decoder_ratio: float) -> int:
    """Positions per time slice the decoder gets a mask token for (:mod:`.masking`'s running
    cells)."""
    if decoder_ratio <= 0:
        return int(encoder_ratio * h * w)
    return (4 - int(4 * decoder_ratio)) * (h // 2) * (w // 2)


def token_counts(cfg: Config) -> tuple[int, int]:
    """(tokens the encoder sees, tokens the decoder sees) per clip: the same for every clip."""
    t, h, w = token_grid(cfg)
    o = cfg.objective
    encoder = t * encoder_visible_per_frame(h * w, o.mask_ratio)
    decoder = t * decoder_visible_per_frame(h, w, o.mask_ratio, o.decoder_mask_ratio)
    return encoder, encoder + decoder


def validate(cfg: Config) -> None:
    m, d, o, p = cfg.model, cfg.data, cfg.objective, cfg.parallel
    if d.video_frames % m.tubelet_size:
        raise ConfigError(
            f"data.video_frames={d.video_frames} is not a multiple of model.tubelet_size={m.tubelet_size}"
        )
    if d.video_size % m.patch_size:
        raise ConfigError(f"data.video_size={d.video_size} is not a multiple of model.patch_size={m.patch_size}")
    _, h, w = token_grid(cfg)
    if o.decoder_mask_ratio > 0 and (h % 2 or w % 2):
        raise ConfigError(
            f"objective.decoder_mask_ratio={o.decoder_mask_ratio}: running-cell masking tiles 2x2 cells over "
            f"the {h}x{w} token grid, which needs even sides (data.video_size / model.patch_size)"
        )
    encoder, decoder = token_counts(cfg)
    if encoder < 1:
        raise ConfigError(f"objective.mask_ratio={o.mask_ratio} leaves no visible token of {h}x{w} per frame")
    if p.sequence_parallel:
        for what, count in (("encoder", encoder), ("decoder", decoder)):
            if count % p.tp:
                raise ConfigError(
                    f"parallel.sequence_parallel: the {what} sees {count} tokens per clip, not divisible by "
                    f"parallel.tp={p.tp}; change objective.mask_ratio / decoder_mask_ratio or data.video_size"
                )
    if m.recompute == "selective":
        raise ConfigError(
            "model.recompute=selective: SDPA stores no score matrix, so there is nothing selective "
            "to recompute; use none or full"
        )


SETTINGS = FamilySettings(
    model=VideoMAEModelConfig, objectives=("mae",), parallel=frozenset({"tp", "sp", "pp"}), validate=validate
)
