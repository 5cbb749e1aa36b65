"""What a process started directly by ``srun`` (one task per GPU, no torchrun) reads from SLURM.

``srun`` gives every task ``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size) and
``SLURM_LOCALID`` (rank on its node), but no rendezvous address. Every task can derive the same
one without talking to the others: rank 0 runs on the first node of the step (SLURM places
tasks in node order), so the address is that node's name, and the port is a function of the
job id (different jobs sharing a node get different ports; the same job keeps its port across
requeues, when the previous incarnation has exited).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

PORT_BASE = 15000
PORT_SPAN = 15000
"""Rendezvous ports are PORT_BASE + job id mod PORT_SPAN: below Linux's ephemeral range (32768+)."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist expression (what ``scontrol show hostnames`` prints first).

    >>> first_host("gpu-[003-010,012],login1")
    'gpu-003'
    >>> first_host("n1,n2")
    'n1'
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("empty SLURM node list")
    depth = 0
    for i, ch in enumerate(text):  # the first entry ends at the first comma outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            text = text[:i]
            break

    # Each bracket group contributes the first value of its first range, keeping zero padding:
    # "rack[1-2]-gpu[07-08]" -> "rack1-gpu07".
    def first_of_group(match: re.Match) -> str:
        return match.group(1).split(",")[0].split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_group, text)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return host


def job_port(job_id: str | int) -> int:
    """Rendezvous port of a job: PORT_BASE + job id mod PORT_SPAN (also used by the sbatch script)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def srun_master(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(MASTER_ADDR, MASTER_PORT) for a task started by srun, or None outside a SLURM step.

    The address is the first host of the step's node list (``SLURM_STEP_NODELIST``, else the
    job's), falling back to ``SLURM_LAUNCH_NODE_IPADDR`` (the node srun ran on); the port
    comes from ``SLURM_JOB_ID`` (``SLURM_STEP_RESV_PORTS`` is not used: it needs MpiParams).
    """
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        addr = first_host(nodelist)
    elif env.get("SLURM_LAUNCH_NODE_IPADDR"):
        addr = env["SLURM_LAUNCH_NODE_IPADDR"]
    else:
        return None
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    return addr, job_port(job_id)
