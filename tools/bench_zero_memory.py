"""Model-state memory per rank and step time: DeepSpeed ZeRO stages vs megatron's distributed optimizer.

    python tools/bench_zero_memory.py [--nproc 2] [--steps 4] [--backends megatron,zero1,zero2,zero3]

For each backend, side by side on the same machine, a fresh ``torch.distributed.run`` of NPROC
ranks trains a ~134M-parameter Yi (12 layers, hidden 768, vocab 32000, sequence 256; fp32 on
CPU, bf16 on a GPU) on random tokens for STEPS steps through fmtrain's engine, and reports:

- model-state bytes rank 0 holds after the last step (weights, gradient buffers, optimizer
  state: summed over the tensors themselves, ``Engine.model_state_bytes``), against the ZeRO
  paper's split that ``fmtrain info`` prints;
- the process's peak RSS (host memory: on CPU everything lives there; on a GPU the peak CUDA
  allocation is reported as well), and its peak RSS up to the end of the engine's build;
- the most parameter bytes rank 0 held whole at once during the build ("whole params"; ZeRO-3
  builds under ``deepspeed.zero.Init``: one parameter at a time), sampled as each parameter is
  registered and as DeepSpeed gathers one;
- the median step time after the first step.

Ratios are against the megatron backend. Results go to stdout and OUT (``--out``, JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = [
    "model.num_layers=12",
    "model.hidden_size=768",
    "model.num_attention_heads=12",
    "model.num_query_groups=12",
    "model.ffn_hidden_size=2048",
    "model.vocab_size=32000",
    "model.seq_length=256",
    "train.micro_batch_size=1",
    "logging.tensorboard=false",
]
BACKENDS = {
    "megatron": ["engine.backend=megatron"],
    "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
    "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
    "zero3+offload": ["engine.backend=deepspeed", "engine.zero_stage=3", "engine.offload=optimizer"],
}


@contextlib.contextmanager
def whole_parameters(peak: list[int]):
    """The most parameter bytes held whole at once, in ``peak[0]``: sampled as a module registers a
    parameter and as DeepSpeed gathers parameters (a partitioned ZeRO-3 parameter's data is empty
    between gathers)."""
    import deepspeed
    import torch

    params = weakref.WeakValueDictionary()

    def sample():
        peak[0] = max(peak[0], sum(p.data.numel() * p.element_size() for p in params.values()))

    def registered(module, name, param):
        if param is not None:
            params[id(param)] = param
            sample()

    gather_enter = deepspeed.zero.GatheredParameters.__enter__

    def gathered(self):
        out = gather_enter(self)
        sample()
        return out

    hook = torch.nn.modules.module.register_module_parameter_registration_hook(registered)
    deepspeed.zero.GatheredParameters.__enter__ = gathered
    try:
        yield
    finally:
        hook.remove()
        deepspeed.zero.GatheredParameters.__enter__ = gather_enter


def child(backend: str, steps: int, out: Path, run_dir: str) -> None:
    """One backend's run (every rank; rank 0 writes OUT)."""
    sys.path.insert(0, str(REPO))
    import torch

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.train.schedules import lr_at

    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = MODEL + BACKENDS[backend] + [f"train.global_batch_size={2 * world}", f"run.dir={run_dir}"]
    cfg = load_config(REPO / "recipes" / "yi" / "tiny.yaml", overrides)
    topo = parallel.initialize(cfg)
    family = get_family("yi")
    whole = [0]
    with whole_parameters(whole):
        engine = build_engine(cfg, topo, family)
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m, t = cfg.model, cfg.train
    g = torch.Generator().manual_seed(topo.dp_rank)
    times = []
    for step in range(steps):
        batches = []
        for _ in range(engine.num_microbatches):
            tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
            tokens = tokens.to(topo.device)
            mask = torch.ones(t.micro_batch_size, m.seq_length, device=topo.device)
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        start = time.perf_counter()
        engine.train_step(batches, lr_at(step, t), step=step)
        if topo.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if topo.rank == 0:
        record = {
            "params": family.param_count(cfg),
            "dp": topo.dp,
            "state_bytes": engine.model_state_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "build_peak_rss_bytes": build_rss,
            "build_whole_param_bytes": whole[0],
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "device": topo.device.type,
        }
        if topo.device.type == "cuda":
            record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        out.write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backends", default="megatron,zero1,zero2,zero3")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.child_out, args.run_dir)
        return

    from fmtrain.models.sizes import state_bytes_per_param, zero_state_bytes_per_param

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            out = Path(tmp) / f"{backend}.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                __file__, "--child", backend, "--child-out", str(out), "--steps", str(args.steps),
                "--run-dir", str(Path(tmp) / backend),
            ]  # fmt: skip
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            if proc.returncode != 0:
                raise SystemExit(f"{backend} failed:\n{proc.stderr[-4000:]}")
            results[backend] = json.loads(out.read_text())
    base = results.get("megatron")
    mib = 2**20
    print(f"Yi {next(iter(results.values()))['params'] / 1e6:.0f}M parameters, DP={args.nproc}, {args.steps} steps")
    print(
        f"{'backend':<14} {'state MiB':>10} {'formula MiB':>12} {'ratio':>7} {'peak RSS MiB':>13} {'ratio':>7} "
        f"{'build RSS MiB':>14} {'whole params MiB':>17} {'step s':>8} {'ratio':>7}"
    )
    for name, r in results.items():
        bf16 = r["device"] == "cuda"
        if name == "megatron":
            formula = r["params"] * state_bytes_per_param(bf16, True, r["dp"])
        else:
            stage = int(name[4])
            offload = "optimizer" if "offload" in name else "none"
            z = zero_state_bytes_per_param(stage, r["dp"], bf16, offload)
            # after the step: ZeRO-1/2 have freed the gradients, ZeRO-3 keeps its flat gradient partition
            kept_grads = z.grads if stage == 3 else 0.0
            formula = r["params"] * (z.params + kept_grads + z.optimizer + z.host)

        def ratio(key: str, r: dict = r) -> str:
            return f"{r[key] / base[key]:.3f}" if base else "-"

        print(
            f"{name:<14} {r['state_bytes'] / mib:>10.1f} {formula / mib:>12.1f} {ratio('state_bytes'):>7} "
            f"{r['peak_rss_bytes'] / mib:>13.1f} {ratio('peak_rss_bytes'):>7} {r['build_peak_rss_bytes'] / mib:>14.1f} "
            f"{r['build_whole_param_bytes'] / mib:>17.1f} {r['step_s']:>8.3f} {ratio('step_s'):>7}"
        )
        r["formula_state_bytes"] = formula
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
