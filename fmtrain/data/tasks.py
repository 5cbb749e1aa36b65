"""In-context task data (LaVin-DiT): pixel task shards, their latents, synthetic latent tasks.

LaVin-DiT ("LaVin-DiT: Large Vision Diffusion Transformer", Wang et al. 2024; official code
DerrickWang005/LaVin-DiT) learns vision tasks in context: a sample holds K (input, output)
example pairs of one task, a query input and the query's target output. The VAE encodes every
item on its own (an image is a one-frame clip), the DiT is conditioned on the latents of
``[in_1, out_1, ..., in_K, out_K, query]`` concatenated along time and generates the target's
latent (the official ``inference.py`` builds its condition this way from ``*_input.png`` /
``*_target.png`` prompt pairs and a query image).

Pixel task shards (index.json kind ``tasks``), one WebDataset sample per task instance::

    KEY.task.txt                 the task's name (UTF-8)
    KEY.json                     {"pairs": K, "kind": "image"|"video", "frames": F, "height": H,
                                  "width": W, ...}
    KEY.in0.png  KEY.out0.png    example pair 0 (.mp4 -- or another video container -- for clips)
    ...
    KEY.in{K-1}.png  KEY.out{K-1}.png
    KEY.query.png  KEY.target.png

Every item of a sample has one size H x W (and, for clips, F frames): the DiT lays all of
them on one latent grid, so an input and its output must show the same region. Writers:
:func:`write_manifest_task_shards` (a JSONL manifest of a user's own files) and
:func:`write_synthetic_task_shards` (tasks derived from video shards, videos or images:
:data:`PIXEL_TASKS`), both behind ``fmtrain data shard tasks``.

:class:`PixelTaskPipeline` reads them in the stream: decodes every item at
``data.task_size`` (``data.task_fit``: ``resize`` straight to the square, as the official
``inference.py`` prepares prompts, or ``center_crop``), the first ``data.task_frames`` frames of
clips, keeps the first ``data.task_pairs`` pairs, buckets by (F, S, S) and collates::

    {"context_pixels": float32 [b, 2K+1, 3, F, S, S] in [-1, 1] (in_1, out_1, ..., query),
     "target_pixels": float32 [b, 3, F, S, S], "sample_seed": int64 [b],
     "task": list[str], "key": list[str]}

Latent task shards (kind ``task_latents``; written by an encode pass through
:func:`latent_task_sample` / :func:`write_latent_task_shards`)::

    KEY.context.npy   float16/32 [C, (2K+1) f, h, w]  latents of in_1, out_1, ..., query
    KEY.target.npy    float16/32 [C, f, h, w]          latent of the target
    KEY.task.txt, KEY.json {"pairs": K, "item_frames": f}

:class:`LatentTaskPipeline` validates them (channels = ``model.in_channels``), keeps the first
``data.task_pairs`` pairs, buckets by (f, h, w) and collates::

    {"context": float32 [b, C, (2K+1) f, h, w], "target": float32 [b, C, f, h, w],
     "item_frames": f, "pairs": K, "sample_seed": int64 [b], "task": list[str], "key": list[str]}

``data.corpus=synthetic:tasks`` needs no files: :class:`SyntheticTasks` generates smooth
latent items and applies :data:`fmtrain.config.SYNTHETIC_LATENT_TASKS` to them in latent
space; :class:`TaskMicrobatchSampler` draws the latent microbatch above as a function of
(seed, step, DP rank). :func:`prepare_task_data` picks the source from the config and, for
shards, the pipeline from their index.json's kind.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fmtrain.config import SYNTHETIC_LATENT_TASKS, ConfigError, microbatches_per_rank
from fmtrain.data.latents import SEED_LIMIT, _load_npy, check_latent, shape_name
from fmtrain.data.shards import (
    INDEX_NAME,
    BadDataError,
    IndexedShardWriter,
    expand_shard_spec,
    is_local,
    iter_samples,
    keyed_samples,
    local_path,
    npy_bytes,
    progress_bar,
    resolve_shards,
    safe_key,
)
from fmtrain.data.stream import BadSample, SampleContext, _int_seed, stream_loaders
from fmtrain.data.video import VIDEO_EXTENSIONS, _resized_shape, decode_frames, encode_mp4, probe_video

log = logging.getLogger("fmtrain.data")

PIXEL_TASK_KIND = "tasks"
"""index.json ``kind`` of pixel task shards."""
LATENT_TASK_KIND = "task_latents"
"""index.json ``kind`` of latent task shards."""
SYNTHETIC_TASKS_CORPUS = "synthetic:tasks"
"""``data.corpus`` of the in-memory synthetic latent tasks."""
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")
PIXEL_TASKS = ("colorize", "flip_h", "flip_v", "deblur", "edges", "frame_prediction")
"""Synthetic pixel tasks ``fmtrain data shard tasks --synthetic`` derives from source items."""
FITS = ("resize", "center_crop")
SYNTHETIC_FPS = 8
"""Frame rate of the clips the synthetic writer encodes (the stream reads frames, not times)."""


def item_names(pairs: int) -> list[str]:
    """The members of a sample with ``pairs`` pairs, in condition order: in0, out0, ..., query, target."""
    return [f"{side}{i}" for i in range(pairs) for side in ("in", "out")] + ["query", "target"]


def _describe_item(name: str) -> str:
    if name in ("query", "target"):
        return f"the {name}"
    side, index = ("input", name[2:]) if name.startswith("in") else ("output", name[3:])
    return f"pair {index}'s {side}"


# --------------------------------------------------------------------------- pixels


def read_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 [1, H, W, 3] (converted to RGB; alpha dropped). ValueError
    when Pillow cannot decode them."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({exc})") from None
    return np.array(rgb, dtype=np.uint8)[None]  # a writable copy: torch.from_numpy warns on read-only arrays


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless, so a round trip returns the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x
    # bicubic with antialiasing: what torchvision's resize (the official preprocessing) runs
    return torch.nn.functional.interpolate(
        x, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    ).clamp_(0, 255)


def fit_frames(frames: np.ndarray, size: int, fit: str) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> float32 [3, F, size, size] in [0, 255]: ``resize`` straight to
    the square (aspect not kept), or ``center_crop`` (shorter side to ``size``, centre square).
    A frame already ``size`` x ``size`` is returned unchanged."""
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not one of {', '.join(FITS)}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    height, width = x.shape[-2:]
    if fit == "resize":
        x = _resize(x, size, size)
    else:
        new_w, new_h = _resized_shape(width, height, size)
        x = _resize(x, new_h, new_w)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top : top + size, left : left + size]
    return x.permute(1, 0, 2, 3).contiguous()


