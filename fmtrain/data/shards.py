"""WebDataset shards: name them, index them, read them with bad-input accounting, write them.

A dataset is a list of POSIX tar shards in WebDataset layout: the members of one sample are
consecutive and share a key (``doc-000000017.txt``, ``doc-000000017.json``, ...). Shards are
named by anything webdataset accepts: a brace pattern (``data/shard-{000000..000127}.tar``),
several patterns joined with ``::``, local paths, ``file:`` URLs or ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/shard-000003.tar -``). A data spec may also name an index file
(``data/index.json``) or a directory holding one.

The index (``index.json``, written next to the shards by every writer here) lists the shards
with their sample counts::

    {"format": "fmtrain.shards/1", "kind": "text", "fields": ["txt"], "samples": 12345,
     "shards": [{"url": "shard-000000.tar", "samples": 4096, "bytes": 67109888}, ...]}

Counts matter: the resumable stream (:mod:`fmtrain.data.stream`) addresses samples by their
position in a shard, so it needs them before reading. Shards with no index entry are counted
by scanning their tar headers (local files) or reading them once (``pipe:``);
``fmtrain data index`` writes an index for shards made elsewhere.

Reading goes through webdataset's own tar iteration (``url_opener`` -> ``tar_file_expander``
-> ``group_by_keys``) with a handler that records the failure instead of raising; the reader
turns it into bad positions and one warning that names the shard and the last good key.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

INDEX_NAME = "index.json"
INDEX_FORMAT = "fmtrain.shards/1"
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")

log = logging.getLogger("fmtrain.data")


class BadDataError(RuntimeError):
    """Input data the run cannot continue with (too many bad samples, nothing to read)."""


@dataclass(frozen=True)
class Shard:
    """One shard: the URL it is opened with and its number of samples."""

    url: str
    samples: int


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line every few
    seconds otherwise)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0
        self.extra = ""
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self._last = time.monotonic()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.n += n
        if extra:
            self.extra = extra
        now = time.monotonic()
        if self.enabled and now - self._last >= (0.2 if self.tty else 5.0):
            self._last = now
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.n / elapsed
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            head = f"{self.desc} [{bar}] {self.n}/{self.total} {self.unit}"
        else:
            head = f"{self.desc} {self.n} {self.unit}"
        line = f"{head} {rate:.1f} {self.unit}/s {elapsed:.0f}s {self.extra}".rstrip()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)


# --------------------------------------------------------------------------- naming shards


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> Path:
    return Path(re.sub(r"^file://?", "/", url) if url.startswith("file:") else url)


def _index_shards(index_path: Path) -> tuple[dict, list[Shard]]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"{index_path}: not a readable shard index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise BadDataError(f"{index_path}: not an fmtrain shard index (expected format {INDEX_FORMAT!r})")
    shards = []
    for i, entry in enumerate(index["shards"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("url"), str)
            or not isinstance(entry.get("samples"), int)
        ):
            raise BadDataError(f"{index_path}: shards[{i}] needs a string 'url' and an integer 'samples'")
        url = entry["url"]
        if is_local(url) and not local_path(url).is_absolute():
            url = str(index_path.parent / url)
        shards.append(Shard(url, entry["samples"]))
    return index, shards


def expand_shard_spec(spec: str) -> list[str]:
    """The shard URLs a data spec names, in order (no counting, no existence checks)."""
    spec = spec.strip()
    if not spec:
        raise BadDataError("empty shard spec: set data.shards to a pattern, an index.json or a directory")
    if "::" not in spec and is_local(spec):
        path = local_path(spec)
        if path.is_dir():
            if (path / INDEX_NAME).is_file():
                return [s.url for s in _index_shards(path / INDEX_NAME)[1]]
            return [str(p) for p in sorted(path.glob("*.tar"))]
        if path.suffix == ".json":
            return [s.url for s in _index_shards(path)[1]]
    return list(expand_urls(spec))


def resolve_shards(spec: str, *, count_missing: bool = True) -> list[Shard]:
    """Shards of a data spec with their sample counts.

    Counts come from an index (the spec itself, or ``index.json`` next to local shards),
    else from scanning the shard. Local shards that do not exist are skipped with a
    warning; empty shards are kept (they yield nothing) with a warning. Raises
    :class:`BadDataError` when the spec names no shard at all.
    """
    spec = spec.strip()
    reported: set[str] = set()
    path = local_path(spec) if ("::" not in spec and is_local(spec)) else None
    if path is not None and (path.suffix == ".json" or (path.is_dir() and (path / INDEX_NAME).is_file())):
        _, shards = _index_shards(path if path.suffix == ".json" else path / INDEX_NAME)
        out = []
        for shard in shards:
            if is_local(shard.url) and not local_path(shard.url).is_file():
                log.warning("fmtrain data: warning: shard %s listed in %s does not exist; skipped", shard.url, path)
                continue
            out.append(shard)
        shards = out
    else:
        urls = expand_shard_spec(spec)
        indexes: dict[Path, dict[str, int]] = {}
        shards = []
        for url in urls:
            if is_local(url):
                p = local_path(url)
                if not p.is_file():
                    log.warning("fmtrain data: warning: shard %s does not exist; skipped", url)
                    continue
                parent = p.resolve().parent
                if parent not in indexes:
                    indexes[parent] = {}
                    if (parent / INDEX_NAME).is_file():
                        try:
                            _, listed = _index_shards(parent / INDEX_NAME)
                            indexes[parent] = {str(Path(s.url).resolve()): s.samples for s in listed if is_local(s.url)}
                        except BadDataError as exc:
                            log.warning("fmtrain data: warning: %s; counting shards instead", exc)
                known = indexes[parent].get(str(p.resolve()))
                if known is not None:
                    shards.append(Shard(url, known))
                    continue
            if not count_missing:
                raise BadDataError(f"shard {url} has no index entry")
            count, damaged = _count(url)
            shards.append(Shard(url, count))
            if damaged:
                reported.add(url)
    if not shards:
        raise BadDataError(f"shard spec {spec!r} names no readable shard")
    for shard in shards:
        if shard.samples == 0 and shard.url not in reported:
            log.warning("fmtrain data: warning: shard %s is empty (0 samples); skipped", shard.url)
    return shards


_META = re.compile(r"__[^/]*__($|/)")


def _member_key(name: str) -> str | None:
    """The sample key webdataset's grouping gives a tar member, None if it skips the member."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _META.match(name):
        return None
    prefix, _ = base_plus_ext(name)
    return prefix


