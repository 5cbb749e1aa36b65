"""A trained model for inference from an fmtrain checkpoint or a release directory.

Used where fmtrain runs a finished model rather than training one: ``fmtrain data encode`` (the
VAE that turns clips into latents), ``fmtrain sample --vae`` and ``eval.sample_vae`` (latents back
to pixels), a DiT family encoding its inputs. An fmtrain checkpoint (or run directory) brings its
resolved config, so no recipe is needed; a release directory (``vae/vae_v2.safetensors`` of
Step-Video-T2V, a directory with LaVin-DiT's ``stvae.safetensors``, a Hugging Face directory)
gives its architecture through the family's converter, as ``fmtrain convert from-hf`` reads it.
Either way the whole model is built on one device, whatever layout wrote it.

A VAE family's ``latent_codec`` (:class:`fmtrain.models.registry.LatentCodec`) turns pixels into
the latents a DiT trains on and back: :func:`latent_encoder` / :func:`latent_decoder` load the
VAE and return it as a function, whichever VAE family ``latent_vae_config`` was asked for.
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
    from fmtrain.checkpoint.hf.convert import from_hf_config

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
        _check_release(source, folder, family)
        cfg = from_hf_config(folder, None, extra, family=family)
    else:
        raise FileNotFoundError(f"{source}: no such checkpoint, run directory or release")
    if cfg.model.family != family:
        raise ConfigError(f"{source} holds a model.family={cfg.model.family!r} model, expected {family!r}")
    return cfg


def vae_family_of(source: str | Path) -> str:
    """The VAE family of ``source``: an fmtrain checkpoint's saved ``model.family``, or the family
    whose converter recognises the release; refused unless it is a VAE family (naming them)."""
    from fmtrain.checkpoint import resolve_checkpoint
    from fmtrain.checkpoint.hf.convert import detect_family

    source = Path(source)
    if is_fmtrain_checkpoint(source):
        family = str((read_state(resolve_checkpoint(source)).get("config") or {}).get("model", {}).get("family", ""))
    elif source.exists():
        family = detect_family(source.parent if source.is_file() else source)
    else:
        raise FileNotFoundError(f"{source}: no such checkpoint, run directory or release")
    if family not in vae_families():
        raise ConfigError(f"{source} holds a {family or 'unknown'} model, not a VAE ({', '.join(vae_families())})")
    return family


def vae_families() -> list[str]:
    """The built-in families with a latent codec (the VAEs a DiT's latents come from)."""
    from fmtrain.config import BUILTIN_FAMILIES
    from fmtrain.models.registry import get_family

    return [name for name in BUILTIN_FAMILIES if get_family(name).latent_codec is not None]


def _check_release(source: Path, folder: Path, family: str) -> None:
    """Refuse ``folder`` unless ``family``'s converter recognises it, with the converter's own reason
    (a pickle refused, a tensor missing) or what the folder looks like."""
    from fmtrain.checkpoint.hf.convert import converter, detect_family, release_config
    from fmtrain.checkpoint.hf.io import HFCheckpointError

    conv = converter(family)
    try:
        config_json, _ = release_config(folder, conv)
    except (ConfigError, HFCheckpointError) as exc:
        raise ConfigError(f"{source}: not a {family} release: {exc}") from None
    if not conv.recognizes(config_json):
        raise ConfigError(f"{source}: expected a {family} release, found what looks like {detect_family(folder)}")


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


def latent_vae_config(source: str | Path, in_channels: int, what: str, family: str = "video_vae") -> Config:
    """The config of the VAE of ``family`` (``video_vae``, ``st_vae``) in ``source`` that is to
    encode or decode a DiT's latents of ``in_channels`` channels; refused (naming ``what``, the
    setting that gave it) otherwise."""
    vae_cfg = pretrained_config(source, family)
    latent_codec(vae_cfg)
    if vae_cfg.model.z_channels != in_channels:
        raise ConfigError(
            f"{what} {source} has {vae_cfg.model.z_channels} latent channels, the DiT's model.in_channels={in_channels}"
        )
    return vae_cfg


def latent_codec(vae_cfg: Config):
    """The :class:`fmtrain.models.registry.LatentCodec` of ``vae_cfg``'s family."""
    from fmtrain.models.registry import get_family

    codec = get_family(vae_cfg.model.family).latent_codec
    if codec is None:
        raise ConfigError(
            f"model.family={vae_cfg.model.family!r} is not a VAE family; these are: {', '.join(vae_families())}"
        )
    return codec


def latent_encoder(vae_cfg: Config, source: str | Path, device: torch.device):
    """``encode(pixels, generator=None)``: pixels [B, C, T, H, W] in [-1, 1] -> latents
    [B, C', T', H', W'] as the DiT sees them (the posterior mean, or a sample drawn with
    ``generator``; normalised as the family defines) by the VAE of ``source``, chunked and tiled as
    its config says."""
    codec = latent_codec(vae_cfg)
    vae = load_pretrained(vae_cfg, source, device)
    dtype = next(vae.parameters()).dtype

    def encode(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return codec.encode(vae_cfg, vae, pixels.to(device, dtype), generator=generator)

    return encode


def latent_decoder(vae_cfg: Config, source: str | Path, device: torch.device):
    """latents [B, C, T', H', W'] (as the DiT sees them) -> pixels [B, 3, T, H, W] in about [-1, 1]
    by the VAE of ``source``, decoded chunk-wise and tiled as its config says."""
    codec = latent_codec(vae_cfg)
    vae = load_pretrained(vae_cfg, source, device)
    dtype = next(vae.parameters()).dtype

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return codec.decode(vae_cfg, vae, latents.to(device, dtype))

    return decode


__all__ = [
    "vae_family_of",
    "is_fmtrain_checkpoint",
    "latent_codec",
    "latent_decoder",
    "latent_encoder",
    "latent_vae_config",
    "load_pretrained",
    "pretrained_config",
]
