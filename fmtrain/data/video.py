"""Video pipeline of the stream: decode with PyAV in the worker, sample clips, resize, crop.

A video sample (``.mp4``/``.webm``/... bytes, ``.json`` metadata from the shard writer, an
optional ``.txt`` caption and optional ``.latent.npy`` / ``.text_emb.npy``) becomes
``clips`` clips (repeated sampling: the video is decoded once and several clips are cut from
it, as VideoMAE V2 does). A clip is ``frames`` frames ``stride`` apart starting at a random
frame (clamped to the last frame for short videos), resized so the shorter side is ``size``
and cropped to ``size x size`` at the centre or at a random offset, then normalised per
channel: a float32 tensor ``(3, frames, size, size)``. Every random choice comes from the
sample's own generator (seed, epoch, stream, position), so a resumed run cuts the same clips.

A microbatch is ``{"video": (mbs, 3, T, size, size), "key": [...], "caption": [...],
"sample_seed": (mbs,) int64}`` (each clip's own seed, for draws a model makes per sample) plus
``"latent"`` / ``"text_emb"`` (stacked per clip) when every sample in it has them.

Also here: :func:`probe_video` (the ``.json`` metadata the shard writer stores) and
:func:`synthetic_video` (real mp4 files of moving shapes for demos, tests and benchmarks).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from fmtrain.data.shards import BadDataError, IndexedShardWriter, progress_bar, safe_key
from fmtrain.data.stream import BadSample, SampleContext

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions by video file name: ``.jsonl`` (``{"video": NAME, "caption": TEXT}``; also
    ``file``/``path`` and ``text``), ``.json`` (``{NAME: TEXT}``) or ``.tsv``/``.txt``
    (``NAME<TAB>TEXT`` per line). Lookups match the file name or its stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    captions: dict[str, str] = {}
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an object mapping video names to captions")
        captions = {str(k): str(v) for k, v in data.items()}
    elif path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
            name = next((record[k] for k in ("video", "file", "path") if isinstance(record.get(k), str)), None)
            caption = next((record[k] for k in ("caption", "text") if isinstance(record.get(k), str)), None)
            if name is None or caption is None:
                raise ValueError(f"{path}:{lineno}: expected 'video' and 'caption' string fields")
            captions[name] = caption
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{lineno}: expected NAME<TAB>CAPTION")
            name, caption = line.split("\t", 1)
            captions[name.strip()] = caption.strip()
    out = {}
    for name, caption in captions.items():
        out[Path(name).name] = caption
        out.setdefault(Path(name).stem, caption)
    return out


def write_video_shards(
    videos: Sequence[str | Path],
    out_dir: str | Path,
    *,
    captions: dict[str, str] | None = None,
    latents: str | Path | None = None,
    text_embs: str | Path | None = None,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    progress: bool = True,
) -> dict:
    """Video files -> video shards: ``.mp4`` (or the file's own container extension),
    ``.json`` (fps, frames, width, height, duration, codec), ``.txt`` caption, and
    ``.latent.npy`` / ``.text_emb.npy`` from ``STEM.npy`` files in ``latents`` / ``text_embs``.

    A video that PyAV cannot decode, or that has no caption when ``captions`` is given, is
    skipped with a warning naming the file. Returns the index (``skipped`` lists them).
    """
    writer = IndexedShardWriter(out_dir, kind="video", shard_size=shard_size, max_count=max_count)
    skipped = []
    bar = progress_bar(f"sharding video into {out_dir}", total=len(videos), unit="videos", enabled=progress)
    keys: set[str] = set()
    for path in map(Path, videos):
        bar.update(1)
        ext = path.suffix.lower().lstrip(".")
        reason = None
        if ext not in VIDEO_EXTENSIONS:
            reason = f"unsupported container .{ext} (expected one of {', '.join(VIDEO_EXTENSIONS)})"
        else:
            try:
                data = path.read_bytes()
                meta = probe_video(data)
            except (OSError, ValueError) as exc:
                reason = f"undecodable: {exc}"
        caption = None
        if reason is None and captions is not None:
            caption = captions.get(path.name, captions.get(path.stem))
            if caption is None:
                reason = "no caption in the captions file"
        extra = {}
        for field, folder in (("latent.npy", latents), ("text_emb.npy", text_embs)):
            if reason is None and folder is not None:
                source = Path(folder) / f"{path.stem}.npy"
                if not source.is_file():
                    reason = f"no {source}"
                else:
                    extra[field] = source.read_bytes()
        if reason is not None:
            log.warning("fmtrain data: warning: video %s skipped: %s", path, reason)
            skipped.append({"file": str(path), "reason": reason})
            continue
        key = safe_key(path.stem)
        if key in keys:
            key = f"{key}_{len(keys)}"
        keys.add(key)
        meta["source"] = path.name
        sample = {"__key__": key, ext: data, "json": json.dumps(meta).encode("utf-8"), **extra}
        if caption is not None:
            sample["txt"] = caption.encode("utf-8")
        writer.write(sample)
    if writer._writer is None:
        raise BadDataError(f"none of the {len(videos)} videos could be sharded (see warnings)")
    writer.meta["skipped"] = skipped
    index = writer.close()
    bar.set_postfix_str(f"{len(index['shards'])} shards, {index['samples']} videos, {len(skipped)} skipped")
    bar.close()
    return index


log = logging.getLogger("fmtrain.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _open(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as exc:
        raise ValueError(f"not a readable video container ({exc})") from None
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    return container


def probe_video(data: bytes) -> dict:
    """``{"fps", "frames", "width", "height", "duration", "codec"}`` of encoded video bytes;
    frames are counted by decoding. Raises ValueError when it cannot be decoded."""
    import av

    container = _open(data)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        frames = 0
        try:
            for _ in container.decode(stream):
                frames += 1
        except av.error.FFmpegError as exc:
            if frames == 0:
                raise ValueError(f"undecodable ({exc})") from None
        if frames == 0:
            raise ValueError("no decodable frames")
        fps = float(rate)
        return {
            "fps": fps,
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "duration": frames / fps if fps else None,
            "codec": stream.codec_context.name,
        }
    finally:
        container.close()


def _resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``, aspect kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def decode_frames(data: bytes, indices: Sequence[int], size: int | None) -> tuple[dict[int, np.ndarray], int]:
    """Decode the frames at ``indices`` (sorted or not), resized to shorter side ``size`` (None:
    as stored), as ``{index: uint8 (H, W, 3)}``; decoding stops after the last one. Also returns
    how many frames were decoded (fewer than asked when the video is shorter)."""
    import av

    wanted = set(indices)
    last = max(wanted)
    out: dict[int, np.ndarray] = {}
    container = _open(data)
    decoded = 0
    try:
        stream = container.streams.video[0]
        shape = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    if shape is None:
                        shape = (
                            (frame.width, frame.height)
                            if size is None
                            else _resized_shape(frame.width, frame.height, size)
                        )
                    out[i] = frame.to_ndarray(format="rgb24", width=shape[0], height=shape[1])
                if i >= last:
                    break
        except av.error.FFmpegError as exc:
            if decoded == 0:
                raise ValueError(f"undecodable ({exc})") from None
    finally:
        container.close()
    return out, decoded


MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)


def multiscale_crop(clip: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
    """VideoMAE's ``GroupMultiScaleCrop`` (scales 1, .875, .75, .66, max distortion 1, the 13 fixed
    offsets) on frames (T, H, W, 3) uint8, resized bilinearly (antialiased, as PIL) to
    (3, T, size, size) float32 in [0, 255]; one crop for the whole clip."""
    _, h, w, _ = clip.shape
    base = min(h, w)
    sides = [size if abs(int(base * s) - size) < 3 else int(base * s) for s in MULTISCALE_SCALES]
    pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= 1]
    cw, ch = pairs[int(rng.integers(len(pairs)))]
    ws, hs = (w - cw) // 4, (h - ch) // 4
    offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    ox, oy = offsets[int(rng.integers(len(offsets)))]
    left, top = ox * ws, oy * hs
    crop = torch.from_numpy(np.ascontiguousarray(clip[:, top : top + ch, left : left + cw]))
    frames = crop.permute(0, 3, 1, 2).float()  # (T, 3, ch, cw)
    if (ch, cw) != (size, size):
        frames = torch.nn.functional.interpolate(
            frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0, 255)
    return frames.permute(1, 0, 2, 3).contiguous()


class VideoPipeline:
    """``units`` = ``clips`` clips of one video; ``item`` = one clip."""

    item_size = 1
    pad_at_epoch_end = False

    def __init__(
        self,
        *,
        frames: int = 16,
        stride: int = 4,
        size: int = 224,
        crop: str = "random",
        clips: int = 1,
        flip: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if min(frames, stride, size, clips) < 1:
            raise ValueError(f"frames={frames}, stride={stride}, size={size} and clips={clips} must be >= 1")
        if crop not in ("center", "random", "multiscale"):
            raise ValueError(f"crop={crop!r} is not one of center, random, multiscale")
        self.frames, self.stride, self.size, self.crop, self.clips = frames, stride, size, crop, clips
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        self._scale = 1.0 / (255.0 * self.std)
        self._bias = -self.mean / self.std

    @staticmethod
    def video_field(sample: dict) -> str | None:
        return next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)

    def _frame_count(self, sample: dict, data: bytes) -> int:
        meta = sample.get("json")
        if meta is not None:
            try:
                frames = json.loads(meta).get("frames")
                if isinstance(frames, int) and frames > 0:
                    return frames
            except (ValueError, AttributeError):
                pass
        try:
            return probe_video(data)["frames"]
        except ValueError as exc:
            raise BadSample(f"undecodable video: {exc}") from None

    def units(self, sample: dict, ctx: SampleContext) -> list[dict]:
        field = self.video_field(sample)
        if field is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"missing field: no video ({'/'.join(VIDEO_EXTENSIONS)}) (has {fields or 'nothing'})")
        data = sample[field]
        total = self._frame_count(sample, data)
        rng = ctx.rng()
        span = (self.frames - 1) * self.stride + 1
        starts = [int(rng.integers(0, total - span + 1)) if total >= span else 0 for _ in range(self.clips)]
        wanted = sorted({min(s + k * self.stride, total - 1) for s in starts for k in range(self.frames)})
        try:
            frames, decoded = decode_frames(data, wanted, self.size)
        except ValueError as exc:
            raise BadSample(f"undecodable video: {exc}") from None
        if not frames:
            raise BadSample(f"undecodable video: no frame decoded (expected {total})")
        have = sorted(frames)
        extras = {}
        for name in ("latent", "text_emb"):
            if f"{name}.npy" in sample:
                try:
                    extras[name] = torch.from_numpy(np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False))
                except (ValueError, OSError, EOFError) as exc:
                    raise BadSample(f"unreadable .{name}.npy ({exc})") from None
        caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else ""
        clips = []
        for start in starts:
            # frame index, clamped to what exists (a video shorter than its metadata says)
            idx = [min(start + k * self.stride, total - 1) for k in range(self.frames)]
            idx = [i if i in frames else have[min(np.searchsorted(have, i), len(have) - 1)] for i in idx]
            clip = np.stack([frames[i] for i in idx])  # (T, H', W', 3) uint8
            if self.crop == "multiscale":
                tensor = multiscale_crop(clip, self.size, rng)  # (3, T, size, size) float32 in [0, 255]
            else:
                # (T, size, size, 3) uint8 -> (3, T, size, size) float32
                tensor = torch.from_numpy(self._crop(clip, rng)).permute(3, 0, 1, 2).contiguous().float()
            if self.flip and rng.random() < 0.5:
                tensor = tensor.flip(-1)
            tensor.mul_(self._scale).add_(self._bias)  # (x / 255 - mean) / std in place
            clips.append({"video": tensor, "key": sample.get("__key__", ""), "caption": caption, **extras})
        for clip in clips:  # drawn after the crops, so a clip's frames do not depend on it
            clip["sample_seed"] = int(rng.integers(0, 2**62))
        return clips

    def _crop(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _, h, w, _ = clip.shape
        s = self.size
        if self.crop == "center":
            top, left = (h - s) // 2, (w - s) // 2
        else:
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return np.ascontiguousarray(clip[:, top : top + s, left : left + s])

    def make_item(self, pieces: list[Sequence], size: int) -> dict:
        return pieces[0][0]

    def collate(self, items: list[dict]) -> dict:
        batch = {
            "video": torch.stack([c["video"] for c in items]),  # (mbs, 3, T, size, size)
            "key": [c["key"] for c in items],
            "caption": [c["caption"] for c in items],
            "sample_seed": torch.tensor([c["sample_seed"] for c in items], dtype=torch.int64),
        }
        for name in ("latent", "text_emb"):
            values = [c.get(name) for c in items]
            if all(v is not None for v in values) and len({tuple(v.shape) for v in values}) == 1:
                batch[name] = torch.stack(values)
        return batch

    def fingerprint(self) -> dict:
        return {
            "kind": "video",
            "frames": self.frames,
            "stride": self.stride,
            "size": self.size,
            "crop": self.crop,
            "clips": self.clips,
            **({"flip": True} if self.flip else {}),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    @classmethod
    def from_config(cls, cfg) -> VideoPipeline:
        d = cfg.data
        return cls(
            frames=d.video_frames,
            stride=d.video_stride,
            size=d.video_size,
            crop=d.video_crop,
            clips=d.video_clips,
            flip=d.video_flip,
        )


# --------------------------------------------------------------------------- synthetic videos


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "magenta": (210, 50, 200),
}


def default_codec() -> str:
    """libx264 when this PyAV build can encode it, else mpeg4."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # noqa: BLE001 - PyAV raises different types across builds
        return "mpeg4"


