"""The engine interface the trainer calls, whatever runs underneath.

An engine owns the model chunks and the optimizer of this rank. It takes the microbatches
of one optimizer step (this data-parallel rank's share) and the learning rate for that
step, and returns numbers that are already reduced over the whole job.
"""

from __future__ import annotations

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
    def train_step(self, microbatches: list[dict], lr: float, *, poison_loss: bool = False) -> StepResult:
        """One optimizer step; a non-finite loss or gradient norm skips the update
        (``update_applied=False``, weights and optimizer state unchanged). ``poison_loss``
        multiplies the loss by NaN (fault injection for tests)."""
        ...

    def eval_step(self, microbatches: list[dict]) -> dict[str, float]: ...

    def state_dict(self, for_loading: bool = False) -> dict[str, Any]:
        """Sharded state (model, optimizer) in distributed-checkpoint form."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def num_parameters(self) -> int:
        """Parameters held by this rank."""
        ...

    def kernel_summary(self) -> str:
        """The optional fused kernels in use, for the start-up log."""
        ...


def build_engine(cfg: Config, topo: Topology, family: ModelFamily) -> Engine:
    if cfg.engine.backend == "megatron":
        from fmtrain.engine.megatron import MegatronEngine

        return MegatronEngine(cfg, topo, family)
    raise ValueError(f"engine.backend={cfg.engine.backend!r} is not available")
