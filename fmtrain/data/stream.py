"""The resumable WebDataset stream: shards -> (DP rank, worker) streams -> microbatches.

Layout (what each process reads)
--------------------------------
The shards are cut into *units*: a whole shard, or, when there are fewer non-empty shards
than streams, contiguous slices of one (so a tiny dataset still feeds every stream). Epoch
``e`` permutes the units with a generator seeded by (run seed, e) -- the same on every rank --
and stream ``s`` takes units ``s, s + S, s + 2S, ...`` of that order, where
``S = dp_size * num_workers`` and ``s = dp_rank + dp_size * worker``. That is exactly
webdataset's ``split_by_node`` (over the data-parallel group) followed by ``split_by_worker``
applied to the epoch's unit list. Every TP rank and PP stage of one DP replica reads the same
stream, so they all see the same batch.

Within its epoch a stream reads its units in order and shuffles samples with a buffer of
``data.shuffle_buffer`` positions. The buffer works on *positions* (0 .. L-1 over the
stream's epoch) with its own seeded generator, so the output order of epoch ``e`` of stream
``s`` is a pure function of (seed, e, s) and the sample counts in the index -- never of timing,
worker scheduling or what was read before. Data follows the positions: a position's bytes are
read when the buffer takes it in and held until the buffer emits it.

Position, checkpoint and exact resume
-------------------------------------
A stream's position is a sample count: (epoch, samples emitted in this epoch), plus how
many of the last emitted samples are still partly unpacked (``carry``, ``offset``: the
tail of a long document not yet cut into windows, the clips of a video not yet batched)
and its bad-sample counters. Each microbatch carries its worker's position after it; the
loader keeps the position of the last microbatch the trainer took from every worker, and
every checkpoint stores those positions for all DP ranks (``fmtrain_state.json["data"]``).
On resume a worker replays its epoch's shuffle on integers only up to the saved count, which
tells it exactly which positions the buffer held; it re-reads just the shards that hold
those positions or come later (whole shards before them are not opened), re-unpacks the
``carry`` samples and drops the first ``offset`` units. The resumed run then produces the
same microbatches, bit for bit, as the run that was never interrupted.

The trainer asks for batches by global step: ``microbatches(step, dp_rank)``. The DataLoader
hands out microbatches round-robin over its workers, so microbatch ``m`` of a rank (counted
from the stream's start) comes from worker ``m % W``; on resume the loader rotates which
logical worker each DataLoader process serves so that the rotation continues where it was.

Resuming with a different layout is refused: DP size, ``data.num_workers`` (``0`` and ``1``
are the same layout), the shard list and its counts, seed, batch sizes and the pipeline's
settings must match the checkpoint's, or the run stops before training with an error that
lists what differs. (An exact re-partition would need every stream's buffer and carry state
to be redistributed; the counts-only state does not describe that.)

Bucketing by shape
------------------
A pipeline may define ``bucket_of(item) -> hashable`` (the latent pipeline: the latent's
(T, H, W)). Its worker then keeps one pending list per bucket and emits a microbatch when a
bucket holds ``micro_batch_size`` items, so a microbatch never mixes shapes and is never
padded; items of a bucket that is not full yet wait, across epoch ends if need be. Only
pipelines with one unit per sample and ``item_size`` 1 may bucket (otherwise ValueError).
The worker position then also lists the samples still waiting, as ``"held": [[epoch,
index], ...]`` (index = place in that epoch's stream order); on resume the worker replays
those epochs' orders on integers, re-reads exactly those samples (possibly from an earlier
epoch), re-inserts them into their buckets and continues, so the resumed stream is again
identical. ``carry`` and ``offset`` stay 0 for a bucketing pipeline.

Bad input
---------
A damaged shard gives a warning naming the shard and the last good key; its missing
positions count as bad. A sample the pipeline cannot use (missing field, undecodable video,
invalid UTF-8, out-of-range token ids) gives a warning naming the shard and the key and
counts as bad. Each worker stops the run with :class:`BadDataError` when its bad samples
exceed ``data.max_bad_fraction`` of what it has read (measured over at least
min(1000, its epoch) samples), or when two consecutive epochs give it no usable sample, so a
dataset that is all bad never hangs. ``data.worker_timeout`` bounds how long the trainer
waits for a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fmtrain.data.shards import BadDataError, Shard, read_shard, resolve_shards

log = logging.getLogger("fmtrain.data")

MAX_WARNINGS = 20
"""Warnings each worker prints about individual bad samples before it only counts them."""


class BadSample(Exception):
    """Raised by a pipeline for a sample it cannot use; the reason goes into the warning."""


class StreamResumeError(RuntimeError):
    """A checkpoint's data-stream state that cannot continue under this configuration."""


