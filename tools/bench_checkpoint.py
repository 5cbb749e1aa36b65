"""How long the training loop waits per checkpoint: synchronous vs asynchronous saves.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_checkpoint.py
    python -m torch.distributed.run --standalone --nproc-per-node 1 tools/bench_checkpoint.py  # one GPU

For each model size, with no saves (the wall-time baseline) and with ``checkpoint.async_save``
false and true (and, with ``--gathered``, both again with megatron-core's own gathering save of
the optimizer state), the script trains the
Yi family on random tokens (short sequences: the step is cheap, the checkpoint is not) and
saves every ``--every`` steps through fmtrain's :class:`CheckpointWriter` the way the training
loop does: ``save`` at the interval, ``poll`` after every step, ``close`` at the end. The
loop's wait for one checkpoint is the time spent inside those calls from its ``save`` until
the next one (for async: staging the state and forking the writer, the per-step completion
checks, the finalize, and any wait at the next save for a write that outlasted the steps in
between). Also reported: the checkpoint's size on disk, the async save() call alone (the state
dict, planning, staging to host memory, forking the writer), the time from an async save's
start until the checkpoint is complete, the mean step time with no save running and while a
background write runs (on the CPU the writer competes with training for the same cores), and,
per size, async wait / sync wait and the wall time of the timed stretch per mode (none / sync /
async: the total cost, including a background writer slowing the steps down). Give ``--every``
enough steps to cover the write, as a real
checkpoint interval does; otherwise the async loop waits for the write at the next save.

Results go to stdout (rank 0) and to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent

# name: (hidden, ffn, layers, heads, kv heads); about 16 bytes per parameter in a checkpoint
# (fp32 weights + the distributed optimizer's fp32 main copy, exp_avg, exp_avg_sq).
SIZES = {
    "6M": (256, 688, 8, 8, 4),
    "14M": (384, 1024, 8, 8, 4),
    "25M": (512, 1376, 8, 8, 4),
    "100M": (1024, 2816, 8, 16, 8),  # GPU sizes
    "400M": (2048, 5504, 8, 16, 8),
}
DEFAULT_SIZES = "6M,14M,25M"


def build_config(size: str, run_dir: Path, async_save: bool, seq: int, gbs: int, mbs: int):
    from fmtrain.config import load_config

    hidden, ffn, layers, heads, kv = SIZES[size]
    return load_config(
        REPO / "recipes" / "yi" / "tiny.yaml",
        [
            f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={ffn}",
            f"model.num_layers={layers}",
            f"model.num_attention_heads={heads}",
            f"model.num_query_groups={kv}",
            "model.vocab_size=2048",
            f"model.seq_length={seq}",
            f"train.global_batch_size={gbs}",
            f"train.micro_batch_size={mbs}",
            "train.max_steps=1000",
            "train.warmup_steps=0",
            f"run.dir={run_dir}",
            f"checkpoint.async_save={str(async_save).lower()}",
            "checkpoint.keep_last=2",
        ],
    )


def random_microbatches(n: int, mbs: int, seq: int, vocab: int, device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append(
            {
                "tokens": tokens[:, :-1].to(device),
                "labels": tokens[:, 1:].to(device),
                "loss_mask": torch.ones(mbs, seq, device=device),
            }
        )
    return out


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sync_device(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def megatron_gathering_save(optimizer, model_sharded_state_dict: dict, metadata: dict) -> dict:
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=False, metadata=metadata)


def bench_one(size: str, mode: str, args, topo) -> dict:
    from fmtrain.checkpoint import CheckpointWriter
    from fmtrain.config import num_microbatches
    from fmtrain.engine import build_engine
    from fmtrain.engine import megatron as megatron_engine
    from fmtrain.engine.optimizer_checkpoint import sharded_state_dict_for_saving
    from fmtrain.models.registry import get_family

    async_save = mode.startswith("async")
    if mode.endswith("-gathered"):  # the baseline: megatron-core's own save, gathering over data parallelism
        megatron_engine.sharded_state_dict_for_saving = megatron_gathering_save
    else:
        megatron_engine.sharded_state_dict_for_saving = sharded_state_dict_for_saving
    run_dir = Path(args.out) / f"{size}-{mode}"
    if topo.is_writer and run_dir.exists():
        shutil.rmtree(run_dir)
    dist.barrier()
    cfg = build_config(size, run_dir, async_save, args.seq, args.gbs, args.mbs)
    family = get_family(cfg.model.family)
    engine = build_engine(cfg, topo, family)
    writer = CheckpointWriter(cfg, run_dir, topo, log=lambda m: None)
    batches = random_microbatches(
        num_microbatches(cfg, topo.dp), args.mbs, args.seq, cfg.model.vocab_size, topo.device, seed=topo.dp_rank
    )

    step_idle, step_busy = [], []
    save_s, poll_s, prior_wait_s, complete_s = [], [], [], []
    step = 0
    for _ in range(args.warmup):
        engine.train_step(batches, 1e-4)
        step += 1
    region_started = None
    for checkpoint in range(args.checkpoints + 1):  # the first save is a warm-up (fork, plans)
        if checkpoint == 1:
            region_started = time.perf_counter()
        started = time.perf_counter()
        writer.wait()  # the previous checkpoint's write, when it outlasted the steps in between
        prior_wait_s.append(time.perf_counter() - started)
        if checkpoint > 0:
            complete_s.append(writer.last_duration_s)
        started = time.perf_counter()
        if mode != "none":
            writer.save(step, engine)
        save_s.append(time.perf_counter() - started)
        polled = 0.0
        for _ in range(args.every):
            busy = writer.in_flight is not None
            sync_device(topo.device)
            started = time.perf_counter()
            engine.train_step(batches, 1e-4)
            sync_device(topo.device)
            (step_busy if busy else step_idle).append(time.perf_counter() - started)
            started = time.perf_counter()
            writer.poll()
            polled += time.perf_counter() - started
            step += 1
        poll_s.append(polled)
    started = time.perf_counter()
    writer.close()
    prior_wait_s.append(time.perf_counter() - started)
    complete_s.append(writer.last_duration_s)
    region_s = time.perf_counter() - region_started
    # Checkpoint c's wait: its save call, the polls after it, and the wait for its write at the
    # next save (or at close). The warm-up checkpoint (c = 0) is left out.
    waits = [save_s[c] + poll_s[c] + prior_wait_s[c + 1] for c in range(1, args.checkpoints + 1)]
    saved = writer.last_saved
    result = {
        "size": size,
        "mode": mode,
        "params": family.param_count(cfg),
        "checkpoint_bytes": du_bytes(saved) if topo.is_writer and saved else 0,
        "total_s": region_s,
        "wait_s": waits,
        "wait_mean_s": statistics.mean(waits),
        "save_call_s": statistics.mean(save_s[1:]),
        "poll_s": statistics.mean(poll_s[1:]),
        "wait_for_write_s": statistics.mean(prior_wait_s[2:]),
        "complete_s": statistics.mean(complete_s[1:]),
        "step_idle_s": statistics.mean(step_idle) if step_idle else None,
        "step_during_write_s": statistics.mean(step_busy) if step_busy else None,
    }
    del engine, writer
    dist.barrier()
    if topo.is_writer:
        shutil.rmtree(run_dir, ignore_errors=True)  # GPU sizes write gigabytes per checkpoint
    if topo.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--out", default="/tmp/fmtrain-bench-checkpoint")
    parser.add_argument("--every", type=int, default=4, help="training steps between checkpoints")
    parser.add_argument("--checkpoints", type=int, default=3, help="timed checkpoints per size and mode")
    parser.add_argument("--warmup", type=int, default=2, help="training steps before the first save")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--gbs", type=int, default=4)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument(
        "--gathered", action="store_true", help="also time megatron-core's own (gathering) optimizer-state save"
    )
    args = parser.parse_args()

    from fmtrain import parallel
    from fmtrain.train.signals import install

    install()
    cfg = build_config(args.sizes.split(",")[0], Path(args.out), False, args.seq, args.gbs, args.mbs)
    topo = parallel.initialize(cfg)
    results = []
    modes = ["none", "sync", "async"] + (["sync-gathered", "async-gathered"] if args.gathered else [])
    for size in args.sizes.split(","):
        for mode in modes:
            results.append(bench_one(size, mode, args, topo))
            r = results[-1]
            if topo.is_writer:
                print(
                    f"{size:>4} {r['mode']:>14}: {r['checkpoint_bytes'] / 2**20:7.1f} MiB, loop waits "
                    f"{r['wait_mean_s']:.3f} s per checkpoint ({', '.join(f'{w:.3f}' for w in r['wait_s'])}), "
                    f"{r['total_s']:.2f} s in all",
                    flush=True,
                )
    if topo.is_writer:
        device = torch.cuda.get_device_name() if topo.device.type == "cuda" else f"CPU ({topo.world_size} ranks, gloo)"
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        print(
            f"\ndevice: {device}; ranks: {topo.world_size}; commit {commit}; "
            f"{args.every} steps between checkpoints, {args.checkpoints} timed checkpoints each\n"
        )
        print(
            "| model | checkpoint | sync: loop waits | async: loop waits | async / sync | async: in save() | "
            "async: save start -> complete | step, no save | step, async write running | "
            "wall time: none / sync / async |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        by = {(r["size"], r["mode"]): r for r in results}
        for size in args.sizes.split(","):
            none, s, a = by[(size, "none")], by[(size, "sync")], by[(size, "async")]
            busy = f"{a['step_during_write_s']:.3f} s" if a["step_during_write_s"] else "-"
            print(
                f"| {s['params'] / 1e6:.1f}M params | {s['checkpoint_bytes'] / 2**20:.0f} MiB | "
                f"{s['wait_mean_s']:.3f} s | {a['wait_mean_s']:.3f} s | {a['wait_mean_s'] / s['wait_mean_s']:.2f} | "
                f"{a['save_call_s']:.3f} s | {a['complete_s']:.3f} s | {none['step_idle_s']:.3f} s | {busy} | "
                f"{none['total_s']:.1f} / {s['total_s']:.1f} / {a['total_s']:.1f} s |"
            )
            if args.gathered:
                gs, ga = by[(size, "sync-gathered")], by[(size, "async-gathered")]
                ratio = ga["wait_mean_s"] / gs["wait_mean_s"]
                print(
                    f"| (megatron's gathered format) | {gs['checkpoint_bytes'] / 2**20:.0f} MiB | "
                    f"{gs['wait_mean_s']:.3f} s | {ga['wait_mean_s']:.3f} s | {ratio:.2f} | "
                    f"{ga['save_call_s']:.3f} s | {ga['complete_s']:.3f} s | - | - | - / {gs['total_s']:.1f} / "
                    f"{ga['total_s']:.1f} s |"
                )
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(
            json.dumps(
                {"device": device, "ranks": topo.world_size, "commit": commit, "args": vars(args), "results": results},
                indent=1,
            )
            + "\n"
        )
    parallel.destroy()


if __name__ == "__main__":
    main()
