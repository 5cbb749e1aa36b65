"""The model-family contract: what a family gives the engine, data, trainer and checkpoints.

A family is one :class:`ModelFamily` entry (compare torchtitan's ``TrainSpec``), called
``FAMILY`` in the family's ``family`` module (or in the family module itself), and found by
name: :func:`get_family` imports ``fmtrain.models.NAME.family`` for a built-in family and
``NAME.family`` (or ``NAME``) for a dotted module path of your own. Its config side (the
``model`` section, supported objectives and layouts) is the ``SETTINGS`` of its ``config``
module (:class:`fmtrain.config.FamilySettings`). The engine, data, trainer and checkpoint code
call these fields and never branch on a family's name.

A run holds one or more *parts* (:class:`PartSpec`): trainable ones, each with its own
optimizer, learning-rate schedule and gradient clipping (a generator and its discriminator),
and frozen ones (a DPO reference model, a VAE used on the fly) built in the same TP / PP
layout with no DDP, no optimizer and no gradient buffers. The first trainable part is the
run's *primary* part: its reports are the run's ``loss`` and friends, its checkpoint keys carry
no prefix, and its forward step defines what a training step computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fmtrain.config import Config, ConfigError, TrainConfig, import_family_part

if TYPE_CHECKING:
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from fmtrain.models.init import InitRuleFn
    from fmtrain.models.sizes import MemoryEstimate
from fmtrain.models.workload import TracedWorkload, Workload


class MakeMegatronConfig(Protocol):
    def __call__(self, cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
        """megatron's TransformerConfig for this part (layout, dtype, architecture switches)."""
        ...


class BuildModule(Protocol):
    def __call__(
        self,
        cfg: Config,
        megatron_config: TransformerConfig | None,
        *,
        pre_process: bool,
        post_process: bool,
        vp_stage: int | None,
    ) -> torch.nn.Module:
        """The module of one (virtual) pipeline stage; ``megatron_config`` is None for a plain
        torch module (a part without :attr:`PartSpec.megatron_config`), which is built whole."""
        ...


class ForwardStep(Protocol):
    """megatron's contract: ``(data_iterator, model) -> (output, loss_fn)``; on the last stage
    ``loss_fn(output)`` returns ``(loss_sum, count, {name: tensor([sum, count])})`` and the
    engine divides the step's loss sum by the step's count."""

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]: ...


@dataclass
class Progress:
    """Where training stands, for a forward step whose loss changes over the run (a GAN term
    that starts at a step); the engine updates it before every optimizer step."""

    step: int = 0
    """Optimizer steps completed before the one being computed."""


class MakeForwardStep(Protocol):
    def __call__(self, cfg: Config, parts: Mapping[str, list[torch.nn.Module]], progress: Progress) -> ForwardStep:
        """The part's training forward step; ``parts`` maps every part's name to the family's
        modules on this rank (a generator's loss may call the discriminator, say)."""
        ...


@dataclass(frozen=True)
class PartSpec:
    """One model of a run, trainable or frozen."""

    name: str
    build: BuildModule
    init_rule: Callable[[Config], InitRuleFn]
    """Per checkpoint key: how the layout-invariant initialiser draws it."""
    megatron_config: MakeMegatronConfig | None = None
    """A megatron-core part (TP / SP / PP per the family's settings); None: a plain
    ``torch.nn.Module`` trained data-parallel only, whatever it is (a conv net)."""
    forward_step: MakeForwardStep | None = None
    """Trainable parts: the forward step its optimizer steps on."""
    trainable: bool = True
    optimizer: Callable[[Config], TrainConfig] | None = None
    """The part's optimizer, LR schedule and clipping settings; None: ``cfg.train`` itself."""
    source: str = ""
    """Frozen parts: where the weights come from. "" is the run seed's initialisation (so a
    frozen copy of a trainable part with the same ``build`` and ``init_rule`` starts equal to
    it); otherwise an fmtrain checkpoint (or run directory) holding this part's weights as its
    primary model, or a release / Hugging Face directory the family's converter reads."""
    offload: bool = False
    """Frozen parts: keep the weights in host memory between uses (moved to the device for a
    forward, back afterwards)."""
    prepare_microbatches: Callable[[Any, list[dict]], list[dict]] | None = None
    """Trainable parts: ``(engine, microbatches) -> microbatches``, run before the part's forward
    steps in training and evaluation, for inputs other parts compute through the pipeline (DPO:
    the frozen reference's log-probs, ``engine.forward_outputs(..., part="reference")``, which
    exist on the last pipeline stage only)."""
    active_from_step: int = 0
    """Trainable parts: stepped from this optimizer step on (a discriminator that starts late);
    before it the part is neither run nor updated, and its metrics are absent."""

    def __post_init__(self):
        if self.trainable and self.forward_step is None:
            raise ValueError(f"part {self.name!r}: a trainable part needs a forward_step")
        if self.trainable and (self.source or self.offload):
            raise ValueError(f"part {self.name!r}: source and offload are for frozen parts")