def moving_shapes(seed: int, *, frames: int = 32, width: int = 64, height: int = 64) -> tuple[np.ndarray, str]:
    """Frames (T, H, W, 3) uint8 of 1-3 coloured squares and discs moving (and bouncing) over a grey
    gradient, and a caption naming the shapes and their directions; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = (90 + 60 * xx / max(width - 1, 1))[..., None].repeat(3, axis=2).astype(np.float32)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        kind = "square" if rng.random() < 0.5 else "disc"
        r = float(rng.uniform(0.08, 0.18) * min(width, height))
        pos = rng.uniform([r, r], [width - r, height - r])
        vel = rng.uniform(-1, 1, size=2) * min(width, height) / 12
        shapes.append((colour, kind, r, pos, vel))
    caption = " and ".join(
        f"a {c} {k} moving {'right' if v[0] > 0 else 'left'} and {'down' if v[1] > 0 else 'up'}"
        for c, k, _, _, v in shapes
    )
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        image = background.copy()
        for colour, kind, r, pos, vel in shapes:
            p = pos + vel * t
            for axis, limit in ((0, width), (1, height)):  # bounce off the walls
                span = limit - 2 * r
                q = (p[axis] - r) % (2 * span)
                p[axis] = r + (q if q <= span else 2 * span - q)
            if kind == "square":
                mask = (abs(xx - p[0]) <= r) & (abs(yy - p[1]) <= r)
            else:
                mask = (xx - p[0]) ** 2 + (yy - p[1]) ** 2 <= r * r
            image[mask] = COLOURS[colour]
        video[t] = image.astype(np.uint8)
    return video, caption


def synthetic_video(
    seed: int, *, frames: int = 32, width: int = 64, height: int = 64, fps: int = 8, codec: str | None = None
) -> tuple[bytes, str]:
    """An mp4 of :func:`moving_shapes`: (mp4 bytes, caption). Width and height are rounded up to
    even numbers (yuv420p)."""
    width, height = width + width % 2, height + height % 2
    video, caption = moving_shapes(seed, frames=frames, width=width, height=height)
    return encode_mp4(video, fps=fps, codec=codec), caption


def _encode_frames(frames: np.ndarray, container: str, codec: str, pix_fmt: str, fps: float, options: dict) -> bytes:
    """Frames (T, H, W, 3) uint8 through one PyAV encoder into an in-memory container."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.options = options
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")


