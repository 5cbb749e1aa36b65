"""Typed run configuration: dataclass sections, YAML recipes, ``section.key=value`` overrides.

Everything here is validated before any process group starts: an unknown key names the
nearest valid key, a wrong type names the field and the value, and cross-field rules
(parallel layout against world size, batch divisibility) say which numbers disagree.
Config text is parsed with ``yaml.safe_load`` only; nothing is ever evaluated.

Two sections belong to someone else. ``model`` is the model family's own dataclass (its
fields, defaults and rules), chosen by ``model.family``; ``objective`` is the training
objective's, chosen by ``objective.name`` (default: the family's first objective). A family
is found by module name: built-in ``NAME`` is the package ``fmtrain.models.NAME``, a dotted
name is a package or module of its own (a user's family); either way its ``config`` module
(or the module itself) holds a :class:`FamilySettings` called ``SETTINGS``, which imports
nothing heavier than this module. An objective ``NAME`` is ``fmtrain.objectives.NAME``, whose
``CONFIG`` is its section class. Shared fields that mean the same thing in every transformer
family (layers, hidden size, heads, ...) live once, in :class:`TransformerModelConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any distributed start-up."""


# ----------------------------------------------------------------------------- shared sections


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, tb/ and checkpoints/ go here."""
    seed: int = 1234
    """Seed for weights (layout-invariant), data order and dropout."""


@dataclass
class ModelConfig:
    """What every model family's section has; a family's own section subclasses this."""

    family: str = ""
    """Registered model family: a built-in name (``fmtrain.config.BUILTIN_FAMILIES``) or the
    dotted module path of a family of your own. Empty: the first built-in family."""
    init_from_hf: str = ""
    """Released weights a new run starts from (continued pretraining, fine-tuning), in the
    family's release layout (a Hugging Face directory for the LLMs, a Step-Video-T2V release
    for step_video). Loaded after the engine is built, each rank reading only its slices, unless
    the run resumes (checkpoint.load set, or RUN_DIR has a checkpoint). Its config must match
    the model.* fields. See docs/hf_interop.md."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def check(self, cfg: Config) -> None:
        """Rules of this section's fields (raise ConfigError); subclasses extend them."""


@dataclass
class TransformerModelConfig(ModelConfig):
    """The fields every transformer family shares, with one meaning each."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 4
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    head_dim: int | None = None
    """Per-head width; hidden_size // num_attention_heads when unset."""
    ffn_hidden_size: int = 256
    seq_length: int = 4096
    """Tokens per sample (for a DiT: the nominal video-token count, for FLOPs, memory and MFU)."""
    init_method_std: float = 0.02
    recompute: str = "none"
    """Activation recompute: none | selective (core attention) | full (every layer)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"recompute": ("none", "selective", "full")}

    @property
    def kv_channels(self) -> int:
        """The per-head width: ``head_dim``, or hidden_size // num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def check(self, cfg: Config) -> None:
        p = cfg.parallel
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "seq_length",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
            )
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % p.tp:
                raise ConfigError(f"model.{name}={getattr(self, name)} is not divisible by parallel.tp={p.tp}")
        chunks = p.pp * p.vpp
        if self.num_layers % chunks:
            raise ConfigError(
                f"model.num_layers={self.num_layers} is not divisible by parallel.pp x parallel.vpp "
                f"= {p.pp} x {p.vpp} = {chunks}"
            )
        if p.sequence_parallel and self.seq_length % p.tp:
            raise ConfigError(
                f"model.seq_length={self.seq_length} is not divisible by parallel.tp={p.tp} "
                "(required by parallel.sequence_parallel)"
            )
        if p.cp > 1 and self.num_attention_heads % (p.tp * p.cp):
            # Ulysses hands each CP rank whole heads of its TP rank's share (key/value heads are
            # repeated when they do not split).
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by parallel.tp x "
                f"parallel.cp = {p.tp} x {p.cp} = {p.tp * p.cp} (context parallelism splits the heads)"
            )


