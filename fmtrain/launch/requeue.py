"""The contract between a training process and whatever starts it: which signals ask it to save
and stop, and the exit status that means "saved; start me again" (:mod:`fmtrain.train.signals`
implements the trainer's side, :mod:`fmtrain.launch` the launchers')."""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 99
"""Exit status of every training rank that saved a checkpoint because it was asked to stop
(SIGTERM, SIGUSR1, train.exit_after_minutes): requeue the job, it resumes from ``latest``.
Distinct from 0 (finished), 1 (error), 2 (configuration error) and 128+N (killed by signal N)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that ask a training process to save and stop."""
