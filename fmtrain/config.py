"""Typed run configuration: dataclass sections, YAML recipes, ``section.key=value`` overrides.

Everything here is validated before any process group starts: an unknown key names the
nearest valid key, a wrong type names the field and the value, and cross-field rules
(parallel layout against world size, batch divisibility) say which numbers disagree.
Config text is parsed with ``yaml.safe_load`` only; nothing is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any distributed start-up."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tb/ and checkpoints/ go here."""
    seed: int = 1234
    """Seed for weights (layout-invariant), data order and dropout."""


@dataclass
class ModelConfig:
    family: str = "yi"
    """Registered model family (see ``fmtrain.models.registry``)."""
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 4
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    head_dim: Optional[int] = None
    """Per-head width; hidden_size // num_attention_heads when unset."""
    ffn_hidden_size: int = 256
    vocab_size: int = 64000
    seq_length: int = 4096
    """Training sequence length in tokens."""
    rotary_base: float = 5_000_000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    attention_backend: str = "auto"
    """auto (Transformer Engine when importable, else sdpa) | sdpa | te | local (megatron's own)."""
    recompute: str = "none"
    """Activation recompute: none | selective (core attention) | full (every layer)."""
    init_from_hf: str = ""
    """Released weights a new run starts from (continued pretraining, fine-tuning): a Hugging Face
    Llama / Yi directory (config.json + safetensors), or for step_video a Step-Video-T2V release
    (transformer/config.json + diffusion_pytorch_model-*.safetensors). Loaded after the engine is
    built, each rank reading only its slices, unless the run resumes (checkpoint.load set, or
    RUN_DIR has a checkpoint). Its config must match the model.* fields (seq_length and
    init_method_std may differ); for Yi set data.tokenizer to its tokenizer.model.
    See docs/hf_interop.md."""
    # Diffusion transformers (step_video); LLM families ignore these. For a DiT,
    # model.seq_length is the nominal video-token count per sample (FLOPs, memory, MFU).
    in_channels: int = 64
    """DiT: latent channels of the video VAE."""
    patch_size: int = 1
    """DiT: spatial patch size over the latent (patch_size x patch_size latent pixels per token)."""
    caption_dim: int = 6144
    """DiT: width of the LLM-style text embedding (Step-LLM)."""
    caption_tokens: int = 320
    """DiT: LLM-style text embedding length (padded / truncated to it, with a mask)."""
    clip_dim: int = 1024
    """DiT: width of the CLIP-style text embedding; 0 disables the second text encoder."""
    clip_tokens: int = 77
    """DiT: CLIP-style text embedding length."""
    rope_axes: str = "64,32,32"
    """DiT: head channels rotated by 3D RoPE for the frame, height and width positions
    (sum = head_dim, each even); model.rotary_base is the RoPE theta."""
    caption_norm_affine: bool = False
    """DiT: the LayerNorm on the LLM-style text embedding has a weight and bias."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B when > 1)."""
    cp: int = 1
    """Context-parallel size (reserved: only 1 is implemented)."""
    dp: int = 0
    """Data-parallel size; 0 derives it as world_size / (tp * pp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for the non-tensor-parallel regions (needs tp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size_mb: float = 40.0
    """Gradient-reduction bucket size in MiB (megatron DDP)."""


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one rank."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "cosine"
    """cosine (linear warmup, cosine to min_lr) | wsd (warmup, stable, linear decay) | constant."""
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    """wsd: fraction of max_steps spent in the final decay."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_interval: int = 1
    """Print a progress line every this many steps (metrics.jsonl gets every step)."""
    exit_after_minutes: float = 0.0
    """Wall-clock budget: after the first step that ends past it, save a checkpoint and exit
    with the requeue status (99), as on SIGTERM / SIGUSR1; 0 disables. Measured from the start
    of the process's training function; leave room for one step and one save."""
    max_consecutive_skips: int = 5
    """Stop the run with an error after this many consecutive steps whose loss or gradient
    norm was not finite (each such step skips its update); 0 never stops."""