def count_samples(url: str) -> int:
    """Samples in one shard, grouped exactly as :func:`read_shard` groups them.

    Local files: tar headers only (seeks over member data). Other URLs: read once.
    A damaged shard is counted up to the damage, with a warning naming it.
    """
    return _count(url)[0]


def _count(url: str) -> tuple[int, bool]:
    count, last = 0, None
    try:
        if is_local(url):
            with tarfile.open(local_path(url), "r:") as tar:
                for info in tar:
                    key = _member_key(info.name) if info.isreg() else None
                    if key is not None and key != last:
                        count, last = count + 1, key
        else:
            errors: list[BaseException] = []
            for _ in _samples(url, errors):
                count += 1
            if errors:
                raise errors[0]
    except (tarfile.TarError, OSError, ValueError) as exc:
        if isinstance(exc, tarfile.ReadError) and str(exc).startswith("empty file"):
            return 0, False
        where = f"after key {last}" if last is not None else "at its start"
        log.warning(
            "fmtrain data: warning: shard %s: unreadable %s (%s); counted %d samples", url, where, _describe(exc), count
        )
        return count, True
    return count, False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc.args[0]) if exc.args else str(exc)
    return f"{type(exc).__name__}: {text.split(' @ ')[0]}"


# --------------------------------------------------------------------------- reading


