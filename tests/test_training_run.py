"""What one training run leaves behind, and resuming it."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import read_metrics, run_fmtrain

REQUIRED_METRICS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "memory_gb"}


def test_run_directory_contents(tiny_args, tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in tiny_args if a != "logging.tensorboard=false" and a != "checkpoint.save_at_end=false"]
    proc = run_fmtrain(args + ["train.max_steps=12", "eval.interval=6", "eval.steps=1"], nproc=2)

    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, 13)), "step counts completed optimizer steps from 1"
    for rec in metrics.values():
        assert REQUIRED_METRICS <= set(rec), f"missing {REQUIRED_METRICS - set(rec)}"
        assert math.isfinite(rec["loss"]) and rec["tokens_per_s"] > 0
    assert "val_loss" in metrics[6] and "val_loss" in metrics[12] and "val_loss" not in metrics[5]
    # The learning-rate column is the schedule: warmup 2 steps to lr, cosine to min_lr at 12.
    assert metrics[1]["lr"] == pytest.approx(3e-3 / 2)
    assert metrics[2]["lr"] == pytest.approx(3e-3)

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["tp"] == 1 and resolved["train"]["max_steps"] == 12

    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "TensorBoard events under RUN_DIR/tb"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000012"
    state = json.loads((run_dir / "checkpoints" / latest / "fmtrain_state.json").read_text())
    assert state["step"] == 12 and state["consumed_samples"] == 12 * 8

    # Rank 0 prints the progress line; the other rank stays quiet.
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert progress and all("tok/s" in line and "MFU" in line and "ETA" in line for line in progress)


def test_resume_continues_the_same_run(tiny_args, tmp_path):
    """10 steps straight vs. 5 steps, stop, resume to 10: steps 6-10 are identical."""
    straight = tmp_path / "straight"
    base = [a for a in tiny_args if not a.startswith("run.dir=")]
    run_fmtrain(base + [f"run.dir={straight}", "train.max_steps=10"], nproc=2)

    resumed = tmp_path / "resumed"
    first = base + [f"run.dir={resumed}", "train.max_steps=10", "checkpoint.interval=5"]
    # Stop after step 5 by asking for a shorter run with the same schedule length is not
    # possible (max_steps shapes the LR schedule), so run to 10 with a checkpoint at 5, then
    # drop everything after the checkpoint and resume.
    run_fmtrain(first, nproc=2)
    ckpts = resumed / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step_0000010")
    (ckpts / "latest").write_text("step_0000005\n")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:5]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    proc = run_fmtrain(first + ["parallel.tp=2"], nproc=2)
    assert "resumed from" in proc.stdout and "step_0000005" in proc.stdout

    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(b) == list(range(1, 11))
    for step in range(6, 11):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-12), step
