"""VideoMAE <-> transformers' ``VideoMAEForPreTraining`` / ``VideoMAEModel`` and the official
VideoMAE V2 checkpoints.

Two external layouts:

- **transformers** (``model_type: videomae``; key mapping of transformers'
  ``convert_videomae_to_pytorch.py``): ``videomae.embeddings.patch_embeddings.projection``,
  per block ``videomae.encoder.layer.N.{layernorm_before, attention.attention.{query, key,
  value}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}``,
  ``videomae.layernorm``, ``encoder_to_decoder``, ``mask_token``,
  ``decoder.decoder_layers.N.*``, ``decoder.norm``, ``decoder.head``. The q / v biases are
  written as ``attention.attention.q_bias`` / ``v_bias``, the names of the published
  checkpoints (transformers renames them to ``query.bias`` / ``value.bias`` on load; both are
  read). Its architecture is V1's (no decoder masking), which is a training choice, not a
  weight difference, so a V2 model exports to it too. ``VideoMAEModel`` (``fmtrain convert
  to-hf --encoder-only``) is the encoder alone, for fine-tuning with transformers.
- **official** (OpenGVLab/VideoMAEv2 ``.pth`` files): fmtrain's own names (the release's module
  names), the fused ``qkv`` as [(q, k, v), heads, head_dim] rows, under a ``'model'`` or
  ``'module'`` key, possibly with torch.compile's ``_orig_mod.`` prefix (both handled by
  :class:`fmtrain.checkpoint.hf.io.HFCheckpoint`). There is no config: the architecture is read
  off the tensor shapes, the head counts from the published sizes.

fmtrain stores ``qkv`` per head ([heads, (q, k, v), head_dim] rows) so a tensor-parallel rank
reads only its heads' rows of q, k and v.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fmtrain.config import Config, ConfigError
from fmtrain.models.release import (
    HFCheckpointError,
    check_architecture,
    check_tensor_names,
    overrides_as_args,
    read_config_json,
)

HF_DECODER_NORM_EPS = 1e-5
"""transformers' ``VideoMAEDecoder.norm`` is a plain ``nn.LayerNorm`` (eps 1e-5)."""

# Encoder width -> heads, decoder width -> heads, of the published sizes (the official
# checkpoints carry no config).
_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
_DECODER_HEADS = {192: 3, 384: 6, 512: 8}

_FIELDS = {  # model.* <- transformers config.json
    "model.hidden_size": "hidden_size",
    "model.num_layers": "num_hidden_layers",
    "model.num_attention_heads": "num_attention_heads",
    "model.ffn_hidden_size": "intermediate_size",
    "model.patch_size": "patch_size",
    "model.tubelet_size": "tubelet_size",
    "model.in_channels": "num_channels",
    "model.qv_bias": "qv_bias",
    "model.norm_epsilon": "layer_norm_eps",
    "model.decoder_hidden_size": "decoder_hidden_size",
    "model.decoder_num_layers": "decoder_num_hidden_layers",
    "model.decoder_num_attention_heads": "decoder_num_attention_heads",
    "model.decoder_ffn_hidden_size": "decoder_intermediate_size",
}

# fmtrain block sub-key -> transformers block sub-key (besides qkv and the biases).
_BLOCK_NAMES = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "intermediate.dense.weight",
    "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight",
    "mlp.fc2.bias": "output.dense.bias",
}


@dataclass(frozen=True)
class Shapes:
    """The model's global tensors (fmtrain key -> shape, in the release's order) and the
    widths the qkv permutation needs."""

    tensors: dict[str, tuple[int, ...]]
    hidden: int
    heads: int
    decoder_hidden: int
    decoder_heads: int

    def tower_of(self, key: str) -> tuple[int, int]:
        """(hidden, heads) of the tower holding ``key``."""
        return (self.decoder_hidden, self.decoder_heads) if key.startswith("decoder.") else (self.hidden, self.heads)


def _block_shapes(prefix: str, h: int, ffn: int, qv_bias: bool) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}norm1.weight": (h,), f"{prefix}norm1.bias": (h,), f"{prefix}attn.qkv.weight": (3 * h, h)}
    if qv_bias:
        out[f"{prefix}attn.q_bias"] = (h,)
        out[f"{prefix}attn.v_bias"] = (h,)
    out.update(
        {
            f"{prefix}attn.proj.weight": (h, h),
            f"{prefix}attn.proj.bias": (h,),
            f"{prefix}norm2.weight": (h,),
            f"{prefix}norm2.bias": (h,),
            f"{prefix}mlp.fc1.weight": (ffn, h),
            f"{prefix}mlp.fc1.bias": (ffn,),
            f"{prefix}mlp.fc2.weight": (h, ffn),
            f"{prefix}mlp.fc2.bias": (h,),
        }
    )
    return out


