"""Data-loading throughput: packed text tokens/s and decoded video clips/s, per worker, against
reading the same tar members raw in the same run.

    python tools/bench_data.py                       # text + video, 1 and 2 DataLoader workers
    python tools/bench_data.py --workers 1 2 4 8 --text-repeat 8 --videos 64

What it measures, all on shards it writes into --workdir (reused on a second run):
- text: the embedded Shakespeare corpus repeated --text-repeat times, as .txt shards, and a
  SentencePiece tokenizer (--vocab-size) trained on it;
- video: --videos synthetic mp4 videos (tools/make_synthetic_videos.py), --frames frames at
  --width x --height;
- raw: webdataset's tar iteration over the same shards (fmtrain.data.shards.read_shard: open,
  read every member, group by key) with no decoding -- the baseline;
- pipeline: one stream (StreamWorker, in this process) producing microbatches: text tokenized
  with SentencePiece and packed into --seq-length windows; video decoded with PyAV, clips
  sampled, resized, cropped and normalised;
- loader: StreamingLoader with N DataLoader worker processes (one DP rank), per worker = total / N.
The ratio column is samples/s of the pipeline over samples/s of the raw read (1.0 = decoding
costs nothing; lower = the pipeline is that much slower than reading bytes).
Prints a markdown table (for docs/benchmarks.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmtrain.data.shards import INDEX_NAME, read_shard, resolve_shards  # noqa: E402
from fmtrain.data.stream import StreamingLoader, StreamSpec, StreamWorker  # noqa: E402
from fmtrain.data.text import TextPipeline, read_documents, train_tokenizer, write_text_shards  # noqa: E402
from fmtrain.data.video import VideoPipeline, default_codec, synthetic_video, write_video_shards  # noqa: E402


def build_text(workdir: Path, repeat: int, vocab_size: int) -> tuple[Path, Path]:
    shards = workdir / f"text-x{repeat}"
    docs = read_documents("builtin:shakespeare")
    if not (shards / INDEX_NAME).is_file():
        write_text_shards(
            ["builtin:shakespeare"],
            shards,
            shard_size=1_000_000,
            progress=False,
            documents=((f"doc-{r}-{i:06d}", d) for r in range(repeat) for i, d in enumerate(docs)),
        )
    tokenizer = workdir / f"tokenizer-{vocab_size}.model"
    if not tokenizer.is_file():
        train_tokenizer(docs, vocab_size, tokenizer.with_suffix(""))
    return shards, tokenizer


def build_video(workdir: Path, count: int, frames: int, width: int, height: int) -> Path:
    shards = workdir / f"video-{count}x{frames}-{width}x{height}"
    if not (shards / INDEX_NAME).is_file():
        codec = default_codec()
        videos = workdir / "videos"
        videos.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(count):
            path = videos / f"v{count}x{frames}-{width}x{height}-{i:04d}.mp4"
            if not path.is_file():
                path.write_bytes(synthetic_video(i, frames=frames, width=width, height=height, codec=codec)[0])
            paths.append(path)
        write_video_shards(paths, shards, max_count=max(1, count // 8), progress=False)
    return shards


def raw_read(spec_path: Path) -> dict:
    """The baseline: every member of every shard through webdataset's tar iteration, no decoding."""
    shards = resolve_shards(str(spec_path))
    start = time.perf_counter()
    samples = nbytes = 0
    for shard in shards:
        for _, sample in read_shard(shard):
            samples += 1
            nbytes += sum(len(v) for k, v in sample.items() if isinstance(v, bytes))
    seconds = time.perf_counter() - start
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "mb_per_s": nbytes / seconds / 1e6,
    }


