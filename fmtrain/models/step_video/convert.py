"""Step-Video-T2V DiT <-> the released checkpoint layout (``stepfun-ai/stepvideo-t2v``).

Release layout (the DiT part; the VAE, text encoders and scheduler are not fmtrain's)::

    RELEASE/transformer/config.json                      StepVideoModel.__init__ arguments
    RELEASE/transformer/diffusion_pytorch_model-0000K-of-0000N.safetensors   (1-based, 5 digits)
    RELEASE/transformer/diffusion_pytorch_model.safetensors.index.json
        {"metadata": {"total_size": bytes}, "weight_map": {key: file}}

(one ``diffusion_pytorch_model.safetensors`` and no index when everything fits one shard,
as diffusers writes it; both are read).

fmtrain's module names are the release's (:mod:`fmtrain.models.step_video.model`), and its
distributed-checkpoint keys are those names with every block under its global index
(``transformer_blocks.N.*``, no prepended layer axis), so the mapping is the identity except:

======================================  ===========================  =============================
key                                     fmtrain                      release
======================================  ===========================  =============================
pos_embed.proj.weight                   Linear [h, C*p*p], (c,p,q)   Conv2d [h, C, p, p] (reshape)
proj_out.weight / proj_out.bias         rows in (c, p, q) order      rows in (p, q, c) order (the
                                                                     release unpatchifies
                                                                     ``n h w p q c``); identity at
                                                                     patch 1
norm_out.weight / .bias                 (no affine)                  only with
                                                                     norm_elementwise_affine: ones
                                                                     / zeros written, and required
                                                                     on import
======================================  ===========================  =============================

Fused projections are per head in both (``attn1.wqkv`` [heads, (q, k, v), head_dim] rows,
``attn2.wkv`` [heads, (k, v), head_dim]), so no permutation; tensor-parallel slicing (rows of
wqkv / wq / wkv / ff.net.0.proj, columns of wo / ff.net.2) happens in
:mod:`fmtrain.checkpoint.hf.layout` from ``sharded_state_dict()``, so import works at any
(TP, PP, VPP) with each rank reading only its rows / columns (safetensors ``get_slice``).

Config: ``num_attention_heads``, ``attention_head_dim`` (hidden = their product),
``in_channels`` (= ``out_channels``), ``num_layers``, ``patch_size``, ``caption_channels``
([LLM dim, CLIP dim], or one int without the CLIP encoder), ``norm_elementwise_affine``
(-> ``model.caption_norm_affine``), ``norm_eps`` (1e-6; caption and final norms). The FFN
width is not in config.json (the release hard-codes 4 x hidden): it is read from
``ff.net.0.proj.weight``'s shape. RoPE (theta 1e4, head channels split d/2, d/4, d/4) is hard-
coded in the release too; a config made from a release takes those values.

This module is the family's converter (:class:`fmtrain.models.registry.Converter`); the command
line is ``fmtrain convert to-hf / from-hf`` and ``model.init_from_hf`` loads a release into a
run (:mod:`fmtrain.checkpoint.hf.convert`). :func:`key_shapes_for_config` lists every fmtrain
checkpoint tensor with its shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmtrain.config import Config, ConfigError
from fmtrain.models.release import HFCheckpointError, check_architecture, overrides_as_args

# ---------------------------------------------------------------------- converter hooks
# (see fmtrain.models.registry.Converter)

FORMAT = "Step-Video-T2V release (transformer/)"
WEIGHTS_SUBDIR = "transformer"
WEIGHTS_PREFIX = "diffusion_pytorch_model"
DTYPE_PROBE = "pos_embed.proj.weight"

CLASS_NAME = "StepVideoModel"
TIMESTEP_FEATURES = 256
"""Width of the sinusoidal timestep features (``adaln_single.emb.timestep_embedder.linear_1`` input)."""
RELEASE_NORM_EPS = 1e-6
"""``norm_eps`` of the release (caption_norm, norm_out); fmtrain.models.step_video.model.OUTER_NORM_EPS."""
RELEASE_ROPE_THETA = 10000.0
"""RoPE3D ``freq`` hard-coded in the release's self-attention."""

# StepVideoModel.__init__ defaults: diffusers fills a field config.json lacks with these.
RELEASE_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 48,
    "attention_head_dim": 128,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 48,
    "dropout": 0.0,
    "patch_size": 1,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
    "caption_channels": [6144, 1024],
    "attention_type": "parallel",
}