# --------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class SampleContext:
    """Where a sample sits in the stream; ``rng()`` is its own reproducible generator."""

    seed: int
    epoch: int
    stream: int
    index: int
    shard: str
    key: str

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.stream, self.index, 0x5EED])


class Pipeline(Protocol):
    """Turns raw samples into fixed-size items and items into microbatches.

    A sample becomes a sequence of *units* (text: token ids with the EOS separator; video:
    clips). Units of consecutive samples are concatenated and cut into items of
    ``item_size`` units (text: a ``seq_length + 1`` window; video: one clip). At the end of a
    stream's epoch a partial item is emitted padded when ``pad_at_epoch_end``, else dropped.

    Optional: ``bucket_of(item) -> hashable``; when present, microbatches are formed per
    bucket (see "Bucketing by shape" above).
    """

    item_size: int
    pad_at_epoch_end: bool

    def units(self, sample: dict, ctx: SampleContext) -> Sequence: ...

    def make_item(self, pieces: list[Sequence], size: int) -> Any: ...

    def collate(self, items: list) -> dict: ...

    def fingerprint(self) -> dict: ...


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Unit:
    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def _int_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


@dataclass
class StreamSpec:
    """Everything that fixes the sample order of every stream (picklable, no open files)."""

    shards: list[Shard]
    dp_size: int
    num_workers: int
    """DataLoader workers per DP rank; 0 reads in the calling process (one stream per rank)."""
    seed: int
    shuffle_buffer: int = 1000
    shuffle: bool = True
    """Permute units per epoch (the shuffle buffer is separate); off for validation."""
    name: str = "train"
    max_bad_fraction: float = 0.01

    def __post_init__(self):
        if self.dp_size < 1 or self.num_workers < 0:
            raise ValueError(f"dp_size={self.dp_size} must be >= 1 and num_workers={self.num_workers} >= 0")
        nonempty = [(i, s) for i, s in enumerate(self.shards) if s.samples > 0]
        total = sum(s.samples for _, s in nonempty)
        if total == 0:
            raise BadDataError(f"{self.name} shards hold no samples ({len(self.shards)} shards: {_names(self.shards)})")
        slices = math.ceil(self.streams / len(nonempty))
        units = []
        for i, shard in nonempty:
            k = min(slices, shard.samples)
            units += [Unit(i, j * shard.samples // k, (j + 1) * shard.samples // k) for j in range(k)]
        if len(units) < self.streams:
            raise BadDataError(
                f"{self.name} shards hold {total} samples in {len(nonempty)} non-empty shards, fewer than the "
                f"{self.streams} streams (DP size {self.dp_size} x {self.workers} workers) that must each get one; "
                "add data or lower data.num_workers"
            )
        self._units = units
        self._epoch_cache: dict[int, list[Unit]] = {}

    @property
    def workers(self) -> int:
        """Streams per DP rank (``num_workers``, at least 1)."""
        return max(self.num_workers, 1)

    @property
    def streams(self) -> int:
        return self.dp_size * self.workers

    @property
    def tag(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def units(self) -> list[Unit]:
        return list(self._units)

    def stream_id(self, dp_rank: int, worker: int) -> int:
        return dp_rank + self.dp_size * worker

    def epoch_units(self, epoch: int) -> list[Unit]:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 4:
                self._epoch_cache.pop(min(self._epoch_cache))
            units = self._units
            if self.shuffle:
                order = np.random.default_rng(_int_seed(self.seed, self.tag, epoch, 1)).permutation(len(units))
                units = [units[i] for i in order]
            self._epoch_cache[epoch] = units
        return self._epoch_cache[epoch]

    def stream_units(self, epoch: int, stream: int) -> list[Unit]:
        """Units of one stream in one epoch, in reading order."""
        return self.epoch_units(epoch)[stream :: self.streams]

    def shuffle_seed(self, epoch: int, stream: int) -> int:
        return _int_seed(self.seed, self.tag, epoch, stream, 2)

    def fingerprint(self) -> dict:
        digest = hashlib.sha256(json.dumps([[s.url, s.samples] for s in self.shards]).encode()).hexdigest()
        return {
            "name": self.name,
            "dp_size": self.dp_size,
            "workers": self.workers,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle": self.shuffle,
            "num_shards": len(self.shards),
            "samples": sum(s.samples for s in self.shards),
            "shards_sha256": digest[:16],
        }


def _names(shards: Sequence[Shard], limit: int = 4) -> str:
    names = ", ".join(s.url for s in shards[:limit])
    return names + (f" and {len(shards) - limit} more" if len(shards) > limit else "")


class PositionShuffle:
    """A shuffle buffer over the positions ``0 .. length-1`` (webdataset's algorithm on ints).

    The buffer is topped up to ``size`` positions (in order) before each draw; a draw swaps a
    uniformly chosen entry to the end and pops it. ``size <= 1`` keeps the order. Positions
    read so far are ``[0, next_read)``; ``buffer`` holds those read but not yet emitted.
    """

    def __init__(self, length: int, size: int, seed: int):
        self.length, self.size = length, max(size, 1)
        self.rng = random.Random(seed)
        self.buffer: list[int] = []
        self.next_read = 0

    def next(self) -> int | None:
        while len(self.buffer) < self.size and self.next_read < self.length:
            self.buffer.append(self.next_read)
            self.next_read += 1
        if not self.buffer:
            return None
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()


def stream_order(spec: StreamSpec, epoch: int, stream: int) -> list[tuple[int, int]]:
    """The (shard index, position in shard) sequence stream ``stream`` emits in ``epoch``."""
    units = spec.stream_units(epoch, stream)
    where = [(u.shard, p) for u in units for p in range(u.start, u.stop)]
    shuffle = PositionShuffle(len(where), spec.shuffle_buffer, spec.shuffle_seed(epoch, stream))
    out = []
    while (pos := shuffle.next()) is not None:
        out.append(where[pos])
    return out


def read_positions(
    spec: StreamSpec, stream: int, wanted: Sequence[tuple[int, int]], warn: Callable[[str], None]
) -> dict[tuple[int, int], tuple[Shard, dict | None]]:
    """Raw samples at ``(epoch, index)`` places of stream ``stream`` (index = position in that
    epoch's :func:`stream_order`): ``{(epoch, index): (shard, sample or None)}``. Reads only
    the shards holding them."""
    by_epoch: dict[int, list[int]] = {}
    for epoch, index in wanted:
        by_epoch.setdefault(int(epoch), []).append(int(index))
    out: dict[tuple[int, int], tuple[Shard, dict | None]] = {}
    for epoch, indices in sorted(by_epoch.items()):
        order = stream_order(spec, epoch, stream)
        need: dict[int, dict[int, int]] = {}  # shard -> {position in shard: index in stream order}
        for index in indices:
            if not 0 <= index < len(order):
                raise StreamResumeError(
                    f"stream {stream} epoch {epoch}: held sample {index} is past the epoch's "
                    f"{len(order)} samples (the shards changed since the checkpoint?)"
                )
            shard, position = order[index]
            need.setdefault(shard, {})[position] = index
        for shard_index in sorted(need):
            places, shard = need[shard_index], spec.shards[shard_index]
            for position, sample in read_shard(shard, min(places), max(places) + 1, places.__contains__, warn):
                out[epoch, places[position]] = (shard, sample)
    return out


# --------------------------------------------------------------------------- one stream


@dataclass
class _Event:
    kind: str  # "sample" | "end"
    epoch: int
    index: int = 0
    shard: str = ""
    sample: dict | None = None
    length: int = 0


def _read_units(
    spec: StreamSpec, units: list[Unit], held: set[int], cursor: int, warn: Callable[[str], None]
) -> Iterator[tuple[int, Shard, dict | None]]:
    """(stream position, shard, raw sample or None) for the positions a (resumed) shuffle
    still needs: those in ``held`` (all below ``cursor``) and every position from ``cursor``."""
    held_sorted = sorted(held)
    start = 0
    for unit in units:
        end = start + unit.size
        shard = spec.shards[unit.shard]
        lo = np.searchsorted(held_sorted, start)
        hi = np.searchsorted(held_sorted, end)
        held_here = set(held_sorted[lo:hi])
        if end > cursor or held_here:
            last = end if end > cursor else max(held_here) + 1

            def keep(p: int, base=start - unit.start, held_here=held_here) -> bool:
                return p + base >= cursor or p + base in held_here

            for p, sample in read_shard(shard, unit.start, unit.start + (last - start), keep, warn):
                yield p - unit.start + start, shard, sample
        start = end


def _events(spec: StreamSpec, stream: int, epoch: int, skip: int, warn: Callable[[str], None]) -> Iterator[_Event]:
    """The stream's samples from ``skip`` emitted samples into ``epoch`` on, forever."""
    while True:
        units = spec.stream_units(epoch, stream)
        length = sum(u.size for u in units)
        shuffle = PositionShuffle(length, spec.shuffle_buffer, spec.shuffle_seed(epoch, stream))
        for _ in range(skip):
            if shuffle.next() is None:
                raise StreamResumeError(
                    f"stream {stream} epoch {epoch}: position {skip} is past the epoch's "
                    f"{length} samples (the shards changed since the checkpoint?)"
                )
        reader = _read_units(spec, units, set(shuffle.buffer), shuffle.next_read, warn)
        pending: dict[int, tuple[Shard, dict | None]] = {}
        index = skip
        while (pos := shuffle.next()) is not None:
            while pos not in pending:
                got, shard, sample = next(reader)
                pending[got] = (shard, sample)
            shard, sample = pending.pop(pos)
            yield _Event("sample", epoch, index, shard.url, sample)
            index += 1
        yield _Event("end", epoch, length=length)
        epoch, skip = epoch + 1, 0


def initial_position(worker: int) -> dict:
    """The position of a worker that has produced nothing yet."""
    return {
        "worker": worker,
        "epoch": 0,
        "consumed": 0,
        "carry": 0,
        "offset": 0,
        "micro": 0,
        "seen": 0,
        "bad": 0,
        "epoch_good": 0,
        "idle_epochs": 0,
    }


class StreamWorker:
    """One stream: (DP rank, worker) -> microbatches, each with the position after it."""

    def __init__(
        self,
        pipeline: Pipeline,
        spec: StreamSpec,
        dp_rank: int,
        worker: int,
        micro_batch_size: int,
        position: dict | None = None,
        verbose: bool = True,
    ):
        self.pipeline, self.spec = pipeline, spec
        self.dp_rank, self.worker = dp_rank, worker
        self.stream = spec.stream_id(dp_rank, worker)
        self.micro_batch_size = micro_batch_size
        self.pos = dict(position or initial_position(worker))
        self.verbose = verbose
        self._warned = 0
        self.bucketed = getattr(pipeline, "bucket_of", None) is not None
        if self.bucketed:
            if pipeline.item_size != 1:
                raise ValueError(
                    f"{type(pipeline).__name__} defines bucket_of but has item_size "
                    f"{pipeline.item_size}; bucketing needs one item per sample (item_size 1)"
                )
            self.pos.setdefault("held", [])

    # -- bad input

    def _warn(self, message: str) -> None:
        if not self.verbose:
            return
        self._warned += 1
        if self._warned <= MAX_WARNINGS:
            log.warning("%s", message)
        elif self._warned == MAX_WARNINGS + 1:
            log.warning(
                "fmtrain data: DP rank %d worker %d: more bad input; further warnings suppressed, still counting",
                self.dp_rank,
                self.worker,
            )

    def _bad(self, shard: str, key: str | None, reason: str | None, window: int) -> None:
        pos = self.pos
        pos["seen"] += 1
        pos["bad"] += 1
        if reason is not None:
            self._warn(f"fmtrain data: warning: shard {shard} key {key}: {reason}; sample skipped")
        limit = self.spec.max_bad_fraction
        if pos["bad"] > limit * max(pos["seen"], window):
            raise BadDataError(
                f"{self.spec.name} data: {pos['bad']} bad of {pos['seen']} samples read by DP rank {self.dp_rank} "
                f"worker {self.worker} ({pos['bad'] / pos['seen']:.1%}) exceeds data.max_bad_fraction={limit}; "
                f"last: shard {shard} key {key}: {reason or 'unreadable (see the shard warning above)'}"
            )

    def _units(self, event: _Event, count: bool, window: int) -> Sequence:
        key = event.sample.get("__key__") if event.sample is not None else None
        if event.sample is None:
            if count:
                self._bad(event.shard, key, None, window)
            return []
        ctx = SampleContext(self.spec.seed, event.epoch, self.stream, event.index, event.shard, key or "")
        try:
            units = self.pipeline.units(event.sample, ctx)
        except BadSample as exc:
            if count:
                self._bad(event.shard, key, str(exc), window)
            return []
        if count:
            self.pos["seen"] += 1
            self.pos["epoch_good"] += 1
        return units

    def _end_epoch(self, event: _Event) -> int:
        """Advance the position past a finished epoch (two idle epochs in a row stop the run);
        returns the bad-fraction window of the next epoch."""
        pos = self.pos
        if pos["epoch_good"] == 0:
            pos["idle_epochs"] += 1
            if pos["idle_epochs"] >= 2:
                raise BadDataError(
                    f"{self.spec.name} data: DP rank {self.dp_rank} worker {self.worker} read two "
                    f"epochs without one usable sample (last epoch: {event.length} samples); "
                    "see the warnings above"
                )
        else:
            pos["idle_epochs"] = 0
        pos.update(epoch=event.epoch + 1, consumed=0, epoch_good=0)
        return min(1000, sum(u.size for u in self.spec.stream_units(pos["epoch"], self.stream)))

    # -- the stream

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        if self.bucketed:
            yield from self._iter_bucketed()
            return
        pipeline, pos = self.pipeline, self.pos
        size = pipeline.item_size
        events = _events(self.spec, self.stream, pos["epoch"], pos["consumed"] - pos["carry"], self._warn)
        window = min(1000, sum(u.size for u in self.spec.stream_units(pos["epoch"], self.stream)))
        parts: deque = deque()
        for _ in range(pos["carry"]):  # re-unpack the partly used samples (counted already)
            event = next(events)
            if event.kind != "sample":
                raise StreamResumeError(
                    f"stream {self.stream}: carried samples run past the end of epoch {pos['epoch']}"
                )
            parts.append(self._units(event, count=False, window=window))
        offset = pos["offset"]
        available = sum(len(p) for p in parts) - offset
        items: list = []

        def take(n: int) -> list:
            nonlocal offset, available
            pieces = []
            while n and parts:
                head = parts[0]
                t = min(len(head) - offset, n)
                if t:
                    pieces.append(head[offset : offset + t])
                offset += t
                n -= t
                available -= t
                if offset == len(head):
                    parts.popleft()
                    offset = 0
            while parts and offset == len(parts[0]):
                parts.popleft()
                offset = 0
            return pieces

        while True:
            while available < size:
                event = next(events)
                if event.kind == "end":
                    if available and pipeline.pad_at_epoch_end:
                        n = available
                        items.append(pipeline.make_item(take(n), n))
                    parts.clear()
                    offset = available = 0
                    window = self._end_epoch(event)
                    if len(items) == self.micro_batch_size:
                        yield self._emit(items, parts, offset)
                        items = []
                    continue
                units = self._units(event, count=True, window=window)
                pos["consumed"] = event.index + 1
                parts.append(units)
                available += len(units)
            items.append(pipeline.make_item(take(size), size))
            if len(items) == self.micro_batch_size:
                yield self._emit(items, parts, offset)
                items = []

    def _emit(self, items: list, parts: deque, offset: int) -> tuple[dict, dict]:
        self.pos.update(carry=len(parts), offset=offset, micro=self.pos["micro"] + 1)
        return self.pipeline.collate(items), dict(self.pos)

    # -- the stream, bucketed by the pipeline's bucket_of (one item per sample)

    def _one_item(self, units: Sequence, where: str) -> Any:
        if len(units) != 1:
            raise ValueError(
                f"{type(self.pipeline).__name__} defines bucket_of but gave {len(units)} units for "
                f"{where}; bucketing needs exactly one unit per usable sample"
            )
        return self.pipeline.make_item([units[0:1]], 1)

    def _iter_bucketed(self) -> Iterator[tuple[dict, dict]]:
        pipeline, pos, mbs = self.pipeline, self.pos, self.micro_batch_size
        window = min(1000, sum(u.size for u in self.spec.stream_units(pos["epoch"], self.stream)))
        # bucket -> [(item, [epoch, index]), ...] in arrival order, each shorter than mbs
        buckets: dict[Any, list[tuple[Any, list[int]]]] = {}
        held = sorted((int(e), int(i)) for e, i in pos.get("held", []))
        raw = read_positions(self.spec, self.stream, held, self._warn) if held else {}
        for epoch, index in held:  # re-insert what waited in the buckets at the checkpoint
            shard, sample = raw.get((epoch, index), (None, None))
            event = _Event("sample", epoch, index, shard.url if shard else "", sample)
            units = self._units(event, count=False, window=window)
            if not units:
                raise StreamResumeError(
                    f"stream {self.stream}: sample {index} of epoch {epoch} (shard {event.shard or '?'}) waited in a "
                    "bucket at the checkpoint but is no longer usable (the shards changed since the checkpoint?)"
                )
            item = self._one_item(units, f"held sample {index} of epoch {epoch}")
            bucket = buckets.setdefault(pipeline.bucket_of(item), [])
            bucket.append((item, [epoch, index]))
            if len(bucket) >= mbs:
                raise StreamResumeError(
                    f"stream {self.stream}: the checkpoint holds {len(bucket)} waiting samples "
                    f"of one bucket, not fewer than micro_batch_size={mbs}"
                )
        for event in _events(self.spec, self.stream, pos["epoch"], pos["consumed"], self._warn):
            if event.kind == "end":
                window = self._end_epoch(event)
                continue
            units = self._units(event, count=True, window=window)
            pos["consumed"] = event.index + 1
            if not units:
                continue
            item = self._one_item(units, f"key {event.sample.get('__key__')} of shard {event.shard}")
            key = pipeline.bucket_of(item)
            bucket = buckets.setdefault(key, [])
            bucket.append((item, [event.epoch, event.index]))
            if len(bucket) == mbs:
                del buckets[key]
                waiting = sorted(where for b in buckets.values() for _, where in b)
                pos.update(carry=0, offset=0, micro=pos["micro"] + 1, held=waiting)
                yield pipeline.collate([item for item, _ in bucket]), dict(pos)


# --------------------------------------------------------------------------- the loader


class _RankDataset(torch.utils.data.IterableDataset):
    """The DataLoader side of one DP rank: DataLoader process ``i`` serves logical worker
    ``(i + phase) % W`` so that the round-robin continues across a resume."""

    def __init__(
        self,
        pipeline: Pipeline,
        spec: StreamSpec,
        dp_rank: int,
        positions: list[dict],
        phase: int,
        micro_batch_size: int,
        verbose: bool,
    ):
        super().__init__()
        self.pipeline, self.spec, self.dp_rank = pipeline, spec, dp_rank
        self.positions, self.phase = positions, phase
        self.micro_batch_size, self.verbose = micro_batch_size, verbose

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.phase) % self.spec.workers
        for batch, position in StreamWorker(
            self.pipeline, self.spec, self.dp_rank, worker, self.micro_batch_size, self.positions[worker], self.verbose
        ):
            batch["_position"] = position
            yield batch


class _RankStream:
    def __init__(self, loader: StreamingLoader, dp_rank: int, step: int, micro: int, positions: list[dict]):
        self.loader, self.dp_rank = loader, dp_rank
        self.next_step, self.micro = step, micro
        self.positions = [dict(p) for p in positions]
        self._it: Iterator[dict] | None = None
        self._loader_obj = None

    def _iterator(self) -> Iterator[dict]:
        if self._it is None:
            lo, spec = self.loader, self.loader.spec
            workers = spec.workers
            dataset = _RankDataset(
                lo.pipeline, spec, self.dp_rank, self.positions, self.micro % workers, lo.micro_batch_size, lo.verbose
            )
            if spec.num_workers == 0:
                self._it = iter(dataset)
            else:
                self._loader_obj = torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=spec.num_workers,
                    prefetch_factor=lo.prefetch,
                    timeout=lo.timeout,
                    generator=torch.Generator(),
                    persistent_workers=False,
                )
                self._it = iter(self._loader_obj)
        return self._it

    def next(self) -> dict:
        try:
            batch = next(self._iterator())
        except RuntimeError as exc:
            if "timed out" in str(exc):
                raise BadDataError(
                    f"{self.loader.spec.name} data: DP rank {self.dp_rank}: no microbatch from the "
                    f"DataLoader workers within data.worker_timeout={self.loader.timeout}s"
                ) from exc
            raise
        position = batch.pop("_position")
        self.positions[position["worker"]] = position
        self.micro += 1
        return batch

    def close(self) -> None:
        self._it = None
        self._loader_obj = None


def batch_hash(batch: dict) -> str:
    """sha256 over a microbatch's keys, tensor dtypes, shapes and bytes, and string lists."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class StreamingLoader:
    """``microbatches(global_step, dp_rank)`` over a shard stream; the streaming counterpart of
    :class:`fmtrain.data.text.MicrobatchSampler`.

    Steps are served in order from where the rank's stream stands (step 0, or the step a
    checkpoint restored); asking for an earlier step restarts from that starting point and
    replays (validation asks for steps 0..n-1 every time), a later one skips ahead.
    One object can serve several DP ranks (tests loop over them in one process); a training
    process serves its own.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        spec: StreamSpec,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        prefetch: int = 2,
        timeout: float = 0.0,
        hash_log: str | Path | None = None,
        verbose: bool = True,
    ):
        per_step = micro_batch_size * spec.dp_size
        if min(global_batch_size, micro_batch_size) < 1 or global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a positive multiple of "
                f"micro_batch_size x dp_size = {micro_batch_size} x {spec.dp_size}"
            )
        self.pipeline, self.spec = pipeline, spec
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.num_microbatches = global_batch_size // per_step
        """Microbatches per rank per global step."""
        self.prefetch, self.timeout, self.verbose = prefetch, timeout, verbose
        self.hash_log = Path(hash_log) if hash_log else None
        self._ranks: dict[int, _RankStream] = {}
        self._starts: dict[int, dict] = {}

    # -- layout and state

    def layout(self) -> dict:
        """What a checkpoint's stream state is only valid for."""
        return {
            **self.spec.fingerprint(),
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "pipeline": self.pipeline.fingerprint(),
        }

    def _start(self, dp_rank: int) -> dict:
        if dp_rank not in self._starts:
            self._starts[dp_rank] = {
                "step": 0,
                "micro": 0,
                "workers": [initial_position(w) for w in range(self.spec.workers)],
            }
        return self._starts[dp_rank]

    def state_dict(self, dp_rank: int) -> dict:
        """The rank's stream position after the last step it served (JSON-serialisable)."""
        rank = self._ranks.get(dp_rank)
        if rank is None:
            start = self._start(dp_rank)
            return {"step": start["step"], "micro": start["micro"], "workers": [dict(p) for p in start["workers"]]}
        return {"step": rank.next_step, "micro": rank.micro, "workers": [dict(p) for p in rank.positions]}

    def load_state_dict(self, dp_rank: int, state: dict) -> None:
        """Continue rank ``dp_rank`` from ``state`` (from :meth:`state_dict` of an identical layout)."""
        workers = state["workers"]
        if len(workers) != self.spec.workers:
            raise StreamResumeError(f"stream state has {len(workers)} workers, this loader {self.spec.workers}")
        for w, position in enumerate(workers):
            expected = len(range(w, state["micro"], self.spec.workers))
            if position["worker"] != w or position["micro"] != expected:
                raise StreamResumeError(
                    f"stream state of DP rank {dp_rank} is inconsistent: worker {w} made "
                    f"{position['micro']} microbatches, {expected} expected"
                )
        self._starts[dp_rank] = {
            "step": int(state["step"]),
            "micro": int(state["micro"]),
            "workers": [dict(p) for p in workers],
        }
        self._drop(dp_rank)

    def start_at(self, step: int) -> None:
        """Serve the stream's beginning as global step ``step`` (a run resumed from a checkpoint
        without stream state: the data restarts, the step count does not)."""
        for rank in range(self.spec.dp_size):
            self._starts[rank] = {
                "step": step,
                "micro": 0,
                "workers": [initial_position(w) for w in range(self.spec.workers)],
            }
            self._drop(rank)

    def _drop(self, dp_rank: int) -> None:
        rank = self._ranks.pop(dp_rank, None)
        if rank is not None:
            rank.close()

    # -- batches

    def microbatches(self, global_step: int, dp_rank: int) -> list[dict]:
        """This rank's microbatches for one optimizer step (``num_microbatches`` of them)."""
        if not 0 <= dp_rank < self.spec.dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={self.spec.dp_size})")
        start = self._start(dp_rank)
        rank = self._ranks.get(dp_rank)
        if rank is None or global_step < rank.next_step:
            if global_step < start["step"]:
                raise ValueError(
                    f"{self.spec.name} stream of DP rank {dp_rank} starts at step {start['step']}; "
                    f"step {global_step} is before it"
                )
            self._drop(dp_rank)
            rank = self._ranks[dp_rank] = _RankStream(self, dp_rank, start["step"], start["micro"], start["workers"])
        while rank.next_step < global_step:  # skip ahead
            for _ in range(self.num_microbatches):
                rank.next()
            rank.next_step += 1
        batches = [rank.next() for _ in range(self.num_microbatches)]
        rank.next_step += 1
        if self.hash_log is not None:
            self.hash_log.parent.mkdir(parents=True, exist_ok=True)
            with self.hash_log.open("a") as f:
                f.write(
                    json.dumps({"step": global_step, "dp_rank": dp_rank, "hashes": [batch_hash(b) for b in batches]})
                    + "\n"
                )
        return batches

    def close(self) -> None:
        for rank in list(self._ranks):
            self._drop(rank)