def encode_mp4(frames: np.ndarray, *, fps: float = 25, codec: str | None = None, crf: int = 18) -> bytes:
    """Frames (T, H, W, 3) uint8 -> mp4 bytes (PyAV; yuv420p, so an odd width or height is
    padded by one edge pixel)."""
    _check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    codec = codec or default_codec()
    options = {"preset": "ultrafast", "crf": str(crf)} if codec == "libx264" else {}
    return _encode_frames(frames, "mp4", codec, "yuv420p", fps, options)


def encode_gif(frames: np.ndarray, *, fps: float = 8) -> bytes:
    """Frames (T, H, W, 3) uint8 -> an animated GIF (PyAV; 8-bit palette), the picture format
    TensorBoard animates."""
    _check_frames(frames)
    return _encode_frames(frames, "gif", "gif", "rgb8", fps, {})


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """A clip [3, T, H, W] in [-1, 1] -> frames (T, H, W, 3) uint8 (values outside clipped)."""
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy()


SYNTHETIC_VIDEOS = "synthetic:videos"
"""``data.corpus`` of the in-memory moving-shapes clips (:class:`SyntheticClipSampler`)."""


def video_batches(cfg, topo, run_dir, pipeline: VideoPipeline):
    """(training, validation) batch sources of a video family: the video shards of ``data.shards``
    / ``data.valid_shards`` through ``pipeline``, or with ``data.corpus=synthetic:videos``
    moving-shape clips drawn in memory with the pipeline's normalisation
    (``data.synthetic_samples`` videos; validation on others, when ``eval.interval`` is set)."""
    from fmtrain.config import ConfigError
    from fmtrain.data.stream import stream_loaders

    d, t = cfg.data, cfg.train
    if d.shards:
        return stream_loaders(cfg, pipeline, topo, run_dir)
    if d.corpus != SYNTHETIC_VIDEOS:
        raise ConfigError(
            f"data.corpus={d.corpus!r}: model.family={cfg.model.family} trains on videos: set "
            f"data.shards to video shards (fmtrain data shard video), or data.corpus={SYNTHETIC_VIDEOS}"
        )
    common = dict(
        frames=d.video_frames,
        size=d.video_size,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_size=topo.dp,
        seed=cfg.run.seed,
        mean=pipeline.mean.flatten().tolist(),
        std=pipeline.std.flatten().tolist(),
    )
    train = SyntheticClipSampler(samples=d.synthetic_samples, tag=0, **common)
    valid = SyntheticClipSampler(samples=d.synthetic_samples, tag=1, **common) if cfg.eval.interval else None
    return train, valid