@dataclass(frozen=True)
class StepVideoShapes:
    num_layers: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    in_channels: int
    patch: int
    caption_dim: int
    clip_dim: int
    caption_norm_affine: bool

    @property
    def patch_features(self) -> int:
        return self.in_channels * self.patch**2

    @classmethod
    def from_config(cls, cfg: Config) -> StepVideoShapes:
        m = cfg.model
        if m.family != "step_video":
            raise ConfigError(f"model.family={m.family!r}: this converter is for the step_video family")
        return cls(
            num_layers=m.num_layers,
            hidden=m.hidden_size,
            heads=m.num_attention_heads,
            head_dim=cfg.head_dim,
            ffn=m.ffn_hidden_size,
            in_channels=m.in_channels,
            patch=m.patch_size,
            caption_dim=m.caption_dim,
            clip_dim=m.clip_dim,
            caption_norm_affine=m.caption_norm_affine,
        )

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden} ({self.heads} heads x {self.head_dim}), "
            f"FFN {self.ffn}, in_channels {self.in_channels}, patch {self.patch}, caption {self.caption_dim}, "
            f"clip {self.clip_dim}, caption_norm_affine {self.caption_norm_affine}"
        )


def shapes_from_config(cfg: Config) -> StepVideoShapes:
    return StepVideoShapes.from_config(cfg)


def recognizes(config_json: dict) -> bool:
    return config_json.get("_class_name") == CLASS_NAME or "caption_channels" in config_json


# ---------------------------------------------------------------------- config


def hf_config_from_fmtrain(cfg: Config, dtype: torch.dtype | None = None) -> dict:
    """``transformer/config.json`` of the release for ``cfg.model`` (diffusers records no dtype)."""
    s = StepVideoShapes.from_config(cfg)
    if s.hidden != s.heads * s.head_dim:
        raise ConfigError(
            f"model.hidden_size={s.hidden} is not num_attention_heads x head_dim = "
            f"{s.heads} x {s.head_dim}: the release's inner_dim is their product"
        )
    return {
        "_class_name": CLASS_NAME,
        "num_attention_heads": s.heads,
        "attention_head_dim": s.head_dim,
        "in_channels": s.in_channels,
        "out_channels": s.in_channels,
        "num_layers": s.num_layers,
        "dropout": 0.0,
        "patch_size": s.patch,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": s.caption_norm_affine,
        "norm_eps": RELEASE_NORM_EPS,
        "use_additional_conditions": False,
        "caption_channels": [s.caption_dim, s.clip_dim] if s.clip_dim else s.caption_dim,
        "attention_type": "parallel",
    }


def _caption_channels(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, 0
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"config.json caption_channels={value!r}: expected an int or [LLM dim, CLIP dim]")