@dataclass
class RunData:
    """What a family's data pipeline hands the trainer."""

    train: Any
    """Training batches: ``microbatches(global_step, dp_rank) -> list[dict]``."""
    valid: Any = None
    """Validation batches (same interface), or None."""
    files: dict[str, Path] = field(default_factory=dict)
    """Files every checkpoint of the run carries, by name (the tokenizer: ``tokenizer.model``)."""
    pixels_to_latents: Callable[[dict, Callable[[Any, int], Any]], dict] | None = None
    """Families whose data may hold pixels the model sees as latents: ``(microbatch,
    encode(pixels, sample_seed) -> latents) -> the latent microbatch`` (a latent microbatch is
    returned as it is). The trainer applies it with the VAE of ``data.vae``."""


class PrepareData(Protocol):
    def __call__(self, cfg: Config, topo: Any, run_dir: Path) -> RunData:
        """Build the run's batch sources (collective: every rank calls it)."""
        ...


class PrepareStep(Protocol):
    def __call__(self, cfg: Config, microbatches: list[dict]) -> tuple[list[dict], int]:
        """(microbatches, pipeline seq_length): what megatron's schedules need to size the
        tensors sent between pipeline stages when that depends on the batch."""
        ...


class Converter(Protocol):
    """A family's release / Hugging Face converter (:mod:`fmtrain.checkpoint.hf.convert` drives
    it): pure mappings between the family's global (unsharded) checkpoint tensors and the
    release's. A module with these names is one (:mod:`fmtrain.models.yi.convert`)."""

    FORMAT: str
    """Name of the external format, for messages."""
    WEIGHTS_SUBDIR: str
    """Where config.json and the weights sit inside a release directory ("" for the directory itself)."""
    WEIGHTS_PREFIX: str
    """Safetensors file stem written on export."""
    DTYPE_PROBE: str
    """A tensor whose dtype is the checkpoint's."""

    def recognizes(self, config_json: dict) -> bool: ...
    def model_overrides(self, weights_dir: Path) -> list[str]: ...
    def check_model_matches_hf(self, cfg: Config, config_json: dict, source: str) -> None: ...
    def shapes_from_config(self, cfg: Config) -> Any: ...
    def check_hf_names(self, ckpt: Any, shapes: Any) -> None: ...
    def piece_reader(self, ckpt: Any, shapes: Any) -> Callable[..., torch.Tensor]: ...
    def export_order(self, shapes: Any, present: Callable[[str], bool]) -> list[tuple[str, tuple[int, ...]]]: ...
    def hf_shapes(self, shapes: Any) -> dict[str, tuple[int, ...]]: ...
    def hf_tensors_from_megatron(
        self, key: str, index: tuple[int, ...], tensor: torch.Tensor, shapes: Any
    ) -> dict[str, torch.Tensor]: ...
    def hf_config_from_fmtrain(self, cfg: Config, dtype: Any) -> dict: ...
    def write_export_extras(self, ckpt_dir: Path, out_dir: Path, cfg: Config, log: Callable[[str], None]) -> str: ...