@dataclass
class ObjectiveConfig:
    """What every objective's section has; an objective's own section subclasses this."""

    name: str = ""
    """The training objective (``fmtrain.objectives.NAME``); empty: the family's default."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    ROWS_PER_SAMPLE: ClassVar[int] = 1
    """Sequences a sample puts into a microbatch's tensors (a preference pair: 2)."""
    CONTEXT_PARALLEL: ClassVar[bool] = True
    """Whether the loss is a sum of per-token terms, so that each context-parallel rank's slice
    adds its share (False: a loss nonlinear in per-sequence sums, which would need them
    reduced over the CP group first)."""

    def check(self, cfg: Config) -> None:
        """Rules of this section's fields (raise ConfigError)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B when > 1)."""
    cp: int = 1
    """Context-parallel size: every sample's sequence split over cp ranks, attention by
    DeepSpeed-Ulysses (heads all-to-all)."""
    dp: int = 0
    """Data-parallel size; 0 derives it as world_size / (tp * cp * pp)."""
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
    """Samples (sequences, clips) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Samples per forward pass on one rank."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "cosine"
    """cosine (linear warmup, cosine to min_lr) | wsd (warmup, stable, linear decay) | constant."""
    warmup_steps: int = 0
    """Linear warm-up steps; longer than the run is allowed (a smoke run of a real recipe):
    the learning rate then never leaves the warm-up, and start-up says so."""
    decay_fraction: float = 0.1
    """wsd: fraction of max_steps spent in the final decay."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    fused_adam: str = "auto"
    """torch's single-kernel AdamW (``fused=True``) when megatron falls back to torch's
    optimizer (no apex / Transformer Engine FusedAdam): auto = on where torch has the kernel
    (CUDA, CPU) | on | off (torch's multi-tensor ``foreach`` AdamW). Same update up to rounding."""
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

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "precision": ("auto", "bf16", "fp32"),
        "lr_schedule": ("cosine", "wsd", "constant"),
        "fused_adam": ("auto", "on", "off"),
    }


