"""A trained model for inference from an fmtrain checkpoint or a release directory.

Used where fmtrain runs a finished model rather than training one: ``fmtrain data encode`` (the
Video-VAE that turns clips into latents) and ``fmtrain sample --vae`` (latents back to pixels).
An fmtrain checkpoint (or run directory) brings its resolved config, so no recipe is needed; a
release directory (``vae/vae_v2.safetensors`` of Step-Video-T2V, a Hugging Face directory) gives
its architecture through the family's converter, as ``fmtrain convert from-hf`` reads it. Either
way the whole model is built on one device, whatever layout wrote it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fmtrain.checkpoint.errors import CheckpointError
from fmtrain.checkpoint.files import STATE_FILE, read_state
from fmtrain.config import WHOLE_MODEL_LAYOUT, Config, ConfigError, config_from_dict


def is_fmtrain_checkpoint(path: Path) -> bool:
    """A checkpoint directory or a run directory with checkpoints (not a release)."""
    path = Path(path)
    return (path / STATE_FILE).is_file() or (path / "checkpoints").is_dir()


def pretrained_config(source: str | Path, family: str, overrides: list[str] | None = None) -> Config:
    """The config of the model in ``source`` (its saved config, or the release's architecture),
    laid out whole on every rank; refuses a source of another family, naming both."""
    from fmtrain.checkpoint import resolve_checkpoint
    from fmtrain.checkpoint.hf.convert import detect_family, from_hf_config

    source = Path(source)
    extra = [*WHOLE_MODEL_LAYOUT, *(overrides or [])]
    if is_fmtrain_checkpoint(source):
        ckpt = resolve_checkpoint(source)
        saved = read_state(ckpt).get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{ckpt}/{STATE_FILE} has no resolved config to build the model from")
        cfg = config_from_dict(saved, extra)
    elif source.is_dir() or source.is_file():
        folder = source.parent if source.is_file() else source
        found = detect_family(folder)
        if found != family:
            raise ConfigError(f"{source}: expected a {family} release, found what looks like {found}")
        cfg = from_hf_config(folder, None, extra)
    else:
        raise FileNotFoundError(f"{source}: no such checkpoint, run directory or release")
    if cfg.model.family != family:
        raise ConfigError(f"{source} holds a model.family={cfg.model.family!r} model, expected {family!r}")
    return cfg


def load_pretrained(cfg: Config, source: str | Path, device: torch.device) -> torch.nn.Module:
    """The primary part of ``cfg`` on ``device`` (fp32 on CPU, bf16 on GPU) with the weights of
    ``source``, in eval mode. Needs :func:`fmtrain.parallel.initialize` with a one-part layout
    (``pretrained_config`` gives one)."""
    from fmtrain.checkpoint import load_model_weights
    from fmtrain.checkpoint.hf.convert import load_hf_weights
    from fmtrain.engine.parts import build_for_inference, family_module
    from fmtrain.models.registry import get_family

    source = Path(source)
    model = build_for_inference(cfg, get_family(cfg.model.family).primary(cfg), device)
    if is_fmtrain_checkpoint(source):
        load_model_weights(source, model, cfg)
    else:
        load_hf_weights([model], source.parent if source.is_file() else source, cfg)
    module = family_module(model)
    module.requires_grad_(False)
    return module.eval()


def latent_vae_config(source: str | Path, in_channels: int, what: str) -> Config:
    """The config of the Video-VAE in ``source`` that is to decode a DiT's latents of
    ``in_channels`` channels; refused (naming ``what``, the setting that gave it) otherwise."""
    vae_cfg = pretrained_config(source, "video_vae")
    if vae_cfg.model.z_channels != in_channels:
        raise ConfigError(
            f"{what} {source} has {vae_cfg.model.z_channels} latent channels, the DiT's model.in_channels={in_channels}"
        )
    return vae_cfg


def latent_decoder(vae_cfg: Config, source: str | Path, device: torch.device):
    """latents [B, C, T', H', W'] -> pixels [B, 3, T, H, W] in about [-1, 1] by the VAE of
    ``source``, decoded chunk-wise and tiled as its config says."""
    from fmtrain.models.video_vae import codec

    vae = load_pretrained(vae_cfg, source, device)
    dtype, options = next(vae.parameters()).dtype, codec.options(vae_cfg.model)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return codec.decode(vae, latents.to(device, dtype), **options)

    return decode


__all__ = [
    "is_fmtrain_checkpoint",
    "latent_decoder",
    "latent_vae_config",
    "load_pretrained",
    "pretrained_config",
]