def fit_uint8(frames: np.ndarray, size: int, fit: str) -> np.ndarray:
    """:func:`fit_frames` back to uint8 frames [F, size, size, 3] (rounded)."""
    return fit_frames(frames, size, fit).round_().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def _luma(frames: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of uint8 RGB frames: float32 [F, H, W] in [0, 255]."""
    rgb = frames.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _grey3(level: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.round(level), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def greyscale(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB frames -> their BT.601 luma in all three channels (R = G = B)."""
    return _grey3(_luma(frames))


def blur_sigma(size: int) -> float:
    """The deblur task's Gaussian sigma in pixels for items of side ``size``: 1/64 of it, >= 1."""
    return max(1.0, size / 64)


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 frames [F, H, W, 3] (kernel radius ceil(3 sigma),
    mirrored borders), rounded back to uint8."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    x = frames.astype(np.float64)
    for axis in (1, 2):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="reflect")
        out = np.zeros_like(x)
        for j, weight in enumerate(kernel):
            index = [slice(None)] * x.ndim
            index[axis] = slice(j, j + n)
            out += weight * padded[tuple(index)]
        x = out
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def sobel_edges(frames: np.ndarray) -> np.ndarray:
    """The Sobel gradient magnitude of the luma of uint8 frames (replicated borders), grey in
    all three channels: |G| / 4 of luma in [0, 1], clipped to 1, so a full black-to-white step
    is white."""
    luma = np.pad(_luma(frames) / 255.0, ((0, 0), (1, 1), (1, 1)), mode="edge")
    right = luma[:, :-2, 2:] + 2 * luma[:, 1:-1, 2:] + luma[:, 2:, 2:]
    left = luma[:, :-2, :-2] + 2 * luma[:, 1:-1, :-2] + luma[:, 2:, :-2]
    below = luma[:, 2:, :-2] + 2 * luma[:, 2:, 1:-1] + luma[:, 2:, 2:]
    above = luma[:, :-2, :-2] + 2 * luma[:, :-2, 1:-1] + luma[:, :-2, 2:]
    magnitude = np.sqrt((right - left) ** 2 + (below - above) ** 2)
    return _grey3(np.clip(magnitude / 4.0, 0.0, 1.0) * 255.0)


def pixel_task_pair(task: str, clip: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) uint8 [frames, S, S, 3] of a synthetic pixel task on one source clip
    (``clip`` holds ``frames`` frames, or ``2 * frames`` for frame_prediction):

    colorize: greyscale -> colour; flip_h / flip_v: the clip -> mirrored left-right / top-bottom;
    deblur: Gaussian-blurred (:func:`blur_sigma`) -> sharp; edges: the clip -> its Sobel edge map;
    frame_prediction: the first ``frames`` frames -> the next ``frames``."""
    if task == "frame_prediction":
        if len(clip) < 2 * frames:
            raise ValueError(f"frame_prediction needs {2 * frames} frames, the source clip has {len(clip)}")
        return clip[:frames], clip[frames : 2 * frames]
    x = clip[:frames]
    if task == "colorize":
        return greyscale(x), x
    if task == "flip_h":
        return x, np.ascontiguousarray(x[:, :, ::-1])
    if task == "flip_v":
        return x, np.ascontiguousarray(x[:, ::-1])
    if task == "deblur":
        return gaussian_blur(x, blur_sigma(x.shape[2])), x
    if task == "edges":
        return x, sobel_edges(x)
    raise ValueError(f"unknown synthetic task {task!r} (known: {', '.join(PIXEL_TASKS)})")


def _media_kind(path: Path | str) -> str | None:
    ext = Path(path).suffix.lower().lstrip(".")
    return "image" if ext in IMAGE_EXTENSIONS else "video" if ext in VIDEO_EXTENSIONS else None


def _shape_text(shape: Sequence[int]) -> str:
    frames, height, width = shape
    return f"{width}x{height}" + (f" x {frames} frames" if frames != 1 else "")


# --------------------------------------------------------------------------- pixel task shards


def pixel_task_sample(
    key: str,
    task: str,
    items: Sequence[tuple[str, bytes]],
    *,
    kind: str,
    frames: int,
    height: int,
    width: int,
    meta: dict | None = None,
) -> dict:
    """The raw shard sample of one task instance: ``items`` are (extension, encoded bytes) in
    :func:`item_names` order (in0, out0, ..., query, target)."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind={kind!r} is not image or video")
    if len(items) < 4 or len(items) % 2:
        raise ValueError(f"task sample {key}: {len(items)} items; expected 2 per pair plus query and target")
    pairs = (len(items) - 2) // 2
    info = {"pairs": pairs, "kind": kind, "frames": frames, "height": height, "width": width, **(meta or {})}
    sample = {"__key__": key, "task.txt": task.encode("utf-8"), "json": json.dumps(info).encode("utf-8")}
    for name, (ext, data) in zip(item_names(pairs), items):
        sample[f"{name}.{ext}"] = data
    return sample


class _TaskShardWriter:
    """IndexedShardWriter of pixel task samples that counts tasks and item kinds for the index."""

    def __init__(self, out_dir, *, shard_size: int, max_count: int, meta: dict):
        self.writer = IndexedShardWriter(
            out_dir, kind=PIXEL_TASK_KIND, shard_size=shard_size, max_count=max_count, meta=meta
        )
        self.tasks: dict[str, int] = {}
        self.kinds: dict[str, int] = {}

    def write(self, sample: dict, task: str, kind: str) -> None:
        self.writer.write(sample)
        self.tasks[task] = self.tasks.get(task, 0) + 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def close(self, skipped: list[dict]) -> dict:
        self.writer.meta.update(tasks=self.tasks, item_kinds=self.kinds, skipped=skipped)
        return self.writer.close()


def _manifest_record(line: str, base: Path) -> tuple[str, list[Path]]:
    """(task, [in0, out0, ..., query, target] paths) of one manifest line; BadSample naming what
    is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadSample(f"not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise BadSample("expected an object {task, pairs, query, target}")
    task, pairs = record.get("task"), record.get("pairs")
    if not isinstance(task, str) or not task.strip():
        raise BadSample("'task' must be a non-empty string")
    if not isinstance(pairs, list) or not pairs:
        raise BadSample("'pairs' must be a non-empty list of [input, output] paths")
    names = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise BadSample(f"pairs[{i}] must be [input path, output path]")
        names += pair
    for field in ("query", "target"):
        if not isinstance(record.get(field), str) or not record[field]:
            raise BadSample(f"'{field}' must be a path")
        names.append(record[field])
    return task.strip(), [p if p.is_absolute() else base / p for p in map(Path, names)]


def _manifest_items(paths: list[Path]) -> tuple[str, list[tuple[str, bytes]], tuple[int, int, int]]:
    """(kind, [(ext, bytes)], (frames, height, width)) of one manifest line's files: images
    re-encoded as RGB PNG, clips stored as they are; BadSample naming the file that fails."""
    kinds = [_media_kind(p) for p in paths]
    for path, kind in zip(paths, kinds):
        if kind is None:
            raise BadSample(
                f"{path}: unsupported file type (images: {', '.join(IMAGE_EXTENSIONS)}; "
                f"clips: {', '.join(VIDEO_EXTENSIONS)})"
            )
    if len(set(kinds)) > 1:
        first_video = paths[kinds.index("video")]
        raise BadSample(f"mixes images and clips ({paths[kinds.index('image')]}, {first_video})")
    items, shapes = [], []
    for path, kind in zip(paths, kinds):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BadSample(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            if kind == "image":
                frames = read_image(data)
                items.append(("png", encode_png(frames[0])))
                shapes.append(frames.shape[:3])
            else:
                meta = probe_video(data)
                items.append((path.suffix.lower().lstrip("."), data))
                shapes.append((meta["frames"], meta["height"], meta["width"]))
        except ValueError as exc:
            raise BadSample(f"{path}: unreadable {kind} ({exc})") from None
    for path, shape in zip(paths, shapes):
        if shape != shapes[0]:
            raise BadSample(
                f"{path} is {_shape_text(shape)}, {paths[0]} is {_shape_text(shapes[0])}: the items of one "
                "sample must share one size and frame count"
            )
    return kinds[0], items, tuple(int(s) for s in shapes[0])


def write_manifest_task_shards(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    progress: bool = True,
) -> dict:
    """A JSONL manifest -> pixel task shards (``fmtrain data shard tasks --manifest``).

    One task instance per line: ``{"task": NAME, "pairs": [[in, out], ...], "query": PATH,
    "target": PATH}``; relative paths are relative to the manifest's folder. All images (stored
    as RGB PNG) or all clips (stored as they are) per line, one size (and frame count) per
    line. A line that cannot be used (malformed, a missing or unreadable file, mixed kinds or
    sizes) is skipped with a warning naming the line and the file; the index lists it under
    ``skipped``. Returns the index."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"task manifest not found: {manifest}")
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"task manifest {manifest} is not UTF-8 ({exc.reason})") from None
    writer = _TaskShardWriter(out_dir, shard_size=shard_size, max_count=max_count, meta={"manifest": str(manifest)})
    skipped: list[dict] = []
    bar = progress_bar(f"sharding tasks into {out_dir}", total=len(lines), unit="lines", enabled=progress)
    for lineno, line in enumerate(lines, 1):
        bar.update(1)
        if not line.strip():
            continue
        try:
            task, paths = _manifest_record(line, manifest.parent)
            kind, items, (frames, height, width) = _manifest_items(paths)
        except BadSample as exc:
            log.warning("fmtrain data: warning: task manifest %s:%d skipped: %s", manifest, lineno, exc)
            skipped.append({"line": lineno, "reason": str(exc)})
            continue
        key = f"{safe_key(task)}-{lineno:09d}"
        sample = pixel_task_sample(
            key, task, items, kind=kind, frames=frames, height=height, width=width, meta={"line": lineno}
        )
        writer.write(sample, task, kind)
    bar.close()
    try:
        return writer.close(skipped)
    except BadDataError:
        raise BadDataError(
            f"no line of {manifest} could be sharded ({len(skipped)} skipped; see the warnings)"
        ) from None


