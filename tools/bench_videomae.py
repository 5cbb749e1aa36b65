#!/usr/bin/env python
"""VideoMAE benchmarks: fmtrain's training step against transformers' ``VideoMAEForPreTraining``,
and what VideoMAE V2's decoder masking saves over V1.

``compare`` (one process, the same torch threads for both sides)
    Builds a transformers ``VideoMAEForPreTraining`` of the preset's architecture (random
    weights), imports it into fmtrain's engine (``model.init_from_hf``), and trains both on the
    same clips with V1 masking (decoder masking off, which is what transformers implements) and
    the same encoder masks: torch's AdamW with fmtrain's hyperparameters and
    ``clip_grad_norm_`` on the transformers side, fmtrain's engine (megatron DDP, distributed
    optimizer) on the other. The first-step losses must agree (checked). Steps alternate ABBA
    after warm-up; the median step time gives clips/s per side and their ratio.
``masking``
    fmtrain's step with V1 masking against V2's running-cell decoder masking (ratio 0.5), same
    model and clips, ABBA; the paper reports the decoder's cost about halved.

    .venv/bin/python tools/bench_videomae.py compare --preset S --frames 16 --size 128 --batch 4
    .venv/bin/python tools/bench_videomae.py compare --steps 4 --profile prof.txt --profile-steps 2
    .venv/bin/python tools/bench_videomae.py masking --preset S --frames 16 --size 128 --batch 4

``compare`` also reports each side's median process CPU time per step and their ratio, which
other processes on the same cores disturb less than wall time (least with ``--threads 1``);
``--profile FILE`` writes torch.profiler tables (self CPU time by op) of each side after the
timed steps.
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


def bench_config(args, hf_dir: Path | None, decoder_mask_ratio: float):
    from fmtrain.config import load_config

    overrides = [
        "model.family=videomae_v2",
        "objective.name=mae",
        f"model.size={args.preset}",
        f"data.video_frames={args.frames}",
        f"data.video_size={args.size}",
        f"objective.decoder_mask_ratio={decoder_mask_ratio}",
        f"train.global_batch_size={args.batch}",
        f"train.micro_batch_size={args.batch}",
        "train.precision=fp32",
        "train.lr=1e-4",
        "train.grad_clip=1.0",
        "train.weight_decay=0.05",
        "eval.interval=0",
        "logging.tensorboard=false",
        "run.dir=" + tempfile.mkdtemp(prefix="bench_videomae_"),
    ]
    if hf_dir is not None:
        overrides += [f"model.init_from_hf={hf_dir}", "model.decoder_norm_epsilon=1e-5"]
    return load_config(None, overrides + list(args.overrides))


def make_transformers_model(cfg, path: Path):
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    m, d = cfg.model, cfg.data
    config = VideoMAEConfig(
        image_size=d.video_size,
        patch_size=m.patch_size,
        num_frames=d.video_frames,
        tubelet_size=m.tubelet_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_hidden_size,
        layer_norm_eps=m.norm_epsilon,
        qkv_bias=True,
        use_mean_pooling=False,
        decoder_hidden_size=m.decoder_hidden_size,
        decoder_num_hidden_layers=m.decoder_num_layers,
        decoder_num_attention_heads=m.decoder_num_attention_heads,
        decoder_intermediate_size=m.decoder_ffn_hidden_size,
        norm_pix_loss=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = VideoMAEForPreTraining(config)
    model.save_pretrained(path)
    return model


def clips(cfg, count: int) -> list[dict]:
    d = cfg.data
    g = torch.Generator().manual_seed(0)
    b = cfg.train.micro_batch_size
    return [
        {
            "video": torch.randn(b, 3, d.video_frames, d.video_size, d.video_size, generator=g),
            "sample_seed": torch.arange(b) + 1000 * i,
        }
        for i in range(count)
    ]


def build_engine(cfg):
    from fmtrain import parallel
    from fmtrain.checkpoint.hf.convert import init_from_hf
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family

    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
    if cfg.model.init_from_hf:
        init_from_hf(cfg, Path(cfg.run.dir), engine, topo, log=lambda m: None)
    return engine


def abba(first, second, steps: int, warmup: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, process CPU) seconds of each timed step of each side."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for i in range(steps):
        order = (first, second) if i % 2 == 0 else (second, first)
        for fn in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            (a if fn is first else b).append((time.perf_counter() - t0, time.process_time() - c0))
    return a, b


def run_compare(args) -> dict:
    from fmtrain.models.videomae_v2.family import masks

    hf_dir = Path(tempfile.mkdtemp(prefix="bench_videomae_hf_"))
    cfg = bench_config(args, None, 0.0)
    hf_model = make_transformers_model(cfg, hf_dir)
    cfg = bench_config(args, hf_dir, 0.0)
    engine = build_engine(cfg)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        hf_model.parameters(),
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        fused=True,
    )
    batches = clips(cfg, 4)
    index = {"fmtrain": 0, "transformers": 0}

    def next_batch(side: str) -> dict:
        batch = batches[index[side] % len(batches)]
        index[side] += 1
        return batch

    losses = {}

    def fmtrain_step():
        result = engine.train_step([next_batch("fmtrain")], lr=t.lr)
        losses.setdefault("fmtrain", result.loss)

    def transformers_step():
        batch = next_batch("transformers")
        encoder_mask, _ = masks(cfg, batch)
        loss = hf_model(batch["video"].permute(0, 2, 1, 3, 4), bool_masked_pos=encoder_mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.setdefault("transformers", float(loss))

    fmtrain_step()
    transformers_step()
    if abs(losses["fmtrain"] - losses["transformers"]) > 1e-4 * abs(losses["transformers"]):
        raise SystemExit(f"first-step losses differ: {losses}")
    ours, theirs = abba(fmtrain_step, transformers_step, args.steps, args.warmup)
    b = cfg.train.micro_batch_size
    ours_s, theirs_s = (statistics.median(wall for wall, _ in side) for side in (ours, theirs))
    ours_cpu, theirs_cpu = (statistics.median(cpu for _, cpu in side) for side in (ours, theirs))
    if args.profile:
        profile_sides(args, {"fmtrain": fmtrain_step, "transformers": transformers_step})
    return {
        "mode": "compare",
        "preset": args.preset,
        "clip": f"{cfg.data.video_frames}x{cfg.data.video_size}x{cfg.data.video_size}",
        "batch": b,
        "threads": torch.get_num_threads(),
        "first_loss": losses,
        "fmtrain_clips_per_s": b / ours_s,
        "transformers_clips_per_s": b / theirs_s,
        "ratio": theirs_s / ours_s,
        # Process CPU time per step (all threads): less sensitive than wall time to other
        # processes on the same cores, most of all with --threads 1.
        "fmtrain_cpu_s": ours_cpu,
        "transformers_cpu_s": theirs_cpu,
        "cpu_ratio": theirs_cpu / ours_cpu,
    }


def profile_sides(args, steps: dict) -> None:
    """torch.profiler op tables (self CPU time) of each side, into one text file: totals over
    ``--profile-steps`` steps per side, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    with open(args.profile, "w") as f:
        for name, step in steps.items():
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    step()
            f.write(f"===== {name}: {args.profile_steps} training step(s)\n")
            table = prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=60
            )
            f.write(table + "\n\n")