@dataclass
class DataConfig:
    corpus: str = "builtin:shakespeare"
    """In-memory text corpus (used when data.shards is empty): a .txt or .jsonl file, or
    builtin:shakespeare (shipped with fmtrain)."""
    tokenizer: str = ""
    """SentencePiece model; empty trains one of model.vocab_size into RUN_DIR/tokenizer/ on the
    corpus (or, when streaming, on the .txt of data.shards)."""
    valid_fraction: float = 0.05
    """Share of the corpus's documents held out for validation (in-memory path)."""
    shards: str = ""
    """Training shards; set, the run streams WebDataset shards (fmtrain.data.stream) instead of
    reading data.corpus: a brace pattern (dir/shard-{000000..000127}.tar), several joined with
    '::', local paths, file: or pipe: URLs, an index.json, or a directory holding one."""
    valid_shards: str = ""
    """Validation shards (same forms); read in order, unshuffled; empty: no validation."""
    num_workers: int = 2
    """DataLoader worker processes per data-parallel rank (0: read in the training process).
    Part of the stream layout: a resumed run must use the same value (0 and 1 are the same)."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer (0 or 1: shard order only, shards still permuted
    per epoch)."""
    max_bad_fraction: float = 0.01
    """Stop the run when a worker's unreadable or unusable samples exceed this share of what it
    read (each bad sample is skipped with a warning naming its shard and key)."""
    reset_position_ids: bool = False
    """Text: position ids restart at 0 after each EOS (document-boundary-aware positions)."""
    prefetch: int = 2
    """Microbatches each DataLoader worker prepares ahead."""
    worker_timeout: float = 600.0
    """Seconds to wait for a microbatch from a DataLoader worker before failing (0: forever)."""
    log_batch_hashes: bool = False
    """Append a sha256 per microbatch to RUN_DIR/data/batch_hashes.rankR.jsonl (debugging resume)."""
    video_frames: int = 16
    """Video: frames per clip."""
    video_stride: int = 4
    """Video: frame step inside a clip."""
    video_size: int = 224
    """Video: clip height and width (shorter side resized to it, then cropped square)."""
    video_crop: str = "random"
    """Video: center | random (spatial crop; the clip's start frame is always drawn at random)."""
    video_clips: int = 1
    """Video: clips cut from each decoded video (repeated sampling)."""
    synthetic_latent_shapes: str = "2x8x8"
    """DiT without data.shards (data.corpus=synthetic:latents): latent T x H x W shapes of the
    generated dataset, comma separated; one bucket per shape."""
    synthetic_samples: int = 512
    """DiT synthetic dataset: samples per shape."""
    synthetic_classes: int = 8
    """DiT synthetic dataset: prototype latents (each with its own text embedding)."""


@dataclass
class FlowConfig:
    """Flow matching (``fmtrain.objectives.flow_matching``): x_t = t*x1 + (1-t)*x0, t=0 noise,
    t=1 data; the model predicts the velocity x1 - x0."""

    timestep_sampling: str = "logit_normal"
    """uniform | logit_normal (t = sigmoid(u), u ~ N(logit_mean, logit_std))."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    """Training time shift: SD3's s*sigma/(1+(s-1)*sigma) on the noise level sigma = 1-t
    (s > 1 trains more at high noise); 1 leaves t as sampled."""
    loss_weighting: str = "none"
    """Per-sample loss weight w(t): none | cosmap (SD3), or a name registered with
    ``fmtrain.objectives.flow_matching.register_weighting``."""
    l1_weight: float = 0.0
    """Adds l1_weight * mean |v_pred - v| to the MSE (LaVin-DiT uses 0.1)."""
    text_drop_prob: float = 0.1
    """Classifier-free guidance training: the share of samples whose text condition is
    replaced by the null condition."""
    sample_steps: int = 50
    """Sampler: Euler steps."""
    sample_shift: float = 13.0
    """Sampler: SD3 time shift of the Euler grid (Step-Video recommends 13; Turbo 17)."""
    guidance_scale: float = 9.0
    """Sampler: classifier-free guidance scale (1 disables the unconditional pass)."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Validate every this many steps; 0 disables validation."""
    steps: int = 2
    """Global batches per validation."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0: only at the end of the run)."""
    save_at_end: bool = True
    load: str = ""
    """Checkpoint directory to start from (any run, any layout); empty resumes from
    RUN_DIR/checkpoints/latest when it exists. Once the run has checkpoints of its own, those
    win over a checkpoint.load outside RUN_DIR/checkpoints (so a requeued run continues)."""
    keep_last: int = 0
    """Retention: keep the newest this many checkpoints (0: keep all). Older ones are removed
    by rank 0 after a newer one is complete; the one `latest` names is never removed."""
    keep_every: int = 0
    """Retention: also keep every checkpoint whose step is a multiple of this (0: none)."""
    async_save: bool = False
    """Write checkpoints in a background process (megatron's async save); the loop waits only
    to stage the state, and the checkpoint is renamed into place at a later step once every
    rank has finished writing. Falls back to synchronous saves, with a logged reason, where
    the platform cannot fork the writer."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for MFU; 0 picks the bf16 dense peak of a known GPU, or
    measures a GEMM at start-up on CPU."""


