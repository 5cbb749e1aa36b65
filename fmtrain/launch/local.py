"""Local launching: ``fmtrain launch local`` (the SLURM job's semantics on one machine) and
:func:`launch_local` (``fmtrain train --nproc N``, ``fmtrain convert from-hf`` at a layout).

Runs fmtrain's torchrun agent (:mod:`fmtrain.launch.agent`) with N local processes on the
resolved config in the run directory, and starts it again whenever the training exits with
the requeue status (it saved a checkpoint after SIGUSR1 or SIGTERM); each start resumes from
``latest``. Signals to this launcher:

- SIGUSR1: passed on; the training saves and exits with the requeue status, and is started
  again (what a SLURM requeue does);
- SIGTERM: passed on; the training saves and the launcher stops;
- SIGINT (Ctrl-C, which the terminal also delivers to the agent): the launcher stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from fmtrain.launch.requeue import STOP_SIGNALS


def under_launcher() -> bool:
    """This process is one rank of a launched job (torchrun or srun set its rank)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command with ``nproc`` local ranks under fmtrain's torchrun agent.

    Exit status: the training's, so 99 (:data:`fmtrain.launch.requeue.REQUEUE_EXIT_CODE`) after a
    save-and-stop. SIGTERM or SIGUSR1 sent to this process, or to its whole process group as
    SLURM does, asks the ranks to save and stop: it is relayed to the agent as SIGUSR1, which
    passes it to the ranks. The agent itself ignores SIGTERM (torchrun would otherwise stop the
    ranks on its own and report 143 instead of their status). Ctrl-C stops the run.
    """
    cmd = [
        sys.executable,
        "-m",
        "fmtrain.launch.agent",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "-m",
        "fmtrain.cli",
        *argv,
    ]

    def ignore_stop_signals() -> None:  # in the agent, before exec; it installs its SIGUSR1 relay later
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    child = subprocess.Popen(cmd, preexec_fn=ignore_stop_signals)

    def relay(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGUSR1)

    previous = {sig: signal.signal(sig, relay) for sig in STOP_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal tells the agent
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def agent_command(nproc: int, config_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fmtrain.launch.agent",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "fmtrain.cli",
        "train",
        str(config_path),
    ]


def run(config_path: Path, nproc: int, requeue_exit_code: int, max_starts: int = 100) -> int:
    """Start the training until it exits with anything but the requeue status; its status."""
    state = {"child": None, "stop": None}

    def forward(signum, frame):
        child = state["child"]
        if signum != signal.SIGUSR1:
            state["stop"] = signal.Signals(signum).name
        if child is not None and child.poll() is None and signum != signal.SIGINT:
            child.send_signal(signum)  # SIGINT reaches the agent from the terminal already

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        for start in range(1, max_starts + 1):
            print(f"fmtrain launch local: start {start}: {nproc} process(es) training {config_path}", flush=True)
            state["child"] = subprocess.Popen(agent_command(nproc, config_path))
            status = state["child"].wait()
            state["child"] = None
            if status != requeue_exit_code:
                return status
            if state["stop"]:
                print(f"fmtrain launch local: training saved and stopped after {state['stop']}", flush=True)
                return status
            print(
                f"fmtrain launch local: training saved and asked to be requeued (status {status}); starting again",
                flush=True,
            )
        print(f"fmtrain launch local: giving up after {max_starts} starts", file=sys.stderr, flush=True)
        return requeue_exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
