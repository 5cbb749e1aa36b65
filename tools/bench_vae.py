#!/usr/bin/env python
"""Video-VAE benchmarks: training clips/s through fmtrain's engine against a plain torch loop, and
``fmtrain data encode`` clips/s with where its time goes.

``train``
    N ranks (``torch.distributed.run``; on CPU one thread each). Every rank builds fmtrain's
    engine for the ``video_vae`` recipe (megatron DDP + the distributed optimizer) and, beside
    it, the same :class:`VideoVAE` module with fmtrain's initial weights copied in, wrapped in
    ``torch.nn.parallel.DistributedDataParallel`` with ``torch.optim.AdamW`` (fused, the same
    hyperparameters) and ``clip_grad_norm_``; both compute the objective's L1 + KL + SSIM on the
    same clips, with the same posterior noise (the family's ``posterior_noise``), so the
    first-step losses must agree (checked). Steps alternate between the sides (ABBA) after
    warm-up; the median step time gives clips/s per side and their ratio. The GAN is off
    (``objective.gan_weight=0``): the plain loop would otherwise need the whole two-optimizer
    schedule written again.
``encode``
    Writes synthetic mp4 shards, a Video-VAE release file of the recipe's widths, and tiny
    Hugging Face text encoders into a temporary directory, then runs ``fmtrain data encode
    --nproc N`` on them and reports clips/s and the time per stage from its output.

    .venv/bin/python tools/bench_vae.py train --nproc 2 --steps 6
    .venv/bin/python tools/bench_vae.py encode --nproc 2 --videos 16
    python tools/bench_vae.py train --nproc 1 --recipe recipes/step_video/vae.yaml   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
TINY = ROOT / "recipes" / "step_video" / "vae_tiny.yaml"


def bench_config(args):
    from fmtrain.config import load_config

    overrides = [
        "objective.gan_weight=0",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        "parallel.dp=0",
        "logging.tensorboard=false",
        *args.overrides,
    ]
    return load_config(args.recipe, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainSide:
    """The same module under DDP with torch's AdamW: what a hand-written training script does."""

    def __init__(self, cfg, device, source: torch.nn.Module, microbatches: list[dict]):
        from fmtrain.models.video_vae.family import build_vae

        t = cfg.train
        self.cfg, self.device, self.microbatches = cfg, device, microbatches
        vae = build_vae(cfg).to(device)
        vae.load_state_dict(source.state_dict())
        self.model = torch.nn.parallel.DistributedDataParallel(vae)
        decay = [p for p in vae.parameters() if p.ndim >= 2]
        rest = [p for p in vae.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
            fused=True,
        )
        self.global_batch = t.global_batch_size

    def loss(self, batch: dict) -> torch.Tensor:
        from fmtrain.models.video_vae.family import posterior_noise
        from fmtrain.objectives import vae as objective

        o = self.cfg.objective
        x = batch["video"].to(self.device)
        noise = posterior_noise(self.cfg, batch, x) if o.sample_posterior else None
        recon, mean, logvar = self.model(x, noise)
        per_sample = o.l1_weight * objective.l1_per_sample(x, recon)
        per_sample = per_sample + o.kl_weight * objective.kl_per_sample(mean, logvar, x[0].numel())
        if o.ssim_weight > 0:
            per_sample = per_sample + o.ssim_weight * (1.0 - objective.ssim_per_sample(x, recon))
        return per_sample.sum()

    def step(self) -> float:
        import torch.distributed as dist

        self.optimizer.zero_grad(set_to_none=True)
        world = dist.get_world_size()
        total = 0.0
        for i, batch in enumerate(self.microbatches):
            # DDP averages over ranks; the sum over this rank's clips / its share gives the global mean
            loss = self.loss(batch) / (self.global_batch / world)
            if i < len(self.microbatches) - 1:
                with self.model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        mean = torch.tensor([total], device=self.device)
        dist.all_reduce(mean)
        return float(mean.item() / world)


def run_worker(args) -> int:
    from fmtrain import parallel
    from fmtrain.data.video import SyntheticClipSampler
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = bench_config(args)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    d, t = cfg.data, cfg.train
    sampler = SyntheticClipSampler(
        samples=64,
        frames=d.video_frames,
        size=d.video_size,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_size=topo.dp,
        seed=cfg.run.seed,
    )
    microbatches = sampler.microbatches(0, topo.dp_rank)
    for mb in microbatches:
        mb["video"] = mb["video"].to(topo.device)
    plain = PlainSide(cfg, topo.device, engine.unwrapped_chunks()[0], microbatches)

    def fmtrain_step() -> float:
        return engine.train_step(microbatches, t.lr).loss

    first = {"fmtrain": fmtrain_step(), "plain": plain.step()}  # the same weights and clips: the same loss
    for _ in range(args.warmup):
        fmtrain_step()
        plain.step()
    times: dict[str, list[float]] = {"fmtrain": [], "plain": []}
    sides = {"fmtrain": fmtrain_step, "plain": plain.step}
    for i in range(args.steps):
        order = ("fmtrain", "plain") if i % 2 == 0 else ("plain", "fmtrain")
        for name in order:
            sync(topo.device)
            start = time.perf_counter()
            sides[name]()
            sync(topo.device)
            times[name].append(time.perf_counter() - start)
    if topo.rank == 0:
        result = {
            "world": topo.world_size,
            "device": str(topo.device),
            "threads": torch.get_num_threads(),
            "clips_per_step": t.global_batch_size,
            "frames": d.video_frames,
            "size": d.video_size,
            "first_loss": first,
            "median_step_s": {k: statistics.median(v) for k, v in times.items()},
            "step_s": times,
        }
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    parallel.destroy()
    return 0


