"""``fmtrain launch slurm``: an sbatch script in the run directory, from launch/slurm/fmtrain.sbatch.

The script asks for N nodes with one task each; each task is fmtrain's torchrun agent
(:mod:`fmtrain.launch.agent`), which starts that node's training processes (one per GPU, or
``--procs-per-node`` on CPU nodes with gloo) and joins a c10d rendezvous on the job's first
node. SIGUSR1 before the time limit, a save with the requeue status, and ``scontrol requeue``
make a long run survive time limits and preemption; every start resumes from ``latest``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fmtrain.config import ConfigError
from fmtrain.parallel.slurm import PORT_BASE, PORT_SPAN

TEMPLATE = Path(__file__).resolve().parent.parent.parent / "launch" / "slurm" / "fmtrain.sbatch"
SCRIPT_NAME = "fmtrain.sbatch"

# GPU jobs only; a CPU (gloo) job gets none of these.
GPU_ENVIRONMENT = [
    (
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "1",
        "megatron: one hardware queue, so TP communication is issued ahead of the GEMMs it overlaps",
    ),
    (
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "1",
        "a failed or hung NCCL collective ends the process instead of blocking until the time limit",
    ),
]
GPU_ENVIRONMENT_NOTE = (
    "# Site-specific, when NCCL picks the wrong network: export NCCL_SOCKET_IFNAME=... NCCL_IB_HCA=..."
)


@dataclass
class SlurmJob:
    """What the sbatch script asks for and runs."""

    run_dir: Path
    """Absolute run directory: the script, the resolved config and the job logs go here."""
    nodes: int
    nproc_per_node: int
    gpus_per_node: int
    """0 for CPU nodes (gloo)."""
    requeue_exit_code: int
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    """The job's working directory (relative paths in the config resolve against it)."""
    job_name: str = ""
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    grace_s: int = 300
    """SIGUSR1 this many seconds before the time limit."""
    extra_sbatch: list[str] = field(default_factory=list)
    command: str = ""
    summary: str = ""

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT_NAME

    @property
    def config_path(self) -> Path:
        return self.run_dir / "config.yaml"


def time_limit_seconds(text: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(
            f"--time={text!r} is not a SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, a, b, c = match.groups()
    a, b, c = int(a), int(b or 0), int(c or 0)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if match.group(4) is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + b  # M or M:S


def _directive_value(name: str, value: str) -> str:
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"--{name}={value!r}: SLURM options in #SBATCH lines cannot contain spaces")
    return value


def sbatch_directives(job: SlurmJob) -> list[str]:
    run_dir = _directive_value("run.dir", str(job.run_dir))
    lines = [
        ("job-name", job.job_name),
        ("nodes", str(job.nodes)),
        ("ntasks-per-node", "1", "one torchrun agent per node"),
    ]
    if job.gpus_per_node:
        lines += [
            ("gpus-per-node", str(job.gpus_per_node)),
            ("exclusive", None, "whole nodes: every CPU for the data loaders"),
            ("mem", "0", "and all of each node's memory"),
        ]
    for name in ("partition", "account", "time"):
        value = getattr(job, name)
        if value:
            lines.append((name, _directive_value(name, value)))
    lines += [
        ("output", f"{run_dir}/slurm-%j.out"),
        ("error", f"{run_dir}/slurm-%j.err"),
        ("open-mode", "append", "a requeued start appends to the same files"),
        ("signal", f"B:USR1@{job.grace_s}", "to this script, which passes it on"),
        ("requeue", None),
        ("chdir", _directive_value("working directory", str(job.workdir))),
    ]
    out = []
    for entry in lines:
        name, value = entry[0], entry[1]
        text = f"#SBATCH --{name}" + (f"={value}" if value is not None else "")
        if len(entry) > 2:
            text = f"{text:<44} # {entry[2]}"
        out.append(text)
    for extra in job.extra_sbatch:
        out.append(f"#SBATCH {_directive_value('sbatch', extra)}")
    return out


def environment_block(job: SlurmJob) -> str:
    if not job.gpus_per_node:
        return ""
    lines = ["", "# GPU nodes (a CPU job gets none of these)."]
    for name, value, why in GPU_ENVIRONMENT:
        lines += [f"# {why}", f"export {name}={value}"]
    lines.append(GPU_ENVIRONMENT_NOTE)
    return "\n".join(lines) + "\n"


def render(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The sbatch script for ``job``; every ``{{name}}`` in the template must be known."""
    if not template.is_file():
        raise ConfigError(f"sbatch template not found: {template}")
    values = {
        "summary": job.summary,
        "command": job.command,
        "script": shlex.quote(str(job.script_path)),
        "sbatch_directives": "\n".join(sbatch_directives(job)),
        "grace": str(job.grace_s),
        "requeue_exit_code": str(job.requeue_exit_code),
        "run_dir": shlex.quote(str(job.run_dir)),
        "config": shlex.quote(str(job.config_path)),
        "python": shlex.quote(job.python),
        "nproc_per_node": str(job.nproc_per_node),
        "environment": environment_block(job),
        "port_base": str(PORT_BASE),
        "port_span": str(PORT_SPAN),
    }

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ConfigError(f"{template}: unknown placeholder {{{{{name}}}}}; known: {', '.join(sorted(values))}")
        return values[name]

    return re.sub(r"\{\{(\w+)\}\}", substitute, template.read_text())


def submit(script: Path) -> str:
    """``sbatch script``; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError(
            "sbatch not found on PATH (not a SLURM login node?); the script is at "
            f"{script}, and --dry-run prints it without submitting"
        ) from None
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {script} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


class SubmitError(RuntimeError):
    """sbatch is missing or refused the job."""
