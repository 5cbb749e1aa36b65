"""Yi <-> Hugging Face ``LlamaForCausalLM``: config translation and weight mapping.

The mapping is between *global* (unsharded) megatron GPT tensors and Hugging Face tensors;
:mod:`fmtrain.checkpoint.hf.layout` slices them for this rank's (TP, PP, VPP) chunks on import
and :mod:`fmtrain.checkpoint.hf.convert` reads them one at a time on export.

==================================================  ===============================================
megatron key (layer index = prepended axis)          Hugging Face key (N = global layer number)
==================================================  ===============================================
embedding.word_embeddings.weight                    model.embed_tokens.weight
decoder.layers.self_attention.linear_qkv            model.layers.N.input_layernorm.weight
.layer_norm_weight (module input_layernorm)         (first Yi release: ln1)
decoder.layers.self_attention.linear_qkv.weight     model.layers.N.self_attn.{q,k,v}_proj.weight
decoder.layers.self_attention.linear_proj.weight    model.layers.N.self_attn.o_proj.weight
decoder.layers.mlp.linear_fc1                       model.layers.N.post_attention_layernorm.weight
.layer_norm_weight (module pre_mlp_layernorm)       (first Yi release: ln2)
decoder.layers.mlp.linear_fc1.weight                cat([mlp.gate_proj, mlp.up_proj]) along rows
decoder.layers.mlp.linear_fc2.weight                model.layers.N.mlp.down_proj.weight
decoder.final_layernorm.weight                      model.norm.weight
output_layer.weight                                 lm_head.weight (absent when tied)
==================================================  ===============================================

megatron names the two per-layer norms after the fused Transformer Engine modules
(``...linear_qkv.layer_norm_weight``) in its checkpoint keys even with separate norm modules
(the local layer spec's ``sharded_state_dict_keys_map``); the module names
(``decoder.layers.input_layernorm.weight``) are accepted too.

Fused QKV (megatron ``SelfAttention.get_query_key_value_tensors``): rows grouped per query
group; for each of the ``ng`` groups, that group's ``np/ng`` query heads, then its key head,
then its value head, each ``head_dim`` rows: ``[q1 q2 k1 v1 | q3 q4 k2 v2 | ...]``. Hugging
Face keeps query head ``h`` with key/value head ``h // (np/ng)``, the same grouping.
Both use rotate-half RoPE (megatron ``rotary_interleaved=False``), so no row permutation of q/k
is needed (unlike Meta's original Llama checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmtrain.config import Config, ConfigError
from fmtrain.models.release import HFCheckpointError, check_architecture, overrides_as_args

GlobalName = tuple[str, tuple[int, ...]]
"""(checkpoint key, prepended layer index) of one global tensor."""

# Names a per-layer norm has had in released Yi checkpoints, newest first.
NORM_ALIASES = {
    "input_layernorm": ("input_layernorm", "ln1"),
    "post_attention_layernorm": ("post_attention_layernorm", "ln2"),
}
# Buffers some Llama-family checkpoints carry that hold no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------- config


def hf_config_from_fmtrain(cfg: Config, dtype: torch.dtype | None = None) -> dict:
    """``config.json`` of the ``LlamaForCausalLM`` equivalent to ``cfg.model``.

    ``dtype`` is the dtype the weights are written in; by default the run's precision
    (``auto`` meaning bf16, the dtype Yi is released in).
    """
    m = cfg.model
    if m.family != "yi":
        raise ConfigError(f"model.family={m.family!r}: this converter is for the yi family")
    if dtype is None:
        dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"export dtype {dtype} is not one of {', '.join(_DTYPE_NAMES.values())}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": m.norm_epsilon,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters (and still accepts rope_theta).
        "rope_theta": m.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.seq_length,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": m.init_method_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config.json {name}.rope_type={kind!r}: fmtrain implements plain RoPE "
                "only (no scaled / extended-context variants)"
            )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def fmtrain_model_overrides_from_hf(config_json: dict) -> dict[str, Any]:
    """``model.*`` values for a Hugging Face Llama / Yi ``config.json``.

    ``model.seq_length`` takes ``max_position_embeddings``; override it for a shorter
    training context. Features fmtrain's Yi model does not have are refused by name.
    """
    c = config_json
    model_type = c.get("model_type", "llama")
    if model_type.lower() not in ("llama", "yi"):
        raise ConfigError(f"config.json model_type={model_type!r}: expected a Llama / Yi model")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag, False):
            raise ConfigError(f"config.json {flag}=true: fmtrain's Yi model has no biases")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json hidden_act={act!r}: fmtrain's Yi model uses SwiGLU (silu)")
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if k not in c
    ]
    if missing:
        raise ConfigError(f"config.json lacks {', '.join(missing)}")
    heads = int(c["num_attention_heads"])
    out = {
        "model.family": "yi",
        "model.num_layers": int(c["num_hidden_layers"]),
        "model.hidden_size": int(c["hidden_size"]),
        "model.num_attention_heads": heads,
        "model.num_query_groups": int(c.get("num_key_value_heads") or heads),
        "model.head_dim": int(c.get("head_dim") or c["hidden_size"] // heads),
        "model.ffn_hidden_size": int(c["intermediate_size"]),
        "model.vocab_size": int(c["vocab_size"]),
        "model.rotary_base": _rope_theta(c),
        "model.norm_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "model.tie_embeddings": bool(c.get("tie_word_embeddings", False)),
    }
    if c.get("max_position_embeddings"):
        out["model.seq_length"] = int(c["max_position_embeddings"])
    if "initializer_range" in c:
        out["model.init_method_std"] = float(c["initializer_range"])
    return out


# fmtrain field -> the config.json field it comes from (for messages).
_HF_FIELD = {
    "model.family": "model_type",
    "model.num_layers": "num_hidden_layers",
    "model.hidden_size": "hidden_size",
    "model.num_attention_heads": "num_attention_heads",
    "model.num_query_groups": "num_key_value_heads",
    "model.head_dim": "head_dim",
    "model.ffn_hidden_size": "intermediate_size",
    "model.vocab_size": "vocab_size",
    "model.rotary_base": "rope_theta",
    "model.norm_epsilon": "rms_norm_eps",
    "model.tie_embeddings": "tie_word_embeddings",
}
ARCHITECTURE_FIELDS = tuple(_HF_FIELD)
"""``model.*`` fields a checkpoint fixes; ``seq_length`` and ``init_method_std`` may differ."""


def check_model_matches_hf(cfg: Config, config_json: dict, source: str) -> None:
    """Raise :class:`ConfigError` naming the first ``model.*`` field that differs from the
    Hugging Face ``config.json`` (``source`` names it in the message)."""
    check_architecture(cfg, fmtrain_model_overrides_from_hf(config_json), _HF_FIELD, source)


# ---------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class YiShapes:
    num_layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups

    @classmethod
    def from_chunk(cls, chunk: torch.nn.Module) -> YiShapes:
        """From a built megatron GPTModel chunk (its TransformerConfig holds the global sizes)."""
        c = chunk.config
        return cls(
            num_layers=c.num_layers,
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            groups=c.num_query_groups or c.num_attention_heads,
            head_dim=c.kv_channels,
            ffn=c.ffn_hidden_size,
            vocab=chunk.vocab_size,
            tied=bool(chunk.share_embeddings_and_output_weights),
        )

    @classmethod
    def from_config(cls, cfg: Config) -> YiShapes:
        m = cfg.model
        return cls(
            num_layers=m.num_layers,
            hidden=m.hidden_size,
            heads=m.num_attention_heads,
            groups=m.num_query_groups,
            head_dim=cfg.head_dim,
            ffn=m.ffn_hidden_size,
            vocab=m.vocab_size,
            tied=m.tie_embeddings,
        )


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: YiShapes) -> torch.Tensor:
    """HF q [np*hd, h], k/v [ng*hd, h] -> megatron's grouped linear_qkv [ng*(np/ng+2)*hd, h]."""
    h = q.shape[-1]
    q = q.reshape(s.groups, s.heads_per_group * s.head_dim, h)
    k = k.reshape(s.groups, s.head_dim, h)
    v = v.reshape(s.groups, s.head_dim, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def unpack_qkv(qkv: torch.Tensor, s: YiShapes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    h = qkv.shape[-1]
    grouped = qkv.reshape(s.groups, (s.heads_per_group + 2) * s.head_dim, h)
    q, k, v = torch.split(grouped, [s.heads_per_group * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


# ---------------------------------------------------------------------- key mapping

_INPUT_NORM = ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.input_layernorm.weight")
_MLP_NORM = ("decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight")


def hf_names(s: YiShapes) -> list[str]:
    """Every tensor name of the Hugging Face checkpoint of this model (current names)."""
    names = ["model.embed_tokens.weight"]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        names += [
            p + "input_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    names.append("model.norm.weight")
    if not s.tied:
        names.append("lm_head.weight")
    return names


def hf_shapes(s: YiShapes) -> dict[str, tuple[int, ...]]:
    """Shape of every Hugging Face tensor of this model (current names), in :func:`hf_names` order."""
    q, kv = s.heads * s.head_dim, s.groups * s.head_dim
    per_layer = {
        "input_layernorm.weight": (s.hidden,),
        "self_attn.q_proj.weight": (q, s.hidden),
        "self_attn.k_proj.weight": (kv, s.hidden),
        "self_attn.v_proj.weight": (kv, s.hidden),
        "self_attn.o_proj.weight": (s.hidden, q),
        "post_attention_layernorm.weight": (s.hidden,),
        "mlp.gate_proj.weight": (s.ffn, s.hidden),
        "mlp.up_proj.weight": (s.ffn, s.hidden),
        "mlp.down_proj.weight": (s.hidden, s.ffn),
    }
    out = {}
    for name in hf_names(s):
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = (s.vocab, s.hidden)
        elif name == "model.norm.weight":
            out[name] = (s.hidden,)
        else:
            out[name] = per_layer[name.split(".", 3)[3]]
    return out


Segment = tuple[str, int, int]
"""(Hugging Face tensor name, first row, number of rows): consecutive rows of a megatron tensor."""


def hf_row_segments(
    key: str, index: tuple[int, ...], s: YiShapes, resolve: Callable[[str], str] = lambda name: name
) -> list[Segment]:
    """The rows of the global megatron tensor ``key`` (layer ``index``), top to bottom, as row
    ranges of Hugging Face tensors; columns map one to one. Nothing is read, so a rank can read
    just the rows and columns it owns. ``resolve`` maps a current norm name to the one the
    checkpoint uses."""
    if key == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", 0, s.vocab)]
    if key == "output_layer.weight":
        return [("model.embed_tokens.weight" if s.tied else "lm_head.weight", 0, s.vocab)]
    if key == "decoder.final_layernorm.weight":
        return [("model.norm.weight", 0, s.hidden)]
    if not key.startswith("decoder.layers.") or len(index) != 1:
        raise ValueError(f"no Hugging Face mapping for megatron tensor {key!r} {index}")
    p = f"model.layers.{index[0]}."
    if key in _INPUT_NORM:
        return [(resolve(p + "input_layernorm.weight"), 0, s.hidden)]
    if key in _MLP_NORM:
        return [(resolve(p + "post_attention_layernorm.weight"), 0, s.hidden)]
    if key == "decoder.layers.self_attention.linear_qkv.weight":
        q_rows, d = s.heads_per_group * s.head_dim, s.head_dim
        segments = []
        for g in range(s.groups):  # megatron's grouping, see pack_qkv
            segments += [
                (p + "self_attn.q_proj.weight", g * q_rows, q_rows),
                (p + "self_attn.k_proj.weight", g * d, d),
                (p + "self_attn.v_proj.weight", g * d, d),
            ]
        return segments
    if key == "decoder.layers.self_attention.linear_proj.weight":
        return [(p + "self_attn.o_proj.weight", 0, s.hidden)]
    if key == "decoder.layers.mlp.linear_fc1.weight":
        return [(p + "mlp.gate_proj.weight", 0, s.ffn), (p + "mlp.up_proj.weight", 0, s.ffn)]
    if key == "decoder.layers.mlp.linear_fc2.weight":
        return [(p + "mlp.down_proj.weight", 0, s.hidden)]
    raise ValueError(f"no Hugging Face mapping for megatron tensor {key!r} (layer {index[0]})")


def read_piece(ckpt, segments: list[Segment], offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Rows ``offset[0]:offset[0]+shape[0]`` (and the columns likewise) of the tensor that
    ``segments`` stacks, reading only those rows and columns from ``ckpt``."""
    lo, hi = offset[0], offset[0] + shape[0]
    cols = (slice(offset[1], offset[1] + shape[1]),) if len(shape) > 1 else ()
    parts, pos = [], 0
    for name, first, rows in segments:
        a, b = max(lo, pos), min(hi, pos + rows)
        if a < b:
            parts.append(ckpt.read_slice(name, (slice(first + a - pos, first + b - pos),) + cols))
        pos += rows
    if not parts:
        raise ValueError(f"rows {lo}:{hi} are outside the {pos} rows of {segments[0][0]}")
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def hf_tensors_from_megatron(key: str, index: tuple[int, ...], t: torch.Tensor, s: YiShapes) -> dict[str, torch.Tensor]:
    """Hugging Face tensors for one full global megatron tensor (the inverse of :func:`hf_row_segments`)."""
    if key == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": t}
    if key == "output_layer.weight":
        return {} if s.tied else {"lm_head.weight": t}
    if key == "decoder.final_layernorm.weight":
        return {"model.norm.weight": t}
    if not key.startswith("decoder.layers.") or len(index) != 1:
        raise ValueError(f"no Hugging Face mapping for megatron tensor {key!r} {index}")
    p = f"model.layers.{index[0]}."
    if key in _INPUT_NORM:
        return {p + "input_layernorm.weight": t}
    if key in _MLP_NORM:
        return {p + "post_attention_layernorm.weight": t}
    if key == "decoder.layers.self_attention.linear_qkv.weight":
        q, k, v = unpack_qkv(t, s)
        return {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v}
    if key == "decoder.layers.self_attention.linear_proj.weight":
        return {p + "self_attn.o_proj.weight": t}
    if key == "decoder.layers.mlp.linear_fc1.weight":
        gate, up = torch.chunk(t, 2, dim=0)
        return {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}
    if key == "decoder.layers.mlp.linear_fc2.weight":
        return {p + "mlp.down_proj.weight": t}
    raise ValueError(f"no Hugging Face mapping for megatron tensor {key!r} (layer {index[0]})")


def check_hf_names(ckpt, s: YiShapes) -> None:
    """Refuse a checkpoint whose tensors are not exactly this model's (missing or extra)."""
    present = set(ckpt.names)
    used: set[str] = set()
    missing = []
    for name in hf_names(s):
        candidates = [name]
        for new, aliases in NORM_ALIASES.items():
            if name.endswith(f".{new}.weight"):
                candidates = [name.replace(f".{new}.", f".{a}.") for a in aliases]
        found = next((c for c in candidates if c in present), None)
        if found is None:
            missing.append(name)
        else:
            used.add(found)
    if s.tied:
        used.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    extra = sorted(n for n in present - used if not n.endswith(IGNORED_SUFFIXES))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
        raise HFCheckpointError(
            f"{ckpt.path}: does not match the model ({s.num_layers} layers, tied={s.tied}): {'; '.join(parts)}"
        )
    # Shapes from the file headers, before anything is copied.
    resolve = norm_resolver(ckpt)
    for name, shape in hf_shapes(s).items():
        found, _ = ckpt.info(resolve(name))
        if tuple(found) != tuple(shape):
            raise HFCheckpointError(
                f"{ckpt.path}: tensor {resolve(name)} has shape {tuple(found)}, the model "
                f"({s.hidden} hidden, {s.heads} heads / {s.groups} KV heads of "
                f"{s.head_dim}, FFN {s.ffn}, vocab {s.vocab}) expects {tuple(shape)}"
            )


def norm_resolver(ckpt) -> Callable[[str], str]:
    """Current norm name -> the name this checkpoint stores it under (``ln1`` / ``ln2`` in the
    first Yi release); other names pass through."""
    present = ckpt.names

    def resolve(name: str) -> str:
        for new, aliases in NORM_ALIASES.items():
            if name.endswith(f".{new}.weight"):
                for alias in aliases:
                    candidate = name.replace(f".{new}.", f".{alias}.")
                    if candidate in present:
                        return candidate
        return name

    return resolve


def piece_reader(ckpt, s: YiShapes) -> Callable[[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]:
    """``piece(key, index, offset, shape)``: the region of the global megatron tensor ``key``
    (layer ``index``) that one rank holds, reading only those rows / columns of ``ckpt``."""
    resolve = norm_resolver(ckpt)

    def piece(key: str, index: tuple[int, ...], offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        try:
            return read_piece(ckpt, hf_row_segments(key, index, s, resolve), offset, shape)
        except KeyError as exc:
            where = f" (layer {index[0]})" if index else ""
            raise HFCheckpointError(f"Hugging Face tensor {exc.args[0]} for {key}{where} is missing") from None

    return piece


# ---------------------------------------------------------------------- converter hooks
# What fmtrain.checkpoint.hf.convert asks of every family converter (see ``converter``).

FORMAT = "Hugging Face LlamaForCausalLM"
WEIGHTS_SUBDIR = ""
"""config.json and the safetensors files sit in the directory itself."""
WEIGHTS_PREFIX = "model"
"""Safetensors file stem: model.safetensors / model-0000K-of-0000N.safetensors."""
DTYPE_PROBE = "model.embed_tokens.weight"
"""A tensor whose dtype is the checkpoint's (``--dtype auto``)."""


def shapes_from_config(cfg: Config) -> YiShapes:
    return YiShapes.from_config(cfg)


def recognizes(config_json: dict) -> bool:
    """A Llama / Yi ``config.json`` (transformers'; a diffusers config names its ``_class_name``)."""
    return "_class_name" not in config_json and str(config_json.get("model_type", "llama")).lower() in ("llama", "yi")


def model_overrides(config_json: dict, ckpt) -> list[str]:
    """``model.*=value`` arguments for a config made from the checkpoint's config.json."""
    return overrides_as_args(fmtrain_model_overrides_from_hf(config_json))


def write_export_extras(ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str:
    """``generation_config.json`` and, when the checkpoint has ``tokenizer.model``, the
    tokenizer files; returns a note for the export's last log line."""
    import json

    from fmtrain.data.hf_tokenizer import write_hf_tokenizer

    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer = Path(ckpt_dir) / "tokenizer.model"
    if not tokenizer.is_file():
        return ""
    written = write_hf_tokenizer(tokenizer, out_dir, model_max_length=cfg.model.seq_length, log=log)
    return f", tokenizer ({', '.join(written)})"


# ---------------------------------------------------------------------- export


def export_order(s: YiShapes, present: Callable[[str], bool]) -> list[GlobalName]:
    """megatron tensors (key, layer index) in the order of the Hugging Face tensors they become
    (:func:`hf_names`); ``present(key)`` tells which of the per-layer norm key spellings a
    checkpoint uses."""

    def pick(candidates: tuple[str, ...]) -> str:
        return next((k for k in candidates if present(k)), candidates[0])

    input_norm, mlp_norm = pick(_INPUT_NORM), pick(_MLP_NORM)
    order: list[GlobalName] = [("embedding.word_embeddings.weight", ())]
    for n in range(s.num_layers):
        order += [
            (input_norm, (n,)),
            ("decoder.layers.self_attention.linear_qkv.weight", (n,)),
            ("decoder.layers.self_attention.linear_proj.weight", (n,)),
            (mlp_norm, (n,)),
            ("decoder.layers.mlp.linear_fc1.weight", (n,)),
            ("decoder.layers.mlp.linear_fc2.weight", (n,)),
        ]
    order.append(("decoder.final_layernorm.weight", ()))
    if not s.tied:
        order.append(("output_layer.weight", ()))
    return order


__all__ = [
    "hf_config_from_fmtrain",
    "fmtrain_model_overrides_from_hf",
    "YiShapes",
    "pack_qkv",
    "unpack_qkv",
    "hf_names",
    "hf_tensors_from_megatron",
    "check_hf_names",
    "hf_shapes",
    "hf_row_segments",
    "read_piece",
    "norm_resolver",
    "check_model_matches_hf",
    "ARCHITECTURE_FIELDS",
    "export_order",
    "shapes_from_config",
    "recognizes",
    "model_overrides",
    "write_export_extras",
    "piece_reader",
    "GlobalName",
]