def run_train(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            str(Path(__file__).resolve()),
            "train",
            "--worker",
            "--json-out",
            str(out),
            "--recipe",
            str(args.recipe),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--global-batch",
            str(args.global_batch),
            "--micro-batch",
            str(args.micro_batch),
            *args.overrides,
        ]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // args.nproc))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        res = json.loads(out.read_text())
    f, p = res["median_step_s"]["fmtrain"], res["median_step_s"]["plain"]
    res["clips_per_s"] = {"fmtrain": res["clips_per_step"] / f, "plain": res["clips_per_step"] / p}
    res["ratio"] = p / f
    rate = res["clips_per_s"]
    print(
        f"Video-VAE training, {res['world']} rank(s) on {res['device']} ({res['threads']} threads each), "
        f"{res['clips_per_step']} clips of {res['frames']}x{res['size']}x{res['size']} per step\n"
        f"  first-step loss   fmtrain {res['first_loss']['fmtrain']:.6f}   plain DDP {res['first_loss']['plain']:.6f}\n"
        f"  median step       fmtrain {f:.3f}s   plain DDP {p:.3f}s\n"
        f"  clips/s           fmtrain {rate['fmtrain']:.2f}   plain DDP {rate['plain']:.2f}\n"
        f"  ratio fmtrain / plain DDP: {res['ratio']:.3f}"
    )
    return res


def run_encode(args) -> dict:
    from safetensors.torch import save_file

    from fmtrain.cli.encode import register_encode  # noqa: F401 (fails early when fmtrain is not importable)
    from fmtrain.config import load_config
    from fmtrain.data.video import synthetic_video, write_video_shards
    from fmtrain.models.video_vae.family import build_vae

    cfg = load_config(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "videos").mkdir()
        captions = {}
        for i in range(args.videos):
            data, caption = synthetic_video(i, frames=args.frames + 4, width=args.size + 8, height=args.size)
            (tmp / "videos" / f"v{i}.mp4").write_bytes(data)
            captions[f"v{i}.mp4"] = caption
        write_video_shards(
            sorted((tmp / "videos").iterdir()),
            tmp / "shards",
            captions=captions,
            max_count=max(1, args.videos // (2 * args.nproc)),
            progress=False,
        )
        (tmp / "release" / "vae").mkdir(parents=True)
        torch.manual_seed(0)
        vae = build_vae(cfg)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp / "release/vae/vae_v2.safetensors"))
        sys.path.insert(0, str(ROOT / "tests"))
        from test_text_to_video_path import text_encoders

        llm, clip = text_encoders(tmp, list(captions.values()))
        cmd = [
            sys.executable,
            "-m",
            "fmtrain.cli",
            "data",
            "encode",
            str(tmp / "shards"),
            "--vae",
            str(tmp / "release"),
        ]
        cmd += ["--llm-encoder", str(llm), "--clip-encoder", str(clip), "--frames", str(args.frames)]
        cmd += ["--size", str(args.size), "--out", str(tmp / "latents"), "--nproc", str(args.nproc), "--quiet"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        index = json.loads((tmp / "latents" / "index.json").read_text())
    lines = [line for line in proc.stdout.splitlines() if "rank" in line and "samples from" in line]
    print(f"fmtrain data encode: {index['samples']} clips of {args.frames}x{args.size}x{args.size}, {args.nproc} ranks")
    for line in lines:
        print("  " + line.removeprefix("fmtrain data encode: "))
    print(f"  wall time of the command (start-up included): {wall:.1f}s = {index['samples'] / wall:.2f} clips/s")
    return {"lines": lines, "wall_s": wall, "samples": index["samples"], "seconds_rank0": index["seconds_rank0"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("train", "encode"))
    parser.add_argument("--recipe", default=str(TINY))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--videos", type=int, default=16, help="encode: synthetic videos")
    parser.add_argument("--frames", type=int, default=17, help="encode: frames per clip")
    parser.add_argument("--size", type=int, default=32, help="encode: clip side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default="")
    parser.add_argument("overrides", nargs="*", help="section.key=value for the recipe")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    res = run_train(args) if args.mode == "train" else run_encode(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
