"""``fmtrain launch``: start a run as a SLURM batch job, or locally with the same semantics.

    fmtrain launch slurm RECIPE --nodes N --gpus-per-node G [--partition P] [--time T]
                         [--account A] [--dry-run] [key=value ...]
    fmtrain launch slurm RECIPE --nodes N --cpu --procs-per-node K ...   CPU nodes (gloo)
    fmtrain launch local --nproc N RECIPE [key=value ...]

Both validate the config against the world size before anything starts (a bad recipe fails
here, with the config error, not in the queue), write the resolved config into the run
directory, train from that copy, resume from ``RUN_DIR/checkpoints/latest`` on every start,
and start the training again when it exits with the requeue status (it saved after SIGUSR1
or SIGTERM). This module only parses and validates; :mod:`fmtrain.launch.slurm` writes and
submits the sbatch script, :mod:`fmtrain.launch.local` runs the local loop, and
:mod:`fmtrain.launch.agent` is the per-node torchrun both of them start.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_GRACE_S = 300
"""Save notice before the time limit: finish the step in flight and write a checkpoint."""


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come before, between or after RECIPE and the key=value overrides."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _requeue_exit_code() -> int:
    from fmtrain.launch.agent import requeue_exit_code

    return requeue_exit_code()


def _prepare(recipe: str, overrides: list[str], world_size: int):
    """Validated config (layout against ``world_size``, input paths) and its absolute run dir."""
    from fmtrain.config import load_config, validate

    cfg = load_config(recipe, overrides)
    validate(cfg, world_size)
    check_inputs(cfg)
    return cfg, Path(cfg.run.dir).resolve()


def check_inputs(cfg) -> None:
    """Files the run will read must exist now, not be found missing after the process group is
    up (or after hours in the queue): one ConfigError naming the setting and the path."""
    from fmtrain.config import ConfigError

    d = cfg.data
    for name in ("shards", "valid_shards"):
        spec = getattr(d, name)
        if spec:
            from fmtrain.data.shards import BadDataError, check_shard_spec  # webdataset, torch: only when streaming

            try:
                check_shard_spec(spec)
            except BadDataError as exc:
                raise ConfigError(f"data.{name}={spec}: {exc}") from None
    corpus_is_path = ":" not in d.corpus  # builtin:NAME, synthetic:latents are not files
    if not d.shards and corpus_is_path and not Path(d.corpus).exists():
        raise ConfigError(f"data.corpus={d.corpus}: no such file")
    if d.tokenizer and not Path(d.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer={d.tokenizer}: no such file")
    if cfg.checkpoint.load and not Path(cfg.checkpoint.load).is_dir():
        raise ConfigError(f"checkpoint.load={cfg.checkpoint.load}: no such directory")
    if cfg.model.init_from_hf and not Path(cfg.model.init_from_hf).is_dir():
        raise ConfigError(f"model.init_from_hf={cfg.model.init_from_hf}: no such directory")


def _write_config(cfg, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def _slurm_command(args: argparse.Namespace) -> str:
    """The launch command, options in a fixed order, for the script's header."""
    words = ["fmtrain", "launch", "slurm", args.recipe, f"--nodes={args.nodes}"]
    if args.cpu or args.gpus_per_node == 0:
        words += ["--cpu", f"--procs-per-node={args.procs_per_node or 1}"]
    else:
        words.append(f"--gpus-per-node={args.gpus_per_node}")
    for name in ("partition", "time", "account", "job_name", "template"):
        if getattr(args, name):
            words.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    if args.grace != DEFAULT_GRACE_S:
        words.append(f"--grace={args.grace}")
    words += [f"--sbatch={extra}" for extra in args.sbatch or []]
    return shlex.join(words + list(args.overrides))


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from fmtrain.config import ConfigError, data_parallel_size
    from fmtrain.launch import slurm

    if args.nodes < 1:
        raise ConfigError(f"--nodes={args.nodes} must be at least 1")
    cpu = args.cpu or args.gpus_per_node == 0
    if cpu:
        nproc = args.procs_per_node or 1
        gpus = 0
    elif args.gpus_per_node is None:
        raise ConfigError(
            "give --gpus-per-node G (one training process per GPU), or --cpu --procs-per-node K for CPU nodes"
        )
    else:
        if args.procs_per_node and args.procs_per_node != args.gpus_per_node:
            raise ConfigError(
                f"--procs-per-node={args.procs_per_node} with --gpus-per-node={args.gpus_per_node}: "
                "GPU jobs run one process per GPU (--procs-per-node is for --cpu)"
            )
        nproc = gpus = args.gpus_per_node
    if nproc < 1:
        raise ConfigError(f"--procs-per-node={nproc} must be at least 1")
    if args.grace < 1:
        raise ConfigError(f"--grace={args.grace} must be at least 1 second")
    if args.time and slurm.time_limit_seconds(args.time) <= args.grace:
        raise ConfigError(f"--time={args.time} leaves no time before the --grace={args.grace} s save notice")
    world = args.nodes * nproc
    cfg, run_dir = _prepare(args.recipe, args.overrides, world)
    per_node = f"{gpus} GPU(s)" if gpus else f"{nproc} CPU process(es), gloo"
    job = slurm.SlurmJob(
        run_dir=run_dir,
        nodes=args.nodes,
        nproc_per_node=nproc,
        gpus_per_node=gpus,
        requeue_exit_code=_requeue_exit_code(),
        job_name=args.job_name or f"fmtrain-{run_dir.name}",
        partition=args.partition,
        time=args.time,
        account=args.account,
        grace_s=args.grace,
        extra_sbatch=args.sbatch or [],
        command=_slurm_command(args),
        summary=(
            f"{Path(args.recipe).name} ({cfg.model.family}), {args.nodes} node(s) x {per_node} = "
            f"{world} processes, TP={cfg.parallel.tp} PP={cfg.parallel.pp} "
            f"DP={data_parallel_size(cfg, world)}"
        ),
    )
    template = Path(args.template) if args.template else slurm.TEMPLATE
    script = slurm.render(job, template)
    if gpus and cfg.parallel.tp > gpus:
        print(
            f"fmtrain launch slurm: note: parallel.tp={cfg.parallel.tp} spans nodes "
            f"({gpus} GPUs per node); tensor parallelism across nodes is slow",
            file=sys.stderr,
        )
    if args.dry_run:
        print(script, end="")
        return 0
    _write_config(cfg, run_dir)
    job.script_path.write_text(script)
    try:
        job_id = slurm.submit(job.script_path)
    except slurm.SubmitError as exc:
        print(f"fmtrain launch slurm: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}")
    print(f"run dir  {run_dir}")
    print(f"script   {job.script_path}")
    print(f"logs     {run_dir}/slurm-{job_id}.out, {run_dir}/slurm-{job_id}.err")
    return 0