# --------------------------------------------------------------------------- synthetic pixel tasks


def _source_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and _media_kind(p) is not None)


def _is_shard_spec(text: str) -> bool:
    if "::" in text or not is_local(text):
        return True
    path = local_path(text)
    if path.is_dir():
        return (path / INDEX_NAME).is_file() or any(path.glob("*.tar"))
    return path.suffix in (".tar", ".json") or "{" in text


def iter_sources(sources: Sequence[str], skipped: list[dict]) -> Iterator[tuple[str, str, bytes, dict | None]]:
    """(name, "image"|"video", encoded bytes, shard metadata or None) of every source item:
    image / video files, folders of them (recursively), or shard specs (video shards from
    ``fmtrain data shard video``, or shards of images); a shard sample with neither is skipped
    and recorded in ``skipped``."""
    for text in sources:
        if _is_shard_spec(text):
            for sample in iter_samples(resolve_shards(text)):
                name = f"{sample.get('__url__')} key {sample.get('__key__')}"
                video = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
                image = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
                if video is None and image is None:
                    reason = f"no video or image member (has {sorted(k for k in sample if not k.startswith('__'))})"
                    log.warning("fmtrain data: warning: source %s skipped: %s", name, reason)
                    skipped.append({"source": name, "reason": reason})
                    continue
                meta = None
                if video is not None and "json" in sample:
                    try:
                        meta = json.loads(sample["json"])
                    except ValueError:
                        meta = None
                kind = "video" if video is not None else "image"
                yield name, kind, sample[video or image], meta if isinstance(meta, dict) else None
            continue
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"source not found: {path}")
        files = _source_files(path) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise ValueError(
                f"source folder {path} holds no shards, images ({', '.join(IMAGE_EXTENSIONS)}) or videos "
                f"({', '.join(VIDEO_EXTENSIONS)})"
            )
        for file in files:
            kind = _media_kind(file)
            if kind is None:
                raise ValueError(f"source {file}: not an image or video file, nor shards")
            try:
                data = file.read_bytes()
            except OSError as exc:
                reason = f"cannot read ({exc.strerror or exc})"
                log.warning("fmtrain data: warning: source %s skipped: %s", file, reason)
                skipped.append({"source": str(file), "reason": reason})
                continue
            yield str(file), kind, data, None


def source_clip(
    kind: str, data: bytes, meta: dict | None, *, frames: int, want: int, size: int, fit: str, rng: np.random.Generator
) -> np.ndarray:
    """One source item as uint8 [L, size, size, 3]: an image (``frames`` must be 1), or up to
    ``want`` consecutive frames of a video from a random start (at least ``frames``).
    BadSample saying why the item cannot serve."""
    if kind == "image":
        if frames > 1:
            raise BadSample(f"an image is one frame; --frames {frames} needs video sources")
        try:
            return fit_uint8(read_image(data), size, fit)
        except ValueError as exc:
            raise BadSample(f"unreadable image ({exc})") from None
    total = meta.get("frames") if meta else None
    try:
        if not isinstance(total, int) or total < 1:
            total = probe_video(data)["frames"]
        length = min(total, want)
        if length < frames:
            raise BadSample(f"{total} frames, fewer than --frames {frames}")
        start = int(rng.integers(0, total - length + 1))
        got, decoded = decode_frames(data, range(start, start + length), None)
    except ValueError as exc:
        raise BadSample(f"undecodable video ({exc})") from None
    if len(got) < length:
        raise BadSample(f"only {decoded} of its {total} frames decode")
    return fit_uint8(np.stack([got[i] for i in range(start, start + length)]), size, fit)


def _encode_item(frames: np.ndarray) -> tuple[str, bytes]:
    if len(frames) == 1:
        return "png", encode_png(frames[0])
    return "mp4", encode_mp4(frames, fps=SYNTHETIC_FPS)