def shapes_from_config(cfg: Config) -> Shapes:
    m = cfg.model
    h, dh = m.hidden_size, m.decoder_hidden_size
    pixels = m.in_channels * m.tubelet_size * m.patch_size**2
    t = {
        "encoder.patch_embed.proj.weight": (h, m.in_channels, m.tubelet_size, m.patch_size, m.patch_size),
        "encoder.patch_embed.proj.bias": (h,),
    }
    for i in range(m.num_layers):
        t.update(_block_shapes(f"encoder.blocks.{i}.", h, m.ffn_hidden_size, m.qv_bias))
    t.update({"encoder.norm.weight": (h,), "encoder.norm.bias": (h,), "encoder_to_decoder.weight": (dh, h)})
    t["mask_token"] = (1, 1, dh)
    for i in range(m.decoder_num_layers):
        t.update(_block_shapes(f"decoder.blocks.{i}.", dh, m.decoder_ffn_hidden_size, m.qv_bias))
    t.update(
        {
            "decoder.norm.weight": (dh,),
            "decoder.norm.bias": (dh,),
            "decoder.head.weight": (pixels, dh),
            "decoder.head.bias": (pixels,),
        }
    )
    return Shapes(t, h, m.num_attention_heads, dh, m.decoder_num_attention_heads)


def _per_head_rows(rows: slice, hidden: int, heads: int) -> tuple[int, int]:
    """The heads [first, last) that fmtrain's per-head qkv rows ``rows`` cover (whole heads)."""
    d = hidden // heads
    if rows.start % (3 * d) or rows.stop % (3 * d):
        raise HFCheckpointError(f"qkv rows {rows.start}:{rows.stop} do not cover whole heads of {3 * d} rows")
    return rows.start // (3 * d), rows.stop // (3 * d)


