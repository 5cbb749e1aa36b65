"""LR schedules checked against hand-evaluated endpoints and plain cosine/linear math."""

import math

import pytest

from fmtrain.config import TrainConfig
from fmtrain.train.schedules import lr_at, wsd_decay_steps


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=110, warmup_steps=10, lr=3e-4, min_lr=3e-5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_from_lr_over_warmup_to_lr(schedule):
    t = cfg(lr_schedule=schedule)
    assert lr_at(0, t) == pytest.approx(3e-4 / 10)
    assert lr_at(4, t) == pytest.approx(3e-4 * 5 / 10)
    assert lr_at(9, t) == pytest.approx(3e-4)


def test_cosine_peak_midpoint_and_end():
    t = cfg(lr_schedule="cosine")
    assert lr_at(10, t) == pytest.approx(3e-4)  # decay starts at the peak
    assert lr_at(60, t) == pytest.approx((3e-4 + 3e-5) / 2)  # 10 + 100/2
    # A quarter of the way: min + (lr-min) * (1 + cos(pi/4)) / 2.
    assert lr_at(35, t) == pytest.approx(3e-5 + 2.7e-4 * (1 + math.sqrt(2) / 2) / 2)
    assert lr_at(110, t) == pytest.approx(3e-5)
    assert lr_at(500, t) == pytest.approx(3e-5)
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_without_warmup_starts_at_lr():
    t = cfg(lr_schedule="cosine", warmup_steps=0, max_steps=100)
    assert lr_at(0, t) == pytest.approx(3e-4)
    assert lr_at(50, t) == pytest.approx(1.65e-4)
    assert lr_at(100, t) == pytest.approx(3e-5)


def test_wsd_plateau_and_linear_decay():
    t = cfg(lr_schedule="wsd", decay_fraction=0.2)  # 22 decay steps: 88..110
    assert wsd_decay_steps(t) == 22
    assert lr_at(10, t) == pytest.approx(3e-4)
    assert lr_at(87, t) == pytest.approx(3e-4)  # last plateau step
    assert lr_at(88, t) == pytest.approx(3e-4)  # decay starts at lr
    assert lr_at(99, t) == pytest.approx(3e-4 - 2.7e-4 * 11 / 22)  # halfway
    assert lr_at(99, t) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(110, t) == pytest.approx(3e-5)
    assert lr_at(200, t) == pytest.approx(3e-5)


def test_wsd_decay_never_eats_into_warmup():
    t = cfg(lr_schedule="wsd", max_steps=20, warmup_steps=15, decay_fraction=0.5)
    assert wsd_decay_steps(t) == 5
    assert lr_at(14, t) == pytest.approx(3e-4)
    assert lr_at(15, t) == pytest.approx(3e-4)
    assert lr_at(20, t) == pytest.approx(3e-5)


def test_constant_after_warmup():
    t = cfg(lr_schedule="constant")
    assert lr_at(10, t) == 3e-4
    assert lr_at(109, t) == 3e-4
    assert lr_at(1000, t) == 3e-4


def test_pure_function_of_step_and_config():
    t = cfg(lr_schedule="cosine")
    first = [lr_at(s, t) for s in range(110)]
    assert [lr_at(s, t) for s in reversed(range(110))] == first[::-1]


def test_rejects_negative_step():
    with pytest.raises(ValueError):
        lr_at(-1, cfg())