def write_synthetic_task_shards(
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    tasks: Sequence[str],
    pairs: int,
    size: int,
    frames: int = 1,
    samples: int = 0,
    seed: int = 0,
    fit: str = "center_crop",
    max_sources: int = 1024,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    progress: bool = True,
) -> dict:
    """Synthetic pixel tasks (:data:`PIXEL_TASKS`, see :func:`pixel_task_pair`) derived from
    source items -> pixel task shards (``fmtrain data shard tasks --from``).

    Up to ``max_sources`` items are read from ``sources`` (:func:`iter_sources`) into memory
    (``max_sources * frames' * size^2 * 3`` bytes, frames' = 2F with frame_prediction, else F),
    each brought to ``size`` x ``size`` by ``fit``: an image, or ``frames`` consecutive frames
    of a video from a random start (``2 * frames`` where frame_prediction can use them). Sample
    ``i`` (``samples`` of them; 0: one per source item) is task ``tasks[i % len(tasks)]``
    with ``pairs`` example pairs and the query made from ``pairs + 1`` different source items.
    Items are PNG for ``frames == 1`` and mp4 clips otherwise. Every random draw comes from
    (``seed``, source or sample index). A source that cannot serve is skipped with a warning
    naming it and listed under the index's ``skipped``. Returns the index."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in PIXEL_TASKS]
    if not tasks or unknown:
        raise ValueError(f"synthetic tasks {unknown or '(none)'}: choose from {', '.join(PIXEL_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"synthetic tasks {tasks} list one task twice")
    if min(pairs, size, frames, max_sources) < 1 or samples < 0:
        raise ValueError(
            f"pairs={pairs}, size={size}, frames={frames} and max_sources={max_sources} must be >= 1, "
            f"samples={samples} >= 0"
        )
    if frames > 1 and size % 2:
        raise ValueError(f"size={size} must be even for clips (mp4 stores yuv420p)")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not one of {', '.join(FITS)}")
    want = 2 * frames if "frame_prediction" in tasks else frames
    skipped: list[dict] = []
    names: list[str] = []
    clips: list[np.ndarray] = []
    bar = progress_bar("reading source items", unit="items", enabled=progress)
    for index, (name, kind, data, meta) in enumerate(iter_sources(sources, skipped)):
        if len(clips) >= max_sources:
            log.info("fmtrain data: read the first %d source items (--max-sources); the rest are not used", max_sources)
            break
        bar.update(1)
        rng = np.random.default_rng([seed, 0x5C0, index])
        try:
            clip = source_clip(kind, data, meta, frames=frames, want=want, size=size, fit=fit, rng=rng)
        except BadSample as exc:
            log.warning("fmtrain data: warning: source %s skipped: %s", name, exc)
            skipped.append({"source": name, "reason": str(exc)})
            continue
        names.append(name)
        clips.append(clip)
    bar.close()
    if not clips:
        raise BadDataError(f"no usable source item in {', '.join(sources)} ({len(skipped)} skipped; see the warnings)")
    pools = {t: [i for i, c in enumerate(clips) if t != "frame_prediction" or len(c) >= 2 * frames] for t in tasks}
    for task, pool in pools.items():
        if len(pool) < pairs + 1:
            why = f" with {2 * frames} frames" if task == "frame_prediction" else ""
            raise BadDataError(
                f"task {task}: {len(pool)} usable source items{why}, but a sample takes {pairs + 1} different "
                f"ones ({pairs} pairs and the query); give more sources or fewer --pairs"
            )
    count = samples or len(clips)
    kind = "image" if frames == 1 else "video"
    settings = {
        "tasks": tasks,
        "pairs": pairs,
        "size": size,
        "frames": frames,
        "fit": fit,
        "seed": seed,
        "sources": list(map(str, sources)),
        "source_items": len(clips),
    }
    writer = _TaskShardWriter(out_dir, shard_size=shard_size, max_count=max_count, meta={"synthetic": settings})
    bar = progress_bar(f"sharding tasks into {out_dir}", total=count, unit="samples", enabled=progress)
    for i in range(count):
        task = tasks[i % len(tasks)]
        pool = pools[task]
        rng = np.random.default_rng([seed, 0x7A5D, i])
        chosen = [pool[j] for j in rng.choice(len(pool), size=pairs + 1, replace=False)]
        items = []
        for j in chosen:
            items += [_encode_item(x) for x in pixel_task_pair(task, clips[j], frames)]
        key = f"{safe_key(task)}-{i:09d}"
        meta = {"sources": [names[j] for j in chosen]}
        writer.write(
            pixel_task_sample(key, task, items, kind=kind, frames=frames, height=size, width=size, meta=meta),
            task,
            kind,
        )
        bar.update(1)
    bar.close()
    return writer.close(skipped)


# --------------------------------------------------------------------------- reading pixel tasks


def _task_name(sample: dict) -> str:
    if "task.txt" not in sample:
        raise BadSample("missing field: .task.txt")
    try:
        task = sample["task.txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample(".task.txt is not UTF-8") from None
    if not task:
        raise BadSample(".task.txt is empty")
    return task


def _task_meta(sample: dict, fields: Sequence[str]) -> dict:
    """The sample's ``.json`` with positive integer ``fields``; BadSample naming the problem."""
    if "json" not in sample:
        raise BadSample("missing field: .json")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSample(f"unreadable .json ({exc})") from None
    if not isinstance(meta, dict):
        raise BadSample(".json is not an object")
    for field in fields:
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadSample(f".json field {field!r} must be a positive integer, got {value!r}")
    return meta


class _TaskPipeline:
    """What the pixel and latent task pipelines share: one item per sample, its own seed,
    bucketed by the item shape of its target (F, S, S) or (f, h, w)."""

    item_size = 1
    pad_at_epoch_end = False

    @staticmethod
    def _item(sample: dict, ctx: SampleContext, task: str, **fields) -> list[dict]:
        seed = int(ctx.rng().integers(0, SEED_LIMIT, dtype=np.int64))
        return [{**fields, "task": task, "key": sample.get("__key__", ctx.key), "sample_seed": seed}]

    def make_item(self, pieces: list[Sequence], size: int) -> dict:
        return pieces[0][0]

    def bucket_of(self, item: dict) -> tuple[int, int, int]:
        return tuple(int(s) for s in item["target"].shape[1:])


class PixelTaskPipeline(_TaskPipeline):
    """Pixel task shards -> pixel microbatches (format in the module doc); one item per sample,
    bucketed by (F, S, S) so images and clips of different lengths never share a microbatch.

    A sample is bad (skipped and counted by the stream, naming shard and key) when its
    ``.task.txt`` or ``.json`` is missing or malformed, it holds fewer than ``pairs`` pairs, a
    member the ``.json`` promises is missing, an item does not decode, its items differ in
    size or frame count, or a clip has fewer frames than ``frames`` (or, with ``frames=0``,
    other than the ``.json`` says)."""

    def __init__(self, *, pairs: int, size: int, fit: str = "resize", frames: int = 0):
        if min(pairs, size) < 1 or frames < 0:
            raise ValueError(f"pairs={pairs} and size={size} must be >= 1, frames={frames} >= 0")
        if fit not in FITS:
            raise ValueError(f"fit={fit!r} is not one of {', '.join(FITS)}")
        self.pairs, self.size, self.fit, self.frames = pairs, size, fit, frames

    @classmethod
    def from_config(cls, cfg) -> PixelTaskPipeline:
        d = cfg.data
        return cls(pairs=d.task_pairs, size=d.task_size, fit=d.task_fit, frames=d.task_frames)

    def _decode(self, name: str, ext: str, data: bytes, kind: str, stored_frames: int) -> np.ndarray:
        field = f".{name}.{ext}"
        if kind == "image":
            try:
                return read_image(data)
            except ValueError as exc:
                raise BadSample(f"unreadable {field} ({exc})") from None
        need = self.frames or stored_frames
        # one frame past the .json's count shows a clip longer than it says
        wanted = range(need + 1) if self.frames == 0 else range(need)
        try:
            got, decoded = decode_frames(data, wanted, None)
        except ValueError as exc:
            raise BadSample(f"undecodable {field} ({exc})") from None
        if self.frames == 0 and decoded != stored_frames:
            count = f"more than {stored_frames}" if decoded > stored_frames else str(decoded)
            raise BadSample(f"{field} has {count} frames, the .json says {stored_frames}")
        if decoded < need or len(got) < need:
            raise BadSample(f"{field} has {decoded} frames, data.task_frames={self.frames} needs {need}")
        return np.stack([got[i] for i in range(need)])

    def units(self, sample: dict, ctx: SampleContext) -> list[dict]:
        task = _task_name(sample)
        meta = _task_meta(sample, ("pairs", "frames"))
        kind, stored, stored_frames = meta.get("kind"), meta["pairs"], meta["frames"]
        if kind not in ("image", "video"):
            raise BadSample(f".json kind must be 'image' or 'video', got {kind!r}")
        if kind == "image" and stored_frames != 1:
            raise BadSample(f".json says kind image with {stored_frames} frames")
        if stored < self.pairs:
            raise BadSample(f"holds {stored} example pairs, data.task_pairs={self.pairs}")
        if kind == "video" and self.frames > stored_frames:
            raise BadSample(f"clips of {stored_frames} frames, data.task_frames={self.frames}")
        extensions = IMAGE_EXTENSIONS if kind == "image" else VIDEO_EXTENSIONS
        members: dict[str, str] = {}
        for name in item_names(stored):
            ext = next((e for e in extensions if f"{name}.{e}" in sample), None)
            if ext is None:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise BadSample(
                    f"missing {_describe_item(name)}: no .{name}.{extensions[0]} (the .json says {stored} pairs "
                    f"of {kind}s; has {fields})"
                )
            members[name] = ext
        used = item_names(self.pairs)
        decoded = {
            name: self._decode(name, members[name], sample[f"{name}.{members[name]}"], kind, stored_frames)
            for name in used
        }
        first = used[0]
        for name in used[1:]:
            if decoded[name].shape != decoded[first].shape:
                raise BadSample(
                    f".{name}.{members[name]} is {_shape_text(decoded[name].shape[:3])}, "
                    f".{first}.{members[first]} is {_shape_text(decoded[first].shape[:3])}: the items of a sample "
                    "must share one size and frame count"
                )
        pixels = [fit_frames(decoded[name], self.size, self.fit).div_(127.5).sub_(1.0) for name in used]
        # context: (2K+1, 3, F, S, S), in_1, out_1, ..., query
        return self._item(sample, ctx, task, context=torch.stack(pixels[:-1]), target=pixels[-1])

    def collate(self, items: list[dict]) -> dict:
        return collate_pixel_tasks(items)

    def fingerprint(self) -> dict:
        return {
            "kind": "pixel_tasks",
            "pairs": self.pairs,
            "size": self.size,
            "fit": self.fit,
            "frames": self.frames,
            "bucketing": "item_shape",
        }