def fused_to_per_head(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """[(q, k, v), heads, d] rows -> [heads, (q, k, v), d] rows."""
    three_h, cols = qkv.shape
    return qkv.view(3, heads, three_h // (3 * heads), cols).transpose(0, 1).reshape(three_h, cols)


def per_head_to_fused(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, cols = qkv.shape
    return qkv.view(heads, 3, three_h // (3 * heads), cols).transpose(0, 1).reshape(three_h, cols)


class VideoMAEConverter:
    """The family's converter (:class:`fmtrain.models.registry.Converter`) for one export target:
    ``VideoMAEForPreTraining`` (the whole model) or, ``encoder_only``, ``VideoMAEModel``."""

    WEIGHTS_SUBDIR = ""
    WEIGHTS_PREFIX = "model"

    def __init__(self, encoder_only: bool = False):
        self.encoder_only = encoder_only
        self.FORMAT = (
            "transformers VideoMAEModel"
            if encoder_only
            else "transformers VideoMAEForPreTraining / official VideoMAE V2"
        )
        self.DTYPE_PROBE = "videomae.embeddings.patch_embeddings.projection.weight"
        self.variants = {} if encoder_only else {"encoder": VideoMAEConverter(encoder_only=True)}

    # ------------------------------------------------------------------ where and what

    def weights_path(self, path: Path) -> Path:
        """A transformers directory, an official ``.pth`` file, or a directory holding one."""
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            pth = sorted(path.glob("*.pth"))
            if len(pth) == 1:
                return pth[0]
        return path

    @staticmethod
    def is_official(ckpt) -> bool:
        return "encoder.patch_embed.proj.weight" in ckpt.names

    def dtype_probe(self, ckpt) -> str:
        return "encoder.patch_embed.proj.weight" if self.is_official(ckpt) else self._hf_prefix() + _HF_EMBED

    def recognizes(self, config_json: dict) -> bool:
        return config_json.get("model_type") == "videomae"

    def release_config(self, ckpt) -> tuple[dict, str]:
        """transformers' config.json, or for an official checkpoint a config read off its shapes."""
        folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
        if not self.is_official(ckpt):
            file = folder / "config.json"
            missing = f"{folder}: no config.json and not an official VideoMAE V2 checkpoint"
            return read_config_json(file, missing), str(file)
        shape = lambda name: tuple(ckpt.info(name)[0])  # noqa: E731
        h, c, t, p, _ = shape("encoder.patch_embed.proj.weight")
        layers = {int(x.group(1)) for n in ckpt.names if (x := re.match(r"encoder\.blocks\.(\d+)\.", n))}
        decoder_layers = {int(x.group(1)) for n in ckpt.names if (x := re.match(r"decoder\.blocks\.(\d+)\.", n))}
        dh = shape("encoder_to_decoder.weight")[0]
        config = {
            "model_type": "videomae",
            "fmtrain_source": "official",
            "hidden_size": h,
            "num_hidden_layers": len(layers),
            "num_attention_heads": _HEADS.get(h),
            "intermediate_size": shape("encoder.blocks.0.mlp.fc1.weight")[0],
            "patch_size": p,
            "tubelet_size": t,
            "num_channels": c,
            "qv_bias": "encoder.blocks.0.attn.q_bias" in ckpt.names,
            "layer_norm_eps": 1e-6,
            "decoder_hidden_size": dh,
            "decoder_num_hidden_layers": len(decoder_layers),
            "decoder_num_attention_heads": _DECODER_HEADS.get(dh),
            "decoder_intermediate_size": shape("decoder.blocks.0.mlp.fc1.weight")[0],
            "use_mean_pooling": False,
        }
        return config, f"{ckpt.path} (tensor shapes)"

    def _want(self, config_json: dict) -> dict:
        want = {name: config_json.get(key) for name, key in _FIELDS.items()}
        if want["model.qv_bias"] is None:
            want["model.qv_bias"] = bool(config_json.get("qkv_bias", True))
        want["model.decoder_norm_epsilon"] = (
            1e-6 if config_json.get("fmtrain_source") == "official" else HF_DECODER_NORM_EPS
        )
        return want

    def model_overrides(self, config_json: dict, ckpt) -> list[str]:
        want = {k: v for k, v in self._want(config_json).items() if v is not None}
        missing = [k for k, v in self._want(config_json).items() if v is None]
        if missing:
            raise ConfigError(
                f"{ckpt.path}: the checkpoint does not fix {', '.join(missing)} (an unpublished width); "
                "pass --recipe with the model's architecture"
            )
        extra = {"model.family": "videomae_v2", **want}
        if "num_frames" in config_json:
            extra["data.video_frames"] = config_json["num_frames"]
        if "image_size" in config_json:
            extra["data.video_size"] = config_json["image_size"]
        if "norm_pix_loss" in config_json:
            extra["objective.norm_target"] = config_json["norm_pix_loss"]
        return overrides_as_args(extra)

    def check_model_matches_hf(self, cfg: Config, config_json: dict, source: str) -> None:
        if cfg.model.family != "videomae_v2":
            raise ConfigError(f"model.family={cfg.model.family!r}: {source} is a VideoMAE checkpoint")
        if config_json.get("use_mean_pooling", False) and "VideoMAEForPreTraining" in config_json.get(
            "architectures", []
        ):
            raise ConfigError(
                f"{source}: use_mean_pooling=true gives the encoder no final LayerNorm; fmtrain's VideoMAE "
                "(the released pretraining model) has one (transformers' conversion sets use_mean_pooling=false)"
            )
        want = self._want(config_json)
        known = {k: v for k, v in want.items() if v is not None}
        fields = {k: _FIELDS.get(k, "decoder norm eps") for k in known}
        check_architecture(cfg, known, fields, source)
        for field, key in (("video_frames", "num_frames"), ("video_size", "image_size")):
            if key in config_json and getattr(cfg.data, field) != config_json[key]:
                raise ConfigError(
                    f"data.{field}={getattr(cfg.data, field)} does not match the checkpoint: {source} has "
                    f"{key}={config_json[key]} (the positions cover that clip)"
                )

    def shapes_from_config(self, cfg: Config) -> Shapes:
        return shapes_from_config(cfg)

    # ------------------------------------------------------------------ import

    def _hf_prefix(self) -> str:
        return "" if self.encoder_only else "videomae."

    def _hf_name(self, key: str, hf_names: frozenset[str] | None = None) -> str:
        """The transformers name of one fmtrain tensor (not qkv)."""
        pre = self._hf_prefix()
        fixed = {
            "encoder.patch_embed.proj.weight": pre + _HF_EMBED,
            "encoder.patch_embed.proj.bias": pre + _HF_EMBED.replace("weight", "bias"),
            "encoder.norm.weight": pre + "layernorm.weight",
            "encoder.norm.bias": pre + "layernorm.bias",
        }
        if key in fixed:
            return fixed[key]
        if key in ("encoder_to_decoder.weight", "mask_token") or key.startswith(("decoder.norm.", "decoder.head.")):
            return key
        match = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", key)
        if match is None:
            raise HFCheckpointError(f"fmtrain tensor {key} has no transformers counterpart")
        tower, index, rest = match.groups()
        block = f"{pre}encoder.layer.{index}." if tower == "encoder" else f"decoder.decoder_layers.{index}."
        if rest in ("attn.q_bias", "attn.v_bias"):
            old = block + "attention.attention." + rest.split(".")[1]
            new = block + f"attention.attention.{'query' if rest.endswith('q_bias') else 'value'}.bias"
            return new if hf_names is not None and new in hf_names and old not in hf_names else old
        return block + _BLOCK_NAMES[rest]

    def _qkv_names(self, key: str) -> list[str]:
        """transformers' query, key and value weights behind fmtrain's fused ``...attn.qkv.weight``."""
        attention = self._hf_name(key.replace("attn.qkv.weight", "attn.proj.weight")).replace(
            "attention.output.dense.weight", "attention.attention."
        )
        return [f"{attention}{w}.weight" for w in ("query", "key", "value")]

    def _expected_names(self, ckpt, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        """The checkpoint's expected tensors (its own naming) and shapes."""
        if self.is_official(ckpt):
            return dict(shapes.tensors)
        return {name: s for key, shape in shapes.tensors.items() for name, s in self._outputs(key, shape, ckpt.names)}

    def check_hf_names(self, ckpt, shapes: Shapes) -> None:
        check_tensor_names(ckpt, self._expected_names(ckpt, shapes))

    def piece_reader(self, ckpt, shapes: Shapes) -> Callable[..., torch.Tensor]:
        official = self.is_official(ckpt)
        names = ckpt.names

        def piece(key: str, index: tuple, offset: tuple, shape: tuple) -> torch.Tensor:
            if index or key not in shapes.tensors:
                raise HFCheckpointError(f"fmtrain tensor {key} has no VideoMAE counterpart")
            region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
            if not key.endswith("attn.qkv.weight"):
                return ckpt.read_slice(key if official else self._hf_name(key, names), region)
            hidden, heads = shapes.tower_of(key)
            d = hidden // heads
            first, last = _per_head_rows(region[0], hidden, heads)
            heads_rows = slice(first * d, last * d)
            if official:
                parts = [
                    ckpt.read_slice(
                        key, (slice(w * hidden + heads_rows.start, w * hidden + heads_rows.stop), region[1])
                    )
                    for w in range(3)
                ]
            else:
                parts = [ckpt.read_slice(name, (heads_rows, region[1])) for name in self._qkv_names(key)]
            stacked = torch.stack([p.view(last - first, d, -1) for p in parts], dim=1)  # [n, 3, d, cols]
            return stacked.reshape(3 * d * (last - first), -1)

        return piece

    # ------------------------------------------------------------------ export

    def _exported(self, shapes: Shapes) -> list[str]:
        keys = list(shapes.tensors)
        if self.encoder_only:
            keys = [k for k in keys if k.startswith("encoder.")]
        return keys

    def export_order(self, shapes: Shapes, present: Callable[[str], bool]) -> list[tuple[str, tuple]]:
        return [(key, ()) for key in self._exported(shapes)]

    def _outputs(
        self, key: str, shape: tuple[int, ...], hf_names: frozenset[str] | None = None
    ) -> list[tuple[str, tuple[int, ...]]]:
        """The transformers tensors (name, shape) one fmtrain tensor becomes."""
        if key.endswith("attn.qkv.weight"):
            h = shape[1]
            return [(name, (h, h)) for name in self._qkv_names(key)]
        return [(self._hf_name(key, hf_names), shape)]

    def hf_shapes(self, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        return {name: s for key in self._exported(shapes) for name, s in self._outputs(key, shapes.tensors[key])}

    def hf_tensors_from_megatron(
        self, key: str, index: tuple, t: torch.Tensor, shapes: Shapes
    ) -> dict[str, torch.Tensor]:
        if not key.endswith("attn.qkv.weight"):
            return {self._hf_name(key): t}
        _, heads = shapes.tower_of(key)
        return dict(zip(self._qkv_names(key), per_head_to_fused(t, heads).chunk(3, dim=0)))

    def hf_config_from_fmtrain(self, cfg: Config, dtype: torch.dtype | None = None) -> dict:
        """transformers' config.json. Its decoder's final LayerNorm has eps 1e-5 whatever the
        config says (fmtrain's default, the release's, is 1e-6): the weights are the same, the
        decoder's output differs by about that much."""
        m, d = cfg.model, cfg.data
        config = {
            "architectures": ["VideoMAEModel" if self.encoder_only else "VideoMAEForPreTraining"],
            "model_type": "videomae",
            "image_size": d.video_size,
            "num_frames": d.video_frames,
            **{key: getattr(m, name.split(".", 1)[1]) for name, key in _FIELDS.items()},
            "qkv_bias": m.qv_bias,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "use_mean_pooling": False,
            "norm_pix_loss": bool(getattr(cfg.objective, "norm_target", True)),
        }
        if dtype is not None:
            config["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(dtype, "float32")
        return config

    def write_export_extras(self, ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
        return ""


_HF_EMBED = "embeddings.patch_embeddings.projection.weight"

CONVERTER = VideoMAEConverter()

__all__ = ["CONVERTER", "Shapes", "VideoMAEConverter", "fused_to_per_head", "per_head_to_fused", "shapes_from_config"]