def one_stream(pipeline, spec_path: Path, *, mbs: int, samples: int) -> dict:
    """One stream in this process until it has unpacked ``samples`` samples (one epoch)."""
    spec = StreamSpec(resolve_shards(str(spec_path)), dp_size=1, num_workers=0, seed=0, shuffle_buffer=100)
    worker = StreamWorker(pipeline, spec, 0, 0, mbs)
    start = time.perf_counter()
    units = batches = 0
    for batch, position in worker:
        batches += 1
        units += unit_count(batch)
        if position["seen"] >= samples:
            break
    seconds = time.perf_counter() - start
    return {
        "samples": position["seen"],
        "seconds": seconds,
        "samples_per_s": position["seen"] / seconds,
        "units": units,
        "units_per_s": units / seconds,
    }


def loader_run(pipeline, spec_path: Path, *, workers: int, mbs: int, seconds: float) -> dict:
    """StreamingLoader (one DP rank, ``workers`` DataLoader processes) for ``seconds`` after
    its first step; the prefetched microbatches are drained first so they are not counted as
    free throughput."""
    spec = StreamSpec(resolve_shards(str(spec_path)), dp_size=1, num_workers=workers, seed=0, shuffle_buffer=100)
    loader = StreamingLoader(pipeline, spec, global_batch_size=mbs * workers, micro_batch_size=mbs, prefetch=2)
    step = 0
    for step in range(3):  # start the workers, drain what they prefetched
        loader.microbatches(step, 0)
    start = time.perf_counter()
    units = 0
    while time.perf_counter() - start < seconds:
        step += 1
        units += sum(unit_count(b) for b in loader.microbatches(step, 0))
    elapsed = time.perf_counter() - start
    loader.close()
    return {
        "workers": workers,
        "seconds": elapsed,
        "units_per_s": units / elapsed,
        "units_per_s_per_worker": units / elapsed / workers,
    }


def unit_count(batch: dict) -> int:
    if "loss_mask" in batch:  # tokens that carry a loss (padding excluded)
        return int(batch["loss_mask"].sum())
    return int(batch["video"].shape[0])  # clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/fmtrain-bench-data")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--text-repeat", type=int, default=2, help="copies of the Shakespeare corpus")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--text-mbs", type=int, default=4)
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--clip-stride", type=int, default=2)
    parser.add_argument("--clip-size", type=int, default=224)
    parser.add_argument("--clips", type=int, default=2, help="clips per decoded video (repeated sampling)")
    parser.add_argument("--video-mbs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per DataLoader run")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    text_shards, tokenizer = build_text(workdir, args.text_repeat, args.vocab_size)
    video_shards = build_video(workdir, args.videos, args.frames, args.width, args.height)
    text_pipe = TextPipeline(tokenizer, args.seq_length, vocab_size=args.vocab_size)
    video_pipe = VideoPipeline(
        frames=args.clip_frames, stride=args.clip_stride, size=args.clip_size, crop="random", clips=args.clips
    )

    results: dict = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    rows = []
    for name, shards, pipe, mbs, unit in (
        ("text", text_shards, text_pipe, args.text_mbs, "tokens"),
        ("video", video_shards, video_pipe, args.video_mbs, "clips"),
    ):
        raw = raw_read(shards)
        stream = one_stream(pipe, shards, mbs=mbs, samples=raw["samples"])
        loaders = [loader_run(pipe, shards, workers=w, mbs=mbs, seconds=args.seconds) for w in args.workers]
        results[name] = {"raw": raw, "one_worker": stream, "loader": loaders}
        rows.append(
            f"| {name} | raw tar read (baseline) | {raw['samples_per_s']:,.0f} samples/s, "
            f"{raw['mb_per_s']:,.1f} MB/s | 1.00 |"
        )
        rows.append(
            f"| {name} | pipeline, 1 stream in-process | {stream['units_per_s']:,.0f} {unit}/s "
            f"({stream['samples_per_s']:,.0f} samples/s) | {stream['samples_per_s'] / raw['samples_per_s']:.3f} |"
        )
        for run in loaders:
            rows.append(
                f"| {name} | StreamingLoader, {run['workers']} worker(s) | {run['units_per_s']:,.0f} {unit}/s "
                f"total, {run['units_per_s_per_worker']:,.0f} {unit}/s per worker | |"
            )
    print("| data | what | throughput | samples/s vs raw |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
