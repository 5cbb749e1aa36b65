"""``fmtrain plan``: rank the layouts of a recipe (or a generic transformer) on N GPUs."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from fmtrain.config import ConfigError, load_config


def _workload(args: argparse.Namespace):
    from fmtrain.models.workload import dense_transformer

    if args.arch:
        missing = [
            name
            for name in ("layers", "hidden", "heads", "ffn", "vocab", "seq", "global_batch")
            if getattr(args, name) is None
        ]
        if missing:
            raise ConfigError(f"--arch {args.arch} needs --{' --'.join(m.replace('_', '-') for m in missing)}")
        dims = dict(
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            ffn=args.ffn,
            vocab=args.vocab,
            seq=args.seq,
            swiglu=args.swiglu,
            tied=args.tied,
        )
        w = dense_transformer(**dims)
        if args.attention_flops == "full":
            # Megatron-LM before March 2025 (and the TFLOP/s it published) counted the causal
            # score matrix in full
            full = dense_transformer(**dims, causal=False)
            w = replace(w, model_flops_per_sample=full.model_flops_per_sample)
        return w, args.global_batch, True, f"--arch {args.arch}", args.backend or "megatron"
    if not args.recipe:
        raise ConfigError("fmtrain plan: give a RECIPE or --arch gpt with its dimensions")
    from fmtrain.models.workload import family_workload

    cfg = load_config(args.recipe, args.overrides)
    workload = family_workload(cfg, True)
    if workload is None:
        from fmtrain.models.registry import get_family

        traced = get_family(cfg.model.family).traced_workload
        if traced is None:
            raise ConfigError(
                f"model.family={cfg.model.family!r} has no planner description yet (ModelFamily.workload "
                "or traced_workload)"
            )
        workload = traced(cfg, cfg.train.precision != "fp32")
    batch = args.global_batch or cfg.train.global_batch_size
    if cfg.engine.backend == "deepspeed" and cfg.engine.offload != "none":
        raise ConfigError(
            f"engine.offload={cfg.engine.offload}: the planner does not model offloading (host memory, PCIe "
            "traffic); plan without it (engine.offload=none) to see the layouts that fit on the GPUs alone"
        )
    return workload, batch, cfg.train.precision != "fp32", args.recipe, args.backend or cfg.engine.backend


def cmd_plan(args: argparse.Namespace) -> int:
    from fmtrain.plan.estimate import Settings
    from fmtrain.plan.hardware import GIB, Efficiency, device
    from fmtrain.plan.search import parse_layout, plan

    start = time.perf_counter()
    try:
        gpu = device(args.gpu)
        fixed = parse_layout(args.layout)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--gpus and --gpus-per-node must be at least 1")
    w, batch, bf16, source, backend = _workload(args)
    efficiency = Efficiency()
    if args.calibrate:
        from fmtrain.plan.calibrate import fit_gemm_efficiency

        efficiency = fit_gemm_efficiency(args.calibrate, gpu, efficiency)
    settings = Settings(
        global_batch=batch,
        device=gpu,
        efficiency=efficiency,
        gpus_per_node=args.gpus_per_node,
        bf16=bf16,
        overlap_tp=args.overlap_tp,
        overlap_dp=not args.no_overlap_dp,
        overlap_pp=args.overlap_pp,
        backend=backend,
    )
    from fmtrain.models.workload import TracedWorkload

    traced = isinstance(w, TracedWorkload)
    if traced:
        from fmtrain.plan.traced import plan as plan_traced

        if any(fixed.get(key, 1) != 1 for key in ("tp", "pp", "vpp", "cp")) or fixed.get("sequence_parallel"):
            raise ConfigError(f"--layout {args.layout}: {source}'s family trains data parallel only (tp=pp=vpp=cp=1)")
        fixed = {key: value for key, value in fixed.items() if key not in ("tp", "pp", "vpp", "cp")}
    try:
        ranked, considered = (plan_traced if traced else plan)(w, args.gpus, settings, fixed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    top = ranked[: args.top]
    if args.json:
        print(json.dumps({"source": source, "gpus": args.gpus, "gpu": gpu.name, "layouts": [p.as_json() for p in top]}))
        return 0 if top else 1
    machine = f"{args.gpus} x {gpu.name} ({args.gpus_per_node}/node, {gpu.memory_bytes / GIB:.0f} GiB)"
    if traced:
        print(
            f"{source}: {w.params:,} trainable parameters, a conv net traced on the meta device "
            f"({w.saved_bytes['none'] / GIB:.2f} GiB kept per sample without recompute, "
            f"{w.saved_bytes['full'] / GIB:.2f} with), global batch {batch}, {machine}; data parallel only"
        )
    else:
        print(
            f"{source}: {w.layers} layers, hidden {w.hidden}, {w.tokens:,} tokens/sample, global batch {batch}, "
            + machine
        )
    if backend == "deepspeed":
        print("backend deepspeed: ZeRO stage 1-3 over the data-parallel ranks, TP without SP, no PP or CP")
    print(
        f"{considered} layouts considered, {len(ranked)} fit; GEMM efficiency {efficiency.gemm:.2f}; memory includes "
        "a 2 GiB + 5% allowance for the CUDA context, NCCL and fragmentation"
    )
    if not top:
        if not considered and traced:
            print(f"no valid layout on {args.gpus} GPUs: data parallel over all of them must divide the global batch")
            return 1
        print(
            "no layout fits: more GPUs, a smaller micro-batch or recompute, or a larger device"
            if considered
            else f"no valid layout has {args.layout or 'these fields'} on {args.gpus} GPUs: TP must divide "
            "the heads and key/value heads and stay within a node, PP the layers (VPP only where the family "
            "interleaves), DP the global batch"
        )
        return 1
    zero = backend == "deepspeed"
    header = (
        f"{'tp':>3} {'pp':>3} {'vpp':>3} {'cp':>3} {'dp':>5} {'mbs':>3} {'recompute':>9} "
        + (f"{'zero':>4} " if zero else "")
        + f"{'mem GiB':>8} "
        f"{'step s':>8} {'compute':>8} {'tp comm':>8} {'cp comm':>8} {'pp comm':>8} {'bubble':>8} {'dp comm':>8} "
        f"{'samples/s/GPU' if traced else 'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6}"
    )
    print(header)
    for p in top:
        lay, t = p.layout, p.time
        print(
            f"{lay.tp:>3} {lay.pp:>3} {lay.vpp:>3} {lay.cp:>3} {lay.dp:>5} {lay.mbs:>3} {lay.recompute:>9} "
            + (f"{lay.zero_stage:>4} " if zero else "")
            + f"{p.memory.total_bytes / GIB:>8.1f} {t.total_s:>8.3f} {t.compute_s:>8.3f} {t.tp_comm_s:>8.3f} "
            f"{t.cp_comm_s:>8.3f} {t.pp_comm_s:>8.3f} {t.bubble_s:>8.3f} {t.dp_comm_s:>8.3f} "
            + (f"{p.units_per_s_per_gpu:>13,.2f}" if traced else f"{p.units_per_s_per_gpu:>10,.0f}")
            + f" {p.tflops_per_gpu:>8.1f} {p.mfu:>6.1%}"
        )
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def register_plan(sub) -> None:
    plan = sub.add_parser("plan", help="rank layouts (TP/PP/VPP/CP/DP, micro-batch, recompute) for N GPUs")
    plan.add_argument("recipe", nargs="?", default="")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu", default="h100", help="h100 | h200 | h800 | a100 | b200 (default h100)")
    plan.add_argument("--top", type=int, default=10)
    plan.add_argument("--json", action="store_true")
    plan.add_argument(
        "--layout", default="", help="fix fields: tp=8,pp=2,vpp=1,cp=1,mbs=1,recompute=selective,sp=1,distopt=1,zero=3"
    )
    plan.add_argument(
        "--backend",
        choices=["megatron", "deepspeed"],
        default=None,
        help="engine backend whose layouts to plan (default: the recipe's engine.backend; megatron for --arch)",
    )
    plan.add_argument("--calibrate", default="", help="a run directory whose metrics.jsonl sets the GEMM efficiency")
    plan.add_argument("--overlap-tp", type=float, default=0.0, help="share of TP collectives hidden (TE comm overlap)")
    plan.add_argument("--overlap-pp", action="store_true", help="point-to-point sends overlapped with compute")
    plan.add_argument("--no-overlap-dp", action="store_true", help="gradient reduce and param gather not overlapped")
    arch = plan.add_argument_group("a generic dense transformer (instead of a recipe)")
    arch.add_argument("--arch", choices=["gpt"], default="")
    arch.add_argument("--layers", type=int)
    arch.add_argument("--hidden", type=int)
    arch.add_argument("--heads", type=int)
    arch.add_argument("--kv-heads", type=int, default=None)
    arch.add_argument("--ffn", type=int)
    arch.add_argument("--swiglu", action="store_true")
    arch.add_argument("--tied", action="store_true")
    arch.add_argument("--vocab", type=int)
    arch.add_argument("--seq", type=int)
    arch.add_argument("--global-batch", type=int, default=None)
    arch.add_argument(
        "--attention-flops",
        choices=["causal", "full"],
        default="causal",
        help="count the causal score matrix half (Megatron since 2025) or full (older published TFLOP/s)",
    )
    plan.set_defaults(func=cmd_plan)