# --------------------------------------------------------------------------- from a Config


def build_stream_loader(
    cfg,
    pipeline: Pipeline,
    shards_spec: str,
    *,
    dp_size: int,
    name: str = "train",
    hash_log: Path | None = None,
    verbose: bool = True,
) -> StreamingLoader:
    """A streaming loader of ``pipeline``'s microbatches over the shards of ``shards_spec``, laid
    out by ``cfg.data`` (workers, shuffle buffer, bad-sample limit) and ``cfg.train`` (batch
    sizes). A validation stream (``name != "train"``) reads in order, unshuffled, in-process."""
    d = cfg.data
    train = name == "train"
    spec = StreamSpec(
        resolve_shards(shards_spec),
        dp_size=dp_size,
        num_workers=d.num_workers if train else 0,
        seed=cfg.run.seed,
        shuffle_buffer=d.shuffle_buffer if train else 0,
        shuffle=train,
        name=name,
        max_bad_fraction=d.max_bad_fraction,
    )
    return StreamingLoader(
        pipeline,
        spec,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        prefetch=d.prefetch,
        timeout=d.worker_timeout,
        hash_log=hash_log,
        verbose=verbose,
    )


def stream_loaders(cfg, pipeline: Pipeline, topo, run_dir: Path) -> tuple[StreamingLoader, StreamingLoader | None]:
    """The run's (train, validation or None) loaders of ``data.shards`` / ``data.valid_shards``
    for this rank: validation only with ``eval.interval > 0``; one rank of each DP replica
    (TP 0, PP 0) prints the warnings; ``data.log_batch_hashes`` logs per rank."""
    d = cfg.data
    verbose = topo.tp_rank == 0 and topo.pp_rank == 0
    hash_log = Path(run_dir) / "data" / f"batch_hashes.rank{topo.rank}.jsonl" if d.log_batch_hashes else None
    train = build_stream_loader(cfg, pipeline, d.shards, dp_size=topo.dp, hash_log=hash_log, verbose=verbose)
    valid = None
    if cfg.eval.interval and d.valid_shards:
        valid = build_stream_loader(cfg, pipeline, d.valid_shards, dp_size=topo.dp, name="valid", verbose=verbose)
    return train, valid


