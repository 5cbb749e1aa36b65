"""The ``fmtrain`` command line.

    fmtrain train RECIPE [key=value ...]            under torchrun / srun (one process per rank)
    fmtrain train --nproc N RECIPE [key=value ...]  starts N local ranks itself
    fmtrain info RECIPE [key=value ...]             parameters, FLOPs per sample unit, memory per GPU
    fmtrain plan RECIPE --gpus N [--gpu h100]       layouts ranked by predicted step time that fit
    fmtrain demo                                    the tiny Yi model on the embedded corpus
    fmtrain data shard text|video ... / data index   WebDataset shards + index.json (fmtrain.data.commands)
    fmtrain data encode SHARDS --vae SRC [--llm-encoder DIR] --out DIR   video / task shards -> DiT latent shards
    fmtrain tokenizer train|encode ...              SentencePiece with Yi's special ids
    fmtrain launch slurm|local RECIPE ...           sbatch script / local run; requeued after a save
    fmtrain convert from-hf HF_DIR OUT [k=v ...]    Hugging Face / release -> fmtrain checkpoint (any layout)
    fmtrain convert to-hf CKPT_DIR OUT [--dtype]    fmtrain checkpoint (any layout) -> Hugging Face / release
    fmtrain sample RECIPE --ckpt DIR --prompt-emb F --out F   DiT latents by the Euler sampler (CFG)
        [--vae SRC --out F.mp4|F.png]               ... decoded by the family's VAE (fmtrain.cli.sample)
        [--task-dir DIR --query FILE]               ... LaVin-DiT: in-context example pairs + a query

Configuration errors are reported before any process starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fmtrain.config import ConfigError, data_parallel_size, load_config, num_microbatches, validate
from fmtrain.launch import check_inputs
from fmtrain.launch.local import free_port, launch_local, under_launcher

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "yi/tiny.yaml"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.nproc and not under_launcher():
        validate(cfg, args.nproc)
        check_inputs(cfg)
        return launch_local(args.nproc, ["train", args.recipe, *args.overrides])
    if not under_launcher():
        check_inputs(cfg)  # one process here; under a launcher, the launch command checked them
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # so that two such runs can share a machine
    from fmtrain.train import signals

    signals.install()  # before the heavy imports: a SIGTERM during start-up is kept, not fatal
    from fmtrain.checkpoint.errors import CheckpointError
    from fmtrain.train.faults import NumericFaultError
    from fmtrain.train.loop import train

    try:
        train(cfg)
        status = 0
    except signals.RequeueRequested:
        status = signals.REQUEUE_EXIT_CODE
    except (CheckpointError, NumericFaultError) as exc:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        kind = "checkpoint error" if isinstance(exc, CheckpointError) else "numeric fault"
        print(f"fmtrain: rank {rank}: {kind}: {exc}", file=sys.stderr, flush=True)
        return 1
    from fmtrain import parallel

    parallel.destroy()
    return status


def cmd_info(args: argparse.Namespace) -> int:
    from fmtrain.models.registry import get_family

    cfg = load_config(args.recipe, args.overrides)
    world = args.gpus or cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp * max(cfg.parallel.dp, 1)
    validate(cfg, world)
    dp = data_parallel_size(cfg, world)
    family = get_family(cfg.model.family)
    params = family.param_count(cfg)
    per_sample = family.units_per_sample(cfg)
    unit = family.throughput_unit
    p, t = cfg.parallel, cfg.train
    print(f"recipe        {args.recipe}")
    print(f"family        {cfg.model.family} (objective {cfg.objective.name})")
    print(f"parameters    {params:,} ({params / 1e9:.2f} B)")
    if family.parameter_breakdown is not None:
        print(
            "              "
            + ", ".join(
                f"{name} {count:,} ({count / 1e9:.2f} B)" for name, count in family.parameter_breakdown(cfg).items()
            )
        )
    print(
        f"FLOPs/{unit.removesuffix('s'):<6} {family.flops_per_sample(cfg) / per_sample:,.0f} "
        "(training: forward + backward)"
    )
    recompute = getattr(cfg.model, "recompute", "none")
    print(
        f"layout        TP={p.tp} PP={p.pp} VPP={p.vpp} CP={p.cp} DP={dp} on {world} GPUs, "
        f"sequence_parallel={p.sequence_parallel}, distributed_optimizer={p.distributed_optimizer}, "
        f"recompute={recompute}"
    )
    print(
        f"batch         {t.global_batch_size} x {per_sample:,} = {t.global_batch_size * per_sample:,} {unit}/step, "
        f"micro-batch {t.micro_batch_size}, {num_microbatches(cfg, dp)} microbatches per DP rank"
    )
    from fmtrain.models.workload import family_workload, layout_of, peak_memory

    if cfg.engine.backend == "deepspeed":
        _print_zero_memory(cfg, params, dp)
    workload = family_workload(cfg, True)
    bf16 = cfg.train.precision != "fp32"
    memory = None
    if workload is not None:
        memory = peak_memory(workload, layout_of(cfg, dp), global_batch=t.global_batch_size, bf16=bf16)
    elif family.traced_workload is not None:
        from fmtrain.plan.traced import memory as traced_memory

        memory = traced_memory(family.traced_workload(cfg, bf16), layout_of(cfg, dp), bf16)
    if memory is not None:
        gib = 2**30
        print(
            f"memory/GPU    {memory.params / 1e6:,.1f}M params | weights+grads+optimizer "
            f"{memory.state_bytes / gib:.2f} GiB | activations {memory.activation_bytes / gib:.2f} GiB | "
            f"backward workspace {memory.workspace_bytes / gib:.2f} GiB | "
            + (f"ZeRO-3 gathered weights {memory.gathered_bytes / gib:.2f} GiB | " if memory.gathered_bytes else "")
            + "allocated "
            f"{memory.allocated_bytes / gib:.2f} GiB, {memory.total_bytes / gib:.2f} GiB with the "
            "2 GiB + 5% allowance (CUDA context, NCCL, fragmentation)"
        )
        print("              other layouts for these GPUs: fmtrain plan RECIPE --gpus N (docs/planner.md)")
        return 0
    if family.memory_estimate is None:
        print(f"memory/GPU    no estimate: model.family={cfg.model.family} defines no workload or memory estimate")
        return 0
    estimate = family.memory_estimate(cfg, dp, num_microbatches(cfg, dp))
    print("memory/GPU    " + estimate.format().replace("\n", "\n              "))
    return 0


def _print_zero_memory(cfg, params: int, dp: int) -> None:
    """The deepspeed backend's model state per GPU (ZeRO's 2 + 2 + 12 bytes per parameter split)."""
    from fmtrain.models.sizes import state_bytes_per_param, zero_state_bytes_per_param

    e, gib = cfg.engine, 2**30
    bf16 = cfg.train.precision != "fp32"
    z = zero_state_bytes_per_param(e.zero_stage, dp, bf16, e.offload)
    host = f" | host (offload) {params * z.host / gib:.2f} GiB" if z.host else ""
    print(
        f"ZeRO-{e.zero_stage}/GPU    weights {params * z.params / gib:.2f} GiB + "
        f"grads {params * z.grads / gib:.2f} GiB "
        f"+ optimizer {params * z.optimizer / gib:.2f} GiB = {params * z.device / gib:.2f} GiB "
        f"({z.device:.2f} B/param at DP={dp}){host}; the megatron backend's distributed optimizer: "
        f"{params * state_bytes_per_param(bf16, True, dp) / gib:.2f} GiB (model state only; activations come on top)"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    recipe = DEMO_RECIPE
    overrides = [f"run.dir={args.run_dir}", *args.overrides]
    cfg = load_config(recipe, overrides)
    if not cfg.data.shards:  # first run: shard the embedded corpus into the run dir, then stream it
        from fmtrain.data.text import prepare_corpus_shards

        train_index, valid_index = prepare_corpus_shards(
            cfg.data.corpus, Path(args.run_dir) / "data", valid_fraction=cfg.data.valid_fraction, seed=cfg.run.seed
        )
        overrides = [
            f"data.shards={train_index}",
            *([f"data.valid_shards={valid_index}"] if valid_index else []),
            *overrides,
        ]
        cfg = load_config(recipe, overrides)
    validate(cfg, args.nproc)
    print(
        f"fmtrain demo: training {recipe.name} on the embedded Shakespeare corpus ({cfg.data.shards}) with "
        f"{args.nproc} ranks into {args.run_dir}",
        flush=True,
    )
    rc = launch_local(args.nproc, ["train", str(recipe), *overrides])
    if rc != 0:
        return rc
    rc = _summarise_demo(Path(args.run_dir), cfg)
    if rc != 0:
        return rc
    # Hand the model over: export to RUN_DIR/hf and generate with transformers.
    from fmtrain.checkpoint.hf.convert import demo_export_and_generate

    print()
    return demo_export_and_generate(Path(args.run_dir), prompt="ROMEO:\nBut, soft! what light through yonder window")


def _summarise_demo(run_dir: Path, cfg) -> int:
    import json
    import math

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    by_step = {rec["step"]: rec for rec in lines}
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    print(
        f"\ndemo finished: loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at "
        f"step {last['step']} (ln(vocab) = {math.log(cfg.model.vocab_size):.3f})"
    )
    if "val_loss" in last:
        print(f"validation loss {last['val_loss']:.3f}")
    print(
        f"metrics: {run_dir / 'metrics.jsonl'}; TensorBoard: tensorboard --logdir {run_dir / 'tb'}; "
        f"checkpoint: {run_dir / 'checkpoints' / (run_dir / 'checkpoints' / 'latest').read_text().strip()}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmtrain", description="distributed pretraining on megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe")
    train.add_argument("--nproc", type=int, default=0, help="start this many local ranks (torchrun)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(func=cmd_train)

    from fmtrain.cli.sample import register_sample

    register_sample(sub)
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

    from fmtrain.data.commands import register_data

    data_commands = register_data(sub)  # data shard|index, tokenizer train|encode

    from fmtrain.cli.encode import register_encode

    register_encode(data_commands)  # data encode

    from fmtrain.launch import register_launch

    register_launch(sub)  # launch slurm|local

    from fmtrain.cli.convert import register_convert

    register_convert(sub)  # convert from-hf|to-hf

    from fmtrain.cli.plan import register_plan

    register_plan(sub)  # plan
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
