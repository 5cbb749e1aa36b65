"""Latent data for diffusion transformers (Step-Video DiT, flow matching): shards, buckets, synthetic.

Sample format (one WebDataset sample per video, all ``.npy`` read with ``allow_pickle=False``)::

    KEY.latent.npy     float16/float32 [C, T, H, W]   VAE latent (C = model.in_channels)
    KEY.text_emb.npy   float [L, caption_dim]          LLM-style caption embedding
    KEY.text_mask.npy  bool/uint8 [L]                  optional; default all ones
    KEY.clip_emb.npy   float [L2, clip_dim]            required when model.clip_dim > 0
    KEY.clip_mask.npy  bool/uint8 [L2]                 optional; default all ones
    KEY.txt, KEY.json                                  optional caption and metadata

:class:`LatentPipeline` validates a sample (a problem is a :class:`BadSample` naming it) and
turns it into one item; text embeddings are truncated or zero-padded to ``model.caption_tokens``
(``model.clip_tokens``) with boolean masks (padding = False). Each item also gets a
``sample_seed`` from the sample's own generator, so the flow-matching noise and timestep drawn
from it are the same in a resumed run. The pipeline buckets by latent shape (``bucket_of`` =
(T, H, W)): the stream forms every microbatch from one bucket, never mixing shapes and never
padding latents (see "Bucketing by shape" in :mod:`fmtrain.data.stream`).

A microbatch (from the stream or the in-memory sampler) is::

    {"latent": float32 [b, C, T, H, W], "text_emb": float32 [b, caption_tokens, caption_dim],
     "text_mask": bool [b, caption_tokens],
     "clip_emb": float32 [b, clip_tokens, clip_dim], "clip_mask": bool [b, clip_tokens],  # clip_dim > 0
     "sample_seed": int64 [b], "key": list[str]}

Without ``data.shards``, ``data.corpus=synthetic:latents`` builds an in-memory dataset of
structured latents (:func:`synthetic_latent_dataset`: per-class smooth prototypes, each with
its own text embedding) sampled by :class:`LatentMicrobatchSampler`, a stateless function of
(seed, step, DP rank) like :class:`fmtrain.data.text.MicrobatchSampler`.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fmtrain.config import microbatches_per_rank, parse_latent_shape
from fmtrain.data.shards import (
    BadDataError,
    IndexedShardWriter,
    keyed_samples,
    npy_bytes,
    progress_bar,
)
from fmtrain.data.stream import BadSample, SampleContext, _int_seed, stream_loaders

log = logging.getLogger("fmtrain.data")

SYNTHETIC_CORPUS = "synthetic:latents"
"""``data.corpus`` value of the in-memory synthetic latent dataset."""

Shape = tuple[int, int, int]
SEED_LIMIT = 1 << 63


def parse_latent_shapes(text: str) -> list[Shape]:
    """``"2x8x8,3x8x6"`` (a command line's form) -> [(2, 8, 8), (3, 8, 6)], each once."""
    shapes = [parse_latent_shape(item, f"latent shape in {text!r}") for item in text.split(",")]
    for i, shape in enumerate(shapes):
        if shape in shapes[:i]:
            raise ValueError(f"latent shape {shape_name(shape)!r} is listed twice in {text!r}")
    return shapes


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# --------------------------------------------------------------------------- validation


def _load_npy(sample: dict, field: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(sample[field]), allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BadSample(f"unreadable .{field} ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise BadSample(f".{field} is not a single .npy array")
    return array


def check_latent(
    latent: np.ndarray, *, in_channels: int | None = None, patch_size: int = 1, name: str = ".latent.npy"
) -> np.ndarray:
    """A float [C, T, H, W] latent with finite values (and C = ``in_channels`` when given,
    H and W divisible by ``patch_size``); raises :class:`BadSample` naming the problem."""
    if latent.ndim != 4:
        raise BadSample(f"{name} must be 4-D [C, T, H, W], got shape {tuple(latent.shape)}")
    if not np.issubdtype(latent.dtype, np.floating):
        raise BadSample(f"{name} must be float16/float32, got {latent.dtype}")
    c, t, h, w = latent.shape
    if min(c, t, h, w) < 1:
        raise BadSample(f"{name} is empty: shape {tuple(latent.shape)}")
    if in_channels is not None and c != in_channels:
        raise BadSample(f"{name} has {c} channels, model.in_channels={in_channels}")
    if h % patch_size or w % patch_size:
        raise BadSample(f"{name} spatial size {h}x{w} is not divisible by model.patch_size={patch_size}")
    if not np.isfinite(latent).all():
        raise BadSample(f"{name} holds non-finite values (NaN or inf)")
    return latent


def check_embedding(
    emb: np.ndarray, mask: np.ndarray | None, *, dim: int | None, tokens: int | None, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """A float [L, dim] embedding and its [L] mask (default all ones), truncated to ``tokens``
    rows when given; raises :class:`BadSample` (naming ``.{name}_emb.npy``) for a wrong shape,
    dtype, non-finite values, or no valid token left. Returns (emb, bool mask)."""
    field = f".{name}_emb.npy"
    if emb.ndim != 2:
        raise BadSample(f"{field} must be 2-D [L, dim], got shape {tuple(emb.shape)}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise BadSample(f"{field} must be floating point, got {emb.dtype}")
    if dim is not None and emb.shape[1] != dim:
        setting = "model.caption_dim" if name == "text" else "model.clip_dim"
        raise BadSample(f"{field} has width {emb.shape[1]}, {setting}={dim}")
    if mask is None:
        mask = np.ones(emb.shape[0], dtype=bool)
    else:
        if mask.ndim != 1 or mask.shape[0] != emb.shape[0]:
            raise BadSample(
                f".{name}_mask.npy must be 1-D with {emb.shape[0]} entries (one per row of {field}), "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.integer) or (mask.size and not np.isin(mask, (0, 1)).all()):
                raise BadSample(f".{name}_mask.npy must be bool or 0/1 integers, got {mask.dtype}")
            mask = mask.astype(bool)
    if tokens is not None:
        emb, mask = emb[:tokens], mask[:tokens]
    if not mask.any():
        kept = f" within the first {tokens} tokens" if tokens is not None else ""
        raise BadSample(f"empty .{name}_mask: no valid token{kept} (embedding of {len(mask)} rows)")
    if not np.isfinite(emb).all():
        raise BadSample(f"{field} holds non-finite values (NaN or inf)")
    return emb, mask


def _pad_stack(
    embs: Sequence[np.ndarray], masks: Sequence[np.ndarray], tokens: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, dim] arrays -> zero-padded float32 [b, tokens, dim] and bool [b, tokens]."""
    out = np.zeros((len(embs), tokens, dim), dtype=np.float32)
    valid = np.zeros((len(embs), tokens), dtype=bool)
    for i, (emb, mask) in enumerate(zip(embs, masks)):
        n = min(len(emb), tokens)
        out[i, :n] = emb[:n]
        valid[i, :n] = mask[:n]
    return torch.from_numpy(out), torch.from_numpy(valid)


def collate_latents(
    items: Sequence[dict], *, caption_tokens: int, caption_dim: int, clip_tokens: int = 0, clip_dim: int = 0
) -> dict:
    """Items (``latent``, ``text_emb``, ``text_mask``, [``clip_emb``, ``clip_mask``],
    ``sample_seed``, ``key``) of one latent shape -> a microbatch (format in the module doc)."""
    shapes = sorted({tuple(item["latent"].shape) for item in items})
    if len(shapes) != 1:
        raise ValueError(
            f"one microbatch must hold one latent shape, got {shapes} (keys {[item['key'] for item in items]})"
        )
    latent = np.stack([np.asarray(item["latent"], dtype=np.float32) for item in items])  # (b, C, T, H, W)
    text_emb, text_mask = _pad_stack(
        [i["text_emb"] for i in items], [i["text_mask"] for i in items], caption_tokens, caption_dim
    )
    batch = {"latent": torch.from_numpy(latent), "text_emb": text_emb, "text_mask": text_mask}
    if clip_dim > 0:
        batch["clip_emb"], batch["clip_mask"] = _pad_stack(
            [i["clip_emb"] for i in items], [i["clip_mask"] for i in items], clip_tokens, clip_dim
        )
    batch["sample_seed"] = torch.tensor([int(i["sample_seed"]) for i in items], dtype=torch.int64)
    batch["key"] = [str(i["key"]) for i in items]
    return batch


# --------------------------------------------------------------------------- the stream pipeline


class LatentPipeline:
    """``units`` = one validated latent item per sample; microbatches are bucketed by (T, H, W)."""

    item_size = 1
    pad_at_epoch_end = False

    def __init__(
        self,
        *,
        in_channels: int,
        caption_tokens: int,
        caption_dim: int,
        patch_size: int = 1,
        clip_tokens: int = 0,
        clip_dim: int = 0,
    ):
        if min(in_channels, caption_tokens, caption_dim, patch_size) < 1:
            raise ValueError(
                f"in_channels={in_channels}, caption_tokens={caption_tokens}, caption_dim={caption_dim} "
                f"and patch_size={patch_size} must be >= 1"
            )
        if clip_dim < 0 or clip_tokens < 0 or (clip_dim > 0) != (clip_tokens > 0):
            raise ValueError(f"clip_dim={clip_dim} and clip_tokens={clip_tokens} must both be positive or both 0")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.caption_tokens, self.caption_dim = caption_tokens, caption_dim
        self.clip_tokens, self.clip_dim = clip_tokens, clip_dim

    @classmethod
    def from_config(cls, cfg) -> LatentPipeline:
        m = cfg.model
        return cls(
            in_channels=m.in_channels,
            caption_tokens=m.caption_tokens,
            caption_dim=m.caption_dim,
            patch_size=m.patch_size,
            clip_tokens=m.clip_tokens if m.clip_dim > 0 else 0,
            clip_dim=m.clip_dim,
        )

    def units(self, sample: dict, ctx: SampleContext) -> list[dict]:
        required = ["latent.npy", "text_emb.npy"] + (["clip_emb.npy"] if self.clip_dim > 0 else [])
        missing = [f for f in required if f not in sample]
        if missing:
            fields = sorted(k for k in sample if not k.startswith("__"))
            why = " (model.clip_dim > 0 needs a CLIP-style embedding)" if missing == ["clip_emb.npy"] else ""
            raise BadSample(f"missing field: {', '.join('.' + f for f in missing)}{why} (has {fields or 'nothing'})")
        latent = check_latent(_load_npy(sample, "latent.npy"), in_channels=self.in_channels, patch_size=self.patch_size)
        item = {"latent": latent}
        encoders = [("text", self.caption_dim, self.caption_tokens)]
        if self.clip_dim > 0:
            encoders.append(("clip", self.clip_dim, self.clip_tokens))
        for name, dim, tokens in encoders:
            mask = _load_npy(sample, f"{name}_mask.npy") if f"{name}_mask.npy" in sample else None
            item[f"{name}_emb"], item[f"{name}_mask"] = check_embedding(
                _load_npy(sample, f"{name}_emb.npy"), mask, dim=dim, tokens=tokens, name=name
            )
        item["sample_seed"] = int(ctx.rng().integers(0, SEED_LIMIT, dtype=np.int64))
        item["key"] = sample.get("__key__", ctx.key)
        return [item]

    def make_item(self, pieces: list[Sequence], size: int) -> dict:
        return pieces[0][0]

    def bucket_of(self, item: dict) -> Shape:
        return tuple(int(s) for s in item["latent"].shape[1:])

    def collate(self, items: list[dict]) -> dict:
        return collate_latents(
            items,
            caption_tokens=self.caption_tokens,
            caption_dim=self.caption_dim,
            clip_tokens=self.clip_tokens,
            clip_dim=self.clip_dim,
        )

    def fingerprint(self) -> dict:
        return {
            "kind": "latent",
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "caption_tokens": self.caption_tokens,
            "caption_dim": self.caption_dim,
            "clip_tokens": self.clip_tokens,
            "clip_dim": self.clip_dim,
            "bucketing": "latent_shape",
        }


# --------------------------------------------------------------------------- synthetic latents


def class_prototypes(
    shape: Sequence[int], classes: int, channels: int, seed: int, *, components: int = 3
) -> np.ndarray:
    """``classes`` smooth latents of one (T, H, W) shape: float32 [classes, channels, T, H, W].

    Class k, channel c is a sum of ``components`` separable cosines
    ``a * cos(2 pi f_t t' + p_t) cos(2 pi f_h h' + p_h) cos(2 pi f_w w' + p_w)`` with integer
    frequencies 0..2 over normalised cell centres (t' = (t + 0.5) / T, ...), scaled to unit
    RMS. The parameters depend on (seed, k) only, so a class is the same continuous field
    sampled at every shape."""
    t, h, w = (int(s) for s in shape)
    grids = [(np.arange(n) + 0.5) / n for n in (t, h, w)]
    out = np.empty((classes, channels, t, h, w), dtype=np.float32)
    for k in range(classes):
        rng = np.random.default_rng([seed, 0x9207, k])
        freq = rng.integers(0, 3, size=(channels, components, 3))
        phase = rng.uniform(0, 2 * np.pi, size=(channels, components, 3))
        amp = rng.standard_normal((channels, components))
        # (C, J, N) per axis
        waves = [np.cos(2 * np.pi * freq[..., a, None] * grids[a] + phase[..., a, None]) for a in range(3)]
        field = np.einsum("cj,cjt,cjh,cjw->cthw", amp, *waves)
        rms = math.sqrt(float(np.mean(field**2)))
        out[k] = field / max(rms, 1e-6)
    return out


def class_text_embeddings(classes: int, tokens: int, dim: int, seed: int, *, tag: int = 0) -> np.ndarray:
    """Fixed random per-class text embeddings (a different vector per token): float32
    [classes, tokens, dim]; ``tag`` separates the LLM-style (0) and CLIP-style (1) ones."""
    return np.stack(
        [np.random.default_rng([seed, 0x7E47, tag, k]).standard_normal((tokens, dim)) for k in range(classes)]
    ).astype(np.float32)


def synthetic_latent_dataset(
    shapes: Sequence[Sequence[int]],
    samples_per_shape: int,
    classes: int,
    channels: int,
    caption_tokens: int,
    caption_dim: int,
    clip_tokens: int = 0,
    clip_dim: int = 0,
    seed: int = 0,
) -> list[dict]:
    """A structured latent dataset, deterministic from ``seed``: per shape, ``samples_per_shape``
    samples, sample i of class ``i % classes``.

    latent = prototype(class, shape) * U(0.8, 1.2) + 0.1 * N(0, 1) (see :func:`class_prototypes`);
    text_emb = the class's embedding + 0.1 * N(0, 1) over a random valid length (>= 1 token;
    rows past it are zero, ``text_mask`` False); likewise ``clip_emb``/``clip_mask`` when
    ``clip_dim > 0``. Each sample: ``{"latent", "text_emb", "text_mask", ["clip_emb",
    "clip_mask"], "class", "key"}`` (numpy; key ``TxHxW-NNNNNN``). Memory: about
    ``4 * (C*T*H*W + caption_tokens*caption_dim + clip_tokens*clip_dim)`` bytes per sample.
    """
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"latent shapes repeat: {shapes}")
    if min(samples_per_shape, classes, channels, caption_tokens, caption_dim) < 1:
        raise ValueError("samples_per_shape, classes, channels, caption_tokens and caption_dim must be >= 1")
    text_base = class_text_embeddings(classes, caption_tokens, caption_dim, seed, tag=0)
    clip_base = class_text_embeddings(classes, clip_tokens, clip_dim, seed, tag=1) if clip_dim > 0 else None
    samples = []
    for shape in shapes:
        prototypes = class_prototypes(shape, classes, channels, seed)
        rng = np.random.default_rng([seed, 0x5A3F, *shape])
        for i in range(samples_per_shape):
            k = i % classes
            amplitude = rng.uniform(0.8, 1.2)
            latent = prototypes[k] * amplitude + 0.1 * rng.standard_normal(prototypes[k].shape)
            sample = {"latent": latent.astype(np.float32)}
            for name, base in (("text", text_base), ("clip", clip_base)):
                if base is None:
                    continue
                tokens = base.shape[1]
                valid = int(rng.integers(1, tokens + 1))
                emb = base[k] + 0.1 * rng.standard_normal(base[k].shape)
                emb[valid:] = 0.0
                sample[f"{name}_emb"] = emb.astype(np.float32)
                sample[f"{name}_mask"] = np.arange(tokens) < valid
            sample["class"] = k
            sample["key"] = f"{shape_name(shape)}-{i:06d}"
            samples.append(sample)
    return samples


def holdout_indices(n: int, count: int, seed: int, shape: Sequence[int]) -> set[int]:
    """``count`` of ``range(n)`` held out for validation, chosen from (seed, shape)."""
    order = np.random.default_rng([seed, 0xE7A1, *(int(s) for s in shape)]).permutation(n)
    return set(order[:count].tolist())


def split_by_shape(samples: Sequence[dict], counts: dict[Shape, int], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, valid): ``counts[shape]`` samples of each shape go to valid (see :func:`holdout_indices`)."""
    groups: dict[Shape, list[dict]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample["latent"].shape[1:]), []).append(sample)
    train, valid = [], []
    for shape, group in groups.items():
        held = holdout_indices(len(group), counts.get(shape, 0), seed, shape)
        for i, sample in enumerate(group):
            (valid if i in held else train).append(sample)
    return train, valid


# --------------------------------------------------------------------------- in-memory sampler


class LatentMicrobatchSampler:
    """Deterministic, stateless assignment of in-memory latent samples to (global step, DP rank),
    every microbatch of one latent shape.

    Epoch ``e`` permutes each shape bucket with a generator seeded by (seed, tag, e), cuts it
    into whole microbatches of ``mbs`` (a bucket's remainder sits out that epoch; another one
    the next), and shuffles the microbatches of all buckets together. The epochs' microbatch
    lists are concatenated into one endless stream; global step ``g`` takes microbatches
    ``[g * K, (g + 1) * K)`` with ``K = GBS / mbs``, DP rank ``r`` the contiguous
    ``K / dp`` of them from ``g * K + r * K / dp``. ``sample_seed`` of a sample is drawn from
    (seed, tag, sample index, epoch). Microbatches have the :func:`collate_latents` format.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        seed: int,
        *,
        caption_tokens: int,
        caption_dim: int,
        clip_tokens: int = 0,
        clip_dim: int = 0,
        tag: int = 0,
    ):
        num_microbatches = microbatches_per_rank(global_batch_size, micro_batch_size, dp_size)
        self.samples = list(samples)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.seed, self.tag = dp_size, seed, tag
        self.num_microbatches = num_microbatches
        """Microbatches per rank per global step."""
        self._collate = dict(
            caption_tokens=caption_tokens, caption_dim=caption_dim, clip_tokens=clip_tokens, clip_dim=clip_dim
        )
        groups: dict[Shape, list[int]] = {}
        for i, sample in enumerate(self.samples):
            groups.setdefault(tuple(int(s) for s in sample["latent"].shape[1:]), []).append(i)
        self.buckets = [groups[shape] for shape in sorted(groups)]
        self.per_epoch = sum(len(b) // micro_batch_size for b in self.buckets)
        """Microbatches per epoch."""
        if self.per_epoch == 0:
            sizes = {shape_name(s): len(groups[s]) for s in sorted(groups)}
            raise ValueError(
                f"no latent shape has micro_batch_size={micro_batch_size} samples (samples per shape: "
                f"{sizes}); every microbatch must hold one shape"
            )
        self._epochs: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def epoch_microbatches(self, epoch: int) -> list[list[int]]:
        """Sample indices of each microbatch of ``epoch``, in order."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng(_int_seed(self.seed, self.tag, epoch, 3))
            mbs, batches = self.micro_batch_size, []
            for bucket in self.buckets:
                order = [bucket[j] for j in rng.permutation(len(bucket))]
                batches += [order[k : k + mbs] for k in range(0, len(order) - mbs + 1, mbs)]
            self._epochs[epoch] = [batches[j] for j in rng.permutation(len(batches))]
        return self._epochs[epoch]

    def batch_indices(self, global_step: int, dp_rank: int) -> list[tuple[int, list[int]]]:
        """(epoch, sample indices) of each microbatch of this rank at this step."""
        if global_step < 0:
            raise ValueError(f"global_step={global_step} must be non-negative")
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={self.dp_size})")
        per_step = self.num_microbatches * self.dp_size
        start = global_step * per_step + dp_rank * self.num_microbatches
        return [
            (p // self.per_epoch, self.epoch_microbatches(p // self.per_epoch)[p % self.per_epoch])
            for p in range(start, start + self.num_microbatches)
        ]

    def sample_seed(self, index: int, epoch: int) -> int:
        return _int_seed(self.seed, self.tag, index, epoch, 4) % SEED_LIMIT

    def microbatches(self, global_step: int, dp_rank: int) -> list[dict]:
        """This rank's microbatches for one optimizer step (``num_microbatches`` of them)."""
        out = []
        for epoch, indices in self.batch_indices(global_step, dp_rank):
            items = [{**self.samples[i], "sample_seed": self.sample_seed(i, epoch)} for i in indices]
            out.append(collate_latents(items, **self._collate))
        return out


def synthetic_holdout(
    samples_per_shape: int, shapes: Sequence[Shape], micro_batch_size: int, global_batch_size: int
) -> dict[Shape, int]:
    """Validation samples per shape of the in-memory synthetic split: 1/16 of each shape,
    rounded up to whole microbatches, grown until they make at least one global batch."""
    mbs = micro_batch_size
    room = (samples_per_shape - mbs) // mbs * mbs if samples_per_shape >= 2 * mbs else 0  # train keeps >= 1 mb
    counts = {s: min(-(-max(-(-samples_per_shape // 16), 1) // mbs) * mbs, room) for s in shapes}
    need = -(-global_batch_size // mbs)
    grown = True
    while sum(c // mbs for c in counts.values()) < need and grown:
        grown = False
        for s in shapes:
            if sum(c // mbs for c in counts.values()) >= need:
                break
            if counts[s] + mbs <= room:
                counts[s] += mbs
                grown = True
    if sum(c // mbs for c in counts.values()) < need:
        raise ValueError(
            f"data.synthetic_samples={samples_per_shape} per shape x {len(shapes)} shapes is too "
            f"small to hold out one global batch ({global_batch_size}) for validation"
        )
    return counts


# --------------------------------------------------------------------------- writers


def _compact(emb: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Drop trailing padding rows when that loses nothing (mask a prefix, padding rows zero):
    the pipeline pads them back identically. Returns (emb, mask or None for all ones)."""
    if mask is None:
        return emb, None
    mask = np.asarray(mask).astype(bool)
    n = int(mask.sum())
    if n and mask[:n].all() and not np.any(emb[n:]):
        return emb[:n], None
    return emb, mask


def latent_shard_sample(sample: dict, key: str) -> dict:
    """A numpy latent sample (``latent``, ``text_emb``, optional ``text_mask``, ``clip_emb``,
    ``clip_mask``, ``caption``, ``class``) -> the raw shard sample (``KEY.latent.npy``, ...); with
    ``rejected_latent`` a preference pair (``KEY.chosen.latent.npy``, ``KEY.rejected.latent.npy``)."""
    import json

    if "rejected_latent" in sample:  # a Video-DPO pair: two latents of one prompt
        out = {
            "__key__": key,
            "chosen.latent.npy": npy_bytes(np.ascontiguousarray(sample["latent"])),
            "rejected.latent.npy": npy_bytes(np.ascontiguousarray(sample["rejected_latent"])),
        }
    else:
        out = {"__key__": key, "latent.npy": npy_bytes(np.ascontiguousarray(sample["latent"]))}
    for name in ("text", "clip"):
        emb = sample.get(f"{name}_emb")
        if emb is None:
            continue
        emb, mask = _compact(np.asarray(emb), sample.get(f"{name}_mask"))
        out[f"{name}_emb.npy"] = npy_bytes(np.ascontiguousarray(emb))
        if mask is not None:
            out[f"{name}_mask.npy"] = npy_bytes(mask)
    if sample.get("caption"):
        out["txt"] = str(sample["caption"]).encode("utf-8")
    meta = {"shape": list(np.shape(sample["latent"]))}
    if "class" in sample:
        meta["class"] = int(sample["class"])
    out["json"] = json.dumps(meta).encode("utf-8")
    return out


def write_latent_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    meta: dict | None = None,
    progress: bool = True,
) -> dict:
    """Numpy latent samples (see :func:`latent_shard_sample`; ``key`` optional) -> latent shards
    with ``index.json`` (kind ``latent``; ``shapes`` counts the samples per latent shape).
    Returns the index."""
    writer = IndexedShardWriter(
        out_dir, kind="latent", shard_size=shard_size, max_count=max_count, meta=dict(meta or {})
    )
    shapes: dict[str, int] = {}
    bar = progress_bar(f"sharding latents into {out_dir}", unit="samples", enabled=progress)
    for key, sample in keyed_samples(samples, "latent"):
        writer.write(latent_shard_sample(sample, key))
        name = shape_name(np.shape(sample["latent"])[1:])
        shapes[name] = shapes.get(name, 0) + 1
        bar.set_postfix_str(f"{len(writer.shards)} shards done", refresh=False)
        bar.update(1)
    writer.meta["shapes"] = shapes
    index = writer.close()
    bar.set_postfix_str(f"{len(index['shards'])} shards, {index['samples']} samples")
    bar.close()
    return index


def read_npz_sample(
    path: str | Path,
    *,
    in_channels: int | None = None,
    patch_size: int = 1,
    caption_dim: int | None = None,
    clip_dim: int | None = None,
) -> dict:
    """One per-sample ``.npz`` (``latent``, ``text_emb``, optional ``text_mask``, ``clip_emb``,
    ``clip_mask``, ``caption``; with ``rejected_latent`` of the latent's shape it is a Video-DPO
    pair, ``latent`` the chosen one) checked as the stream checks it; raises :class:`BadSample`
    (or OSError) naming the problem."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, SyntaxError, zipfile.BadZipFile) as exc:
        raise BadSample(f"unreadable ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        archive_type = "a single .npy array" if isinstance(archive, np.ndarray) else type(archive).__name__
        raise BadSample(f"not an .npz archive ({archive_type})")
    try:
        with archive:
            missing = [k for k in ("latent", "text_emb") if k not in archive.files]
            if missing:
                raise BadSample(f"missing {', '.join(missing)} (has {sorted(archive.files) or 'nothing'})")
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, zlib.error) as exc:  # a damaged member
        raise BadSample(f"unreadable member ({exc})") from None
    sample = {"latent": check_latent(arrays["latent"], in_channels=in_channels, patch_size=patch_size, name="latent")}
    if "rejected_latent" in arrays:
        rejected = check_latent(
            arrays["rejected_latent"], in_channels=in_channels, patch_size=patch_size, name="rejected_latent"
        )
        if rejected.shape != sample["latent"].shape:
            raise BadSample(
                f"rejected_latent has shape {tuple(rejected.shape)}, "
                f"the (chosen) latent {tuple(sample['latent'].shape)}"
            )
        sample["rejected_latent"] = rejected
    for name, dim in (("text", caption_dim), ("clip", clip_dim)):
        if f"{name}_emb" in arrays:
            check_embedding(arrays[f"{name}_emb"], arrays.get(f"{name}_mask"), dim=dim, tokens=None, name=name)
            sample[f"{name}_emb"] = arrays[f"{name}_emb"]
            if f"{name}_mask" in arrays:
                sample[f"{name}_mask"] = arrays[f"{name}_mask"].astype(bool)
        elif name == "clip" and clip_dim:
            raise BadSample(f"missing clip_emb (clip_dim={clip_dim} given)")
    if "caption" in arrays:
        caption = arrays["caption"]
        if caption.dtype.kind != "U" or caption.size != 1:
            raise BadSample(f"caption must be one string, got {caption.dtype} {caption.shape}")
        sample["caption"] = str(caption.reshape(()))
    return sample


def write_npz_latent_shards(
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    in_channels: int | None = None,
    patch_size: int = 1,
    caption_dim: int | None = None,
    clip_dim: int | None = None,
    progress: bool = True,
) -> dict:
    """Per-sample ``.npz`` files -> latent shards (``fmtrain data shard latents``). A file that
    cannot be used is skipped with a warning naming it; the index lists them under ``skipped``."""
    skipped: list[dict] = []

    def good() -> Iterator[dict]:
        bar = progress_bar(f"reading {len(files)} .npz files", total=len(files), unit="files", enabled=progress)
        for path in map(Path, files):
            bar.update(1)
            try:
                sample = read_npz_sample(
                    path, in_channels=in_channels, patch_size=patch_size, caption_dim=caption_dim, clip_dim=clip_dim
                )
            except (BadSample, OSError) as exc:
                reason = str(exc) if isinstance(exc, BadSample) else f"unreadable ({exc.strerror or exc})"
                log.warning("fmtrain data: warning: latent file %s skipped: %s", path, reason)
                skipped.append({"file": str(path), "reason": reason})
                continue
            sample["key"] = path.stem
            yield sample
        bar.close()

    try:
        index = write_latent_shards(
            good(), out_dir, shard_size=shard_size, max_count=max_count, meta={"skipped": skipped}, progress=False
        )
    except BadDataError:
        raise BadDataError(
            f"none of the {len(files)} .npz files could be sharded ({len(skipped)} skipped; see the warnings)"
        ) from None
    return index


def write_synthetic_latent_shards(
    out_dir: str | Path,
    *,
    shapes: Sequence[Shape],
    samples: int,
    classes: int,
    channels: int,
    caption_tokens: int,
    caption_dim: int,
    clip_tokens: int = 0,
    clip_dim: int = 0,
    seed: int = 0,
    valid_fraction: float = 0.0,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    progress: bool = True,
    preference: bool = False,
) -> tuple[dict, dict | None]:
    """:func:`synthetic_latent_dataset` written as ``OUT/train`` (and ``OUT/valid``, with
    ``round(samples * valid_fraction)`` (at least 1) samples of each shape, when
    ``valid_fraction > 0``); ``preference``: as Video-DPO pairs (:func:`synthetic_preference_pairs`).
    Returns (train index, valid index or None)."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    dataset = synthetic_latent_dataset(
        shapes, samples, classes, channels, caption_tokens, caption_dim, clip_tokens, clip_dim, seed
    )
    if preference:
        dataset = synthetic_preference_pairs(dataset)
    held = max(1, round(samples * valid_fraction)) if valid_fraction > 0 else 0
    if held >= samples:
        raise ValueError(f"valid_fraction={valid_fraction} of {samples} samples per shape leaves no training sample")
    train, valid = split_by_shape(dataset, {tuple(s): held for s in shapes}, seed)
    meta = {
        "synthetic": {
            "shapes": [shape_name(s) for s in shapes],
            "classes": classes,
            "channels": channels,
            "caption_tokens": caption_tokens,
            "caption_dim": caption_dim,
            "clip_tokens": clip_tokens,
            "clip_dim": clip_dim,
            "seed": seed,
            "preference": preference,
        }
    }
    out_dir = Path(out_dir)
    train_index = write_latent_shards(
        train, out_dir / "train", shard_size=shard_size, max_count=max_count, meta=meta, progress=progress
    )
    valid_index = None
    if valid:
        valid_index = write_latent_shards(
            valid, out_dir / "valid", shard_size=shard_size, max_count=max_count, meta=meta, progress=progress
        )
    return train_index, valid_index


def synthetic_preference_pairs(samples: Sequence[dict]) -> list[dict]:
    """Video-DPO pairs from synthetic samples: each sample's own latent (its caption's class) is
    chosen, the latent of the next sample of the same shape and another class is rejected."""
    by_shape: dict[Shape, list[int]] = {}
    for i, sample in enumerate(samples):
        by_shape.setdefault(tuple(np.shape(sample["latent"])[1:]), []).append(i)
    pairs = []
    for i, sample in enumerate(samples):
        group = by_shape[tuple(np.shape(sample["latent"])[1:])]
        start = group.index(i)
        others = [samples[group[(start + k) % len(group)]] for k in range(1, len(group))]
        rejected = next((o for o in others if o.get("class") != sample.get("class")), None)
        if rejected is None:
            raise ValueError("synthetic preference pairs need at least two classes per latent shape")
        pairs.append({**sample, "rejected_latent": rejected["latent"]})
    return pairs


class LatentPreferencePipeline(LatentPipeline):
    """Video-DPO pairs: ``KEY.chosen.latent.npy`` and ``KEY.rejected.latent.npy`` (the same shape)
    of one prompt, with the prompt's embeddings as in :class:`LatentPipeline`. A microbatch of n
    pairs is 2n rows: the chosen latents, then the rejected ones, every other field repeated, so
    both halves share each sample's ``sample_seed`` and with it the flow-matching t and noise."""

    def units(self, sample: dict, ctx: SampleContext) -> list[dict]:
        missing = [f for f in ("chosen.latent.npy", "rejected.latent.npy") if f not in sample]
        if missing:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"missing field: {', '.join('.' + f for f in missing)} (has {fields or 'nothing'})")
        fields = {k: v for k, v in sample.items() if k not in ("chosen.latent.npy", "rejected.latent.npy")}
        (item,) = super().units({**fields, "latent.npy": sample["chosen.latent.npy"]}, ctx)
        rejected = check_latent(
            _load_npy(sample, "rejected.latent.npy"), in_channels=self.in_channels, patch_size=self.patch_size
        )
        if rejected.shape != item["latent"].shape:
            raise BadSample(f"rejected latent {rejected.shape} differs from the chosen one {item['latent'].shape}")
        item["rejected_latent"] = rejected
        return [item]

    def collate(self, items: list[dict]) -> dict:
        return super().collate(list(items) + [{**item, "latent": item["rejected_latent"]} for item in items])

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "kind": "latent_preference"}


# --------------------------------------------------------------------------- from a Config


def synthetic_datasets(cfg) -> tuple[list[dict], list[dict]]:
    """(train, valid) in-memory synthetic samples of a config (``data.corpus=synthetic:latents``);
    the split does not depend on ``eval.*``. Deterministic, so every rank builds the same."""
    from fmtrain.config import latent_shapes

    m, d, t = cfg.model, cfg.data, cfg.train
    shapes = latent_shapes(cfg)
    clip_dim = m.clip_dim
    samples = synthetic_latent_dataset(
        shapes,
        d.synthetic_samples,
        d.synthetic_classes,
        m.in_channels,
        m.caption_tokens,
        m.caption_dim,
        m.clip_tokens if clip_dim > 0 else 0,
        clip_dim,
        cfg.run.seed,
    )
    counts = synthetic_holdout(d.synthetic_samples, shapes, t.micro_batch_size, t.global_batch_size)
    return split_by_shape(samples, counts, cfg.run.seed)


def prepare_latent_data(cfg, topo, run_dir: Path):
    """The latent (DiT) counterpart of :func:`fmtrain.data.text.prepare_text_data`: (None, train, valid).

    ``data.shards`` set: streaming loaders (validation over ``data.valid_shards`` when
    ``eval.interval > 0``). Otherwise ``data.corpus`` must be ``synthetic:latents``: the
    in-memory synthetic dataset and :class:`LatentMicrobatchSampler` (validation over a held-out
    split when ``eval.interval > 0``). No tokenizer: the first element is always None.
    """
    from fmtrain.config import ConfigError

    d, t, m = cfg.data, cfg.train, cfg.model
    if d.shards:
        pipeline = LatentPreferencePipeline if cfg.objective.ROWS_PER_SAMPLE == 2 else LatentPipeline
        return (None, *stream_loaders(cfg, pipeline.from_config(cfg), topo, run_dir))
    if cfg.objective.ROWS_PER_SAMPLE == 2:
        raise ConfigError(
            f"objective.name={cfg.objective.name} trains on preference latent shards: set data.shards "
            "(fmtrain data synth-latents --preference, or shards of chosen/rejected latents)"
        )
    if d.corpus != SYNTHETIC_CORPUS:
        raise ConfigError(
            f"data.corpus={d.corpus!r}: model.family={m.family} trains on latents: set data.shards "
            f"to latent shards (fmtrain data shard latents / synth-latents), or "
            f"data.corpus={SYNTHETIC_CORPUS} for the in-memory synthetic dataset"
        )
    try:
        train_samples, valid_samples = synthetic_datasets(cfg)
        clip = dict(clip_tokens=m.clip_tokens if m.clip_dim > 0 else 0, clip_dim=m.clip_dim)
        common = dict(caption_tokens=m.caption_tokens, caption_dim=m.caption_dim, **clip)
        train = LatentMicrobatchSampler(
            train_samples, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed, tag=0, **common
        )
        valid = None
        if cfg.eval.interval:
            valid = LatentMicrobatchSampler(
                valid_samples, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed, tag=1, **common
            )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data.corpus={SYNTHETIC_CORPUS}: {exc}") from None
    return None, train, valid


__all__ = [
    "SYNTHETIC_CORPUS",
    "parse_latent_shapes",
    "shape_name",
    "check_latent",
    "check_embedding",
    "collate_latents",
    "LatentPipeline",
    "LatentPreferencePipeline",
    "synthetic_preference_pairs",
    "class_prototypes",
    "class_text_embeddings",
    "synthetic_latent_dataset",
    "holdout_indices",
    "split_by_shape",
    "LatentMicrobatchSampler",
    "synthetic_holdout",
    "latent_shard_sample",
    "write_latent_shards",
    "read_npz_sample",
    "write_npz_latent_shards",
    "write_synthetic_latent_shards",
    "synthetic_datasets",
    "prepare_latent_data",
]
