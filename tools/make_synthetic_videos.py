"""Write synthetic videos (moving coloured shapes, real mp4 files) and shard them.

    python tools/make_synthetic_videos.py --out data/synthetic-video --count 64
    # -> data/synthetic-video/videos/vid-0000.mp4 ...      the mp4 files (libx264, else mpeg4)
    #    data/synthetic-video/captions.jsonl               {"video": "vid-0000.mp4", "caption": "..."}
    #    data/synthetic-video/shards/shard-000000.tar ...  .mp4 + .json + .txt per sample
    #    data/synthetic-video/shards/index.json
    # then: fmtrain ... data.shards=data/synthetic-video/shards

Video ``i`` uses seed ``seed + i``, so the same arguments give the same frames. The shards
are written by ``fmtrain data shard video`` (fmtrain.data.video.write_video_shards).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmtrain.config import parse_size  # noqa: E402
from fmtrain.data.shards import progress_bar  # noqa: E402
from fmtrain.data.video import default_codec, read_captions, synthetic_video, write_video_shards  # noqa: E402


def make_videos(
    out: Path,
    count: int,
    *,
    frames: int,
    width: int,
    height: int,
    fps: int,
    seed: int,
    codec: str,
    progress: bool = True,
) -> list[Path]:
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    bar = progress_bar(f"encoding {codec} videos", total=count, unit="videos", enabled=progress)
    for i in range(count):
        data, caption = synthetic_video(seed + i, frames=frames, width=width, height=height, fps=fps, codec=codec)
        path = videos_dir / f"vid-{i:04d}.mp4"
        path.write_bytes(data)
        paths.append(path)
        lines.append(json.dumps({"video": path.name, "caption": caption}))
        bar.update(1)
    bar.close()
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (videos/, captions.jsonl, shards/)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", default="auto", help="auto (libx264 if available, else mpeg4), libx264, mpeg4")
    parser.add_argument("--shard-size", default="64MB")
    parser.add_argument("--max-count", type=int, default=16, help="videos per shard at most")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    codec = default_codec() if args.codec == "auto" else args.codec
    paths = make_videos(
        out,
        args.count,
        frames=args.frames,
        width=args.width,
        height=args.height,
        fps=args.fps,
        seed=args.seed,
        codec=codec,
        progress=not args.quiet,
    )
    index = write_video_shards(
        paths,
        out / "shards",
        captions=read_captions(out / "captions.jsonl"),
        shard_size=parse_size(args.shard_size),
        max_count=args.max_count,
        progress=not args.quiet,
    )
    print(
        f"{len(paths)} {codec} videos in {out / 'videos'}; {index['samples']} samples in "
        f"{len(index['shards'])} shards: data.shards={out / 'shards'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