def cmd_launch_local(args: argparse.Namespace) -> int:
    from fmtrain.config import ConfigError
    from fmtrain.launch import local

    if args.nproc < 1:
        raise ConfigError(f"--nproc={args.nproc} must be at least 1")
    cfg, run_dir = _prepare(args.recipe, args.overrides, args.nproc)
    config_path = _write_config(cfg, run_dir)
    print(f"fmtrain launch local: run dir {run_dir}", flush=True)
    return local.run(config_path, args.nproc, _requeue_exit_code())


def register_launch(sub) -> None:
    """Add ``fmtrain launch {slurm,local}`` to the CLI's subcommands."""
    launch = sub.add_parser(
        "launch",
        help="start a run as a SLURM job or locally (requeue on preemption)",
        description=__doc__.split("\n\n")[0],
    )
    kinds = launch.add_subparsers(dest="launcher", required=True, parser_class=_IntermixedParser)

    s = kinds.add_parser(
        "slurm",
        help="write an sbatch script into the run directory and submit it",
        description="Validate RECIPE for nodes x processes, write RUN_DIR/fmtrain.sbatch (from "
        "launch/slurm/fmtrain.sbatch) and RUN_DIR/config.yaml, and submit with sbatch.",
    )
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", help="section.key=value")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, default=None, help="training processes per node = GPUs")
    s.add_argument("--cpu", action="store_true", help="CPU nodes, gloo (same as --gpus-per-node 0)")
    s.add_argument(
        "--procs-per-node", "--nproc-per-node", type=int, default=0, help="training processes per CPU node (default 1)"
    )
    s.add_argument("--partition")
    s.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00")
    s.add_argument("--account")
    s.add_argument(
        "--grace",
        type=int,
        default=DEFAULT_GRACE_S,
        help="seconds before the time limit at which the job is told to save and requeue "
        f"(default {DEFAULT_GRACE_S}; SLURM may send it up to a minute earlier)",
    )
    s.add_argument("--job-name", help="default fmtrain-RUN_DIR_NAME")
    s.add_argument(
        "--sbatch",
        action="append",
        metavar="OPTION",
        help="extra #SBATCH option, e.g. --sbatch=--qos=high (repeatable)",
    )
    s.add_argument("--template", help="sbatch template (default launch/slurm/fmtrain.sbatch)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.set_defaults(func=cmd_launch_slurm)

    loc = kinds.add_parser(
        "local",
        help="train on this machine; start again after a save-and-requeue",
        description="Validate RECIPE for N processes, write RUN_DIR/config.yaml and train from it with N "
        "local processes; SIGUSR1 saves and restarts, as a SLURM requeue would.",
    )
    loc.add_argument("--nproc", type=int, required=True)
    loc.add_argument("recipe")
    loc.add_argument("overrides", nargs="*", help="section.key=value")
    loc.set_defaults(func=cmd_launch_local)
