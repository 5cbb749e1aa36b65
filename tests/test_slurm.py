"""`fmtrain launch slurm` and `fmtrain train` under srun, against a real SLURM cluster.

The cluster is tests/slurm/cluster.sh's: two nodes, n1 and n2, on this machine (CI starts it
in .ci/run). Tests that submit jobs skip, saying why, when it is not running; the dry-run and
configuration-error tests need no cluster.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_OVERRIDES, TINY_RECIPE, read_metrics

DOCS_EXAMPLE = REPO / "docs" / "slurm_example.md"
# How the 34B example was produced (docs/slurm_example.md shows this command's output).
EXAMPLE_ARGS = [
    "launch",
    "slurm",
    "recipes/yi/34b.yaml",
    "--nodes",
    "4",
    "--gpus-per-node",
    "8",
    "--partition",
    "gpu",
    "--time",
    "2-00:00:00",
    "--account",
    "my-project",
    "--dry-run",
]
EXAMPLE_CHECKOUT = "/path/to/fmtrain"
JOB_TIMEOUT_S = 240


def _cluster_state() -> str | None:
    """None when tests/slurm/cluster.sh's cluster is up, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (sinfo not found); tests/slurm/cluster.sh install && start"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if proc.returncode != 0:
        return f"the SLURM cluster is down (sinfo: {proc.stderr.strip()[:200]}); tests/slurm/cluster.sh start"
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    if set(states) != {"n1", "n2"}:
        return f"not the two-node test cluster (nodes {sorted(states)}); tests/slurm/cluster.sh start"
    down = {n: s for n, s in states.items() if s.rstrip("*~#") not in ("idle", "mix", "alloc", "comp")}
    if down:
        return f"test cluster nodes not usable: {down}"
    return None


_REASON = _cluster_state()
needs_cluster = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def fmtrain(args: list[str], timeout: int = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmtrain.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def cli(capsys, monkeypatch):
    """`fmtrain ARGS` in this process (from the repository root): (exit status, stdout, stderr)."""
    monkeypatch.chdir(REPO)

    def run(args: list[str]) -> tuple[int, str, str]:
        from fmtrain.cli import main

        status = main(args)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def submit(args: list[str]) -> tuple[str, subprocess.CompletedProcess]:
    proc = fmtrain(["launch", "slurm", *args])
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout}\n{proc.stderr}"
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, proc


def job_logs(run_dir: Path, job_id: str) -> str:
    out, err = run_dir / f"slurm-{job_id}.out", run_dir / f"slurm-{job_id}.err"
    return (
        f"--- {out.name}\n{out.read_text() if out.exists() else '(missing)'}\n"
        f"--- {err.name} (tail)\n{err.read_text()[-6000:] if err.exists() else '(missing)'}"
    )