@dataclass
class EngineConfig:
    backend: str = "megatron"
    """megatron (TP x PP x DP, distributed optimizer)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def head_dim(self) -> int:
        return self.model.head_dim or self.model.hidden_size // self.model.num_attention_heads


_CHOICES = {
    "model.attention_backend": ("auto", "sdpa", "te", "local"),
    "model.recompute": ("none", "selective", "full"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.lr_schedule": ("cosine", "wsd", "constant"),
    "engine.backend": ("megatron",),
    "data.video_crop": ("center", "random"),
    "flow.timestep_sampling": ("uniform", "logit_normal"),
}


def _nearest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(path: str, value: Any, annotation) -> Any:
    """Convert a YAML or override value to the field's declared type, or raise."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{path}: unsupported field type {hint}")
    raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")


def _section_fields(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if len(parts) != 2:
        raise ConfigError(f"'{dotted}' is not a section.key name{_nearest(dotted, all_keys())}")
    section, key = parts
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'{_nearest(section, sections)}")
    obj = getattr(cfg, section)  # section names come from Config's own fields
    fields = _section_fields(type(obj))
    if key not in fields:
        raise ConfigError(f"unknown config key '{section}.{key}'{_nearest(key, fields)}")
    setattr(obj, key, _coerce(dotted, value, fields[key]))


def _parse_override_value(text: str) -> Any:
    # safe_load gives YAML scalars (numbers, booleans, null); anything else stays a string.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def load_config(recipe: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Recipe YAML (optional) plus ``section.key=value`` overrides -> validated Config."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                try:
                    _set(cfg, f"{section}.{key}", value)
                except ConfigError as exc:
                    raise ConfigError(f"{path}: {exc}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        _set(cfg, key.strip(), _parse_override_value(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field rules. ``world_size`` adds the layout-against-world checks."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(choices)}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    positive = {
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups, "model.ffn_hidden_size": m.ffn_hidden_size,
        "model.vocab_size": m.vocab_size, "model.seq_length": m.seq_length,
        "parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.vpp": p.vpp, "parallel.cp": p.cp,
        "train.max_steps": t.max_steps, "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size, "train.log_interval": t.log_interval,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if p.dp < 0:
        raise ConfigError(f"parallel.dp={p.dp} must be 0 (derived) or positive")
    if p.cp != 1:
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism is not implemented yet; use parallel.cp=1")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} must be a multiple of "
            f"model.num_query_groups={m.num_query_groups}")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; set model.head_dim")
    for name, value in (("model.num_attention_heads", m.num_attention_heads),
                        ("model.num_query_groups", m.num_query_groups),
                        ("model.ffn_hidden_size", m.ffn_hidden_size),
                        ("model.vocab_size", m.vocab_size)):
        if value % p.tp:
            raise ConfigError(f"{name}={value} is not divisible by parallel.tp={p.tp}")
    chunks = p.pp * p.vpp
    if m.num_layers % chunks:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pp x parallel.vpp "
            f"= {p.pp} x {p.vpp} = {chunks}")
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp > 1 (interleaving is across stages)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and m.seq_length % p.tp:
        raise ConfigError(f"model.seq_length={m.seq_length} is not divisible by parallel.tp={p.tp} "
                          "(required by parallel.sequence_parallel)")
    if m.init_from_hf and m.family == "yi" and not cfg.data.tokenizer:
        raise ConfigError(f"model.init_from_hf={m.init_from_hf} needs data.tokenizer (the checkpoint's "
                          "tokenizer.model): a tokenizer trained on the corpus would not match its weights")
    if not 0.0 <= cfg.data.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction={cfg.data.valid_fraction} must be in [0, 1)")
    d = cfg.data
    for name, value, low in (("num_workers", d.num_workers, 0), ("shuffle_buffer", d.shuffle_buffer, 0),
                             ("prefetch", d.prefetch, 1), ("video_frames", d.video_frames, 1),
                             ("video_stride", d.video_stride, 1), ("video_size", d.video_size, 1),
                             ("video_clips", d.video_clips, 1)):
        if value < low:
            raise ConfigError(f"data.{name}={value} must be at least {low}")
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if d.worker_timeout < 0:
        raise ConfigError(f"data.worker_timeout={d.worker_timeout} must be >= 0 (0: no timeout)")
    if t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be in [0, train.max_steps={t.max_steps}]")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in (0, 1]")
    for name, value in (("train.exit_after_minutes", t.exit_after_minutes),
                        ("train.max_consecutive_skips", t.max_consecutive_skips),
                        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                        ("checkpoint.keep_every", cfg.checkpoint.keep_every)):
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0 (0 disables it)")
    _validate_dit(cfg)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    if world_size is not None:
        dp = data_parallel_size(cfg, world_size)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} = {per_step}")
        micro_batches = t.global_batch_size // per_step
        if p.vpp > 1 and micro_batches % p.pp:
            raise ConfigError(
                f"interleaved pipeline (parallel.vpp={p.vpp}) needs the number of microbatches "
                f"({micro_batches} = global_batch_size / (micro_batch_size x dp)) to be a multiple of "
                f"parallel.pp={p.pp}")


