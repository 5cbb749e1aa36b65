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
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from tqdm import tqdm
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

INDEX_NAME = "index.json"
INDEX_FORMAT = "fmtrain.shards/1"

log = logging.getLogger("fmtrain.data")


class BadDataError(RuntimeError):
    """Input data the run cannot continue with (too many bad samples, nothing to read)."""


@dataclass(frozen=True)
class Shard:
    """One shard: the URL it is opened with and its number of samples."""

    url: str
    samples: int


# --------------------------------------------------------------------------- progress


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> tqdm:
    """A progress bar on stderr for long data work (tqdm): redrawn in place on a terminal, a
    line every few seconds otherwise."""
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.2 if tty else 5.0,
        dynamic_ncols=tty,
    )


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


def check_shard_spec(spec: str) -> None:
    """Refuse, before any process starts, a spec naming no shard that exists here: BadDataError
    when it expands to nothing, or every shard it names is a local file that is missing. Remote
    shards (``pipe:``, URLs) are checked when read. Cheap: nothing is opened but an index."""
    urls = expand_shard_spec(spec)
    if not urls:
        raise BadDataError("names no shard (an empty directory, or a pattern that expands to nothing)")
    local = [url for url in urls if is_local(url)]
    if len(local) == len(urls) and not any(local_path(url).is_file() for url in local):
        more = f" and {len(urls) - 1} more" if len(urls) > 1 else ""
        raise BadDataError(f"no shard it names exists ({urls[0]}{more})")


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


# --------------------------------------------------------------------------- writing


def safe_key(text: str) -> str:
    # webdataset splits a member name at its first dot; keys must not contain one.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def keyed_samples(samples: Iterable[dict], prefix: str) -> Iterator[tuple[str, dict]]:
    """(key, sample) for a writer: each sample's ``key`` made safe (:func:`safe_key`), or
    ``PREFIX-NNNNNNNNN`` by position when it has none; a key seen before gets ``_POSITION``
    appended, so no two samples of a shard set share one."""
    seen: set[str] = set()
    for i, sample in enumerate(samples):
        key = safe_key(str(sample.get("key") or f"{prefix}-{i:09d}"))
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        yield key, sample


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
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
        write_atomic(self.out_dir / INDEX_NAME, json.dumps(index, indent=1) + "\n")
        return index


def write_index(spec: str, out: str | Path) -> dict:
    """Count the samples of existing shards and write an index for them (``fmtrain data index``)."""
    out = Path(out)
    urls = expand_shard_spec(spec)
    entries = []
    progress = progress_bar("counting", total=len(urls), unit="shards")
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
    write_atomic(out, json.dumps(index, indent=1) + "\n")
    return index


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


__all__ = [
    "BadDataError",
    "Shard",
    "keyed_samples",
    "progress_bar",
    "write_atomic",
    "npy_bytes",
    "safe_key",
    "INDEX_NAME",
    "expand_shard_spec",
    "resolve_shards",
    "check_shard_spec",
    "count_samples",
    "read_shard",
    "iter_samples",
    "IndexedShardWriter",
    "write_index",
]