def collate_pixel_tasks(items: Sequence[dict]) -> dict:
    """Pixel task items of one shape -> a pixel microbatch (format in the module doc)."""
    shapes = sorted({tuple(item["context"].shape) for item in items})
    if len(shapes) != 1:
        raise ValueError(f"one microbatch must hold one item shape, got {shapes} (keys {[i['key'] for i in items]})")
    return {
        "context_pixels": torch.stack([item["context"] for item in items]),
        "target_pixels": torch.stack([item["target"] for item in items]),
        "sample_seed": torch.tensor([int(item["sample_seed"]) for item in items], dtype=torch.int64),
        "task": [str(item["task"]) for item in items],
        "key": [str(item["key"]) for item in items],
    }


# --------------------------------------------------------------------------- latent task shards


def check_task_latents(
    context: np.ndarray,
    target: np.ndarray,
    *,
    pairs: int,
    item_frames: int,
    in_channels: int | None = None,
    patch_size: int = 1,
) -> None:
    """A latent task sample's arrays against its ``pairs`` and ``item_frames``: float, finite,
    4-D, context [C, (2K+1) f, h, w] and target [C, f, h, w] (C = ``in_channels`` when given,
    h and w divisible by ``patch_size``); BadSample naming the problem."""
    check_latent(context, in_channels=in_channels, patch_size=patch_size, name=".context.npy")
    check_latent(target, in_channels=in_channels, patch_size=patch_size, name=".target.npy")
    frames = (2 * pairs + 1) * item_frames
    if context.shape[1] != frames:
        raise BadSample(
            f".context.npy has {context.shape[1]} frames; the .json's pairs={pairs} and item_frames={item_frames} "
            f"make (2 x {pairs} + 1) x {item_frames} = {frames}"
        )
    if target.shape[1] != item_frames:
        raise BadSample(f".target.npy has {target.shape[1]} frames, the .json's item_frames={item_frames}")
    if context.shape[0] != target.shape[0] or context.shape[2:] != target.shape[2:]:
        raise BadSample(
            f".target.npy is {tuple(target.shape)}, .context.npy {tuple(context.shape)}: channels and "
            "spatial size must agree"
        )


def latent_task_sample(
    key: str,
    *,
    context: np.ndarray,
    target: np.ndarray,
    task: str,
    pairs: int,
    item_frames: int,
    meta: dict | None = None,
) -> dict:
    """The raw shard sample of one encoded task instance (``KEY.context.npy``, ``KEY.target.npy``,
    ``KEY.task.txt``, ``KEY.json``), checked by :func:`check_task_latents` (ValueError naming
    ``key``). Arrays are stored in their own dtype (float16 or float32)."""
    try:
        check_task_latents(np.asarray(context), np.asarray(target), pairs=pairs, item_frames=item_frames)
    except BadSample as exc:
        raise ValueError(f"latent task sample {key}: {exc}") from None
    if not task:
        raise ValueError(f"latent task sample {key}: empty task name")
    info = {"pairs": int(pairs), "item_frames": int(item_frames), **(meta or {})}
    return {
        "__key__": key,
        "context.npy": npy_bytes(np.ascontiguousarray(context)),
        "target.npy": npy_bytes(np.ascontiguousarray(target)),
        "task.txt": task.encode("utf-8"),
        "json": json.dumps(info).encode("utf-8"),
    }