def _samples(url: str, errors: list) -> Iterator[dict]:
    """webdataset's tar iteration for one shard; failures are appended to ``errors``."""

    def stop(exn: BaseException) -> bool:  # stop this shard (the rest of it is unreadable)
        errors.append(exn)
        return False

    def skip(exn: BaseException) -> bool:  # a duplicate member inside one sample: drop it
        errors.append(exn)
        return True

    streams = url_opener([{"url": url}], handler=stop)
    files = tar_file_expander(streams, handler=stop)
    return group_by_keys(files, handler=skip)


def read_shard(
    shard: Shard,
    start: int = 0,
    stop: int | None = None,
    keep: Callable[[int], bool] | None = None,
    warn: Callable[[str], None] = lambda m: log.warning("%s", m),
) -> Iterator[tuple[int, dict | None]]:
    """``(position, sample)`` for every position in ``[start, stop)`` of ``shard``.

    ``sample`` is the raw member dict (``__key__``, ``__url__`` and one ``bytes`` value per
    extension), or None when that position cannot be read (damaged or short shard). Every
    position in the range is yielded exactly once, so positions stay aligned with the index
    even when a shard is damaged. ``keep`` filters which positions are yielded (the others
    are still read past). One warning names the shard and the last good key when the shard
    is damaged or shorter than its count.
    """
    stop = shard.samples if stop is None else min(stop, shard.samples)
    pos, last_key = 0, None
    errors: list[BaseException] = []
    samples = _samples(shard.url, errors)
    try:
        for sample in samples:
            if pos >= stop:
                break
            if pos >= start and (keep is None or keep(pos)):
                yield pos, sample
            last_key = sample.get("__key__")
            pos += 1
    finally:
        close = getattr(samples, "close", None)
        if close is not None:
            close()
    duplicates = [e for e in errors if isinstance(e, ValueError) and "duplicate file name" in str(e)]
    failures = [e for e in errors if e not in duplicates]
    for exc in duplicates[:1]:
        warn(f"fmtrain data: warning: shard {shard.url}: {_describe(exc)}; extra member dropped")
    if pos < stop:
        why = _describe(failures[0]) if failures else f"it holds {pos} samples, its count says {shard.samples}"
        where = f"after key {last_key}" if last_key is not None else "at its start"
        warn(
            f"fmtrain data: warning: shard {shard.url}: unreadable {where} ({why}); "
            f"positions {pos}..{stop - 1} skipped as bad"
        )
        for p in range(max(pos, start), stop):
            if keep is None or keep(p):
                yield p, None


def iter_samples(shards: Sequence[Shard]) -> Iterator[dict]:
    """Every readable sample of ``shards`` in order (bad positions are skipped with a warning)."""
    for shard in shards:
        for _, sample in read_shard(shard):
            if sample is not None:
                yield sample


def sample_text(sample: dict) -> str | None:
    """The ``.txt`` field of a raw sample as text, None when absent."""
    raw = sample.get("txt")
    return None if raw is None else raw.decode("utf-8")


# --------------------------------------------------------------------------- writing