def run_masking(args) -> dict:
    # One engine per masking: their forward steps differ (the config is part of the step).
    from fmtrain import parallel

    cfg_v1, cfg_v2 = bench_config(args, None, 0.0), bench_config(args, None, 0.5)
    times = {}
    for name, cfg in (("v1", cfg_v1), ("v2", cfg_v2)):
        engine = build_engine(cfg)
        batches = clips(cfg, 4)
        step = {"i": 0}

        def one(engine=engine, batches=batches, step=step, cfg=cfg):
            engine.train_step([batches[step["i"] % len(batches)]], lr=cfg.train.lr)
            step["i"] += 1

        for _ in range(args.warmup):
            one()
        samples = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            one()
            samples.append(time.perf_counter() - t0)
        times[name] = statistics.median(samples)
        del engine
        parallel.destroy()
    from fmtrain.models.videomae_v2.config import token_counts

    b = cfg_v1.train.micro_batch_size
    return {
        "mode": "masking",
        "preset": args.preset,
        "decoder_tokens": {"v1": token_counts(cfg_v1)[1], "v2": token_counts(cfg_v2)[1]},
        "v1_clips_per_s": b / times["v1"],
        "v2_clips_per_s": b / times["v2"],
        "speedup": times["v1"] / times["v2"],
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("compare", "masking"))
    parser.add_argument("--preset", default="S", help="model.size: S, B, L, H, g")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="clips per step (one microbatch)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    parser.add_argument("--json-out", default="")
    parser.add_argument("--profile", default="", help="compare: write torch.profiler op tables of each side here")
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--profile-rows", type=int, default=40)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, value)
    from fmtrain.launch.local import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    result = run_compare(args) if args.mode == "compare" else run_masking(args)
    print(json.dumps(result, indent=2))
    if args.mode == "compare":
        print(
            f"fmtrain {result['fmtrain_clips_per_s']:.2f} clips/s vs transformers "
            f"{result['transformers_clips_per_s']:.2f} clips/s -> ratio {result['ratio']:.3f} (goal >= 1.0); "
            f"CPU time per step {result['fmtrain_cpu_s']:.3f} s vs {result['transformers_cpu_s']:.3f} s "
            f"-> {result['cpu_ratio']:.3f}"
        )
    else:
        print(
            f"V2 decoder masking {result['v2_clips_per_s']:.2f} clips/s vs V1 {result['v1_clips_per_s']:.2f} "
            f"clips/s -> speed-up {result['speedup']:.3f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
