"""The Video-VAE <-> the released ``vae/`` of Step-Video-T2V (``stepfun-ai/stepvideo-t2v``).

The release keeps the autoencoder as one safetensors file per version, with no config.json::

    RELEASE/vae/vae_v2.safetensors     v2: 64 latent channels, 16x16 spatial / 8x temporal
    RELEASE/vae/vae.safetensors        v1: 16 latent channels, 8x8 / 4x

Its tensor names are fmtrain's parameter names (:mod:`.model` names its modules as the official
``AutoencoderKL`` does, and ``decoder.conv_out`` holds its weight directly, as the file does),
so the mapping is the identity. The architecture is read off the tensors (latent channels,
widths, blocks per level, which levels resample in time, v1 or v2), so a release imports without
a recipe; export writes the file back bit for bit, plus a config.json describing it (which the
official loader ignores).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fmtrain.config import Config, ConfigError
from fmtrain.models.release import (
    HFCheckpointError,
    SameNameTensors,
    check_architecture,
    check_tensor_names,
    overrides_as_args,
)

FORMAT = "Step-Video-T2V release (vae/)"
WEIGHTS_SUBDIR = "vae"
WEIGHTS_PREFIX = "vae_v2"
DTYPE_PROBE = "encoder.conv_in.conv.weight"
CLASS_NAME = "AutoencoderKL"
LEVEL_PROBE = "encoder.down.0.block.0.conv1.conv.weight"
"""A tensor of this layout only (LaVin-DiT's ST-VAE has ``encoder.conv_in.conv.weight`` too)."""
FILES = {2: "vae_v2.safetensors", 1: "vae.safetensors"}


def weights_prefix(cfg: Config) -> str:
    return FILES[cfg.model.version].removesuffix(".safetensors")


def weights_path(path: Path) -> Path:
    """The safetensors file of a release: ``RELEASE``, ``RELEASE/vae`` or the file itself; in a
    directory with both versions, v2."""
    path = Path(path)
    if path.is_file():
        return path
    folder = path / WEIGHTS_SUBDIR if (path / WEIGHTS_SUBDIR).is_dir() else path
    for name in FILES.values():
        if (folder / name).is_file():
            return folder / name
    return folder


def release_config(ckpt) -> tuple[dict, str]:
    """The architecture of a release file, read off its tensor headers (``ckpt``: the file,
    opened by the caller)."""
    names = ckpt.names
    if DTYPE_PROBE not in names or LEVEL_PROBE not in names:
        raise HFCheckpointError(f"{ckpt.path}: no {LEVEL_PROBE}: not a Step-Video VAE")
    shape = lambda name: tuple(ckpt.info(name)[0])  # noqa: E731
    v2 = "encoder.conv_patchify.conv.conv.weight" in names
    levels = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n))})
    blocks = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))})
    enc_ch = shape("encoder.conv_in.conv.weight")[0]
    dec_top = shape("decoder.mid.block_1.conv1.conv.weight")[0]
    config = {
        "_class_name": CLASS_NAME,
        "version": 2 if v2 else 1,
        "z_channels": shape("encoder.conv_out.conv.weight")[0] // 2,
        "in_channels": shape("encoder.conv_in.conv.weight")[1],
        "encoder_channels": enc_ch,
        "encoder_channel_mult": [shape(f"encoder.down.{i}.block.0.conv1.conv.weight")[0] // enc_ch for i in levels],
        "decoder_channels": shape("decoder.conv_out.weight")[1],
        "num_res_blocks": len(blocks),
        "temporal_down_levels": [i for i in levels if f"encoder.down.{i}.downsample.conv.conv.weight" in names],
        "temporal_up_levels": [i for i in levels if f"decoder.up.{i}.upsample.conv3d.conv1.conv.weight" in names],
    }
    config["decoder_channel_mult"] = [
        shape(f"decoder.up.{i}.block.0.conv1.conv.weight")[0] // config["decoder_channels"] for i in levels
    ]
    if dec_top != config["decoder_channels"] * config["decoder_channel_mult"][-1]:
        raise HFCheckpointError(f"{ckpt.path}: decoder widths do not fit a Step-Video VAE")
    return config, f"{ckpt.path} (tensor shapes)"


def recognizes(config_json: dict) -> bool:
    return config_json.get("_class_name") == CLASS_NAME


_FIELDS = (
    "version",
    "z_channels",
    "in_channels",
    "encoder_channels",
    "encoder_channel_mult",
    "decoder_channels",
    "decoder_channel_mult",
    "num_res_blocks",
    "temporal_down_levels",
    "temporal_up_levels",
)


def model_overrides(config_json: dict, ckpt) -> list[str]:
    """The architecture, and the release's clip length (17 frames: one causal chunk) for a config
    made from the file alone."""
    model = {f"model.{k}": config_json[k] for k in _FIELDS}
    return overrides_as_args({"model.family": "video_vae", **model, "data.video_frames": 17})


def check_model_matches_hf(cfg: Config, config_json: dict, source: str) -> None:
    if cfg.model.family != "video_vae":
        raise ConfigError(f"model.family={cfg.model.family!r}: {source} is a Step-Video VAE")
    check_architecture(cfg, {f"model.{k}": config_json[k] for k in _FIELDS}, {f"model.{k}": k for k in _FIELDS}, source)


def hf_config_from_fmtrain(cfg: Config, dtype: torch.dtype | None = None) -> dict:
    m = cfg.model
    return {"_class_name": CLASS_NAME, **{k: getattr(m, k) for k in _FIELDS}}


# ---------------------------------------------------------------------- tensors


def shapes_from_config(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the autoencoder and its shape (a meta build: no memory)."""
    from fmtrain.models.video_vae.family import build_vae

    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in build_vae(cfg).state_dict().items()}


def check_hf_names(ckpt, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors are not exactly this model's, naming the tensor and both shapes,
    before anything is read."""
    check_tensor_names(ckpt, shapes)


_MAPPING = SameNameTensors("Step-Video VAE")
piece_reader = _MAPPING.piece_reader
export_order = _MAPPING.export_order
hf_shapes = _MAPPING.hf_shapes
hf_tensors_from_megatron = _MAPPING.hf_tensors_from_megatron


def write_export_extras(ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
    return ""


__all__: list[Any] = [
    "check_hf_names",
    "check_model_matches_hf",
    "export_order",
    "hf_config_from_fmtrain",
    "hf_shapes",
    "hf_tensors_from_megatron",
    "model_overrides",
    "piece_reader",
    "recognizes",
    "release_config",
    "shapes_from_config",
    "weights_path",
    "weights_prefix",
    "write_export_extras",
]