class SyntheticClipSampler:
    """Clips [3, T, S, S] of :func:`moving_shapes` videos, normalised ``(x / 255 - mean) / std``
    (default: to [-1, 1]), drawn as a stateless function of (seed, step, global microbatch):
    microbatch ``g`` of a step is DP rank ``g // n``'s ``g % n``-th (n per rank), so the global
    batch is the same at every data-parallel size. ``samples`` distinct videos cycle in a
    per-epoch order; ``tag`` separates a validation set's videos."""

    def __init__(
        self,
        *,
        samples: int,
        frames: int,
        size: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        seed: int,
        tag: int = 0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        from fmtrain.config import microbatches_per_rank

        self.samples, self.frames, self.size, self.seed, self.tag = samples, frames, size, seed, tag
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.num_microbatches = microbatches_per_rank(global_batch_size, micro_batch_size, dp_size)

    def video_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.tag * 7_919 + index) % 2**31

    def clip(self, index: int) -> torch.Tensor:
        frames, _ = moving_shapes(self.video_seed(index), frames=self.frames, width=self.size, height=self.size)
        return (torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(255.0) - self.mean) / self.std

    def microbatches(self, global_step: int, dp_rank: int) -> list[dict]:
        out = []
        for i in range(self.num_microbatches):
            first = global_step * self.global_batch_size + (dp_rank * self.num_microbatches + i) * self.micro_batch_size
            positions = range(first, first + self.micro_batch_size)
            indices = [self._index(p) for p in positions]
            out.append(
                {
                    "video": torch.stack([self.clip(k) for k in indices]),
                    "key": [f"synthetic-{self.tag}-{k}" for k in indices],
                    "sample_seed": torch.tensor(
                        [self.video_seed(k) * 31 + p for k, p in zip(indices, positions)], dtype=torch.int64
                    ),
                }
            )
        return out

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.samples)
        order = np.random.default_rng([self.seed, self.tag, epoch]).permutation(self.samples)
        return int(order[offset])


__all__ = [
    "SYNTHETIC_VIDEOS",
    "video_batches",
    "multiscale_crop",
    "SyntheticClipSampler",
    "moving_shapes",
    "VIDEO_EXTENSIONS",
    "read_captions",
    "write_video_shards",
    "VideoPipeline",
    "probe_video",
    "decode_frames",
    "synthetic_video",
    "encode_mp4",
    "encode_gif",
    "to_uint8_frames",
    "default_codec",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