def rope_axes(cfg: Config) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in cfg.model.rope_axes.split(","))
    except ValueError:
        raise ConfigError(f"model.rope_axes={cfg.model.rope_axes!r} must be comma-separated integers") from None


def parse_latent_shape(text: str, what: str = "latent shape") -> tuple[int, int, int]:
    """'TxHxW' -> (T, H, W) of positive integers."""
    try:
        t, h, w = (int(x) for x in text.strip().lower().split("x"))
    except ValueError:
        raise ConfigError(f"{what}: {text.strip()!r} is not TxHxW") from None
    if min(t, h, w) < 1:
        raise ConfigError(f"{what}: {text.strip()!r} has a non-positive size")
    return t, h, w


def latent_shapes(cfg: Config) -> list[tuple[int, int, int]]:
    return [parse_latent_shape(item, f"data.synthetic_latent_shapes={cfg.data.synthetic_latent_shapes!r}")
            for item in cfg.data.synthetic_latent_shapes.split(",")]


def _validate_dit(cfg: Config) -> None:
    """Rules for the diffusion-transformer fields; checked for every config (cheap), so a
    typo surfaces even before a DiT recipe uses it."""
    m, f = cfg.model, cfg.flow
    axes = rope_axes(cfg)
    if m.family == "step_video":
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != cfg.head_dim:
            raise ConfigError(f"model.rope_axes={m.rope_axes!r} must be three positive even numbers summing to "
                              f"the head dim {cfg.head_dim}")
        if m.num_query_groups != m.num_attention_heads:
            raise ConfigError(f"model.num_query_groups={m.num_query_groups}: the Step-Video DiT uses plain multi-head "
                              f"attention; set it to model.num_attention_heads={m.num_attention_heads}")
        for t, h, w in latent_shapes(cfg):
            if h % m.patch_size or w % m.patch_size:
                raise ConfigError(f"data.synthetic_latent_shapes: {t}x{h}x{w} is not divisible by "
                                  f"model.patch_size={m.patch_size}")
    for name, value in (("model.in_channels", m.in_channels), ("model.patch_size", m.patch_size),
                        ("model.caption_dim", m.caption_dim), ("model.caption_tokens", m.caption_tokens),
                        ("flow.sample_steps", f.sample_steps), ("data.synthetic_samples", cfg.data.synthetic_samples),
                        ("data.synthetic_classes", cfg.data.synthetic_classes)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if m.clip_dim < 0 or m.clip_tokens < 0 or (m.clip_dim > 0) != (m.clip_tokens > 0):
        raise ConfigError(f"model.clip_dim={m.clip_dim} and model.clip_tokens={m.clip_tokens} must both be "
                          "positive (two text encoders) or both 0 (one)")
    if f.logit_std <= 0 or f.shift <= 0 or f.sample_shift <= 0:
        raise ConfigError("flow.logit_std, flow.shift and flow.sample_shift must be positive")
    if not 0.0 <= f.text_drop_prob <= 1.0:
        raise ConfigError(f"flow.text_drop_prob={f.text_drop_prob} must be in [0, 1]")
    if f.l1_weight < 0:
        raise ConfigError(f"flow.l1_weight={f.l1_weight} must be >= 0")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """World size must equal TP x PP x DP; say which numbers disagree when it does not."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    if p.dp:
        if p.tp * p.pp * p.cp * p.dp != world_size:
            raise ConfigError(
                f"world size {world_size} != parallel.tp x parallel.pp x parallel.dp = "
                f"{p.tp} x {p.pp} x {p.dp} = {p.tp * p.pp * p.dp}")
        return p.dp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
            f"{p.tp} x {p.pp} = {model_parallel}")
    return world_size // model_parallel


def num_microbatches(cfg: Config, dp: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def all_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        keys += [f"{section.name}.{k}" for k in _section_fields(typing.get_type_hints(Config)[section.name])]
    return keys


__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "validate",
           "data_parallel_size", "num_microbatches", "all_keys", "rope_axes", "latent_shapes",
           "parse_latent_shape"]
