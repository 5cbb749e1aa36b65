"""The engine interface the trainer calls, whatever runs underneath.

An engine owns this rank's parts of the run (:class:`fmtrain.models.registry.PartSpec`): the
trainable ones with their optimizers and the frozen ones. It takes the microbatches of one
optimizer step (this data-parallel rank's share) and the learning rate(s) for that step, and
returns numbers that are already reduced over the whole job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fmtrain.config import Config
from fmtrain.models.registry import ModelFamily
from fmtrain.parallel import Topology


@dataclass
class StepResult:
    loss: float
    """Token-weighted mean loss over the global batch."""
    tokens: int
    """Loss-bearing tokens in the global batch."""
    grad_norm: float
    """Global gradient norm before clipping (nan when the update was skipped)."""
    update_applied: bool
    """False when the optimizer skipped the update (non-finite gradients)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Other reported means, by name (e.g. family-specific loss terms)."""


class Engine(Protocol):
    """One run's parts on this rank (:class:`fmtrain.engine.megatron.MegatronEngine`)."""

    primary: Any
    """The primary part (``.name``, ``.train``: its optimizer and schedule settings)."""
    trainable_parts: list
    """Every trainable part, in stepping order (the primary first)."""

    def train_step(
        self,
        microbatches: list[dict],
        lr: float | Mapping[str, float],
        *,
        step: int | None = None,
        poison_loss: bool = False,
    ) -> StepResult:
        """One optimizer step of every trainable part (``lr``: one rate, or one per part name);
        a non-finite loss or gradient norm skips that part's update (``update_applied=False``,
        weights and optimizer state unchanged). ``poison_loss`` multiplies the loss by NaN
        (fault injection for tests)."""
        ...

    def eval_step(self, microbatches: list[dict]) -> dict[str, float]:
        """The primary part's reported means, forward only."""
        ...

    def forward_outputs(
        self, microbatches: list[dict], *, part: str | None = None, forward_step=None, collect=None
    ) -> list:
        """A part's forward outputs per microbatch on the last pipeline stage (megatron's
        ``collect_non_loss_data``); [] elsewhere."""
        ...

    def state_dict(self, for_loading: bool = False) -> dict[str, Any]:
        """Sharded state (trainable parts' models and optimizers) in distributed-checkpoint form."""
        ...

    def model_sharded_state_dict(self, primary_only: bool = False) -> dict[str, Any]:
        """The trainable parts' weights only (or the primary part's), in distributed-checkpoint form."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def unwrapped_chunks(self, part: str | None = None) -> list:
        """A part's chunks on this rank without DDP / Float16Module wrappers (default: the primary part)."""
        ...

    def weights_changed(self, part: str | None = None) -> None:
        """Weights were written into a part's modules from outside: refresh the optimizer's copies."""
        ...

    def num_parameters(self) -> int:
        """Parameters of the trainable parts held by this rank."""
        ...

    def kernel_summary(self) -> str:
        """The optional fused kernels in use, for the start-up log."""
        ...


def build_engine(cfg: Config, topo: Topology, family: ModelFamily) -> Engine:
    if cfg.engine.backend == "megatron":
        from fmtrain.engine.megatron import MegatronEngine

        return MegatronEngine(cfg, topo, family)
    if cfg.engine.backend == "deepspeed":
        from fmtrain.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, topo, family)
    raise ValueError(f"engine.backend={cfg.engine.backend!r} is not available")