@dataclass
class DataConfig:
    corpus: str = "builtin:shakespeare"
    """In-memory dataset (used when data.shards is empty): for text a .txt or .jsonl file, or
    builtin:shakespeare (shipped with fmtrain); for a DiT synthetic:latents; for in-context
    tasks (LaVin-DiT) synthetic:tasks."""
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
    """Text: position ids restart at 0 after each EOS (Megatron's reset_position_ids): RoPE
    rotates each document's tokens by their position in that document."""
    reset_attention_mask: bool = False
    """Text: attention stops at document boundaries (Megatron's reset_attention_mask): a token
    attends only to earlier tokens of its own document. Documents are where the position ids
    restart, so this needs reset_position_ids."""
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
    """Video: center | random | multiscale (spatial crop; the clip's start frame is always drawn
    at random). multiscale is VideoMAE's ``GroupMultiScaleCrop``: a crop of 1, .875, .75 or .66
    of the shorter side per axis (aspect distortion at most one step), at one of 13 fixed
    offsets, resized to data.video_size."""
    video_flip: bool = False
    """Video: flip each clip horizontally with probability 0.5 (VideoMAE V2's pretraining does
    not; its fine-tuning does)."""
    video_clips: int = 1
    """Video: clips cut from each decoded video (repeated sampling)."""
    synthetic_latent_shapes: list[list[int]] = field(default_factory=lambda: [[2, 8, 8]])
    """DiT without data.shards (data.corpus=synthetic:latents): the latent [T, H, W] shapes of
    the generated dataset, one bucket per shape, e.g. [[2, 8, 8], [2, 8, 4]]."""
    synthetic_samples: int = 512
    """DiT synthetic dataset: samples per shape; synthetic:tasks: latent items (1/8 of them, at
    least one, held out as validation queries)."""
    synthetic_classes: int = 8
    """DiT synthetic dataset: prototype latents (each with its own text embedding)."""
    vae: str = ""
    """A VAE (an fmtrain checkpoint of a VAE family, or a release) that turns pixel data into the
    latents the model trains on, on the fly on every rank (LaVin-DiT's pixel task shards through
    the ST-VAE); empty: the data holds latents (``fmtrain data encode`` makes them once)."""
    task_pairs: int = 2
    """In-context tasks (LaVin-DiT): (input, output) example pairs before the query in each
    sample. A stored sample with more uses its first task_pairs; one with fewer is skipped and
    counted as bad."""
    task_size: int = 256
    """In-context pixel task shards: every image or clip frame is brought to task_size x
    task_size (see task_fit)."""
    task_fit: str = "resize"
    """In-context pixel task shards: resize (bicubic, antialiased, straight to the square, aspect
    not kept, as LaVin-DiT's inference.py prepares its prompts) | center_crop (shorter side to
    task_size, aspect kept, then the centre square)."""
    task_frames: int = 0
    """In-context pixel task clips: frames per item, the first task_frames of each clip (a clip
    with fewer is skipped); 0: as stored (the sample's .json frames). An image is one frame."""
    task_latent_size: int = 8
    """data.corpus=synthetic:tasks: side h = w of the generated latent items [C, 1, h, w]."""
    synthetic_tasks: list[str] = field(default_factory=lambda: ["flip_h", "flip_v"])
    """data.corpus=synthetic:tasks: the latent-space tasks samples are drawn from, any of
    flip_h, flip_v, negate, transpose, channel_roll, raise, lower (SYNTHETIC_LATENT_TASKS)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "video_crop": ("center", "random", "multiscale"),
        "task_fit": ("resize", "center_crop"),
    }


SYNTHETIC_LATENT_TASKS = ("flip_h", "flip_v", "negate", "transpose", "channel_roll", "raise", "lower")
"""The tasks ``data.synthetic_tasks`` may name (fmtrain.data.tasks applies them to latents)."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Validate every this many steps; 0 disables validation."""
    steps: int = 2
    """Global batches per validation."""
    videos: bool = True
    """Families that draw pictures at validation (the Video-VAE: input beside reconstruction)
    log them to TensorBoard and RUN_DIR/videos/."""
    video_fps: float = 8.0
    """Frame rate of those videos."""
    sample_vae: str = ""
    """A video_vae checkpoint / run directory or the release's vae/: at every validation a DiT
    family samples a video for the first validation prompt (at that sample's latent shape) and
    logs it decoded, beside the sample's own video decoded from its latent."""


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
    """megatron (TP x PP x DP, distributed optimizer) or deepspeed (ZeRO stages 1-3 over the
    data-parallel ranks, optional CPU offload; no pipeline parallelism)."""
    zero_stage: int = 3
    """deepspeed: ZeRO stage (1: optimizer state sharded, 2: and gradients, 3: and parameters)."""
    offload: str = "none"
    """deepspeed: what lives in host memory: none, optimizer (ZeRO-Offload; stages 1-3) or
    optimizer+params (ZeRO-Infinity's parameter offload; stage 3 only)."""
    deepspeed_config: str = ""
    """deepspeed: a DeepSpeed JSON file merged over the config fmtrain generates; a key fmtrain
    sets that the file sets differently is refused, naming both values."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "backend": ("megatron", "deepspeed"),
        "zero_stage": (1, 2, 3),
        "offload": ("none", "optimizer", "optimizer+params"),
    }


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: default_model_section())
    objective: ObjectiveConfig = field(default_factory=lambda: default_objective_section())
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
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
        """The per-head width of a transformer family (``model.kv_channels``)."""
        return self.model.kv_channels

    @property
    def family(self) -> FamilySettings:
        return family_settings(self.model.family)


# ----------------------------------------------------------------------------- families, objectives


@dataclass(frozen=True)
class FamilySettings:
    """What the configuration needs to know of a model family, before anything is built."""

    model: type[ModelConfig]
    """The family's ``model`` section."""
    objectives: tuple[str, ...]
    """The objectives the family trains with; the first is the default ``objective.name``."""
    parallel: frozenset[str] = frozenset()
    """Layout dimensions the family supports besides data parallelism: tp, sp (sequence
    parallelism), pp, vpp (interleaved pipeline), cp."""
    validate: Callable[[Config], None] | None = None
    """Rules across sections that only this family has (raise ConfigError)."""


BUILTIN_FAMILIES = ("yi", "step_video", "video_vae", "videomae_v2", "lavin_dit", "st_vae")
"""The model families shipped with fmtrain (packages under ``fmtrain.models``); the first is
the default ``model.family``."""
BUILTIN_OBJECTIVES = ("lm", "flow_matching", "vae", "mae", "dpo", "video_dpo")
"""The objectives shipped with fmtrain (modules under ``fmtrain.objectives``)."""
PARALLEL_DIMENSIONS = {
    "tp": "tensor",
    "sp": "sequence",
    "pp": "pipeline",
    "vpp": "interleaved pipeline",
    "cp": "context",
}


def family_module_name(family: str) -> str:
    """The module path a family name stands for: ``fmtrain.models.NAME`` for a built-in one."""
    return f"fmtrain.models.{family}" if family in BUILTIN_FAMILIES else family