def fmtrain_model_overrides_from_release(config_json: dict, ffn_hidden_size: int | None = None) -> dict[str, Any]:
    """``model.*`` values for a release ``transformer/config.json`` (missing fields take the
    release defaults, as diffusers does). Features fmtrain's DiT does not have are refused by
    name. ``ffn_hidden_size`` (not in config.json) comes from ``ff.net.0.proj.weight``."""
    c = {**RELEASE_DEFAULTS, **config_json}
    name = c.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ConfigError(f"config.json _class_name={name!r}: expected {CLASS_NAME!r} (Step-Video-T2V transformer)")
    if c["norm_type"] != "ada_norm_single":
        raise ConfigError(f"config.json norm_type={c['norm_type']!r}: fmtrain's DiT implements ada_norm_single only")
    if c["use_additional_conditions"]:
        raise ConfigError(
            "config.json use_additional_conditions=true: fmtrain's DiT has no resolution / frame-rate conditioning"
        )
    if c["out_channels"] is not None and c["out_channels"] != c["in_channels"]:
        raise ConfigError(
            f"config.json out_channels={c['out_channels']} differs from in_channels="
            f"{c['in_channels']}: fmtrain's DiT predicts the input's channels"
        )
    if not math.isclose(float(c["norm_eps"]), RELEASE_NORM_EPS, rel_tol=1e-9):
        raise ConfigError(
            f"config.json norm_eps={c['norm_eps']}: fmtrain's caption and final norms use {RELEASE_NORM_EPS}"
        )
    heads, d = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    caption, clip = _caption_channels(c["caption_channels"])
    out: dict[str, Any] = {
        "model.family": "step_video",
        "model.num_layers": int(c["num_layers"]),
        "model.hidden_size": heads * d,
        "model.num_attention_heads": heads,
        "model.num_query_groups": heads,
        "model.head_dim": d,
        "model.in_channels": int(c["in_channels"]),
        "model.patch_size": int(c["patch_size"]),
        "model.caption_dim": caption,
        "model.clip_dim": clip,
        "model.caption_norm_affine": bool(c["norm_elementwise_affine"]),
        "model.rotary_base": RELEASE_ROPE_THETA,
    }
    if not clip:
        out["model.clip_tokens"] = 0
    if d % 8 == 0:  # the release splits 128 as 64 / 32 / 32
        out["model.rope_axes"] = [d // 2, d // 4, d // 4]
    if ffn_hidden_size is not None:
        out["model.ffn_hidden_size"] = int(ffn_hidden_size)
    return out


FFN_KEY = "transformer_blocks.0.ff.net.0.proj.weight"


def model_overrides(config_json: dict, ckpt) -> list[str]:
    """``model.*=value`` arguments for a config made from a release (config.json + the FFN width
    read from the header of ``ff.net.0.proj.weight`` in ``ckpt``)."""
    try:
        ffn = ckpt.info(FFN_KEY)[0][0]
    except KeyError:
        raise HFCheckpointError(f"{ckpt.path}: no tensor {FFN_KEY} to read the FFN width from") from None
    return overrides_as_args(fmtrain_model_overrides_from_release(config_json, ffn))


# fmtrain field -> the config.json field it comes from (for messages).
_RELEASE_FIELD = {
    "model.family": "_class_name",
    "model.num_layers": "num_layers",
    "model.hidden_size": "num_attention_heads x attention_head_dim",
    "model.num_attention_heads": "num_attention_heads",
    "model.head_dim": "attention_head_dim",
    "model.in_channels": "in_channels",
    "model.patch_size": "patch_size",
    "model.caption_dim": "caption_channels[0]",
    "model.clip_dim": "caption_channels[1]",
    "model.caption_norm_affine": "norm_elementwise_affine",
}
ARCHITECTURE_FIELDS = tuple(_RELEASE_FIELD)
"""``model.*`` fields config.json fixes; ``ffn_hidden_size`` is checked against the weights."""


def check_model_matches_hf(cfg: Config, config_json: dict, source: str) -> None:
    """Raise :class:`ConfigError` naming the first ``model.*`` field that differs from the
    release ``config.json`` (``source`` names it in the message)."""
    check_architecture(
        cfg,
        fmtrain_model_overrides_from_release(config_json),
        _RELEASE_FIELD,
        source,
        shown={"model.family": CLASS_NAME},
    )


# ---------------------------------------------------------------------- shapes and key mapping


def _block_shapes(s: StepVideoShapes) -> dict[str, tuple[int, ...]]:
    h, d = s.hidden, s.head_dim
    return {
        "scale_shift_table": (6, h),
        "norm1.weight": (h,),
        "norm1.bias": (h,),
        "attn1.wqkv.weight": (3 * h, h),
        "attn1.wo.weight": (h, h),
        "attn1.q_norm.weight": (d,),
        "attn1.k_norm.weight": (d,),
        "norm2.weight": (h,),
        "norm2.bias": (h,),
        "attn2.wq.weight": (h, h),
        "attn2.wkv.weight": (2 * h, h),
        "attn2.wo.weight": (h, h),
        "attn2.q_norm.weight": (d,),
        "attn2.k_norm.weight": (d,),
        "ff.net.0.proj.weight": (s.ffn, h),
        "ff.net.2.weight": (h, s.ffn),
    }


def fmtrain_key_shapes(s: StepVideoShapes) -> dict[str, tuple[int, ...]]:
    """Every tensor of the fmtrain checkpoint (key -> global shape), in the release's
    state-dict order (the order export writes)."""
    h, p = s.hidden, s.patch_features
    out: dict[str, tuple[int, ...]] = {
        "scale_shift_table": (2, h),
        "pos_embed.proj.weight": (h, p),
        "pos_embed.proj.bias": (h,),
    }
    block = _block_shapes(s)
    for n in range(s.num_layers):
        out.update({f"transformer_blocks.{n}.{k}": v for k, v in block.items()})
    out.update(
        {
            "proj_out.weight": (p, h),
            "proj_out.bias": (p,),
            "adaln_single.emb.timestep_embedder.linear_1.weight": (h, TIMESTEP_FEATURES),
            "adaln_single.emb.timestep_embedder.linear_1.bias": (h,),
            "adaln_single.emb.timestep_embedder.linear_2.weight": (h, h),
            "adaln_single.emb.timestep_embedder.linear_2.bias": (h,),
            "adaln_single.linear.weight": (6 * h, h),
            "adaln_single.linear.bias": (6 * h,),
        }
    )
    if s.clip_dim:
        out.update({"clip_projection.weight": (h, s.clip_dim), "clip_projection.bias": (h,)})
    if s.caption_norm_affine:
        out.update({"caption_norm.weight": (s.caption_dim,), "caption_norm.bias": (s.caption_dim,)})
    out.update(
        {
            "caption_projection.linear_1.weight": (h, s.caption_dim),
            "caption_projection.linear_1.bias": (h,),
            "caption_projection.linear_2.weight": (h, h),
            "caption_projection.linear_2.bias": (h,),
        }
    )
    return out


def hf_shapes(s: StepVideoShapes) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release (name -> shape), in the order export writes them."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in fmtrain_key_shapes(s).items():
        if key == "pos_embed.proj.weight":
            out[key] = (s.hidden, s.in_channels, s.patch, s.patch)
        else:
            out[key] = shape
        if key == "scale_shift_table" and s.caption_norm_affine:
            out["norm_out.weight"] = (s.hidden,)
            out["norm_out.bias"] = (s.hidden,)
    return out


def key_shapes_for_config(cfg: Config) -> dict[str, tuple[int, ...]]:
    """{release key: shape} of ``cfg``'s model, by arithmetic (nothing is allocated)."""
    return hf_shapes(StepVideoShapes.from_config(cfg))


def export_order(
    s: StepVideoShapes, present: Callable[[str], bool] = lambda key: True
) -> list[tuple[str, tuple[int, ...]]]:
    """fmtrain checkpoint tensors (key, prepended index) in release order; blocks carry their
    number in the key, so the index is always ()."""
    return [(key, ()) for key in fmtrain_key_shapes(s)]


def _rows_cpq_to_pqc(t: torch.Tensor, s: StepVideoShapes) -> torch.Tensor:
    """proj_out rows: fmtrain's (c, p, q) order -> the release's (p, q, c)."""
    c, p, rest = s.in_channels, s.patch, tuple(t.shape[1:])
    dims = tuple(range(3, 3 + len(rest)))
    return t.reshape(c, p, p, *rest).permute(1, 2, 0, *dims).reshape(c * p * p, *rest)


def _rows_pqc_to_cpq(t: torch.Tensor, s: StepVideoShapes) -> torch.Tensor:
    c, p, rest = s.in_channels, s.patch, tuple(t.shape[1:])
    dims = tuple(range(3, 3 + len(rest)))
    return t.reshape(p, p, c, *rest).permute(2, 0, 1, *dims).reshape(c * p * p, *rest)


_TRANSFORMED = ("pos_embed.proj.weight", "proj_out.weight", "proj_out.bias")


def hf_tensors_from_megatron(
    key: str, index: tuple[int, ...], t: torch.Tensor, s: StepVideoShapes
) -> dict[str, torch.Tensor]:
    """Release tensors for one full fmtrain tensor (works on meta tensors too)."""
    if index or key not in _fmtrain_keys(s):
        raise ValueError(f"no Step-Video release mapping for fmtrain tensor {key!r} {index or ''}".rstrip())
    if key == "pos_embed.proj.weight":
        return {key: t.reshape(s.hidden, s.in_channels, s.patch, s.patch)}
    if key in ("proj_out.weight", "proj_out.bias"):
        return {key: _rows_cpq_to_pqc(t, s)}
    if key == "scale_shift_table" and s.caption_norm_affine:
        # The release's norm_out takes norm_elementwise_affine too; fmtrain's has no affine:
        # an identity affine reproduces it.
        return {
            key: t,
            "norm_out.weight": torch.ones(s.hidden, dtype=t.dtype, device=t.device),
            "norm_out.bias": torch.zeros(s.hidden, dtype=t.dtype, device=t.device),
        }
    return {key: t}


def fmtrain_tensor_from_release(key: str, t: torch.Tensor, s: StepVideoShapes) -> torch.Tensor:
    """The full fmtrain tensor ``key`` from the release tensor of the same name."""
    if key == "pos_embed.proj.weight":
        return t.reshape(s.hidden, s.patch_features)
    if key in ("proj_out.weight", "proj_out.bias"):
        return _rows_pqc_to_cpq(t, s)
    return t


@functools.lru_cache(maxsize=4)
def _fmtrain_keys(s: StepVideoShapes) -> frozenset[str]:
    return frozenset(fmtrain_key_shapes(s))


# ---------------------------------------------------------------------- import


def check_hf_names(ckpt, s: StepVideoShapes) -> None:
    """Refuse release files that are not exactly this model's, before anything is copied:
    missing or unexpected tensors, or a wrong shape (naming the tensor, its file and both
    shapes; a different FFN width names ``model.ffn_hidden_size``)."""
    expected = hf_shapes(s)
    present = set(ckpt.names)
    missing = [name for name in expected if name not in present]
    extra = sorted(present - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} tensor(s): "
                + ", ".join(f"{name} (expected shape {expected[name]})" for name in missing[:3])
            )
        if extra:
            parts.append(
                f"{len(extra)} unexpected tensor(s): "
                + ", ".join(f"{name} (in {ckpt.file_of(name).name}, shape {ckpt.info(name)[0]})" for name in extra[:3])
            )
        raise HFCheckpointError(f"{ckpt.path}: does not match the model ({s.describe()}): {'; '.join(parts)}")
    if s.num_layers:
        found = ckpt.info(FFN_KEY)[0]
        if len(found) == 2 and found[1] == s.hidden and found[0] != s.ffn:
            raise HFCheckpointError(
                f"model.ffn_hidden_size={s.ffn} does not match the checkpoint: {FFN_KEY} in "
                f"{ckpt.file_of(FFN_KEY)} has shape {found} (FFN {found[0]}), the model expects {expected[FFN_KEY]}"
            )
    for name, shape in expected.items():
        found = ckpt.info(name)[0]
        if tuple(found) != tuple(shape):
            raise HFCheckpointError(
                f"{ckpt.path}: tensor {name} in {ckpt.file_of(name).name} has shape "
                f"{tuple(found)}, the model ({s.describe()}) expects {tuple(shape)}"
            )
    if s.caption_norm_affine:
        for name, value in (("norm_out.weight", 1.0), ("norm_out.bias", 0.0)):
            if not bool((ckpt[name].float() == value).all()):
                raise HFCheckpointError(
                    f"{ckpt.path}: {name} in {ckpt.file_of(name).name} is not all {value:g}: fmtrain's final "
                    "LayerNorm has no affine (model.caption_norm_affine adds only the caption norm's)"
                )