class LatentCodec(Protocol):
    """A VAE family's pixels <-> the latents a DiT trains on, for code that uses a trained VAE
    (a DiT family, ``fmtrain sample --vae``, ``eval.sample_vae``): chunked and tiled as the
    VAE's model section says, normalised as the family defines (:class:`fmtrain.models.vae_codec.LatentCodec`)."""

    def encode(
        self, cfg: Config, vae: torch.nn.Module, pixels: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """pixels [B, C, T, H, W] in [-1, 1] -> latents [B, z, T', H', W']: the posterior mean, or a
        sample drawn with ``generator``."""
        ...

    def decode(self, cfg: Config, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, z, T', H', W'] -> pixels [B, C, T, H, W] in about [-1, 1]."""
        ...


class Sampler(Protocol):
    def __call__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        *,
        prompt_file: str,
        shape: tuple[int, int, int] | None,
        num: int,
        seed: int,
        device: Any,
    ) -> torch.Tensor:
        """Generate with a built, loaded model (``fmtrain sample``): ``prompt_file`` is the condition
        (an .npz the family reads), ``shape`` the latent (T, H, W) asked for or None (the family's
        default)."""
        ...


@dataclass(frozen=True)
class ModelFamily:
    name: str
    parts: Callable[[Config], list[PartSpec]]
    """The run's parts for a config (trainable first; the first is the primary part)."""
    prepare_data: PrepareData
    param_count: Callable[[Config], int]
    """Parameters of the model (the primary part; for ``fmtrain info`` and the start-up line)."""
    flops_per_sample: Callable[[Config], float]
    """Model FLOPs (forward + backward) of one training sample, for throughput and MFU."""
    units_per_sample: Callable[[Config], int]
    """Throughput units in one sample (tokens of an LLM sequence, video tokens of a clip)."""
    throughput_unit: str = "tokens"
    """What ``units_per_sample`` counts; metrics report ``{unit}_per_s``."""
    prepare_step: PrepareStep | None = None
    """Only for families whose pipeline tensor size depends on the batch (None: model.seq_length)."""
    converter: Converter | None = None
    """Release / Hugging Face interop (``fmtrain convert``, ``model.init_from_hf``)."""
    sample: Sampler | None = None
    """Generative families: the sampler behind ``fmtrain sample``."""
    eval_videos: Callable[[Config, torch.nn.Module, dict, Callable | None], dict[str, torch.Tensor]] | None = None
    """(cfg, the primary module, a validation microbatch, ``decode``) -> videos [3, T, H, W] in
    [-1, 1] by name, made on rank 0 at every evaluation and logged to TensorBoard and
    RUN_DIR/videos (the primary module must be whole on rank 0: TP = PP = 1). ``decode`` maps
    latents [B, C, T', H', W'] to pixels with the Video-VAE of ``eval.sample_vae`` (None without
    one), for families that generate latents."""

    first_step_check: Callable[[Config, float, dict[str, float]], str | None] | None = None
    """(cfg, the first step's loss, its other reports) -> one line for the log, or None: a sanity
    check of a fresh run's first step (DPO: the loss is ln 2 while the reference equals the policy)."""

    parameter_breakdown: Callable[[Config], dict[str, int]] | None = None
    """Parameters of the primary part by component (encoder, decoder), for ``fmtrain info``."""

    workload: Callable[[Config, bool], Workload] | None = None
    """(cfg, on a GPU) -> what one training sample asks of a GPU (:mod:`fmtrain.models.workload`;
    on a GPU fused kernels change what is saved): ``fmtrain info``'s memory estimate and
    ``fmtrain plan``'s layouts."""

    traced_workload: Callable[[Config, bool], TracedWorkload] | None = None
    """Families that are no stack of token blocks (the VAEs): (cfg, bf16) -> their training step
    traced on the meta device, for ``fmtrain plan`` and ``fmtrain info``."""

    memory_estimate: Callable[[Config, int, int | None], MemoryEstimate] | None = None
    """Families without a ``workload``: (cfg, dp, microbatches per step) -> the estimated peak
    memory of the busiest GPU, for ``fmtrain info``."""

    latent_vae: str = ""
    """Latent families (the DiTs): the VAE family whose latents the model trains on and samples
    (``video_vae``, ``st_vae``); ``fmtrain sample --vae``, ``eval.sample_vae`` and ``data.vae``
    read that family's checkpoints."""

    latent_codec: LatentCodec | None = None
    """VAE families: pixels <-> DiT latents with a loaded module of this family
    (:func:`fmtrain.checkpoint.pretrained.latent_encoder` / ``latent_decoder`` load one)."""

    def primary(self, cfg: Config) -> PartSpec:
        return next(part for part in self.parts(cfg) if part.trainable)


def with_frozen_reference(
    model: PartSpec,
    cfg: Config,
    *,
    forward_step: MakeForwardStep,
    reference_step: ForwardStep,
    collect: Callable[[torch.Tensor, Callable], torch.Tensor],
    key: str,
) -> list[PartSpec]:
    """A preference-tuned run's parts (DPO, Video-DPO): ``model`` trained with ``forward_step``
    beside ``reference``, a frozen copy in the same layout whose weights come from
    ``objective.reference`` (else the policy's start). Before every training or validation step
    one forward-only pass of the reference (``reference_step``; ``collect(output, loss_fn)`` of
    what it returns on the last stage) puts ``key`` into each microbatch on the last pipeline
    stage, where the loss reads it."""
    from dataclasses import replace

    from fmtrain.objectives.dpo import reference_source

    def add_reference_outputs(engine, microbatches: list[dict]) -> list[dict]:
        outputs = engine.forward_outputs(
            microbatches,
            part="reference",
            forward_step=reference_step,
            collect=lambda output, loss_fn: collect(output, loss_fn).detach(),
        )
        if not outputs:  # not the last stage
            return microbatches
        return [{**batch, key: value} for batch, value in zip(microbatches, outputs)]

    policy = replace(model, forward_step=forward_step, prepare_microbatches=add_reference_outputs)
    reference = replace(
        model,
        name="reference",
        trainable=False,
        forward_step=None,
        prepare_microbatches=None,
        source=reference_source(cfg),
        offload=cfg.objective.reference_offload,
    )
    return [policy, reference]


def get_family(name: str) -> ModelFamily:
    """The family registered under ``name`` (a built-in name or a dotted module path)."""
    family = import_family_part(name, "family", "FAMILY")
    if not isinstance(family, ModelFamily):
        raise ConfigError(f"model.family={name!r}: its FAMILY is a {type(family).__name__}, not a ModelFamily")
    return family


__all__ = [
    "BuildModule",
    "Converter",
    "ForwardStep",
    "LatentCodec",
    "MakeForwardStep",
    "MakeMegatronConfig",
    "ModelFamily",
    "PartSpec",
    "PrepareData",
    "PrepareStep",
    "Progress",
    "RunData",
    "Sampler",
    "get_family",
    "with_frozen_reference",
]
