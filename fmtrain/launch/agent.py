"""One node's launcher: torchrun, keeping the training's "requeue me" exit status.

    python -m fmtrain.launch.agent [torchrun options] -m fmtrain.cli train CONFIG

Runs ``torch.distributed.run`` in this process, with torchrun's options, and differs from the
``torchrun`` command where preemption needs it:

- Exit status. torchrun exits 1 whenever a worker fails. This agent exits with
  ``REQUEUE_EXIT_CODE`` when a worker exited with it (the training saved a checkpoint after
  SIGUSR1 or SIGTERM and asks to be started again), so that the sbatch script, or
  ``fmtrain launch local``, can tell a save-and-requeue from a crash. Other failures exit 1
  with one line per failed rank.
- SIGUSR1 (save, exit with the requeue status) reaches the training processes and nothing
  else. SLURM delivers a signal for a job step to every process of the step
  (proctrack/linuxproc, proctrack/cgroup), and SIGUSR1's default action would kill torchrun,
  data-loader workers and megatron's checkpoint-writer processes. So the sbatch script relays
  its notice as SIGURG, which every process ignores by default, and this agent answers SIGURG,
  or a SIGUSR1 sent to it (``fmtrain launch local`` does), with SIGUSR1 to its own children,
  the training processes.
- SIGTERM is passed on to the training processes (which save and exit with the requeue
  status) and the agent keeps waiting for them, instead of torchrun's shutdown, which would
  lose their exit status and SIGKILL them after 30 s: how long a save may take is SLURM's
  KillWait, or the user's patience. SIGINT, SIGHUP and SIGQUIT keep torchrun's handling.

Multi-node: the rendezvous store lives in the first node's agent, which exits as soon as its
training processes have. Another node's agent that polls the store in that moment (before it
has seen its own processes exit) would fail with a connection error and lose their status;
here it keeps watching its own processes for up to ``STORE_GONE_GRACE_S`` instead.

Under SLURM the training processes also get SIGTERM (and a SIGUSR1 sent to the whole step)
straight from slurmstepd; the forwarded copy is a second delivery of the same request, which
the training's handler treats as one (and the only one under proctrack/pgid, where the
workers, in sessions of their own, are not reached).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

RELAY_SIGNAL = signal.SIGURG
"""What the sbatch script sends to every process of the job's steps to ask for a save."""
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""The signals left to torchrun's own handler (pass on, wait 30 s, SIGKILL)."""


def requeue_exit_code() -> int:
    """The status the training exits with after saving on a signal."""
    from fmtrain.launch.requeue import REQUEUE_EXIT_CODE

    return REQUEUE_EXIT_CODE


def _child_pids() -> list[int]:
    """Direct children of this process: the training processes torchrun started."""
    me, children = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            children.append(int(entry.name))
    return children


def _pass_on(signum, frame) -> None:
    """SIGTERM -> SIGTERM, SIGUSR1 or the relay -> SIGUSR1, to the training processes."""
    received = signal.Signals(signum)
    sent = signal.SIGTERM if received == signal.SIGTERM else signal.SIGUSR1
    pids = _child_pids()
    print(
        f"fmtrain.launch.agent: {received.name}: sending {sent.name} to {len(pids)} training process(es) "
        "(save a checkpoint and exit)",
        file=sys.stderr,
        flush=True,
    )
    for pid in pids:
        try:
            os.kill(pid, sent)
        except ProcessLookupError:
            pass


STORE_GONE_GRACE_S = 60.0
"""How long an agent keeps watching its training processes after the rendezvous store went away."""


def _tolerate_finished_store_host() -> None:
    """A fixed-size job needs no membership changes: a store that went away (its host agent
    finished first) is not an error while this node's own training processes are exiting."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    original = DynamicRendezvousHandler.num_nodes_waiting
    first_failure: list[float] = []

    def num_nodes_waiting(self) -> int:
        try:
            return original(self)
        except RendezvousConnectionError:
            first_failure[:] = first_failure or [time.monotonic()]
            if time.monotonic() - first_failure[0] > STORE_GONE_GRACE_S:
                raise
            return 0

    DynamicRendezvousHandler.num_nodes_waiting = num_nodes_waiting


def _has_option(argv: list[str], *names: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in argv for name in names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not _has_option(argv, "--signals-to-handle", "--signals_to_handle"):
        argv = [f"--signals-to-handle={TORCHRUN_SIGNALS}", *argv]
    requeue = requeue_exit_code()
    args = parse_args(argv)
    _tolerate_finished_store_host()
    for sig in (signal.SIGTERM, signal.SIGUSR1, RELAY_SIGNAL):
        signal.signal(sig, _pass_on)
    node = os.environ.get("SLURMD_NODENAME", os.uname().nodename)
    print(
        f"fmtrain.launch.agent: node {node} (SLURM node index {os.environ.get('SLURM_NODEID', '-')}): "
        f"{args.nproc_per_node} training process(es), rendezvous "
        f"{'standalone' if args.standalone else args.rdzv_endpoint}",
        flush=True,
    )
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if requeue in codes.values():
            print(
                f"fmtrain.launch.agent: training exited with the requeue status {requeue} "
                f"(exit codes by rank: {codes})",
                file=sys.stderr,
                flush=True,
            )
            return requeue
        for rank, failure in sorted(exc.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(
                f"fmtrain.launch.agent: rank {rank} (pid {failure.pid}) failed with {how}", file=sys.stderr, flush=True
            )
        return 1
    except SignalException as exc:
        # SIGINT/SIGHUP/SIGQUIT: torchrun passed it on and waited for the workers.
        print(f"fmtrain.launch.agent: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
