"""Numeric faults (skipped updates, the stop after too many) and fault-injection hooks for tests.

A step whose loss or gradient norm is not finite skips its update (the engine checks before
the optimizer step, so weights and Adam state are left exactly as they were) and is counted:
``skipped_steps`` in metrics.jsonl is the run's total, carried across resumes in the
checkpoint. After ``train.max_consecutive_skips`` skipped steps in a row the run stops with
:class:`NumericFaultError`; nothing is saved on the way out, so the last checkpoint is the
last good state.

Fault-injection hooks (environment variables, read once at start-up; for tests only, inactive
unless set):

``FMTRAIN_TEST_NAN_AT_STEP=N[,M,...]``
    multiply the loss of steps N, M, ... (1-based, as logged) by NaN on the last pipeline stage,
    so the loss and every gradient are NaN;
``FMTRAIN_TEST_SIGNAL_AT_STEP=N``
    after step N the last rank sends itself SIGTERM (a signal that reaches one rank only);
``FMTRAIN_TEST_HANG_AT_STEP=N``
    after step N every rank sleeps until killed, or until its parent (the torchrun agent) is
    gone (a test kills the job at a known step).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_NAN = "FMTRAIN_TEST_NAN_AT_STEP"
ENV_SIGNAL = "FMTRAIN_TEST_SIGNAL_AT_STEP"
ENV_HANG = "FMTRAIN_TEST_HANG_AT_STEP"


class NumericFaultError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def _steps(name: str) -> frozenset[int]:
    text = os.environ.get(name, "").strip()
    if not text:
        return frozenset()
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected step numbers separated by commas") from None


@dataclass(frozen=True)
class FaultInjection:
    nan_steps: frozenset[int] = frozenset()
    signal_steps: frozenset[int] = frozenset()
    hang_steps: frozenset[int] = frozenset()

    @classmethod
    def from_env(cls) -> FaultInjection:
        return cls(_steps(ENV_NAN), _steps(ENV_SIGNAL), _steps(ENV_HANG))

    @property
    def active(self) -> bool:
        return bool(self.nan_steps or self.signal_steps or self.hang_steps)

    def describe(self) -> str:
        parts = [
            f"{name}={','.join(map(str, sorted(steps)))}"
            for name, steps in ((ENV_NAN, self.nan_steps), (ENV_SIGNAL, self.signal_steps), (ENV_HANG, self.hang_steps))
            if steps
        ]
        return "fault injection active: " + " ".join(parts)

    def poison_loss(self, step: int) -> bool:
        """Whether step ``step`` (1-based) gets a NaN loss."""
        return step in self.nan_steps

    def after_step(self, step: int, rank: int, world_size: int) -> None:
        if step in self.signal_steps and rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        if step in self.hang_steps:
            # Until killed; torchrun's agent runs every rank in a session of its own, so a SIGKILL
            # to the launcher's process group reaches the agent only: follow it.
            parent = os.getppid()
            while os.getppid() == parent:
                time.sleep(0.2)
            os._exit(128 + signal.SIGKILL)


@dataclass
class SkipCounter:
    """Skipped updates of the run (``total``, checkpointed) and of the current streak."""

    limit: int
    total: int = 0
    streak: list[int] = field(default_factory=list)

    def count(self, step: int, applied: bool) -> None:
        if applied:
            self.streak.clear()
        else:
            self.total += 1
            self.streak.append(step)

    def exhausted(self) -> bool:
        """The streak reached ``limit`` (never when the limit is 0)."""
        return bool(self.limit) and len(self.streak) >= self.limit

    def raise_fault(self, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
        kept = (
            f"the last checkpoint, {last_checkpoint}, is left as it is"
            if last_checkpoint
            else "no checkpoint was written"
        )
        raise NumericFaultError(
            f"steps {self.streak[0]}-{self.streak[-1]}: {len(self.streak)} consecutive steps had a "
            f"non-finite loss or gradient norm (last: loss={_fmt(loss)}, grad_norm={_fmt(grad_norm)}); "
            f"stopping (train.max_consecutive_skips={self.limit}). Their updates were skipped, so the "
            f"weights and optimizer state are those of step {self.streak[0] - 1}; {kept}"
        )


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if math.isfinite(value) else str(value)
