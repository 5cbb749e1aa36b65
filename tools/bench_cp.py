#!/usr/bin/env python
"""Context parallelism: tokens/s at CP=2 against CP=1 on the same 2 ranks, long sequences.

Both runs are the Yi family (or ``--family step_video``, the DiT over one long latent) on two
gloo processes with the same global batch of ``--batch`` sequences of ``--seq`` tokens per
step: CP=1 is data parallelism (each rank trains whole sequences), CP=2 splits every sequence
over the two ranks, which exchange q/k/v and the attention output by all-to-all (DeepSpeed-
Ulysses) in every layer, forward and backward. Each side runs ``--warmup`` steps, then
``--steps`` timed ones; the all-to-all share is the time spent inside
``deepspeed.comm.all_to_all_single`` (wrapped with a timer) over the timed steps' time, on
rank 0. Prints one JSON line per side and the ratio of tokens/s (CP=2 / CP=1).

    .venv/bin/python tools/bench_cp.py --seq 8192 --steps 4
    .venv/bin/python tools/bench_cp.py --family step_video --latent 8,32,32 --steps 4

What CP buys is memory: each rank holds the activations of 1/2 of every sequence (see
tests/test_context_parallel.py), which lets a sequence too long for one device train at all;
the ratio shows what that costs in speed where both fit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

warnings.simplefilter("ignore")


def overrides(args, cp: int) -> tuple[Path, list[str]]:
    common = [
        f"parallel.cp={cp}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.heads}",
        f"model.ffn_hidden_size={4 * args.hidden}",
        f"train.global_batch_size={args.batch}",
        "train.micro_batch_size=1",
        "train.precision=fp32",
    ]
    if args.family == "yi":
        return ROOT / "recipes" / "yi" / "tiny.yaml", common + [
            f"model.num_query_groups={args.heads // 2}",
            f"model.seq_length={args.seq}",
            "model.vocab_size=2048",
        ]
    head_dim = args.hidden // args.heads
    axes = [head_dim // 2, head_dim // 4, head_dim // 4]
    return ROOT / "recipes" / "step_video" / "dit_tiny.yaml", common + [
        f"model.num_query_groups={args.heads}",
        f"model.head_dim={head_dim}",
        f"model.rope_axes=[{','.join(map(str, axes))}]",
        f"data.synthetic_latent_shapes=[[{args.latent}]]",
    ]


def microbatches(cfg, count: int, step: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(step)
    m = cfg.model
    out = []
    for i in range(count):
        if m.family == "yi":
            tokens = torch.randint(0, m.vocab_size, (1, m.seq_length + 1), generator=g)
            out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, m.seq_length)})
            continue
        t, h, w = cfg.data.synthetic_latent_shapes[0]
        out.append(
            {
                "latent": torch.randn(1, m.in_channels, t, h, w, generator=g),
                "text_emb": torch.randn(1, m.caption_tokens, m.caption_dim, generator=g),
                "text_mask": torch.ones(1, m.caption_tokens, dtype=torch.bool),
                "clip_emb": torch.randn(1, m.clip_tokens, m.clip_dim, generator=g),
                "clip_mask": torch.ones(1, m.clip_tokens, dtype=torch.bool),
                "sample_seed": torch.tensor([1000 * step + i]),
            }
        )
    return out


def worker(args) -> None:
    import torch.distributed as dist

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family

    recipe, extra = overrides(args, args.cp)
    cfg = load_config(recipe, extra)
    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
    spent = [0.0]
    if args.cp > 1:
        import deepspeed.comm

        original = deepspeed.comm.all_to_all_single

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        deepspeed.comm.all_to_all_single = timed
    times, comm = [], []
    for step in range(args.warmup + args.steps):
        batches = microbatches(cfg, engine.num_microbatches, step * topo.dp + topo.dp_rank)
        dist.barrier()
        spent[0] = 0.0
        start = time.perf_counter()
        engine.train_step(batches, lr=1e-4)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            comm.append(spent[0])
    if topo.rank == 0:
        step_s = statistics.median(times)
        tokens = cfg.train.global_batch_size * family_tokens(cfg)
        print(
            "RESULT "
            + json.dumps(
                {
                    "cp": args.cp,
                    "dp": topo.dp,
                    "tokens_per_step": tokens,
                    "step_s": round(step_s, 4),
                    "tokens_per_s": round(tokens / step_s, 1),
                    "all_to_all_share": round(sum(comm) / sum(times), 4),
                }
            ),
            flush=True,
        )
    parallel.destroy()


def family_tokens(cfg) -> int:
    if cfg.model.family == "yi":
        return cfg.model.seq_length
    t, h, w = cfg.data.synthetic_latent_shapes[0]
    return t * (h // cfg.model.patch_size) * (w // cfg.model.patch_size)


def run_side(args, cp: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29700 + cp)]
    cmd += [__file__, "--worker", "--cp", str(cp)] + [a for a in sys.argv[1:] if a != "--worker"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"CP={cp} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--family", choices=["yi", "step_video"], default="yi")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per sequence (yi)")
    parser.add_argument("--latent", default="8,32,32", help="T,H,W of the latent (step_video)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (global)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {cp: run_side(args, cp) for cp in (1, 2)}
    for result in results.values():
        print(json.dumps(result))
    ratio = results[2]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(
        f"{args.family}: tokens/s CP=2 / CP=1 on 2 ranks = {ratio:.3f}; all-to-all "
        f"{100 * results[2]['all_to_all_share']:.1f}% of the CP=2 step"
    )


if __name__ == "__main__":
    main()
