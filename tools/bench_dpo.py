#!/usr/bin/env python
"""DPO step time against an SFT step over the same tokens, side by side in one process.

Both engines are the Yi family at TP = PP = DP = 1 with the same shapes and the same rows: n
preference pairs are 2n sequences of ``--seq`` tokens whose second half is the completion. The
SFT step trains next-token prediction on those 2n sequences (loss on the completion tokens);
the DPO step trains the policy on them as n pairs with the co-located frozen reference (one
extra forward-only pass). Steps alternate ABBA after warm-up; the medians give the ratio
(issue goal: DPO <= 1.35x SFT with the co-located reference; the floor is 4/3, a forward is a
third of forward + backward).

    .venv/bin/python tools/bench_dpo.py --seq 256 --pairs 8 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

warnings.simplefilter("ignore")


def config(args, objective: str, rows_per_microbatch: int):
    from fmtrain.config import load_config

    samples = rows_per_microbatch if objective == "lm" else rows_per_microbatch // 2
    return load_config(
        None,
        [
            f"objective.name={objective}",
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.num_attention_heads={args.heads}",
            f"model.num_query_groups={args.kv_heads}",
            f"model.ffn_hidden_size={args.ffn}",
            f"model.vocab_size={args.vocab}",
            f"model.seq_length={args.seq}",
            f"train.global_batch_size={samples}",
            f"train.micro_batch_size={samples}",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            "logging.tensorboard=false",
            "run.dir=" + tempfile.mkdtemp(prefix="bench_dpo_"),
        ],
    )


def rows(args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (2 * args.pairs, args.seq + 1), generator=g)
    loss_mask = torch.zeros(2 * args.pairs, args.seq)
    loss_mask[:, args.seq // 2 :] = 1.0  # the completion: the second half of every sequence
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": loss_mask}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (2x as many sequences)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    from fmtrain.launch.local import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from fmtrain import parallel
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    family = get_family("yi")
    cfg_sft, cfg_dpo = config(args, "lm", 2 * args.pairs), config(args, "dpo", 2 * args.pairs)
    topo = parallel.initialize(cfg_sft)
    engines = {"sft": build_engine(cfg_sft, topo, family), "dpo": build_engine(cfg_dpo, topo, family)}
    batch = rows(args)
    times: dict[str, list[float]] = {"sft": [], "dpo": []}
    order = ["sft", "dpo", "dpo", "sft"]
    for i in range(args.warmup * 2 + args.steps * 2):
        name = order[i % 4]
        start = time.perf_counter()
        engines[name].train_step([dict(batch)], 1e-5, step=i)
        if i >= args.warmup * 2:
            times[name].append(time.perf_counter() - start)
    sft, dpo = statistics.median(times["sft"]), statistics.median(times["dpo"])
    tokens = 2 * args.pairs * args.seq
    print(
        json.dumps(
            {
                "shape": f"{args.layers}x{args.hidden}, vocab {args.vocab}, {args.pairs} pairs x 2 x {args.seq} tokens",
                "threads": torch.get_num_threads(),
                "sft_step_s": round(sft, 4),
                "dpo_step_s": round(dpo, 4),
                "sft_tokens_per_s": round(tokens / sft),
                "dpo_tokens_per_s": round(tokens / dpo),
                "dpo_over_sft": round(dpo / sft, 3),
            }
        )
    )
    parallel.destroy()


if __name__ == "__main__":
    main()