def piece_reader(
    ckpt, s: StepVideoShapes
) -> Callable[[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]:
    """``piece(key, index, offset, shape)``: the region of fmtrain tensor ``key`` one rank holds,
    reading only those rows / columns of the release (the reshaped / permuted tensors, replicated
    and small, are read whole)."""
    known = _fmtrain_keys(s)

    def piece(key: str, index: tuple[int, ...], offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        if index or key not in known:
            raise HFCheckpointError(
                f"fmtrain tensor {key} {index or ''} has no Step-Video release mapping ({s.describe()})"
            )
        region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        try:
            if key in _TRANSFORMED:
                return fmtrain_tensor_from_release(key, ckpt[key], s)[region]
            return ckpt.read_slice(key, region)
        except KeyError:
            raise HFCheckpointError(f"{ckpt.path}: release tensor {key} is missing") from None

    return piece


# ---------------------------------------------------------------------- export


def write_export_extras(ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
    """Nothing besides config.json and the weights (the VAE, text encoders and scheduler of a
    full release are not fmtrain's)."""
    return ""


__all__ = [
    "StepVideoShapes",
    "hf_config_from_fmtrain",
    "fmtrain_model_overrides_from_release",
    "model_overrides",
    "check_model_matches_hf",
    "fmtrain_key_shapes",
    "hf_shapes",
    "key_shapes_for_config",
    "export_order",
    "hf_tensors_from_megatron",
    "fmtrain_tensor_from_release",
    "check_hf_names",
    "piece_reader",
    "ARCHITECTURE_FIELDS",
    "RELEASE_DEFAULTS",
]
