"""The ST-VAE <-> LaVin-DiT's released ``stvae.pt`` (Hugging Face ``DerrickWang005/LaVin-DiT``).

The release is one torch pickle whose ``["state_dict"]`` is the state dict of the official
``AutoencoderKLSTVAE`` (official repository DerrickWang005/LaVin-DiT, ``lib/model/vae3d.py``,
which loads it with ``torch.load(path)["state_dict"]`` and ``strict=False``), with no config.
fmtrain's parameter names are that module's, so the mapping is the identity:

- import: ``RELEASE/stvae.pt`` (or the file itself) is a pickle, refused unless the caller allows
  pickles (``fmtrain convert from-hf --allow-pickle``), then read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only). A directory holding
  ``stvae.safetensors`` (what the export writes) is read from that instead, no pickle involved;
  ``model.init_from_hf`` takes such a directory. Only the module's tensors (``encoder.*``,
  ``decoder.*``) are read: anything else a training checkpoint keeps beside them is not the
  model's (the official loader's ``strict=False`` skips it too);
- the architecture is read off the tensors (input and latent channels, block widths, ResNet
  blocks per level); what the weights do not fix (the temporal compression, the GroupNorm
  groups) takes the release's values unless a ``config.json`` beside the weights gives them (the
  export writes one);
- export: ``OUT/stvae.safetensors`` plus, for the official loader, ``OUT/stvae.pt`` =
  ``{"state_dict": ...}`` with the same tensors, and ``OUT/config.json`` (the official
  constructor's arguments, and fmtrain's ``latent_shift`` / ``latent_scale``). The ``.pt`` is
  written with the whole state dict in memory (0.86 GB in fp32 for the release's size).
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

FORMAT = "LaVin-DiT ST-VAE release (stvae.pt)"
WEIGHTS_SUBDIR = ""
WEIGHTS_PREFIX = "stvae"
DTYPE_PROBE = "encoder.conv_in.conv.weight"
CLASS_NAME = "AutoencoderKLSTVAE"
PICKLE_FILE = "stvae.pt"
SAFETENSORS_FILE = "stvae.safetensors"
LAYOUT_PROBE = "encoder.down_blocks.0.resnets.0.conv1.conv.weight"
"""A tensor of this layout only (the Step-Video VAE has ``encoder.conv_in.conv.weight`` too)."""
MODULES = ("encoder", "decoder")
"""The official module's children with weights (``quant_conv`` / ``post_quant_conv`` are off in the release)."""

_FIELDS = {  # model.* <- the official constructor's argument
    "in_channels": "in_channels",
    "z_channels": "latent_channels",
    "block_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "temporal_compression": "temporal_compression_ratio",
    "norm_groups": "norm_num_groups",
}
RELEASE_DEFAULTS = {"temporal_compression_ratio": 4, "norm_num_groups": 32}
"""What the weights do not fix, as ``AutoencoderKLSTVAE()`` sets it."""
_NORMALISATION = ("latent_shift", "latent_scale")


def weights_path(path: Path) -> Path:
    """The weights of a release: the file itself, or in a directory ``stvae.safetensors`` (its
    index when sharded), else ``stvae.pt``, else its only ``*.pt`` file."""
    path = Path(path)
    if path.is_file() or not path.is_dir():
        return path
    for name in (SAFETENSORS_FILE, f"{SAFETENSORS_FILE}.index.json", PICKLE_FILE):
        if (path / name).is_file():
            return path / name
    pickles = sorted(path.glob("*.pt"))
    return pickles[0] if len(pickles) == 1 else path


class _ModelTensors:
    """The tensors of a checkpoint that belong to the official module (``encoder.*``, ``decoder.*``,
    and ``quant_conv`` / ``post_quant_conv``, refused below): what the converter checks and reads."""

    def __init__(self, ckpt):
        self.path, self._ckpt = ckpt.path, ckpt
        self.names = frozenset(
            n for n in ckpt.names if n.split(".", 1)[0] in (*MODULES, "quant_conv", "post_quant_conv")
        )

    def info(self, name: str):
        return self._ckpt.info(name)