def parse_size(text: str | int | float) -> int:
    """``64MB``, ``1.5GiB``, ``500k``, ``1000000`` -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (k, M, G, T; e.g. 64MB)")
    value, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " KMGT".index(unit or " "))


def _safe_key(text: str) -> str:
    # webdataset splits a member name at its first dot; keys must not contain one.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class IndexedShardWriter:
    """``webdataset.ShardWriter`` that writes ``DIR/PREFIX-NNNNNN.tar`` plus ``DIR/index.json``.

    ``shard_size`` bounds the tar file size (a shard is closed once it reaches it, so it
    exceeds it by at most one sample). Each shard is written under a temporary name
    (``.partial``) and renamed when complete; the index is
    written last (atomically), so an interrupted run never leaves an index naming a partial
    shard. Tar headers carry mtime 0, so the same input gives byte-identical shards.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        kind: str,
        shard_size: int = 64_000_000,
        max_count: int = 100_000,
        prefix: str = "shard",
        meta: dict | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists():
            (self.out_dir / INDEX_NAME).unlink()  # a rewrite: the old index must not outlive this run
        self.kind, self.prefix, self.meta = kind, prefix, meta or {}
        self.shard_size, self.max_count = shard_size, max_count
        self.shards: list[dict] = []
        self.fields: set[str] = set()
        self._writer: wds.ShardWriter | None = None

    def _opener(self, fname: str):
        return open(fname + ".partial", "wb")

    def _post(self, fname: str) -> None:
        os.replace(fname + ".partial", fname)
        assert self._writer is not None
        self.shards.append(
            {"url": Path(fname).name, "samples": self._writer.count, "bytes": Path(fname).stat().st_size}
        )

    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._writer = wds.ShardWriter(
                str(self.out_dir / f"{self.prefix}-%06d.tar"),
                maxcount=self.max_count,
                maxsize=self.shard_size,
                post=self._post,
                verbose=0,
                opener=self._opener,
                encoder=False,
                mtime=0.0,
            )
        self.fields.update(k for k in sample if not k.startswith("__"))
        self._writer.write(sample)
        # ShardWriter counts payload bytes; count what the tar file holds (headers, padding) instead
        self._writer.size = self._writer.tarstream.tarstream.offset

    @property
    def samples(self) -> int:
        done = sum(s["samples"] for s in self.shards)
        return done + (self._writer.count if self._writer is not None and self._writer.tarstream is not None else 0)

    def close(self) -> dict:
        if self._writer is None:
            raise BadDataError(f"nothing to write into {self.out_dir}: no usable input samples")
        self._writer.close()
        index = {
            "format": INDEX_FORMAT,
            "kind": self.kind,
            "fields": sorted(self.fields),
            "samples": sum(s["samples"] for s in self.shards),
            "shards": self.shards,
            **self.meta,
        }
        _write_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=1) + "\n")
        return index