def checkpoint_state(batches, topo) -> dict | None:
    """``{"data": ...}`` for ``checkpoint.save(extra_state=...)``: every DP rank's stream
    position, gathered to all ranks (collective: call on every rank). None for the stateless
    in-memory sampler."""
    if not isinstance(batches, StreamingLoader):
        return None
    import torch.distributed as dist

    mine = (topo.dp_rank, batches.state_dict(topo.dp_rank))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    ranks = {}
    for dp_rank, state in gathered:
        ranks.setdefault(dp_rank, state)
    return {"data": {"layout": batches.layout(), "ranks": [ranks[r] for r in range(topo.dp)]}}


def restore_state(
    batches,
    saved: dict | None,
    start_step: int,
    cfg,
    topo,
    log_fn: Callable[[str], None] = print,
    source: str | Path = "the checkpoint",
) -> None:
    """Put a streaming loader where the checkpoint the run resumed from left it; ``saved`` is
    that checkpoint's state (fmtrain_state.json, which the trainer hands over), ``source``
    names it in messages.

    Refuses (:class:`StreamResumeError`) a checkpoint whose stream layout differs from this
    run's (another DP size, worker count, shard list, seed, batch size or pipeline). A
    checkpoint with no stream state (an in-memory run, converted weights, another dataset)
    starts the stream at its beginning. No-op for the in-memory sampler or a fresh run.
    """
    if not isinstance(batches, StreamingLoader) or start_step == 0 or saved is None:
        return
    path = source
    data = saved.get("data")
    saved_shards = saved.get("config", {}).get("data", {}).get("shards", "")
    if data is None:
        if saved_shards and saved_shards == cfg.data.shards:
            raise StreamResumeError(
                f"checkpoint {path} was written by a run streaming data.shards={saved_shards} but holds no "
                "stream state, so the stream cannot continue exactly; resume from a checkpoint written by "
                "the training loop"
            )
        log_fn(
            f"checkpoint {path} has no data-stream state: {batches.spec.name} data starts from the "
            f"beginning of data.shards at step {start_step}"
        )
        batches.start_at(start_step)
        return
    saved, current = data["layout"], batches.layout()
    if saved != current:
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)
        ]
        raise StreamResumeError(
            f"checkpoint {path}: its data stream was laid out differently, so the run cannot continue it "
            "exactly (streams are not re-partitioned; resume with the DP size, data.num_workers, shards, seed, "
            "batch sizes and data settings it was saved with): " + "; ".join(diffs)
        )
    if data["ranks"][topo.dp_rank]["step"] != start_step:
        raise StreamResumeError(
            f"checkpoint {path}: stream state is for step {data['ranks'][topo.dp_rank]['step']}, "
            f"the checkpoint for step {start_step}"
        )
    batches.load_state_dict(topo.dp_rank, data["ranks"][topo.dp_rank])
    pos = data["ranks"][topo.dp_rank]["workers"]
    log_fn(
        f"data stream resumed at step {start_step}: epoch {min(p['epoch'] for p in pos)}, "
        f"{sum(p['seen'] for p in pos)} samples read by DP rank {topo.dp_rank} ({sum(p['bad'] for p in pos)} bad)"
    )


__all__ = [
    "BadSample",
    "BadDataError",
    "StreamResumeError",
    "SampleContext",
    "Pipeline",
    "Unit",
    "StreamSpec",
    "PositionShuffle",
    "stream_order",
    "read_positions",
    "StreamWorker",
    "StreamingLoader",
    "batch_hash",
    "initial_position",
    "build_stream_loader",
    "stream_loaders",
    "checkpoint_state",
    "restore_state",
]
