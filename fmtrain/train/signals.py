"""Stopping for a requeue: SIGTERM / SIGUSR1, the wall-clock budget, and the exit status.

SLURM sends SIGTERM when a job is preempted or reaches its time limit (and, with
``--signal``, SIGUSR1 some time before). On either signal, or once ``train.exit_after_minutes``
has passed, the training loop finishes the step it is in, saves a checkpoint, waits for it to
be complete, and every rank exits with :data:`REQUEUE_EXIT_CODE`: "saved; start me again".
A launcher that sees it requeues the job, and the next start resumes from ``latest``.

A signal may reach only some ranks (or reach them at different steps), and clocks differ, so
the decision is collective: after every step each rank contributes (SIGTERM seen, SIGUSR1
seen, budget passed) to one small MAX all-reduce (:class:`StopCheck`), and all ranks stop
after the same step.

The handlers only record the signal. :func:`install` is called by ``fmtrain train`` before
the heavy imports, so a signal that arrives while the process starts is not lost either.
This module imports nothing heavy at import time.
"""

from __future__ import annotations

import signal
import threading
import time

from fmtrain.launch.requeue import REQUEUE_EXIT_CODE, STOP_SIGNALS

_received: dict[str, float] = {}
_installed = False


def _record(signum, frame) -> None:
    _received.setdefault(signal.Signals(signum).name, time.time())


def install() -> dict | None:
    """Record SIGTERM and SIGUSR1 instead of dying (main thread only).

    Returns the handlers it replaced, for :func:`uninstall`; None when the recorders were
    already installed (by ``fmtrain train``, for the whole process) or off the main thread.
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}
    _installed = True
    return previous


def uninstall(previous: dict | None) -> None:
    """Put back what :func:`install` replaced (no-op for None) and forget recorded signals."""
    global _installed
    if previous is None:
        return
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _received.clear()
    _installed = False


def received() -> list[str]:
    """Names of the stop signals this process has received, first first."""
    return sorted(_received, key=_received.get)


class RequeueRequested(Exception):
    """Raised on every rank after the checkpoint for a stop was saved; exit with REQUEUE_EXIT_CODE."""

    def __init__(self, step: int, reason: str, checkpoint: str | None):
        super().__init__(
            f"stopped after step {step} ({reason}); checkpoint {checkpoint}; "
            f"exit status {REQUEUE_EXIT_CODE} asks to be requeued"
        )
        self.step = step
        self.reason = reason
        self.checkpoint = checkpoint


class StopCheck:
    """The per-step collective decision: should every rank stop after this step, and why."""

    _REASONS = ("SIGTERM", "SIGUSR1")

    def __init__(self, exit_after_minutes: float, device, started: float | None = None):
        self.budget_s = exit_after_minutes * 60.0
        self.device = device
        self.started = time.monotonic() if started is None else started

    def local_flags(self) -> list[int]:
        seen = received()
        over = self.budget_s > 0 and time.monotonic() - self.started >= self.budget_s
        return [int(name in seen) for name in self._REASONS] + [int(over)]

    def check(self) -> str | None:
        """Every rank: None to go on, else the reason all ranks stop (collective)."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor(self.local_flags(), dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        term, usr1, over = flags.tolist()
        reasons = [name for name, hit in zip(self._REASONS, (term, usr1)) if hit]
        if over:
            reasons.append(f"train.exit_after_minutes={self.budget_s / 60.0:g} reached")
        return " + ".join(reasons) or None