def write_latent_task_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Latent task samples (dicts with ``context``, ``target``, ``task``, ``pairs``,
    ``item_frames``, optional ``key``) -> latent task shards with index.json (kind
    ``task_latents``; ``tasks`` and ``shapes`` count the samples per task and per
    context shape C x T x h x w). Returns the index."""
    writer = IndexedShardWriter(
        out_dir, kind=LATENT_TASK_KIND, shard_size=shard_size, max_count=max_count, meta=dict(meta or {})
    )
    tasks: dict[str, int] = {}
    shapes: dict[str, int] = {}
    bar = progress_bar(f"sharding latent tasks into {out_dir}", unit="samples", enabled=progress)
    for key, sample in keyed_samples(samples, "task"):
        writer.write(
            latent_task_sample(
                key,
                context=sample["context"],
                target=sample["target"],
                task=str(sample["task"]),
                pairs=int(sample["pairs"]),
                item_frames=int(sample["item_frames"]),
            )
        )
        tasks[str(sample["task"])] = tasks.get(str(sample["task"]), 0) + 1
        name = shape_name(np.shape(sample["context"]))
        shapes[name] = shapes.get(name, 0) + 1
        bar.update(1)
    bar.close()
    writer.meta.update(tasks=tasks, shapes=shapes)
    return writer.close()


class LatentTaskPipeline(_TaskPipeline):
    """Latent task shards -> latent microbatches (format in the module doc); bucketed by the
    item latent shape (f, h, w). A stored sample with more than ``pairs`` pairs keeps its first
    ``pairs`` and the query; one with fewer, or failing :func:`check_task_latents` (channels =
    ``in_channels``), is bad."""

    def __init__(self, *, in_channels: int, pairs: int, patch_size: int = 1):
        if min(in_channels, pairs, patch_size) < 1:
            raise ValueError(f"in_channels={in_channels}, pairs={pairs} and patch_size={patch_size} must be >= 1")
        self.in_channels, self.pairs, self.patch_size = in_channels, pairs, patch_size

    @classmethod
    def from_config(cls, cfg) -> LatentTaskPipeline:
        return cls(
            in_channels=cfg.model.in_channels,
            pairs=cfg.data.task_pairs,
            patch_size=getattr(cfg.model, "patch_size", 1),
        )

    def units(self, sample: dict, ctx: SampleContext) -> list[dict]:
        missing = [f for f in ("context.npy", "target.npy") if f not in sample]
        if missing:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"missing field: {', '.join('.' + f for f in missing)} (has {fields or 'nothing'})")
        task = _task_name(sample)
        meta = _task_meta(sample, ("pairs", "item_frames"))
        pairs, frames = meta["pairs"], meta["item_frames"]
        context, target = _load_npy(sample, "context.npy"), _load_npy(sample, "target.npy")
        check_task_latents(
            context, target, pairs=pairs, item_frames=frames, in_channels=self.in_channels, patch_size=self.patch_size
        )
        if pairs < self.pairs:
            raise BadSample(f"holds {pairs} example pairs, data.task_pairs={self.pairs}")
        if pairs > self.pairs:
            context = np.concatenate([context[:, : 2 * self.pairs * frames], context[:, -frames:]], axis=1)
        return self._item(sample, ctx, task, context=context, target=target, item_frames=frames, pairs=self.pairs)

    def collate(self, items: list[dict]) -> dict:
        return collate_latent_tasks(items)

    def fingerprint(self) -> dict:
        return {
            "kind": "latent_tasks",
            "in_channels": self.in_channels,
            "pairs": self.pairs,
            "patch_size": self.patch_size,
            "bucketing": "item_shape",
        }


def collate_latent_tasks(items: Sequence[dict]) -> dict:
    """Latent task items of one shape, pair count and item length -> a latent microbatch."""
    layouts = sorted(
        {(tuple(i["context"].shape), tuple(i["target"].shape), int(i["item_frames"]), int(i["pairs"])) for i in items}
    )
    if len(layouts) != 1:
        raise ValueError(
            "one microbatch must hold one (context shape, target shape, item_frames, pairs), got "
            f"{layouts} (keys {[i['key'] for i in items]})"
        )
    return {
        "context": torch.from_numpy(np.stack([np.asarray(i["context"], dtype=np.float32) for i in items])),
        "target": torch.from_numpy(np.stack([np.asarray(i["target"], dtype=np.float32) for i in items])),
        "item_frames": layouts[0][2],
        "pairs": layouts[0][3],
        "sample_seed": torch.tensor([int(i["sample_seed"]) for i in items], dtype=torch.int64),
        "task": [str(i["task"]) for i in items],
        "key": [str(i["key"]) for i in items],
    }


# --------------------------------------------------------------------------- a prompt for sampling


def task_dir_pairs(task_dir: str | Path) -> list[tuple[Path, Path]]:
    """The example pairs of a task folder as LaVin-DiT's ``inference.py`` reads its templates:
    ``NAME_input.EXT`` beside ``NAME_target.EXT`` (images or clips), sorted by NAME; ValueError
    naming the folder when a pair is incomplete or there is none."""
    folder = Path(task_dir)
    if not folder.is_dir():
        raise ValueError(f"task folder {folder}: no such directory")
    inputs, targets = {}, {}
    for path in sorted(folder.iterdir()):
        stem, _, role = path.stem.rpartition("_")
        if _media_kind(path) is not None and role in ("input", "target") and stem:
            (inputs if role == "input" else targets)[stem] = path
    unpaired = sorted(set(inputs) ^ set(targets))
    if unpaired:
        raise ValueError(f"task folder {folder}: {unpaired[0]!r} has an _input without a _target or the reverse")
    if not inputs:
        raise ValueError(f"task folder {folder}: no NAME_input.EXT / NAME_target.EXT pairs")
    return [(inputs[name], targets[name]) for name in sorted(inputs)]


def prompt_pixels(
    pairs: Sequence[tuple[Path, Path]], query: str | Path, *, size: int, fit: str = "resize", frames: int = 0
) -> torch.Tensor:
    """A sampling prompt's pixels: the example pairs' inputs and outputs, then the query, each
    brought to ``size`` x ``size`` as training brings them (``frames`` of each clip; 0: all,
    which must agree): [2K+1, 3, F, size, size] in [-1, 1]. ValueError naming a file that cannot be
    read or whose shape differs."""
    paths = [p for pair in pairs for p in pair] + [Path(query)]
    items = []
    for path in paths:
        kind = _media_kind(path)
        try:
            data = path.read_bytes()
            if kind == "image":
                decoded = read_image(data)
            elif kind == "video":
                wanted = range(frames) if frames else range(probe_video(data)["frames"])
                got, _ = decode_frames(data, wanted, None)
                decoded = np.stack([got[i] for i in wanted])
            else:
                raise ValueError("not an image or a clip")
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: cannot read it ({exc})") from None
        items.append((path, fit_frames(decoded, size, fit).div_(127.5).sub_(1.0)))
    first_path, first = items[0]
    for path, item in items[1:]:
        if item.shape != first.shape:
            raise ValueError(
                f"{path} gives {tuple(item.shape)}, {first_path} {tuple(first.shape)}: a prompt's items share one "
                "frame count"
            )
    return torch.stack([item for _, item in items])


# --------------------------------------------------------------------------- pixels -> latents


def encode_task_pixels(context: torch.Tensor, target: torch.Tensor, encode: Callable):
    """One sample's pixels (``context`` [2K+1, 3, F, S, S]: in_1, out_1, ..., query; ``target``
    [3, F, S, S]) -> its latents (context [C, (2K+1) f, h, w] concatenated along time, target
    [C, f, h, w]). ``encode(items)`` maps [N, 3, F, S, S] to [N, C, f, h, w] (torch or numpy): every
    item is encoded on its own, as LaVin-DiT's ``inference.py`` encodes each image."""
    latents = encode(torch.cat([context, target[None]]))
    pieces = list(latents[:-1])
    joined = np.concatenate(pieces, axis=1) if isinstance(latents, np.ndarray) else torch.cat(pieces, dim=1)
    return joined, latents[-1]


def latents_from_pixel_tasks(batch: dict, encode_sample: Callable) -> dict:
    """A pixel microbatch -> the latent microbatch of the same samples (a latent one is returned as
    it is). ``encode_sample(items, sample_seed)`` encodes one sample's items, so each sample's
    posterior noise comes from its own seed whatever microbatch it is in."""
    if "context_pixels" not in batch:
        return batch
    pairs = (batch["context_pixels"].shape[1] - 1) // 2
    encoded = [
        encode_task_pixels(context, target, lambda items, seed=int(seed): encode_sample(items, seed))
        for context, target, seed in zip(batch["context_pixels"], batch["target_pixels"], batch["sample_seed"])
    ]
    contexts = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c, _ in encoded])
    targets = torch.stack([torch.as_tensor(t, dtype=torch.float32) for _, t in encoded])
    return {
        "context": contexts,
        "target": targets,
        "item_frames": targets.shape[2],
        "pairs": pairs,
        "sample_seed": batch["sample_seed"],
        "task": batch["task"],
        "key": batch["key"],
    }