def release_config(ckpt) -> tuple[dict, str]:
    """The architecture of a release (``ckpt``: its weights, opened by the caller) as the official
    constructor's arguments, read off the tensor shapes and, for what they do not fix, the
    ``config.json`` beside the weights or the release's defaults."""
    model = _ModelTensors(ckpt)
    names = model.names
    if LAYOUT_PROBE not in names or DTYPE_PROBE not in names:
        raise HFCheckpointError(f"{ckpt.path}: no {LAYOUT_PROBE}: not a LaVin-DiT ST-VAE")
    quant = sorted(n for n in names if not n.startswith(MODULES))
    if quant:
        raise HFCheckpointError(
            f"{ckpt.path}: has {quant[0]}: an ST-VAE with use_quant_conv / use_post_quant_conv, which the "
            "release leaves off and fmtrain does not build"
        )
    shape = lambda name: tuple(ckpt.info(name)[0])  # noqa: E731
    levels = sorted({int(m.group(1)) for n in names if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", n))})
    layers = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", n))}
    config = {
        "_class_name": CLASS_NAME,
        "in_channels": shape("encoder.conv_in.conv.weight")[1],
        "latent_channels": shape("encoder.conv_out.conv.weight")[0] // 2,
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in levels],
        "layers_per_block": len(layers),
    }
    stored = ckpt.config()
    if stored.get("_class_name") != CLASS_NAME:
        return {**config, **RELEASE_DEFAULTS}, (
            f"{ckpt.path} (tensor shapes; temporal_compression_ratio and norm_num_groups: the release's)"
        )
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    for key, value in config.items():
        if key in stored and stored[key] != value:
            raise HFCheckpointError(
                f"{folder}/config.json has {key}={stored[key]!r}, but the tensors of {ckpt.path} give {value!r}"
            )
    extra = {k: stored[k] for k in (*RELEASE_DEFAULTS, *_NORMALISATION) if k in stored}
    return {**config, **RELEASE_DEFAULTS, **extra}, f"{ckpt.path} (tensor shapes) with {folder}/config.json"


def recognizes(config_json: dict) -> bool:
    return config_json.get("_class_name") == CLASS_NAME


def _want(config_json: dict) -> dict:
    return {f"model.{field}": config_json[key] for field, key in _FIELDS.items()}


def model_overrides(config_json: dict, ckpt) -> list[str]:
    """The architecture (and a stored normalisation), and 17-frame clips (1 + 4 k frames) for a
    config made from the file alone."""
    normalisation = {f"model.{k}": config_json[k] for k in _NORMALISATION if k in config_json}
    return overrides_as_args({"model.family": "st_vae", **_want(config_json), **normalisation, "data.video_frames": 17})


def check_model_matches_hf(cfg: Config, config_json: dict, source: str) -> None:
    if cfg.model.family != "st_vae":
        raise ConfigError(f"model.family={cfg.model.family!r}: {source} is a LaVin-DiT ST-VAE")
    check_architecture(cfg, _want(config_json), {f"model.{k}": v for k, v in _FIELDS.items()}, source)


def hf_config_from_fmtrain(cfg: Config, dtype: torch.dtype | None = None) -> dict:
    """config.json: the official constructor's arguments (``AutoencoderKLSTVAE(**config)`` without
    ``_class_name``, ``latent_shift``, ``latent_scale`` builds the model) and the normalisation."""
    m = cfg.model
    config = {"_class_name": CLASS_NAME, **{key: getattr(m, field) for field, key in _FIELDS.items()}}
    config["out_channels"] = m.in_channels
    return config | {k: getattr(m, k) for k in _NORMALISATION}


# ---------------------------------------------------------------------- tensors


def shapes_from_config(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the autoencoder and its shape, in the release's order (a meta build)."""
    from fmtrain.models.st_vae.family import build_vae

    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in build_vae(cfg).state_dict().items()}


def check_hf_names(ckpt, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose module tensors are not exactly this model's, naming the tensor and both
    shapes, before anything is read."""
    check_tensor_names(_ModelTensors(ckpt), shapes)


_MAPPING = SameNameTensors("ST-VAE")
piece_reader = _MAPPING.piece_reader
export_order = _MAPPING.export_order
hf_shapes = _MAPPING.hf_shapes
hf_tensors_from_megatron = _MAPPING.hf_tensors_from_megatron


def write_export_extras(ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
    """``stvae.pt`` = ``{"state_dict": ...}`` of the safetensors just written, for the official loader."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(Path(out_dir).glob(f"{WEIGHTS_PREFIX}*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    torch.save({"state_dict": {name: tensors[name] for name in shapes_from_config(cfg)}}, Path(out_dir) / PICKLE_FILE)
    return f" and {PICKLE_FILE} (the official loader's ['state_dict'])"


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
    "write_export_extras",
]