def import_family_part(family: str, part: str, attribute: str):
    """``attribute`` of the family's ``part`` submodule (or of the family module itself, for a
    family written as one module); ConfigError naming the known families when there is none."""
    base = family_module_name(family or BUILTIN_FAMILIES[0])
    known = ", ".join(BUILTIN_FAMILIES)
    if not base or not all(piece.isidentifier() for piece in base.split(".")):
        raise ConfigError(f"model.family={family!r} is not a family name; known families: {known}")
    for name in (f"{base}.{part}", base):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue  # this module does not exist (an import inside it failing is a real error)
            raise
        if hasattr(module, attribute):
            return getattr(module, attribute)
    hint = _nearest(family, BUILTIN_FAMILIES, cutoff=0.6) if "." not in family else ""
    raise ConfigError(
        f"unknown model family {family!r}{hint}; known families: {known} "
        f"(or the dotted module path of a family of your own)"
    )


def family_settings(family: str) -> FamilySettings:
    return import_family_part(family, "config", "SETTINGS")


def objective_section(name: str, family: str) -> type[ObjectiveConfig]:
    """The section class of objective ``name``, which family ``family`` must support."""
    settings = family_settings(family)
    if name not in settings.objectives:
        raise ConfigError(
            f"objective.name={name!r}: model.family={family or BUILTIN_FAMILIES[0]} trains with "
            f"{', '.join(settings.objectives)}{_nearest(name, settings.objectives)}"
        )
    if name in BUILTIN_OBJECTIVES:
        return importlib.import_module("fmtrain.objectives.sections").SECTIONS[name]
    return importlib.import_module(name).CONFIG


def default_model_section() -> ModelConfig:
    family = BUILTIN_FAMILIES[0]
    return family_settings(family).model(family=family)


def default_objective_section() -> ObjectiveConfig:
    family = BUILTIN_FAMILIES[0]
    name = family_settings(family).objectives[0]
    return objective_section(name, family)(name=name)


# Keys that moved; an old recipe gets told the new place.
MOVED_SECTIONS = {"flow": "objective"}
"""Old section -> its new name (``flow.shift`` is ``objective.shift`` with objective.name=flow_matching)."""


# ----------------------------------------------------------------------------- reading values


def _nearest(name: str, options, cutoff: float = 0.0) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=cutoff)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _choices(section_obj, key: str) -> tuple[str, ...]:
    return getattr(type(section_obj), "CHOICES", {}).get(key, ())