# --------------------------------------------------------------------------- synthetic latent tasks


def apply_latent_task(task: str, x: np.ndarray) -> np.ndarray:
    """One of :data:`fmtrain.config.SYNTHETIC_LATENT_TASKS` on a latent [C, T, h, w]: flip_h
    (mirror w), flip_v (mirror h), negate, transpose (swap h and w; needs h = w), channel_roll
    (channel c takes channel c - 1's values), raise / lower (every value + / - 1, a latent
    "brighten" and "darken"). negate, channel_roll, raise and lower act on each position alone,
    the flips and transpose move values across positions."""
    if task == "flip_h":
        return np.ascontiguousarray(x[..., ::-1])
    if task == "flip_v":
        return np.ascontiguousarray(x[..., ::-1, :])
    if task == "negate":
        return -x
    if task == "transpose":
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"transpose needs square latents, got {x.shape[-2]}x{x.shape[-1]}")
        return np.ascontiguousarray(np.swapaxes(x, -1, -2))
    if task == "channel_roll":
        return np.ascontiguousarray(np.roll(x, 1, axis=0))
    if task in ("raise", "lower"):
        return x + (1.0 if task == "raise" else -1.0)
    raise ValueError(f"unknown latent task {task!r} (known: {', '.join(SYNTHETIC_LATENT_TASKS)})")


def task_latent_items(count: int, channels: int, size: int, seed: int, *, components: int = 4) -> np.ndarray:
    """``count`` structured latent items, float32 [count, channels, 1, size, size].

    Channel c of item k is ``sum_j a_j cos(2 pi f_j h' + p_j) cos(2 pi g_j w' + q_j)`` with
    frequencies f, g in {1, 2} over cell centres (h' = (h + 0.5) / size), plus a random ramp
    along each axis, scaled to unit RMS; parameters depend on (seed, k) only. Smooth, and
    without the symmetry a flip or transpose would keep: no constant components (frequency 0)
    and random phases and ramps."""
    if min(count, channels, size) < 1:
        raise ValueError(f"count={count}, channels={channels} and size={size} must be >= 1")
    grid = (np.arange(size) + 0.5) / size
    ramp = 2 * grid - 1
    out = np.empty((count, channels, 1, size, size), dtype=np.float32)
    for k in range(count):
        rng = np.random.default_rng([seed, 0x17E4, k])
        freq = rng.integers(1, 3, size=(2, channels, components))
        phase = rng.uniform(0, 2 * np.pi, size=(2, channels, components))
        amp = rng.standard_normal((channels, components))
        slope = rng.standard_normal((2, channels))
        wave_h = np.cos(2 * np.pi * freq[0, ..., None] * grid + phase[0, ..., None])  # (C, J, h)
        wave_w = np.cos(2 * np.pi * freq[1, ..., None] * grid + phase[1, ..., None])
        field = np.einsum("cj,cjh,cjw->chw", amp, wave_h, wave_w)
        field += slope[0, :, None, None] * ramp[:, None] + slope[1, :, None, None] * ramp[None, :]
        rms = np.sqrt(np.mean(field**2, axis=(1, 2), keepdims=True))
        out[k, :, 0] = field / np.maximum(rms, 1e-6)
    return out


SPLITS = {"train": 0, "valid": 1}


class SyntheticTasks:
    """In-memory in-context tasks on latents (``data.corpus=synthetic:tasks``).

    ``items`` latent items (:func:`task_latent_items`); ``valid_items`` of them (default 1/8,
    at least 1, chosen from the seed) are held out: they are the queries of the validation
    split and appear nowhere in training. A training sample takes ``pairs + 1`` different
    training items (examples, then the query); a validation sample a held-out query and
    ``pairs`` training items as examples. Sample ``i`` of a split is a pure function of
    (seed, split, i): its task (one of ``tasks``), items and ``sample_seed``."""

    def __init__(
        self,
        *,
        items: int,
        channels: int,
        size: int,
        tasks: Sequence[str],
        pairs: int,
        seed: int,
        valid_items: int | None = None,
    ):
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in SYNTHETIC_LATENT_TASKS]
        if not tasks or unknown:
            raise ValueError(f"tasks {unknown or '(none)'}: choose from {', '.join(SYNTHETIC_LATENT_TASKS)}")
        if pairs < 1:
            raise ValueError(f"pairs={pairs} must be >= 1")
        held = max(1, math.ceil(items / 8)) if valid_items is None else valid_items
        if not 1 <= held < items or items - held < pairs + 1:
            raise ValueError(
                f"{items} items with {held} held out for validation leave {items - held} for training; a sample "
                f"takes pairs + 1 = {pairs + 1} different ones"
            )
        self.tasks, self.pairs, self.seed = tasks, pairs, seed
        self.items = task_latent_items(items, channels, size, seed)
        order = np.random.default_rng([seed, 0x7A5E]).permutation(items)
        self.valid_queries = sorted(int(i) for i in order[:held])
        """Held-out items: the validation queries."""
        self.train_items = sorted(int(i) for i in order[held:])
        """Items training samples are made of (examples and queries)."""

    @classmethod
    def from_config(cls, cfg) -> SyntheticTasks:
        d = cfg.data
        try:
            return cls(
                items=d.synthetic_samples,
                channels=cfg.model.in_channels,
                size=d.task_latent_size,
                tasks=d.synthetic_tasks,
                pairs=d.task_pairs,
                seed=cfg.run.seed,
            )
        except ValueError as exc:
            raise ConfigError(
                f"data.corpus={SYNTHETIC_TASKS_CORPUS} (data.synthetic_samples, data.task_pairs, "
                f"data.synthetic_tasks): {exc}"
            ) from None

    def sample(self, query: int, task: str, examples: Sequence[int], *, key: str = "", sample_seed: int = 0) -> dict:
        """The latent task item for ``query`` with ``examples`` as example inputs, all under
        ``task``: context = [e_1, task(e_1), ..., e_K, task(e_K), query] along time, target =
        task(query). Any items and any known task (a test may pair a held-out query with
        examples of either task)."""
        indices = [*map(int, examples), int(query)]
        for i in indices:
            if not 0 <= i < len(self.items):
                raise ValueError(f"item {i} is not in [0, {len(self.items)})")
        if len(set(indices)) != len(indices):
            raise ValueError(f"examples {list(examples)} and query {query} must be different items")
        frames = []
        for i in indices[:-1]:
            frames += [self.items[i], apply_latent_task(task, self.items[i])]
        frames.append(self.items[indices[-1]])
        return {
            "context": np.concatenate(frames, axis=1),
            "target": apply_latent_task(task, self.items[indices[-1]]),
            "item_frames": 1,
            "pairs": len(indices) - 1,
            "task": task,
            "key": key or f"{task}-q{indices[-1]}-" + "-".join(map(str, indices[:-1])),
            "sample_seed": int(sample_seed),
        }

    def draw(self, index: int, split: str = "train") -> dict:
        """Sample ``index`` of ``split`` ("train" or "valid")."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        tag = SPLITS[split]
        rng = np.random.default_rng([self.seed, 0x7A5B, tag, index])
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        pool = self.train_items
        if split == "train":
            picked = [pool[j] for j in rng.choice(len(pool), size=self.pairs + 1, replace=False)]
            examples, query = picked[:-1], picked[-1]
        else:
            query = self.valid_queries[int(rng.integers(len(self.valid_queries)))]
            examples = [pool[j] for j in rng.choice(len(pool), size=self.pairs, replace=False)]
        seed = _int_seed(self.seed, tag, index, 5) % SEED_LIMIT
        return self.sample(query, task, examples, key=f"{split}-{index:09d}", sample_seed=seed)


class TaskMicrobatchSampler:
    """Latent microbatches of a :class:`SyntheticTasks` split as a stateless function of (step,
    DP rank): microbatch ``i`` of rank ``r`` at step ``g`` holds samples ``g * GBS + (r * n + i)
    * mbs + j`` (n microbatches per rank), so the global batch is the same at every DP size."""

    def __init__(self, tasks: SyntheticTasks, split: str, global_batch_size: int, micro_batch_size: int, dp_size: int):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        self.tasks, self.split = tasks, split
        self.global_batch_size, self.micro_batch_size, self.dp_size = global_batch_size, micro_batch_size, dp_size
        self.num_microbatches = microbatches_per_rank(global_batch_size, micro_batch_size, dp_size)
        """Microbatches per rank per global step."""

    def sample_indices(self, global_step: int, dp_rank: int) -> list[list[int]]:
        """The split's sample indices of each of this rank's microbatches at this step."""
        if global_step < 0:
            raise ValueError(f"global_step={global_step} must be non-negative")
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={self.dp_size})")
        mbs, n = self.micro_batch_size, self.num_microbatches
        firsts = [global_step * self.global_batch_size + (dp_rank * n + i) * mbs for i in range(n)]
        return [list(range(first, first + mbs)) for first in firsts]

    def microbatches(self, global_step: int, dp_rank: int) -> list[dict]:
        """This rank's microbatches for one optimizer step (``num_microbatches`` of them)."""
        return [
            collate_latent_tasks([self.tasks.draw(i, self.split) for i in indices])
            for indices in self.sample_indices(global_step, dp_rank)
        ]


