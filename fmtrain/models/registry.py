"""The registry of model families: the only place that knows a model.

A family is one :class:`ModelFamily` entry (compare torchtitan's TrainSpec). The engine,
data, trainer and checkpoint code call these fields and never branch on the family's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.config import Config
from fmtrain.models.init import InitRule


class BuildChunk(Protocol):
    def __call__(
        self, cfg: Config, tconfig: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None
    ) -> torch.nn.Module: ...


class MakeTransformerConfig(Protocol):
    def __call__(self, cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig: ...


class ForwardStep(Protocol):
    """megatron's contract: ``(data_iterator, model) -> (output, loss_fn)``; ``loss_fn(output)``
    returns ``(loss_sum, num_tokens, {name: tensor([sum, count])})``."""

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]: ...


class PrepareData(Protocol):
    def __call__(self, cfg: Config, topo: Any, run_dir: Path) -> tuple[Path | None, Any, Any]:
        """(tokenizer path or None, train batches, validation batches or None); both batch
        sources answer ``microbatches(global_step, dp_rank) -> list[dict]``."""
        ...


class PrepareStep(Protocol):
    def __call__(self, cfg: Config, microbatches: list[dict]) -> tuple[list[dict], int]:
        """(microbatches, pipeline seq_length): what megatron's schedules need to size the
        tensors sent between pipeline stages when that depends on the batch."""
        ...


@dataclass(frozen=True)
class ModelFamily:
    name: str
    transformer_config: MakeTransformerConfig
    """Translate the run config into megatron's TransformerConfig (layout, dtype included)."""
    build_chunk: BuildChunk
    """Build the model chunk for one (virtual) pipeline stage."""
    make_forward_step: Callable[[Config], ForwardStep]
    """The forward step for a run config (the objective's settings are bound here)."""
    init_rule: Callable[[Config], Callable[[str], InitRule]]
    """Per checkpoint key: how the layout-invariant initialiser draws it."""
    flops_per_sample: Callable[[Config], float]
    """Model FLOPs (forward + backward) of one training sample, for throughput and MFU."""
    tokens_per_sample: Callable[[Config], int]
    param_count: Callable[[Config], int]
    memory_estimate: Callable[[Config, int, int | None], Any]
    """(cfg, dp, microbatches per step) -> fmtrain.train.flops.MemoryEstimate of the busiest GPU."""
    prepare_data: PrepareData
    prepare_step: PrepareStep | None = None
    """Only for families whose pipeline tensor size depends on the batch (None: model.seq_length)."""
    validate: Callable[[Config], None] | None = None
    """Family-specific config rules, raising ConfigError (run before any process group starts)."""
    sample: Callable[..., torch.Tensor] | None = None
    """Generative families: ``sample(cfg, *, checkpoint, prompt_file, shape, num, seed, device)``
    -> generated latents (``fmtrain sample``)."""


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    _load_builtin_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise KeyError(f"unknown model family {name!r}; known families: {known}") from None


def known_families() -> list[str]:
    _load_builtin_families()
    return sorted(_FAMILIES)


def _load_builtin_families() -> None:
    # Importing a family module registers it.
    from fmtrain.models import step_video, yi  # noqa: F401
