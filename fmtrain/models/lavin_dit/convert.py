"""LaVin-DiT's J-DiT <-> the released ``lavin_dit.safetensors`` (official repository
DerrickWang005/LaVin-DiT; ``inference.py`` loads it into ``LaVinDiT_3B_2()``).

The release is one safetensors file and no config.json: the architecture is hard-coded in
``lib/model/dit.py`` (``LaVinDiT_3B_2``: depth 22, hidden 2304, 32 heads, ``kv_group`` 4).
fmtrain's module names are the release's (:mod:`.model`), and its distributed-checkpoint keys are
those names with every block under its global index, so the mapping is the identity; tensor-
parallel slicing (rows of q / k / v, the q/k norms and gate / up, columns of the output and down
projections) happens in :mod:`fmtrain.checkpoint.hf.layout` from ``sharded_state_dict()``, so an
import works at any (TP, PP, VPP) with each rank reading only its slices.

The architecture of a directory is its config.json when there is one (export writes the
release's constructor arguments ``patch_size``, ``in_channels``, ``hidden_size``, ``depth``,
``num_heads``, ``kv_group``, plus ``ffn_hidden_size``), else it is read off the tensors: hidden
width, depth, key/value width and SwiGLU width from the shapes, 16 latent channels and patch 2
from the release (their product is all the shapes hold), and the head count of the released
size (the shapes cannot tell heads from head width; another width needs a config.json).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fmtrain.config import Config, ConfigError
from fmtrain.models.lavin_dit.config import SIZES
from fmtrain.models.lavin_dit.sizes import tensor_shapes
from fmtrain.models.release import (
    HFCheckpointError,
    SameNameTensors,
    check_architecture,
    check_tensor_names,
    overrides_as_args,
)

FORMAT = "LaVin-DiT release (lavin_dit.safetensors)"
WEIGHTS_SUBDIR = ""
WEIGHTS_PREFIX = "lavin_dit"
DTYPE_PROBE = "x_embedder.0.weight"
CLASS_NAME = "LaVinDiT"
RELEASE = SIZES["3.4B"]
"""The released size: what a directory without config.json is read as."""


def weights_path(path: Path) -> Path:
    """A release directory, or the safetensors file itself (its directory then)."""
    path = Path(path)
    return path.parent if path.is_file() else path


# ---------------------------------------------------------------------- config


def release_config(ckpt) -> tuple[dict, str]:
    """The release constructor's arguments: config.json beside the weights, or read off the
    tensors (``ckpt``: the directory's files, opened by the caller)."""
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    file = folder / "config.json"
    if file.is_file():
        try:
            return json.loads(file.read_text()), str(file)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    names = ckpt.names
    if DTYPE_PROBE not in names or "blocks.0.joint_attn.cond_k.weight" not in names:
        raise HFCheckpointError(f"{ckpt.path}: no {DTYPE_PROBE} / blocks.0.joint_attn.*: not a LaVin-DiT release")
    shape = lambda name: tuple(ckpt.info(name)[0])  # noqa: E731
    hidden, patch_features = shape(DTYPE_PROBE)
    kv_width = shape("blocks.0.joint_attn.cond_k.weight")[0]
    if hidden != RELEASE["hidden_size"] or patch_features != RELEASE["in_channels"] * RELEASE["patch_size"] ** 2:
        raise HFCheckpointError(
            f"{ckpt.path}: hidden {hidden} and patch features {patch_features} are not the released "
            f"LaVin-DiT's ({RELEASE['hidden_size']}, {RELEASE['in_channels'] * RELEASE['patch_size'] ** 2}), and "
            "there is no config.json giving the head count and patch size: add one (num_heads, kv_group, "
            "patch_size, in_channels)"
        )
    heads = RELEASE["num_attention_heads"]
    config = {
        "_class_name": CLASS_NAME,
        "patch_size": [RELEASE["patch_size"]] * 2,
        "in_channels": RELEASE["in_channels"],
        "hidden_size": hidden,
        "depth": len({int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}),
        "num_heads": heads,
        "kv_group": heads // (kv_width // (hidden // heads)),
        "ffn_hidden_size": shape("blocks.0.cond_mlp.gate_proj.weight")[0],
    }
    return config, f"{ckpt.path} (tensor shapes and the released head count)"


def recognizes(config_json: dict) -> bool:
    return config_json.get("_class_name") == CLASS_NAME


def fmtrain_model_overrides(config_json: dict) -> dict[str, Any]:
    """``model.*`` values of the release constructor's arguments."""
    c = config_json
    patch = c.get("patch_size", [2, 2])
    patch = patch if isinstance(patch, int) else patch[0]
    if not isinstance(c.get("patch_size", 2), int) and len(set(c["patch_size"])) != 1:
        raise ConfigError(f"config.json patch_size={c['patch_size']}: fmtrain's J-DiT uses square patches")
    hidden, heads = int(c["hidden_size"]), int(c["num_heads"])
    if hidden % heads:
        raise ConfigError(f"config.json hidden_size={hidden} is not divisible by num_heads={heads}")
    kv_group = int(c.get("kv_group", 1))
    if heads % kv_group:
        raise ConfigError(f"config.json num_heads={heads} is not divisible by kv_group={kv_group}")
    out: dict[str, Any] = {
        "model.family": "lavin_dit",
        "model.num_layers": int(c["depth"]),
        "model.hidden_size": hidden,
        "model.num_attention_heads": heads,
        "model.num_query_groups": heads // kv_group,
        "model.in_channels": int(c.get("in_channels", 16)),
        "model.patch_size": int(patch),
    }
    if "ffn_hidden_size" in c:
        out["model.ffn_hidden_size"] = int(c["ffn_hidden_size"])
    return out


def model_overrides(config_json: dict, ckpt) -> list[str]:
    return overrides_as_args(fmtrain_model_overrides(config_json))


_RELEASE_FIELD = {
    "model.family": "_class_name",
    "model.num_layers": "depth",
    "model.hidden_size": "hidden_size",
    "model.num_attention_heads": "num_heads",
    "model.num_query_groups": "num_heads / kv_group",
    "model.in_channels": "in_channels",
    "model.patch_size": "patch_size",
}


def check_model_matches_hf(cfg: Config, config_json: dict, source: str) -> None:
    want = fmtrain_model_overrides(config_json)
    fields = dict(_RELEASE_FIELD)
    if "model.ffn_hidden_size" in want:
        fields["model.ffn_hidden_size"] = "ffn_hidden_size"
    check_architecture(cfg, want, fields, source, shown={"model.family": CLASS_NAME})


def hf_config_from_fmtrain(cfg: Config, dtype: torch.dtype | None = None) -> dict:
    m = cfg.model
    return {
        "_class_name": CLASS_NAME,
        "patch_size": [m.patch_size, m.patch_size],
        "in_channels": m.in_channels,
        "hidden_size": m.hidden_size,
        "depth": m.num_layers,
        "num_heads": m.num_attention_heads,
        "kv_group": m.num_attention_heads // m.num_query_groups,
        "ffn_hidden_size": m.ffn_hidden_size,
    }


# ---------------------------------------------------------------------- tensors


def shapes_from_config(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release (name -> shape): fmtrain's own names and shapes."""
    return tensor_shapes(cfg)


def check_hf_names(ckpt, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a file whose tensors are not exactly this model's, naming the tensor and both
    shapes, before anything is read."""
    check_tensor_names(ckpt, shapes)


_MAPPING = SameNameTensors("LaVin-DiT release")
piece_reader = _MAPPING.piece_reader
export_order = _MAPPING.export_order
hf_shapes = _MAPPING.hf_shapes
hf_tensors_from_megatron = _MAPPING.hf_tensors_from_megatron


def write_export_extras(ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
    """Nothing besides config.json and the weights (the ST-VAE is a family of its own)."""
    return ""


__all__ = [
    "check_hf_names",
    "check_model_matches_hf",
    "export_order",
    "fmtrain_model_overrides",
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