# --------------------------------------------------------------------------- from a Config


def shards_kind(spec: str, setting: str = "data.shards") -> str:
    """The ``kind`` the index.json of a shard spec names (the spec's own index, the index in
    its folder, or the one beside its first local shard); ConfigError naming ``setting`` when
    there is none to read."""
    spec = spec.strip()
    index_path = None
    if "::" not in spec and is_local(spec):
        path = local_path(spec)
        if path.is_dir():
            index_path = path / INDEX_NAME
        elif path.suffix == ".json":
            index_path = path
    if index_path is None:
        try:
            local = next((url for url in expand_shard_spec(spec) if is_local(url)), None)
        except BadDataError as exc:
            raise ConfigError(f"{setting}={spec!r}: {exc}") from None
        index_path = local_path(local).parent / INDEX_NAME if local is not None else None
    if index_path is None or not index_path.is_file():
        raise ConfigError(
            f"{setting}={spec!r}: no index.json beside the shards says whether they hold pixel tasks (kind "
            f"{PIXEL_TASK_KIND!r}) or their latents (kind {LATENT_TASK_KIND!r}); write them with `fmtrain data "
            "shard tasks` or the encode pass"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}={spec!r}: {index_path} is not a readable index ({exc})") from None
    kind = index.get("kind") if isinstance(index, dict) else None
    return kind if isinstance(kind, str) else ""


def task_pipeline(cfg, spec: str, setting: str = "data.shards") -> PixelTaskPipeline | LatentTaskPipeline:
    """The pipeline for the task shards of ``spec``, chosen by their index.json's kind."""
    kind = shards_kind(spec, setting)
    if kind == PIXEL_TASK_KIND:
        return PixelTaskPipeline.from_config(cfg)
    if kind == LATENT_TASK_KIND:
        return LatentTaskPipeline.from_config(cfg)
    raise ConfigError(
        f"{setting}={spec!r}: its index.json says kind {kind!r}; in-context task training reads pixel task shards "
        f"(kind {PIXEL_TASK_KIND!r}, fmtrain data shard tasks) or their latents (kind {LATENT_TASK_KIND!r})"
    )


def prepare_task_data(cfg, topo, run_dir: Path):
    """(train, valid or None) batch sources of an in-context task family.

    ``data.shards`` set: streaming loaders (:func:`fmtrain.data.stream.stream_loaders`) with
    :class:`PixelTaskPipeline` or :class:`LatentTaskPipeline`, as the shards' index.json kind
    says (``data.valid_shards``, when read, must be of the same kind). Otherwise
    ``data.corpus=synthetic:tasks``: :class:`TaskMicrobatchSampler` over :class:`SyntheticTasks`
    (validation on the held-out queries when ``eval.interval > 0``)."""
    d, t = cfg.data, cfg.train
    if d.shards:
        pipeline = task_pipeline(cfg, d.shards, "data.shards")
        if cfg.eval.interval and d.valid_shards:
            other = task_pipeline(cfg, d.valid_shards, "data.valid_shards")
            if type(other) is not type(pipeline):
                raise ConfigError(
                    f"data.valid_shards={d.valid_shards!r} hold {other.fingerprint()['kind']}, data.shards="
                    f"{d.shards!r} hold {pipeline.fingerprint()['kind']}: validate on shards of the same kind"
                )
        return stream_loaders(cfg, pipeline, topo, run_dir)
    if d.corpus != SYNTHETIC_TASKS_CORPUS:
        raise ConfigError(
            f"data.corpus={d.corpus!r}: model.family={cfg.model.family} trains on in-context tasks: set data.shards "
            f"to task shards (fmtrain data shard tasks, or their latents), or data.corpus={SYNTHETIC_TASKS_CORPUS} "
            "for in-memory synthetic latent tasks"
        )
    tasks = SyntheticTasks.from_config(cfg)
    try:
        train = TaskMicrobatchSampler(tasks, "train", t.global_batch_size, t.micro_batch_size, topo.dp)
        valid = TaskMicrobatchSampler(tasks, "valid", t.global_batch_size, t.micro_batch_size, topo.dp)
    except ValueError as exc:
        raise ConfigError(f"train.global_batch_size / train.micro_batch_size: {exc}") from None
    return train, valid if cfg.eval.interval else None


__all__ = [
    "PIXEL_TASK_KIND",
    "LATENT_TASK_KIND",
    "SYNTHETIC_TASKS_CORPUS",
    "IMAGE_EXTENSIONS",
    "PIXEL_TASKS",
    "item_names",
    "read_image",
    "encode_png",
    "fit_frames",
    "fit_uint8",
    "greyscale",
    "blur_sigma",
    "gaussian_blur",
    "sobel_edges",
    "pixel_task_pair",
    "pixel_task_sample",
    "write_manifest_task_shards",
    "iter_sources",
    "source_clip",
    "write_synthetic_task_shards",
    "PixelTaskPipeline",
    "collate_pixel_tasks",
    "check_task_latents",
    "latent_task_sample",
    "write_latent_task_shards",
    "LatentTaskPipeline",
    "collate_latent_tasks",
    "apply_latent_task",
    "task_latent_items",
    "SyntheticTasks",
    "TaskMicrobatchSampler",
    "shards_kind",
    "task_pipeline",
    "prepare_task_data",
    "prompt_pixels",
    "task_dir_pairs",
    "encode_task_pixels",
    "latents_from_pixel_tasks",
]
