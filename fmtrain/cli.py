"""The ``fmtrain`` command line.

    fmtrain train RECIPE [key=value ...]            under torchrun / srun (one process per rank)
    fmtrain train --nproc N RECIPE [key=value ...]  starts N local ranks itself
    fmtrain info RECIPE [key=value ...]             parameters, FLOPs per token, memory per GPU
    fmtrain demo                                    the tiny Yi model on the embedded corpus

Configuration errors are reported before any process starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fmtrain.config import ConfigError, data_parallel_size, load_config, num_microbatches, validate

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def _launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` local ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "fmtrain.cli", *argv]
    return subprocess.call(cmd)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.nproc and not _under_launcher():
        validate(cfg, args.nproc)
        return _launch_local(args.nproc, ["train", args.recipe, *args.overrides])
    from fmtrain.train.loop import train

    train(cfg)
    from fmtrain import parallel

    parallel.destroy()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from fmtrain.models.registry import get_family
    from fmtrain.train.flops import memory_per_gpu_from_config

    cfg = load_config(args.recipe, args.overrides)
    world = args.gpus or cfg.parallel.tp * cfg.parallel.pp * max(cfg.parallel.dp, 1)
    validate(cfg, world)
    dp = data_parallel_size(cfg, world)
    family = get_family(cfg.model.family)
    params = family.param_count(cfg)
    flops_token = family.flops_per_sample(cfg) / family.tokens_per_sample(cfg)
    p, t = cfg.parallel, cfg.train
    print(f"recipe        {args.recipe}")
    print(f"family        {cfg.model.family}")
    print(f"parameters    {params:,} ({params / 1e9:.2f} B)")
    print(f"FLOPs/token   {flops_token:,.0f} (training: forward + backward)")
    print(f"layout        TP={p.tp} PP={p.pp} VPP={p.vpp} DP={dp} on {world} GPUs, "
          f"sequence_parallel={p.sequence_parallel}, distributed_optimizer={p.distributed_optimizer}, "
          f"recompute={cfg.model.recompute}")
    tokens = t.global_batch_size * cfg.model.seq_length
    print(f"batch         {t.global_batch_size} x {cfg.model.seq_length} = {tokens:,} tokens/step, "
          f"micro-batch {t.micro_batch_size}, {num_microbatches(cfg, dp)} microbatches per DP rank")
    estimate = memory_per_gpu_from_config(cfg, dp=dp, num_microbatches=num_microbatches(cfg, dp))
    print("memory/GPU    " + estimate.format().replace("\n", "\n              "))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    recipe = REPO_RECIPES / "yi" / "tiny.yaml"
    overrides = [f"run.dir={args.run_dir}", *args.overrides]
    cfg = load_config(recipe, overrides)
    validate(cfg, args.nproc)
    print(f"fmtrain demo: training {recipe.name} on the embedded Shakespeare corpus with "
          f"{args.nproc} ranks into {args.run_dir}", flush=True)
    rc = _launch_local(args.nproc, ["train", str(recipe), *overrides])
    if rc != 0:
        return rc
    return _summarise_demo(Path(args.run_dir), cfg)


def _summarise_demo(run_dir: Path, cfg) -> int:
    import json
    import math

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    by_step = {rec["step"]: rec for rec in lines}
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    print(f"\ndemo finished: loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at "
          f"step {last['step']} (ln(vocab) = {math.log(cfg.model.vocab_size):.3f})")
    if "val_loss" in last:
        print(f"validation loss {last['val_loss']:.3f}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}; "
          f"checkpoint: {run_dir / 'checkpoints' / (run_dir / 'checkpoints' / 'latest').read_text().strip()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmtrain", description="distributed pretraining on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe")
    train.add_argument("--nproc", type=int, default=0, help="start this many local ranks (torchrun)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="parameters, FLOPs and memory per GPU of a recipe")
    info.add_argument("recipe")
    info.add_argument("overrides", nargs="*")
    info.add_argument("--gpus", type=int, default=0, help="world size (default: tp x pp x dp)")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="train the tiny Yi recipe on the embedded corpus")
    demo.add_argument("--nproc", type=int, default=2)
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fmtrain: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