def _coerce(path: str, value: Any, annotation, choices: tuple[str, ...] = ()) -> Any:
    """Convert a YAML or override value to the field's declared type, or raise."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            example = "[64, 32, 32]" if item is int else "[[2, 8, 8], [2, 8, 4]]"
            raise ConfigError(f"{path}: expected a list like {example}, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
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
        # YAML 1.1 reads a bare on / off as a boolean.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            return "on" if value else "off"
    else:
        raise ConfigError(f"{path}: unsupported field type {hint}")
    raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")


def _section_fields(section_cls) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _config_sections() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _other_family_with(key: str, family: str) -> str:
    """A built-in family whose model section has ``key``, for an error message ('' if none)."""
    for name in BUILTIN_FAMILIES:
        if name != family and key in _section_fields(family_settings(name).model):
            return name
    return ""


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    sections = _config_sections()
    if len(parts) != 2:
        raise ConfigError(f"'{dotted}' is not a section.key name{_nearest(dotted, all_keys(cfg))}")
    section, key = parts
    if section in MOVED_SECTIONS:
        new = MOVED_SECTIONS[section]
        raise ConfigError(
            f"'{dotted}' moved: the {section} section is now the objective's section, "
            f"'{new}.{key}' (with objective.name=flow_matching)"
        )
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}'{_nearest(section, sections)}")
    obj = getattr(cfg, section)  # section names come from Config's own fields
    fields = _section_fields(type(obj))
    if key not in fields:
        if section == "model":
            owner = _other_family_with(key, cfg.model.family)
            if owner:
                raise ConfigError(
                    f"unknown config key 'model.{key}' for model.family={cfg.model.family}: "
                    f"it is a field of model.family={owner}{_nearest(key, fields)}"
                )
        raise ConfigError(f"unknown config key '{section}.{key}'{_nearest(key, fields)}")
    setattr(obj, key, _coerce(dotted, value, fields[key], _choices(obj, key)))


def _parse_override_value(text: str) -> Any:
    # safe_load gives YAML scalars (numbers, booleans, null) and flow lists ([64, 32, 32]);
    # anything else stays a string.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str, list)) or value is None else text


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any, str]]:
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        items.append((key.strip(), _parse_override_value(text), ""))
    return items


def _recipe_items(path: Path) -> list[tuple[str, Any, str]]:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    items = []
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        items += [(f"{section}.{key}", value, f"{path}: ") for key, value in values.items()]
    return items


def _last(items: list[tuple[str, Any, str]], key: str) -> tuple[Any, str]:
    found = [(value, where) for dotted, value, where in items if dotted.strip() == key]
    return found[-1] if found else ("", "")


def _build(items: list[tuple[str, Any, str]]) -> Config:
    """A Config from (section.key, value, where) items, later items winning; ``where`` prefixes errors."""
    family, where = _last(items, "model.family")
    try:
        family = _coerce("model.family", family, str) if family else BUILTIN_FAMILIES[0]
        settings = family_settings(family)
        objective, where = _last(items, "objective.name")
        objective = _coerce("objective.name", objective, str) if objective else settings.objectives[0]
        objective_cls = objective_section(objective, family)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    cfg = Config(model=settings.model(family=family), objective=objective_cls(name=objective))
    items = _with_size_preset(settings.model, items)
    for dotted, value, where in items:
        if dotted.strip() in ("model.family", "objective.name"):
            continue  # chose the sections above (the last one given wins)
        try:
            _set(cfg, dotted.strip(), value)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
    return cfg


def _with_size_preset(section: type[ModelConfig], items: list[tuple[str, Any, str]]) -> list[tuple[str, Any, str]]:
    """A family section with ``PRESETS`` (named sizes) expands ``model.size=NAME`` into its
    fields, placed before every item given, so what the recipe or command line sets wins."""
    presets = getattr(section, "PRESETS", None)
    size, where = _last(items, "model.size")
    if not presets or size in (None, ""):
        return items
    if str(size) not in presets:
        raise ConfigError(f"{where}model.size={size!r} is not one of {', '.join(presets)}")
    return [(f"model.{k}", v, f"model.size={size}: ") for k, v in presets[str(size)].items()] + items


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (optional) plus ``section.key=value`` overrides -> validated Config."""
    items = _recipe_items(Path(recipe)) if recipe is not None else []
    cfg = _build(items + _parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """``section.key=value`` strings onto ``cfg`` (values read as YAML scalars or lists).
    The family and the objective stay what they are (build a new config to change them)."""
    for key, value, _ in _parse_overrides(overrides):
        if key in ("model.family", "objective.name") and value != getattr(
            getattr(cfg, key.split(".")[0]), key.split(".")[1]
        ):
            raise ConfigError(f"{key} cannot change on a built config; pass it to load_config")
        _set(cfg, key, value)


# Fields of the single model section of checkpoints written before the families owned their
# sections; a saved config still lists them all (see upgrade_saved_config).
_FLAT_MODEL_FIELDS_BEFORE_FAMILIES = frozenset(
    {
        "family",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "head_dim",
        "ffn_hidden_size",
        "vocab_size",
        "seq_length",
        "rotary_base",
        "norm_epsilon",
        "init_method_std",
        "tie_embeddings",
        "attention_backend",
        "recompute",
        "fused_kernels",
        "init_from_hf",
        "in_channels",
        "patch_size",
        "caption_dim",
        "caption_tokens",
        "clip_dim",
        "clip_tokens",
        "rope_axes",
        "caption_norm_affine",
    }
)


def upgrade_saved_config(data: dict) -> dict:
    """A config saved by an earlier fmtrain (fmtrain_state.json) in today's form.

    Then: one flat ``model`` section for every family (a Yi config listed the DiT fields too),
    a ``flow`` section, and comma-separated strings for lists. Keys of the old flat section
    that the family's section does not have are dropped; nothing else is.
    """
    data = {section: dict(values) for section, values in data.items()}
    model = data.get("model", {})
    if "flow" in data:
        flow = data.pop("flow")
        settings = family_settings(model.get("family") or BUILTIN_FAMILIES[0])
        if "objective" not in data and "flow_matching" in settings.objectives:
            data["objective"] = {"name": "flow_matching", **flow}
    if model:
        fields = _section_fields(family_settings(model.get("family") or BUILTIN_FAMILIES[0]).model)
        for key in [k for k in model if k not in fields and k in _FLAT_MODEL_FIELDS_BEFORE_FAMILIES]:
            del model[key]
        if isinstance(model.get("rope_axes"), str):
            model["rope_axes"] = [int(x) for x in model["rope_axes"].split(",")]
    shapes = data.get("data", {}).get("synthetic_latent_shapes")
    if isinstance(shapes, str):
        data["data"]["synthetic_latent_shapes"] = [[int(x) for x in s.lower().split("x")] for s in shapes.split(",")]
    return data


WHOLE_MODEL_LAYOUT = [
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.vpp=1",
    "parallel.cp=1",
    "parallel.dp=0",
    "parallel.sequence_parallel=false",
]
"""Overrides that lay a model out whole on every rank (data parallel only): inference with a
checkpoint of any layout (``fmtrain sample``, ``data encode``)."""


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A Config from a dict of sections (a saved ``config.yaml`` / fmtrain_state.json entry)."""
    items = [
        (f"{section}.{key}", value, "")
        for section, values in upgrade_saved_config(data).items()
        for key, value in values.items()
    ]
    cfg = _build(items + _parse_overrides(overrides or []))
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _check_choices(cfg: Config) -> None:
    for section in _config_sections():
        obj = getattr(cfg, section)
        for key, choices in getattr(type(obj), "CHOICES", {}).items():
            value = getattr(obj, key)
            if value not in choices:
                raise ConfigError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}")


def _check_layout_support(cfg: Config, settings: FamilySettings) -> None:
    """Refuse a layout dimension the family does not implement, naming both."""
    p, family = cfg.parallel, cfg.model.family
    used = {"tp": p.tp > 1, "sp": p.sequence_parallel, "pp": p.pp > 1, "vpp": p.vpp > 1, "cp": p.cp > 1}
    for dim, on in used.items():
        if on and dim not in settings.parallel:
            name = PARALLEL_DIMENSIONS[dim]
            value = {"sp": "true", "vpp": p.vpp, "cp": p.cp, "tp": p.tp, "pp": p.pp}[dim]
            key = "sequence_parallel" if dim == "sp" else dim
            if dim == "cp":
                raise ConfigError(
                    f"parallel.cp={p.cp}: context parallelism is not implemented for "
                    f"model.family={family}; use parallel.cp=1"
                )
            raise ConfigError(f"parallel.{key}={value}: model.family={family} does not support {name} parallelism")


def _check_engine(cfg: Config) -> None:
    """What the deepspeed backend cannot run, refused before any process starts."""
    e, p = cfg.engine, cfg.parallel
    if e.backend != "deepspeed":
        for key, value, default in (
            ("zero_stage", e.zero_stage, 3),
            ("offload", e.offload, "none"),
            ("deepspeed_config", e.deepspeed_config, ""),
        ):
            if value != default:
                raise ConfigError(f"engine.{key}={value!r} is a deepspeed setting, but engine.backend={e.backend}")
        return
    # DeepSpeed's own PipelineEngine cannot run ZeRO-2/3, and megatron's schedules are the
    # megatron backend's: the deepspeed backend has no pipeline stages.
    for key, value in (("pp", p.pp), ("vpp", p.vpp), ("cp", p.cp)):
        if value > 1:
            raise ConfigError(
                f"engine.backend=deepspeed does not run parallel.{key}={value}: DeepSpeed's pipeline engine "
                "cannot run ZeRO-2/3 and fmtrain's pipeline and context parallelism are megatron's; use "
                f"engine.backend=megatron, or parallel.{key}=1"
            )
    if p.sequence_parallel:
        # megatron's finalize_model_grads all-reduces the norms' gradients of a sequence-parallel
        # layout; DeepSpeed's gradient path does not.
        raise ConfigError(
            "engine.backend=deepspeed with parallel.sequence_parallel=true: sequence parallelism needs megatron's "
            "gradient reduction of the norms; use parallel.sequence_parallel=false or engine.backend=megatron"
        )
    if e.offload == "optimizer+params" and e.zero_stage != 3:
        raise ConfigError(
            f"engine.offload=optimizer+params needs engine.zero_stage=3 (parameters are partitioned only "
            f"at stage 3), got engine.zero_stage={e.zero_stage}"
        )
    if e.deepspeed_config and not Path(e.deepspeed_config).is_file():
        raise ConfigError(f"engine.deepspeed_config={e.deepspeed_config}: no such file")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-field rules. ``world_size`` adds the layout-against-world checks."""
    _check_choices(cfg)
    p, t, d = cfg.parallel, cfg.train, cfg.data
    positive = {
        "parallel.tp": p.tp,
        "parallel.pp": p.pp,
        "parallel.vpp": p.vpp,
        "parallel.cp": p.cp,
        "train.max_steps": t.max_steps,
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.log_interval": t.log_interval,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if p.dp < 0:
        raise ConfigError(f"parallel.dp={p.dp} must be 0 (derived) or positive")
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} needs parallel.pp > 1 (interleaving is across stages)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    settings = family_settings(cfg.model.family)
    _check_layout_support(cfg, settings)
    if cfg.objective.name not in settings.objectives:
        raise ConfigError(
            f"objective.name={cfg.objective.name!r}: model.family={cfg.model.family} trains with "
            f"{', '.join(settings.objectives)}"
        )
    if p.cp > 1 and not type(cfg.objective).CONTEXT_PARALLEL:
        raise ConfigError(
            f"parallel.cp={p.cp}: objective.name={cfg.objective.name} is not a sum of per-token terms "
            "and does not support context parallelism; use parallel.cp=1"
        )
    if d.reset_attention_mask and not d.reset_position_ids:
        raise ConfigError(
            "data.reset_attention_mask=true needs data.reset_position_ids=true (documents begin where "
            "the position ids restart)"
        )
    cfg.model.check(cfg)
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction={d.valid_fraction} must be in [0, 1)")
    for name, value, low in (
        ("num_workers", d.num_workers, 0),
        ("shuffle_buffer", d.shuffle_buffer, 0),
        ("prefetch", d.prefetch, 1),
        ("video_frames", d.video_frames, 1),
        ("video_stride", d.video_stride, 1),
        ("video_size", d.video_size, 1),
        ("video_clips", d.video_clips, 1),
        ("synthetic_samples", d.synthetic_samples, 1),
        ("synthetic_classes", d.synthetic_classes, 1),
        ("task_pairs", d.task_pairs, 1),
        ("task_size", d.task_size, 1),
        ("task_frames", d.task_frames, 0),
        ("task_latent_size", d.task_latent_size, 1),
    ):
        if value < low:
            raise ConfigError(f"data.{name}={value} must be at least {low}")
    _check_synthetic_tasks(d.synthetic_tasks)
    if d.vae and not Path(d.vae).exists():
        raise ConfigError(f"data.vae={d.vae}: no such checkpoint, run directory or release")
    latent_shapes(cfg)  # the shapes are well-formed
    if not 0.0 <= d.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={d.max_bad_fraction} must be in [0, 1]")
    if d.worker_timeout < 0:
        raise ConfigError(f"data.worker_timeout={d.worker_timeout} must be >= 0 (0: no timeout)")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in (0, 1]")
    for name, value in (
        ("train.exit_after_minutes", t.exit_after_minutes),
        ("train.max_consecutive_skips", t.max_consecutive_skips),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("checkpoint.keep_every", cfg.checkpoint.keep_every),
    ):
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0 (0 disables it)")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    cfg.objective.check(cfg)
    _check_engine(cfg)
    if settings.validate is not None:
        settings.validate(cfg)
    if world_size is not None:
        dp = data_parallel_size(cfg, world_size)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} = {per_step}"
            )
        micro_batches = t.global_batch_size // per_step
        if p.vpp > 1 and micro_batches % p.pp:
            raise ConfigError(
                f"interleaved pipeline (parallel.vpp={p.vpp}) needs the number of microbatches "
                f"({micro_batches} = global_batch_size / (micro_batch_size x dp)) to be a multiple of "
                f"parallel.pp={p.pp}"
            )


