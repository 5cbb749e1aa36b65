"""Learning-rate schedules as pure functions of the step count.

The LR is recomputed from ``(step, TrainConfig)`` alone, never from scheduler state, so a
resumed run uses bit-identical learning rates without saving anything beyond the step.
"""

from __future__ import annotations

import math

from fmtrain.config import TrainConfig


def _warmup(step: int, train: TrainConfig) -> float:
    # (step + 1): the first update already uses lr/warmup_steps rather than 0, which
    # would waste a step; the last warmup step reaches exactly train.lr.
    return train.lr * (step + 1) / train.warmup_steps


def wsd_decay_steps(train: TrainConfig) -> int:
    """Steps in the final linear decay of ``wsd``: decay_fraction * max_steps, rounded
    half up, at least 1, and never reaching back into the warmup."""
    steps = max(1, math.floor(train.decay_fraction * train.max_steps + 0.5))
    return min(steps, train.max_steps - train.warmup_steps)


def lr_at(step: int, train: TrainConfig) -> float:
    """LR for optimizer update number ``step + 1``, given ``step`` completed updates.

    cosine: linear warmup to lr over warmup_steps, then half a cosine from lr (at
    step == warmup_steps) to min_lr (at step == max_steps).
    wsd: warmup, constant lr, then linear from lr to min_lr over the last
    ``wsd_decay_steps(train)`` steps, reaching min_lr at step == max_steps.
    constant: warmup, then lr.
    Steps past max_steps keep the final value (min_lr, or lr for constant).
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if step < train.warmup_steps:
        return _warmup(step, train)
    schedule = train.lr_schedule
    if schedule == "constant":
        return train.lr
    if step >= train.max_steps:
        return train.min_lr
    if schedule == "cosine":
        progress = (step - train.warmup_steps) / (train.max_steps - train.warmup_steps)
        return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay = wsd_decay_steps(train)
        decay_start = train.max_steps - decay
        if step < decay_start:
            return train.lr
        return train.lr - (train.lr - train.min_lr) * (step - decay_start) / decay
    raise ValueError(f"train.lr_schedule={schedule!r} is not one of cosine, wsd, constant")


__all__ = ["lr_at", "wsd_decay_steps"]
