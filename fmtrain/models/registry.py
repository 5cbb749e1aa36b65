"""The registry of model families: the only place that knows a model.

A family is one :class:`ModelFamily` entry (compare torchtitan's TrainSpec). The engine,
data, trainer and checkpoint code call these fields and never branch on the family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.config import Config
from fmtrain.models.init import InitRule


class BuildChunk(Protocol):
    def __call__(self, cfg: Config, tconfig: TransformerConfig, *, pre_process: bool,
                 post_process: bool, vp_stage: Optional[int]) -> torch.nn.Module: ...


class MakeTransformerConfig(Protocol):
    def __call__(self, cfg: Config, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig: ...


class ForwardStep(Protocol):
    """megatron's contract: ``(data_iterator, model) -> (output, loss_fn)``; ``loss_fn(output)``
    returns ``(loss_sum, num_tokens, {name: tensor([sum, count])})``."""

    def __call__(self, data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple[torch.Tensor, Callable]: ...


@dataclass(frozen=True)
class ModelFamily:
    name: str
    transformer_config: MakeTransformerConfig
    """Translate the run config into megatron's TransformerConfig (layout, dtype included)."""
    build_chunk: BuildChunk
    """Build the model chunk for one (virtual) pipeline stage."""
    forward_step: ForwardStep
    init_rule: Callable[[Config], Callable[[str], InitRule]]
    """Per checkpoint key: how the layout-invariant initialiser draws it."""
    flops_per_sample: Callable[[Config], float]
    """Model FLOPs (forward + backward) of one training sample, for throughput and MFU."""
    tokens_per_sample: Callable[[Config], int]
    param_count: Callable[[Config], int]
    extras: Optional[dict[str, Any]] = None


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
    from fmtrain.models import yi  # noqa: F401