def _check_synthetic_tasks(tasks: list[str]) -> None:
    if not tasks:
        raise ConfigError(f"data.synthetic_tasks is empty: list at least one of {', '.join(SYNTHETIC_LATENT_TASKS)}")
    for i, task in enumerate(tasks):
        if task not in SYNTHETIC_LATENT_TASKS:
            raise ConfigError(
                f"data.synthetic_tasks[{i}]={task!r} is not one of {', '.join(SYNTHETIC_LATENT_TASKS)}"
                + _nearest(task, SYNTHETIC_LATENT_TASKS, 0.6)
            )
        if task in tasks[:i]:
            raise ConfigError(f"data.synthetic_tasks: {task!r} is listed twice")


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not meant (printed at start-up)."""
    t = cfg.train
    warnings = []
    if t.warmup_steps > t.max_steps:
        warnings.append(
            f"train.warmup_steps={t.warmup_steps} is longer than the run (train.max_steps="
            f"{t.max_steps}): the learning rate stays in its warm-up and peaks at "
            f"{t.lr * t.max_steps / t.warmup_steps:.3g} instead of train.lr={t.lr:g}"
        )
    return warnings


def parse_size(text: str | int | float) -> int:
    """A byte size: ``64MB``, ``5GB`` (powers of 1000), ``1.5GiB`` (powers of 1024), ``500k``,
    or a plain number of bytes; ValueError for anything else or a size that is not positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
        if not match:
            raise ValueError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
        number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
        value = int(number * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return value


def parse_latent_shape(value, what: str = "latent shape") -> tuple[int, int, int]:
    """A latent shape: a [T, H, W] list, or 'TxHxW' (command lines) -> (T, H, W) of positive ints."""
    try:
        if isinstance(value, str):
            value = value.strip().lower().split("x")
        t, h, w = (int(x) for x in value)
    except (ValueError, TypeError):
        raise ConfigError(f"{what}: {value!r} is not [T, H, W] (or TxHxW)") from None
    if min(t, h, w) < 1:
        raise ConfigError(f"{what}: {[t, h, w]} has a non-positive size")
    return t, h, w


def latent_shapes(cfg: Config) -> list[tuple[int, int, int]]:
    """``data.synthetic_latent_shapes`` as (T, H, W) tuples, each once."""
    shapes = [
        parse_latent_shape(item, f"data.synthetic_latent_shapes={cfg.data.synthetic_latent_shapes}")
        for item in cfg.data.synthetic_latent_shapes
    ]
    if not shapes:
        raise ConfigError("data.synthetic_latent_shapes is empty: list at least one [T, H, W]")
    for i, shape in enumerate(shapes):
        if shape in shapes[:i]:
            raise ConfigError(f"data.synthetic_latent_shapes: {list(shape)} is listed twice")
    return shapes


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """World size must equal TP x PP x DP; say which numbers disagree when it does not."""
    p = cfg.parallel
    model_parallel = p.tp * p.pp * p.cp
    names = "parallel.tp x parallel.cp x parallel.pp" if p.cp > 1 else "parallel.tp x parallel.pp"
    sizes = f"{p.tp} x {p.cp} x {p.pp}" if p.cp > 1 else f"{p.tp} x {p.pp}"
    if p.dp:
        if model_parallel * p.dp != world_size:
            raise ConfigError(
                f"world size {world_size} != {names} x parallel.dp = {sizes} x {p.dp} = {model_parallel * p.dp}"
            )
        return p.dp
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by {names} = {sizes} = {model_parallel}")
    return world_size // model_parallel


def num_microbatches(cfg: Config, dp: int) -> int:
    return microbatches_per_rank(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)


def microbatches_per_rank(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Microbatches each data-parallel rank runs per step; ValueError when the batch does not split."""
    if min(global_batch_size, micro_batch_size, dp_size) < 1:
        raise ValueError(
            f"global_batch_size={global_batch_size}, micro_batch_size={micro_batch_size} "
            f"and dp_size={dp_size} must all be at least 1"
        )
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"micro_batch_size x dp_size = {micro_batch_size} x {dp_size}"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every ``section.key`` of ``cfg`` (default: the default family's config)."""
    cfg = cfg or Config()
    return [
        f"{section}.{key}" for section in _config_sections() for key in _section_fields(type(getattr(cfg, section)))
    ]


__all__ = [
    "BUILTIN_FAMILIES",
    "BUILTIN_OBJECTIVES",
    "Config",
    "ConfigError",
    "FamilySettings",
    "ModelConfig",
    "ObjectiveConfig",
    "TransformerModelConfig",
    "all_keys",
    "config_from_dict",
    "config_warnings",
    "data_parallel_size",
    "family_settings",
    "import_family_part",
    "latent_shapes",
    "load_config",
    "num_microbatches",
    "parse_latent_shape",
    "parse_size",
    "upgrade_saved_config",
    "validate",
]