def wait_for_job(job_id: str, run_dir: Path, timeout: float = JOB_TIMEOUT_S, until=None) -> None:
    """Until the job has left the queue (or ``until()`` holds); cancels it on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and until():
            return
        if until is None and job_id not in job_ids():
            return
        time.sleep(0.2 if until is not None else 1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish within {timeout} s (cancelled)\n{job_logs(run_dir, job_id)}")


def tiny_job_args(run_dir: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        str(TINY_RECIPE),
        "--nodes",
        "2",
        "--cpu",
        "--procs-per-node",
        "1",
        *TINY_OVERRIDES,
        f"data.tokenizer={tokenizer}",
        f"run.dir={run_dir}",
        "train.log_interval=1",
        *extra,
    ]


# -- no cluster needed ------------------------------------------------------------------------


def test_dry_run_34b_on_4_nodes_of_8_h100_is_the_documented_example(cli):
    status, script, err = cli(EXAMPLE_ARGS)
    assert status == 0, err
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=my-project",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "NPROC_PER_NODE=8",
        'scontrol requeue "$SLURM_JOB_ID"',
    ):
        assert line in script, line
    assert f"#SBATCH --output={REPO}/runs/yi-34b/slurm-%j.out" in script
    assert "TP=8 PP=2 DP=2" in script
    assert "--rdzv-backend=c10d" in script and "-m fmtrain.launch.agent" in script
    # docs/slurm_example.md shows exactly this output (checkout path written as /path/to/fmtrain).
    shown = re.search(r"```bash\n(.*?)```", DOCS_EXAMPLE.read_text(), re.S).group(1)
    assert script.replace(str(REPO), EXAMPLE_CHECKOUT) == shown, (
        "docs/slurm_example.md is stale: regenerate it with `fmtrain " + " ".join(EXAMPLE_ARGS) + "`"
    )


def test_dry_run_of_a_cpu_job_has_no_gpu_settings(cli, tmp_path):
    status, script, err = cli(
        [
            "launch",
            "slurm",
            str(TINY_RECIPE),
            "--nodes",
            "2",
            "--cpu",
            "--procs-per-node",
            "2",
            "--dry-run",
            f"run.dir={tmp_path / 'run'}",
            *TINY_OVERRIDES,
        ]
    )
    assert status == 0, err
    assert "NPROC_PER_NODE=2" in script and "gloo" in script
    for absent in ("--gpus-per-node", "--exclusive", "CUDA_", "NCCL"):
        assert absent not in script, absent
    assert not (tmp_path / "run").exists(), "--dry-run writes nothing"


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.pp=4", "world size 2 is not divisible by parallel.tp x parallel.pp = 1 x 4 = 4"),
        ("model.hiden_size=8", "unknown config key 'model.hiden_size'"),
    ],
)
def test_invalid_recipe_fails_before_sbatch(cli, tmp_path, override, message):
    before = job_ids() if _REASON is None else set()
    run_dir = tmp_path / "run"
    status, out, err = cli(
        ["launch", "slurm", str(TINY_RECIPE), "--nodes", "2", "--cpu", *TINY_OVERRIDES, f"run.dir={run_dir}", override]
    )
    assert status == 2
    assert "configuration error" in err and message in err, err
    assert "submitted job" not in out
    assert not run_dir.exists(), "nothing written for a job that was never submitted"
    if _REASON is None:
        assert job_ids() == before, "no job reached the queue"


def test_missing_gpus_per_node_is_explained(cli):
    status, _, err = cli(["launch", "slurm", str(TINY_RECIPE), "--nodes", "2", "--dry-run"])
    assert status == 2 and "--gpus-per-node" in err and "--cpu" in err


def test_first_host_of_slurm_node_lists():
    from fmtrain.parallel.slurm import first_host

    assert first_host("n[1-2]") == "n1"
    assert first_host("n1,n2") == "n1"
    assert first_host("gpu-[003-010,012],login1") == "gpu-003"
    assert first_host("rack[2-3]-gpu[07-08]") == "rack2-gpu07"
    assert first_host("node17") == "node17"
    with pytest.raises(ValueError):
        first_host("")


def test_process_env_under_srun_without_torchrun(monkeypatch):
    import fmtrain.parallel as parallel

    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu-[07-08]",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_JOB_ID": "81723",
    }
    monkeypatch.setattr(os, "environ", dict(env))
    assert parallel.process_env() == (3, 4, 1)
    assert os.environ["MASTER_ADDR"] == "gpu-07" and os.environ["MASTER_PORT"] == str(15000 + 81723 % 15000)
    # The batch script itself has SLURM_PROCID=0 and the job's task count, but is no step: one process.
    monkeypatch.setattr(os, "environ", {k: v for k, v in env.items() if k != "SLURM_STEP_ID"})
    assert parallel.process_env() == (0, 1, 0) and "MASTER_ADDR" not in os.environ
    # torchrun's variables win over SLURM's (the agent's workers inherit both).
    monkeypatch.setattr(os, "environ", {**env, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"})
    assert parallel.process_env() == (5, 8, 5)


def test_slurm_time_limits():
    from fmtrain.config import ConfigError
    from fmtrain.launch.slurm import time_limit_seconds

    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("30:15") == 1815
    assert time_limit_seconds("4:00:00") == 4 * 3600
    assert time_limit_seconds("2-00:00:00") == 2 * 86400
    assert time_limit_seconds("1-12") == 86400 + 12 * 3600
    with pytest.raises(ConfigError):
        time_limit_seconds("two days")


def test_time_limit_shorter_than_the_save_notice_is_refused(cli):
    status, _, err = cli(
        ["launch", "slurm", str(TINY_RECIPE), "--nodes", "1", "--cpu", "--time", "4", "--grace", "300", "--dry-run"]
    )
    assert status == 2 and "--time=4 leaves no time before the --grace=300 s save notice" in err


# -- against the cluster ----------------------------------------------------------------------


@needs_cluster
def test_two_node_job_with_tensor_parallelism_across_nodes(tiny_tokenizer, tmp_path):
    run_dir = tmp_path / "run"
    job_id, launch = submit(
        tiny_job_args(run_dir, tiny_tokenizer, "parallel.tp=2", "train.max_steps=6", "checkpoint.save_at_end=true")
    )
    assert f"run dir  {run_dir}" in launch.stdout
    assert (run_dir / "fmtrain.sbatch").is_file() and (run_dir / "config.yaml").is_file()
    wait_for_job(job_id, run_dir)
    logs = job_logs(run_dir, job_id)
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "ExitCode") == "0:0", logs
    out = (run_dir / f"slurm-{job_id}.out").read_text()
    # One agent on each node; one rank each, so TP=2 spans the two nodes.
    assert "node n1 (SLURM node index 0)" in out and "node n2 (SLURM node index 1)" in out, logs
    assert "layout TP=2 PP=1 VPP=1 DP=1 on 2 cpu rank(s)" in out, logs
    assert "training exited with status 0" in out, logs

    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, 7)), logs
    assert all(math.isfinite(m["loss"]) for m in metrics.values())
    assert metrics[6]["loss"] < metrics[1]["loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    state = json.loads((run_dir / "checkpoints" / "step_0000006" / "fmtrain_state.json").read_text())
    assert state["step"] == 6 and state["layout"]["tp"] == 2


@needs_cluster
def test_preempted_job_saves_requeues_and_resumes_without_repeating_a_step(tiny_tokenizer, tmp_path):
    """SIGUSR1 to the batch script (what SLURM sends before the time limit) mid-run."""
    from fmtrain.train.signals import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "run"
    steps = 80  # about 0.1 s each here: the notice (about a second to reach the ranks) lands mid-run
    job_id, _ = submit(
        tiny_job_args(run_dir, tiny_tokenizer, f"train.max_steps={steps}", "checkpoint.save_at_end=true")
    )
    metrics_file = run_dir / "metrics.jsonl"

    def steps_logged() -> int:
        return len(metrics_file.read_text().splitlines()) if metrics_file.exists() else 0

    wait_for_job(job_id, run_dir, until=lambda: steps_logged() >= 3)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    wait_for_job(job_id, run_dir, until=lambda: "start 2" in (run_dir / f"slurm-{job_id}.out").read_text())
    wait_for_job(job_id, run_dir)
    logs = job_logs(run_dir, job_id)
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "Restarts") == "1", logs

    out = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "SIGUSR1 (time limit or preemption notice)" in out and "requeueing job" in out, logs
    resumed = re.search(r"resumed from \S+step_(\d+)", out)
    assert resumed, logs
    saved_at = int(resumed.group(1))
    assert 3 <= saved_at < steps, logs
    err = (run_dir / f"slurm-{job_id}.err").read_text()
    # The notice reached both nodes' training processes (as SIGUSR1 from their agent), and both
    # agents reported the requeue status.
    assert err.count("SIGURG: sending SIGUSR1 to 1 training process(es)") == 2, logs
    assert err.count(f"Exited with exit code {REQUEUE_EXIT_CODE}") == 2, logs
    logged = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.strip()]
    assert logged == list(range(1, steps + 1)), f"each step exactly once, in order: {logged}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"


@needs_cluster
def test_train_directly_under_srun_one_task_per_node(tiny_tokenizer, tmp_path):
    """No torchrun: rank, world size and rendezvous come from srun's variables."""
    run_dir = tmp_path / "run"
    cmd = [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--chdir={REPO}",
        "--time=5",
        sys.executable,
        "-m",
        "fmtrain.cli",
        "train",
        str(TINY_RECIPE),
        *TINY_OVERRIDES,
        f"data.tokenizer={tiny_tokenizer}",
        f"run.dir={run_dir}",
        "train.max_steps=3",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-6000:]}"
    assert "layout TP=1 PP=1 VPP=1 DP=2 on 2 cpu rank(s)" in proc.stdout
    assert sorted(read_metrics(run_dir)) == [1, 2, 3]
