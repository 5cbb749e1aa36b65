"""`fmtrain launch local`: run directory, config copy, and a save-and-restart on SIGUSR1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES, TINY_RECIPE


def _launch(run_dir, tokenizer, *extra) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fmtrain.cli",
        "launch",
        "local",
        "--nproc",
        "2",
        str(TINY_RECIPE),
        *TINY_OVERRIDES,
        f"data.tokenizer={tokenizer}",
        f"run.dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _wait_for_steps(proc: subprocess.Popen, metrics, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"launcher exited ({proc.returncode}) before step {n}:\n{out}\n{err[-6000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no step {n} within {timeout} s")


def test_sigusr1_saves_restarts_and_finishes_without_repeating_a_step(tiny_tokenizer, tmp_path):
    run_dir, steps = tmp_path / "run", 40
    proc = _launch(run_dir, tiny_tokenizer, f"train.max_steps={steps}", "checkpoint.save_at_end=true")
    metrics = run_dir / "metrics.jsonl"
    _wait_for_steps(proc, metrics, 4)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == steps
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out}\n{err[-6000:]}"
    assert "asked to be requeued" in out and "start 2:" in out, out
    assert "resumed from" in out, out
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert logged == list(range(1, steps + 1)), f"each step exactly once, in order: {logged}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"


def test_sigterm_saves_and_stops(tiny_tokenizer, tmp_path):
    from fmtrain.train.signals import REQUEUE_EXIT_CODE

    run_dir, steps = tmp_path / "run", 40
    proc = _launch(run_dir, tiny_tokenizer, f"train.max_steps={steps}")
    metrics = run_dir / "metrics.jsonl"
    _wait_for_steps(proc, metrics, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, f"{out}\n{err[-6000:]}"
    assert "start 2:" not in out, "SIGTERM stops; it does not restart"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    saved = int(latest.split("_")[1])
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert 3 <= saved < steps and logged == list(range(1, saved + 1)), (latest, logged)