def write_index(spec: str, out: str | Path) -> dict:
    """Count the samples of existing shards and write an index for them (``fmtrain data index``)."""
    out = Path(out)
    urls = expand_shard_spec(spec)
    entries = []
    progress = Progress("counting", total=len(urls), unit="shards")
    for url in urls:
        entry_url = url
        if is_local(url):
            p = local_path(url).resolve()
            if not p.is_file():
                raise BadDataError(f"shard {url} does not exist")
            try:
                entry_url = os.path.relpath(p, out.resolve().parent)
            except ValueError:
                entry_url = str(p)
        entries.append({"url": entry_url, "samples": count_samples(url)})
        progress.update(1)
    progress.close()
    index = {
        "format": INDEX_FORMAT,
        "kind": "unknown",
        "fields": [],
        "samples": sum(e["samples"] for e in entries),
        "shards": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, json.dumps(index, indent=1) + "\n")
    return index


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_text_shards(
    files: Sequence[str],
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    tokenizer: str | Path | None = None,
    documents: Iterable[tuple[str, str]] | None = None,
    progress: bool = True,
) -> dict:
    """Text files (``.txt``/``.jsonl``, optionally gzipped, or ``builtin:NAME``) -> text shards.

    One sample per document (see :func:`fmtrain.data.text.read_documents`), keyed
    ``FILESTEM-NNNNNNNNN``, holding ``.txt``, or ``.tokens.npy`` (uint16 when the vocabulary
    fits, else int32; no EOS appended) when ``tokenizer`` is given. ``documents`` replaces
    ``files`` with ready ``(key, text)`` pairs. Returns the index it wrote.
    """
    from fmtrain.data.text import load_tokenizer, read_documents

    processor = load_tokenizer(tokenizer) if tokenizer else None
    dtype = np.uint16 if processor is not None and processor.vocab_size() <= 1 << 16 else np.int32
    meta = {"source": [str(f) for f in files]}
    if processor is not None:
        meta["tokenizer"] = {
            "path": str(tokenizer),
            "vocab_size": processor.vocab_size(),
            "dtype": np.dtype(dtype).name,
        }
    writer = IndexedShardWriter(out_dir, kind="text", shard_size=shard_size, max_count=max_count, meta=meta)

    def generate() -> Iterator[tuple[str, str]]:
        stems: dict[str, int] = {}
        for number, name in enumerate(files):
            stem = _safe_key(name.split(":", 1)[1] if name.startswith("builtin:") else Path(name).name.split(".")[0])
            if stem in stems:
                stem = f"{stem}_{number}"
            stems[stem] = number
            for i, doc in enumerate(read_documents(str(name))):
                yield f"{stem}-{i:09d}", doc

    bar = Progress(f"sharding text into {out_dir}", unit="docs", enabled=progress)
    for key, doc in documents if documents is not None else generate():
        sample = {"__key__": key}
        if processor is not None:
            sample["tokens.npy"] = _npy_bytes(np.asarray(processor.encode(doc), dtype=dtype))
        else:
            sample["txt"] = doc.encode("utf-8")
        writer.write(sample)
        bar.update(1, extra=f"{len(writer.shards)} shards done")
    index = writer.close()
    bar.extra = f"{len(index['shards'])} shards, {index['samples']} samples"
    bar.close()
    return index


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
    from fmtrain.data.video import probe_video

    writer = IndexedShardWriter(out_dir, kind="video", shard_size=shard_size, max_count=max_count)
    skipped = []
    bar = Progress(f"sharding video into {out_dir}", total=len(videos), unit="videos", enabled=progress)
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
        key = _safe_key(path.stem)
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
    bar.extra = f"{len(index['shards'])} shards, {index['samples']} videos, {len(skipped)} skipped"
    bar.close()
    return index


def prepare_corpus_shards(
    corpus: str, out_dir: str | Path, *, valid_fraction: float, seed: int, shards: int = 8, progress: bool = True
) -> tuple[Path, Path | None]:
    """Train/validation text shards of a corpus, split as the in-memory path splits it
    (:func:`fmtrain.data.text.split_documents`), written once and reused: ``OUT/train/`` and
    ``OUT/valid/``, each with an index. Returns the two index paths (valid None when
    ``valid_fraction`` is 0). Used by ``fmtrain demo``."""
    from fmtrain.data.text import read_documents, split_documents

    out_dir = Path(out_dir)
    train_index, valid_index = out_dir / "train" / INDEX_NAME, out_dir / "valid" / INDEX_NAME
    if train_index.is_file() and (valid_fraction == 0 or valid_index.is_file()):
        return train_index, valid_index if valid_fraction else None
    docs = read_documents(corpus)
    train, valid = split_documents(docs, valid_fraction, seed)
    stem = _safe_key(corpus.split(":", 1)[-1])
    for name, part, count in (("train", train, shards), ("valid", valid, 1)):
        if not part:
            continue
        write_text_shards(
            [corpus],
            out_dir / name,
            max_count=math.ceil(len(part) / count),
            progress=progress,
            documents=((f"{stem}-{name}-{i:09d}", d) for i, d in enumerate(part)),
        )
    return train_index, valid_index if valid else None


__all__ = [
    "BadDataError",
    "Shard",
    "Progress",
    "INDEX_NAME",
    "expand_shard_spec",
    "resolve_shards",
    "count_samples",
    "read_shard",
    "iter_samples",
    "sample_text",
    "parse_size",
    "IndexedShardWriter",
    "write_index",
    "write_text_shards",
    "write_video_shards",
    "read_captions",
    "prepare_corpus_shards",
]
