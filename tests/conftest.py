"""Shared fixtures: a tiny Yi config and a way to run `fmtrain train` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtrain.launch.local import free_port  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "recipes" / "yi" / "tiny.yaml"

# Small enough that a 4-rank run of 10 steps takes seconds on 2 cores; GQA (4 heads, 2 KV
# heads) and 4 layers so that TP=2, PP=2 and PP=2 x VPP=2 all split something.
TINY_OVERRIDES = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=512",
    "model.seq_length=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    "train.warmup_steps=2",
    "train.log_interval=5",
    "eval.interval=0",
    "logging.tensorboard=false",
    "logging.peak_tflops=1.0",
    "checkpoint.save_at_end=false",
]


def run_fmtrain(
    args: list[str],
    nproc: int = 1,
    timeout: int = 600,
    check: bool = True,
    env: dict | None = None,
    recipe: Path = TINY_RECIPE,
) -> subprocess.CompletedProcess:
    """`fmtrain train --nproc N RECIPE args...` as a subprocess (real torchrun ranks on gloo)."""
    cmd = [sys.executable, "-m", "fmtrain.cli", "train", "--nproc", str(nproc), str(recipe), *args]
    proc_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=proc_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fmtrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def single_rank(monkeypatch):
    """A one-process gloo group for in-process (TP, PP) = (1, 1); torn down afterwards."""
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    ).items():
        monkeypatch.setenv(key, value)
    yield
    from fmtrain import parallel

    parallel.destroy()


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a later line for the same step wins (resumed runs)."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            records[rec["step"]] = rec
    return records


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-piece tokenizer on the embedded corpus, trained once per test session."""
    from fmtrain.config import load_config
    from fmtrain.data.text import ensure_tokenizer

    run_dir = tmp_path_factory.mktemp("tokenizer")
    cfg = load_config(TINY_RECIPE, TINY_OVERRIDES + [f"run.dir={run_dir}"])
    return ensure_tokenizer(cfg, run_dir)


@pytest.fixture
def tiny_args(tiny_tokenizer, tmp_path) -> list[str]:
    return TINY_OVERRIDES + [f"data.tokenizer={tiny_tokenizer}", f"run.dir={tmp_path / 'run'}"]


class Run:
    """``fmtrain train --nproc N`` in its own process group (so a test can signal all of it)."""

    def __init__(
        self, args: list[str], nproc: int, log_dir: Path, name: str, env: dict | None = None, recipe: Path = TINY_RECIPE
    ):
        self.name = name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        cmd = [sys.executable, "-m", "fmtrain.cli", "train", "--nproc", str(nproc), str(recipe), *args]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
            )

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        metrics = Path(run_dir) / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.is_file() and any(
                json.loads(line)["step"] >= step for line in metrics.read_text().splitlines() if line.strip()
            ):
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) before step {step}:\n"
                    f"{self.err_path.read_text()[-4000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not reach step {step} in {timeout}s")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            raise
        return rc, self.out_path.read_text(), self.err_path.read_text()


def finish_ok(run: Run, expected: int = 0) -> str:
    rc, out, err = run.finish()
    assert rc == expected, f"{run.name}: exit {rc}, expected {expected}\n{out[-3000:]}\n{err[-6000:]}"
    return out
