"""Latent data for the DiT: validation and collate, shape bucketing in the stream, exact resume
with samples held in buckets, the synthetic dataset, the in-memory sampler, writers and CLI."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from fmtrain.cli import main as fmtrain_main
from fmtrain.config import Config, ConfigError
from fmtrain.data.latents import (
    LatentMicrobatchSampler,
    LatentPipeline,
    class_prototypes,
    prepare_latent_data,
    synthetic_latent_dataset,
    write_latent_shards,
)
from fmtrain.data.shards import INDEX_NAME, read_shard, resolve_shards
from fmtrain.data.stream import (
    BadSample,
    SampleContext,
    StreamingLoader,
    StreamSpec,
    StreamWorker,
    batch_hash,
    stream_order,
)
from fmtrain.models.step_video.config import StepVideoModelConfig
from fmtrain.objectives.flow_matching import FlowMatchingConfig

C, CAP_L, CAP_D, CLIP_L, CLIP_D = 4, 6, 8, 3, 5


def npy(array, **kw) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), **kw)
    return buffer.getvalue()


def pipe(**kw) -> LatentPipeline:
    return LatentPipeline(
        **{
            "in_channels": C,
            "caption_tokens": CAP_L,
            "caption_dim": CAP_D,
            "patch_size": 2,
            "clip_tokens": CLIP_L,
            "clip_dim": CLIP_D,
            **kw,
        }
    )


def raw_sample(key="k", shape=(2, 4, 6), text_len=4, clip_len=2, dtype=np.float16, **fields) -> dict:
    rng = np.random.default_rng(len(key))
    sample = {
        "__key__": key,
        "latent.npy": npy(rng.standard_normal((C, *shape)).astype(dtype)),
        "text_emb.npy": npy(rng.standard_normal((text_len, CAP_D)).astype(np.float32)),
        "clip_emb.npy": npy(rng.standard_normal((clip_len, CLIP_D)).astype(np.float16)),
    }
    for name, value in fields.items():
        if value is None:
            sample.pop(name, None)
        else:
            sample[name] = value if isinstance(value, bytes) else npy(value)
    return sample


def ctx(index=0, epoch=0) -> SampleContext:
    return SampleContext(seed=3, epoch=epoch, stream=0, index=index, shard="s.tar", key="k")


def dataset(shapes=((1, 4, 4), (2, 4, 2), (1, 2, 4)), per_shape=(11, 9, 7), seed=0) -> list[dict]:
    """Small synthetic samples of several shapes, interleaved (so every shard mixes shapes)."""
    parts = [
        synthetic_latent_dataset([s], n, 3, C, CAP_L, CAP_D, CLIP_L, CLIP_D, seed) for s, n in zip(shapes, per_shape)
    ]
    out = []
    for i in range(max(per_shape)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def write(root: Path, samples, max_count=5) -> dict:
    return write_latent_shards(samples, root, max_count=max_count, progress=False)


def loader(root, *, dp=2, workers=0, buffer=3, gbs=4, mbs=2, bad=0.01, shards=None, seed=7, **kw):
    spec = StreamSpec(
        shards or resolve_shards(str(root)),
        dp_size=dp,
        num_workers=workers,
        seed=seed,
        shuffle_buffer=buffer,
        max_bad_fraction=bad,
    )
    return StreamingLoader(pipe(**kw), spec, global_batch_size=gbs, micro_batch_size=mbs)


def hashes(lo, steps, dp=2) -> list[list[str]]:
    return [[batch_hash(b) for b in lo.microbatches(step, r)] for step in steps for r in range(dp)]


@pytest.fixture
def caplog_data(caplog):
    caplog.set_level(logging.WARNING, logger="fmtrain.data")
    return caplog


# --------------------------------------------------------------------------- pipeline


def test_pipeline_pads_truncates_masks_and_seeds():
    p = pipe()
    short = p.units(
        raw_sample("a", text_len=4, clip_len=2, **{"text_mask.npy": np.array([1, 1, 0, 1], np.uint8)}), ctx(0)
    )
    long = p.units(raw_sample("bb", text_len=9, clip_len=5), ctx(1))
    assert len(short) == len(long) == 1 and p.bucket_of(short[0]) == (2, 4, 6)
    assert short[0]["sample_seed"] == p.units(raw_sample("a"), ctx(0))[0]["sample_seed"]  # the sample's own rng
    assert short[0]["sample_seed"] != long[0]["sample_seed"] and 0 <= long[0]["sample_seed"] < 2**63
    batch = p.collate([p.make_item([short], 1), p.make_item([long], 1)])
    assert set(batch) == {"latent", "text_emb", "text_mask", "clip_emb", "clip_mask", "sample_seed", "key"}
    assert batch["latent"].shape == (2, C, 2, 4, 6) and batch["latent"].dtype == torch.float32
    assert batch["text_emb"].shape == (2, CAP_L, CAP_D) and batch["text_mask"].dtype == torch.bool
    assert batch["text_mask"].tolist() == [[True, True, False, True, False, False], [True] * CAP_L]
    assert batch["clip_emb"].shape == (2, CLIP_L, CLIP_D)
    assert batch["clip_mask"].tolist() == [[True, True, False], [True] * 3]
    assert torch.all(batch["text_emb"][0, 4:] == 0) and torch.all(batch["clip_emb"][0, 2:] == 0)  # zero padding
    text = np.load(io.BytesIO(raw_sample("bb", text_len=9)["text_emb.npy"]))
    assert torch.equal(batch["text_emb"][1], torch.from_numpy(text[:CAP_L]))  # truncated
    assert batch["sample_seed"].dtype == torch.int64 and batch["key"] == ["a", "bb"]
    latent = np.load(io.BytesIO(raw_sample("a")["latent.npy"]))
    assert torch.equal(batch["latent"][0], torch.from_numpy(latent.astype(np.float32)))
    # without a second encoder: no clip keys, and a sample's clip embedding is ignored
    single = pipe(clip_tokens=0, clip_dim=0)
    one = single.collate(single.units(raw_sample("c", **{"clip_emb.npy": None}), ctx()))
    assert "clip_emb" not in one and "clip_mask" not in one
    assert single.fingerprint()["bucketing"] == "latent_shape"
    with pytest.raises(ValueError, match="one latent shape"):
        p.collate(p.units(raw_sample("a"), ctx()) + p.units(raw_sample("b", shape=(1, 4, 6)), ctx()))


BAD_CASES = {
    "missing latent": (
        {"latent.npy": None},
        r"missing field: \.latent\.npy \(has \['clip_emb.npy', 'text_emb.npy'\]\)",
    ),
    "missing text": ({"text_emb.npy": None}, r"missing field: \.text_emb\.npy"),
    "missing clip": ({"clip_emb.npy": None}, r"missing field: \.clip_emb\.npy \(model\.clip_dim > 0 needs"),
    "not 4-D": (
        {"latent.npy": np.zeros((C, 4, 6), np.float16)},
        r"\.latent\.npy must be 4-D \[C, T, H, W\], got shape \(4, 4, 6\)",
    ),
    "channels": ({"latent.npy": np.zeros((3, 1, 4, 6), np.float16)}, r"has 3 channels, model\.in_channels=4"),
    "patch": ({"latent.npy": np.zeros((C, 1, 4, 5), np.float16)}, r"4x5 is not divisible by model\.patch_size=2"),
    "integer latent": ({"latent.npy": np.zeros((C, 1, 4, 4), np.int16)}, r"must be float16/float32, got int16"),
    "nan latent": ({"latent.npy": np.full((C, 1, 4, 4), np.nan, np.float32)}, r"\.latent\.npy holds non-finite"),
    "text dim": ({"text_emb.npy": np.zeros((3, 7), np.float32)}, r"\.text_emb\.npy has width 7, model\.caption_dim=8"),
    "text 1-D": ({"text_emb.npy": np.zeros(8, np.float32)}, r"\.text_emb\.npy must be 2-D"),
    "clip dim": ({"clip_emb.npy": np.zeros((3, 4), np.float32)}, r"\.clip_emb\.npy has width 4, model\.clip_dim=5"),
    "inf text": ({"text_emb.npy": np.full((2, CAP_D), np.inf, np.float32)}, r"\.text_emb\.npy holds non-finite"),
    "empty mask": ({"text_mask.npy": np.zeros(4, bool)}, r"empty \.text_mask: no valid token within the first 6"),
    "mask past truncation": (
        {"text_emb.npy": np.ones((9, CAP_D), np.float32), "text_mask.npy": np.arange(9) == 8},
        r"empty \.text_mask",
    ),
    "mask length": ({"text_mask.npy": np.ones(3, bool)}, r"\.text_mask\.npy must be 1-D with 4 entries"),
    "mask values": ({"clip_mask.npy": np.array([2, 1], np.int64)}, r"\.clip_mask\.npy must be bool or 0/1"),
    "corrupt npy": ({"latent.npy": npy(np.zeros((C, 1, 4, 4), np.float16))[:-7]}, r"unreadable \.latent\.npy \(EOF"),
    "not npy": ({"text_emb.npy": b"\x00garbage" * 9}, r"unreadable \.text_emb\.npy"),
    "pickled": (
        {"latent.npy": npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)},
        r"unreadable \.latent\.npy",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_sample_names_its_problem(case):
    fields, match = BAD_CASES[case]
    with pytest.raises(BadSample, match=match):
        pipe().units(raw_sample("k", **fields), ctx())


def test_bad_and_corrupt_samples_in_a_shard_are_counted_not_fatal(tmp_path, caplog_data):
    samples = [raw_sample(f"s{i:02d}", shape=(1, 4, 4)) for i in range(12)]
    samples[3]["latent.npy"] = samples[3]["latent.npy"][:40]  # a cut-off .npy
    samples[8] = raw_sample("s08", **{"clip_emb.npy": None})
    with wds.TarWriter(str(tmp_path / "x.tar"), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample)
    lo = loader(
        tmp_path, dp=1, workers=0, buffer=0, gbs=2, mbs=2, bad=0.5, shards=resolve_shards(str(tmp_path / "x.tar"))
    )
    keys = [k for step in range(5) for b in lo.microbatches(step, 0) for k in b["key"]]
    assert keys == [f"s{i:02d}" for i in range(12) if i not in (3, 8)]
    assert "x.tar key s03: unreadable .latent.npy (EOF" in caplog_data.text
    assert "x.tar key s08: missing field: .clip_emb.npy" in caplog_data.text
    assert lo.state_dict(0)["workers"][0]["bad"] == 2


# --------------------------------------------------------------------------- bucketing in the stream


def _keys_by_place(spec) -> dict[tuple[int, int], str]:
    return {(i, p): s["__key__"] for i, shard in enumerate(spec.shards) for p, s in read_shard(shard)}


def test_bucketing_single_shape_microbatches_each_sample_once(tmp_path):
    """2 DP ranks x 2 DataLoader workers: every microbatch holds one latent shape; what the
    streams read (all of epoch 0 and more) is exactly what they emitted plus what their
    positions say is still held in buckets, and epoch 0 covers every sample once."""
    samples = dataset()
    write(tmp_path, samples)
    lo = loader(tmp_path, dp=2, workers=2, buffer=4, gbs=8, mbs=2)
    emitted = Counter()
    for step in range(6):
        for r in range(2):
            for batch in lo.microbatches(step, r):
                shapes = {k.split("-")[0] for k in batch["key"]}
                assert len(shapes) == 1 and "x".join(map(str, batch["latent"].shape[2:])) == shapes.pop()
                emitted.update(batch["key"])
    states = [lo.state_dict(r) for r in range(2)]
    lo.close()
    spec, names = lo.spec, _keys_by_place(lo.spec)
    read, held, epoch0 = Counter(), Counter(), Counter()
    for r, state in enumerate(states):
        for w, position in enumerate(state["workers"]):
            stream = spec.stream_id(r, w)
            assert position["epoch"] >= 1, "each stream got past its first epoch"
            for epoch in range(position["epoch"] + 1):
                order = stream_order(spec, epoch, stream)
                if epoch == position["epoch"]:
                    order = order[: position["consumed"]]
                read.update(names[where] for where in order)
                if epoch == 0:
                    epoch0.update(names[where] for where in order)
            held.update(names[stream_order(spec, e, stream)[i]] for e, i in position["held"])
            assert position["carry"] == position["offset"] == 0
    assert epoch0 == Counter(s["key"] for s in samples)  # every sample exactly once per epoch
    assert emitted + held == read and sum(held.values()) > 0


def test_resume_with_samples_held_in_buckets_matches_uninterrupted(tmp_path):
    write(tmp_path, dataset())
    straight = hashes(loader(tmp_path), range(14))
    held_any = held_earlier_epoch = False
    for k in range(1, 13):
        first = loader(tmp_path)
        assert hashes(first, range(k)) == straight[: 2 * k]
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))  # as in a checkpoint
        for state in states:
            for position in state["workers"]:
                held_any |= bool(position["held"])
                held_earlier_epoch |= any(e < position["epoch"] for e, _ in position["held"])
        resumed = loader(tmp_path)
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        assert hashes(resumed, range(k, 14)) == straight[2 * k :], f"resumed at step {k}"
    assert held_any and held_earlier_epoch, "some resume point must hold samples, one from an earlier epoch"


def test_resume_with_two_dataloader_workers(tmp_path):
    write(tmp_path, dataset())
    kw = dict(dp=2, workers=2, buffer=3, gbs=4, mbs=1)
    lo = loader(tmp_path, **kw, seed=1)
    straight = hashes(lo, range(8))
    lo.close()
    kw2 = dict(kw, mbs=2)  # mbs=1 never holds; mbs=2 does
    lo = loader(tmp_path, **kw2, seed=1)
    straight2 = hashes(lo, range(8))
    lo.close()
    for k, base, args in ((3, straight, kw), (3, straight2, kw2), (5, straight2, kw2)):
        first = loader(tmp_path, **args, seed=1)
        hashes(first, range(k))
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))
        first.close()
        resumed = loader(tmp_path, **args, seed=1)
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        assert hashes(resumed, range(k, 8)) == base[2 * k :]
        resumed.close()


class _Pairs(LatentPipeline):
    item_size = 2


class _Twice(LatentPipeline):
    def units(self, sample, ctx):
        return super().units(sample, ctx) * 2


def test_bucketing_needs_one_item_per_sample(tmp_path):
    write(tmp_path, dataset(per_shape=(4, 4, 4)))
    spec = StreamSpec(resolve_shards(str(tmp_path)), dp_size=1, num_workers=0, seed=0)
    args = dict(in_channels=C, caption_tokens=CAP_L, caption_dim=CAP_D, clip_tokens=CLIP_L, clip_dim=CLIP_D)
    with pytest.raises(ValueError, match="item_size 2; bucketing needs one item per sample"):
        StreamWorker(_Pairs(**args), spec, 0, 0, 2)
    with pytest.raises(ValueError, match="gave 2 units .* exactly one unit per usable sample"):
        next(iter(StreamWorker(_Twice(**args), spec, 0, 0, 2)))


# --------------------------------------------------------------------------- synthetic dataset and sampler


def _residual(x: np.ndarray, prototypes: np.ndarray) -> tuple[float, int]:
    """Smallest share of x's energy not explained by a scaled prototype, and which one."""
    flat, protos = x.ravel(), prototypes.reshape(len(prototypes), -1)
    fits = (protos @ flat) ** 2 / (np.sum(protos**2, axis=1) * np.sum(flat**2))
    return float(1 - fits.max()), int(fits.argmax())


def test_synthetic_dataset_is_deterministic_and_structured():
    shapes = [(2, 8, 8), (1, 16, 12)]
    a = synthetic_latent_dataset(shapes, 24, 4, 6, 10, 16, 5, 12, seed=4)
    b = synthetic_latent_dataset(shapes, 24, 4, 6, 10, 16, 5, 12, seed=4)
    c = synthetic_latent_dataset(shapes, 24, 4, 6, 10, 16, 5, 12, seed=5)
    assert len(a) == 48 and [s["key"] for s in a] == [s["key"] for s in b]
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in ("latent", "text_emb", "text_mask", "clip_emb", "clip_mask"))
    assert not np.array_equal(a[0]["latent"], c[0]["latent"])
    rng = np.random.default_rng(0)
    for shape in shapes:
        prototypes = class_prototypes(shape, 4, 6, seed=4)
        assert prototypes.shape == (4, 6, *shape)
        assert np.allclose(np.sqrt(np.mean(prototypes**2, axis=(1, 2, 3, 4))), 1.0, atol=1e-4)  # unit RMS
        group = [s for s in a if s["latent"].shape[1:] == shape]
        fits = [_residual(s["latent"], prototypes) for s in group]
        assert all(k == s["class"] for (_, k), s in zip(fits, group)), "nearest prototype = the sample's class"
        noise = [_residual(rng.standard_normal((6, *shape)), prototypes)[0] for _ in range(10)]
        assert max(r for r, _ in fits) < 0.05 < 0.5 < min(noise)
    # smooth: neighbouring cells differ far less than white noise (mean squared step 2 x variance)
    big = class_prototypes((1, 32, 32), 4, 6, seed=4)
    assert np.mean(np.diff(big, axis=-1) ** 2) < 0.3 and np.mean(np.diff(big, axis=-2) ** 2) < 0.3
    # text: per-class embeddings (different per token) + small noise, a valid prefix of >= 1 token
    for s in a:
        n = int(s["text_mask"].sum())
        assert n >= 1 and s["text_mask"][:n].all() and not np.any(s["text_emb"][n:])
        assert int(s["clip_mask"].sum()) >= 1
    same = [s for s in a if s["class"] == 0 and s["text_mask"][:2].all()]
    other = [s for s in a if s["class"] == 1 and s["text_mask"][:2].all()]
    assert np.abs(same[0]["text_emb"][:2] - same[1]["text_emb"][:2]).mean() < 0.3
    assert np.abs(same[0]["text_emb"][:2] - other[0]["text_emb"][:2]).mean() > 0.8
    assert np.abs(same[0]["text_emb"][0] - same[0]["text_emb"][1]).mean() > 0.8


def dit_config(**data) -> Config:
    cfg = Config(model=StepVideoModelConfig(family="step_video"), objective=FlowMatchingConfig(name="flow_matching"))
    m = cfg.model
    m.in_channels, m.caption_tokens, m.caption_dim, m.clip_tokens, m.clip_dim = C, CAP_L, CAP_D, CLIP_L, CLIP_D
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 2
    cfg.data.corpus = "synthetic:latents"
    cfg.data.synthetic_latent_shapes = [[2, 4, 4], [1, 4, 6]]
    cfg.data.synthetic_samples, cfg.data.synthetic_classes = 20, 3
    cfg.eval.interval = 5
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def topo(dp=2, dp_rank=0):
    return SimpleNamespace(dp=dp, dp_rank=dp_rank, tp_rank=0, pp_rank=0, rank=dp_rank, is_writer=dp_rank == 0)


def test_in_memory_sampler_is_stateless_and_single_shape(tmp_path):
    cfg = dit_config()
    tokenizer, train, valid = prepare_latent_data(cfg, topo(), tmp_path)
    assert tokenizer is None
    assert isinstance(train, LatentMicrobatchSampler) and isinstance(valid, LatentMicrobatchSampler)
    _, again, _ = prepare_latent_data(cfg, topo(dp_rank=1), tmp_path)
    assert [batch_hash(b) for s in (7, 0, 3) for r in range(2) for b in train.microbatches(s, r)] == [
        batch_hash(b) for s in (7, 0, 3) for r in range(2) for b in again.microbatches(s, r)
    ]
    batch = train.microbatches(0, 1)[0]
    assert set(batch) == {"latent", "text_emb", "text_mask", "clip_emb", "clip_mask", "sample_seed", "key"}
    assert batch["latent"].dtype == torch.float32 and batch["text_mask"].dtype == torch.bool
    assert batch["text_emb"].shape == (2, CAP_L, CAP_D) and batch["clip_emb"].shape == (2, CLIP_L, CLIP_D)
    # the microbatch stream: steps x ranks in order walk the epochs' microbatch lists
    walked = [mb for s in range(6) for r in range(2) for mb in train.batch_indices(s, r)]
    per_epoch = train.per_epoch
    assert walked == [(p // per_epoch, train.epoch_microbatches(p // per_epoch)[p % per_epoch]) for p in range(24)]
    for epoch in (0, 1):
        flat = [i for mb in train.epoch_microbatches(epoch) for i in mb]
        assert len(flat) == len(set(flat)) == per_epoch * 2  # each sample at most once per epoch
        for mb in train.epoch_microbatches(epoch):
            assert len({train.samples[i]["latent"].shape for i in mb}) == 1
    assert train.epoch_microbatches(0) != train.epoch_microbatches(1)
    seeds = {(e, i): train.sample_seed(i, e) for e in (0, 1) for i in range(3)}
    assert len(set(seeds.values())) == 6 and all(0 <= v < 2**63 for v in seeds.values())
    # held-out validation: disjoint keys, at least one global batch of whole single-shape microbatches
    train_keys = {s["key"] for s in train.samples}
    valid_keys = {s["key"] for s in valid.samples}
    assert not train_keys & valid_keys and len(train_keys | valid_keys) == 40
    assert valid.per_epoch * 2 >= 8
    cfg.eval.interval = 0
    assert prepare_latent_data(cfg, topo(), tmp_path)[2] is None
    cfg.data.corpus = "builtin:shakespeare"
    with pytest.raises(ConfigError, match=r"data.corpus='builtin:shakespeare'.*data.shards.*synthetic:latents"):
        prepare_latent_data(cfg, topo(), tmp_path)


# --------------------------------------------------------------------------- writers and CLI


def test_synth_latents_cli_writes_shards_the_loader_reads(tmp_path, capsys):
    out = tmp_path / "syn"
    assert (
        fmtrain_main(
            [
                "data",
                "synth-latents",
                str(out),
                "--shapes",
                "2x4x4,1x4x6",
                "--samples",
                "12",
                "--classes",
                "3",
                "--channels",
                str(C),
                "--caption-dim",
                str(CAP_D),
                "--caption-tokens",
                str(CAP_L),
                "--clip-dim",
                str(CLIP_D),
                "--clip-tokens",
                str(CLIP_L),
                "--seed",
                "2",
                "--valid-fraction",
                "0.25",
                "--max-count",
                "5",
            ]
        )
        == 0
    )
    assert "wrote 18 training samples" in capsys.readouterr().out
    index = json.loads((out / "train" / INDEX_NAME).read_text())
    assert index["kind"] == "latent" and index["shapes"] == {"2x4x4": 9, "1x4x6": 9} and len(index["shards"]) == 4
    assert json.loads((out / "valid" / INDEX_NAME).read_text())["samples"] == 6
    cfg = dit_config(shards=str(out / "train"), valid_shards=str(out / "valid"), num_workers=0, shuffle_buffer=4)
    cfg.run.seed = 2
    _, train, valid = prepare_latent_data(cfg, topo(), tmp_path)
    assert isinstance(train, StreamingLoader) and isinstance(valid, StreamingLoader)
    assert train.layout()["pipeline"]["bucketing"] == "latent_shape"
    reference = {
        s["key"]: s
        for s in synthetic_latent_dataset([(2, 4, 4), (1, 4, 6)], 12, 3, C, CAP_L, CAP_D, CLIP_L, CLIP_D, seed=2)
    }
    seen = set()
    for step in range(8):
        for r in range(2):
            for batch in train.microbatches(step, r):
                for j, key in enumerate(batch["key"]):
                    want = reference[key]
                    assert torch.equal(batch["latent"][j], torch.from_numpy(want["latent"]))
                    assert torch.equal(batch["text_emb"][j], torch.from_numpy(want["text_emb"]))
                    assert torch.equal(batch["text_mask"][j], torch.from_numpy(want["text_mask"]))
                    assert torch.equal(batch["clip_emb"][j], torch.from_numpy(want["clip_emb"]))
                    seen.add(key)
    assert len(seen) == 18
    assert {k for b in valid.microbatches(0, 0) + valid.microbatches(0, 1) for k in b["key"]} <= set(reference) - seen


def test_shard_latents_from_npz_skips_bad_files(tmp_path, capsys, caplog_data):
    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(1, 4, 4), (2, 4, 4), (1, 4, 4)]):
        np.savez(
            src / f"good{i}.npz",
            latent=rng.standard_normal((C, *shape)).astype(np.float16),
            text_emb=rng.standard_normal((3, CAP_D)).astype(np.float32),
            text_mask=np.array([1, 1, 0], np.uint8),
            clip_emb=rng.standard_normal((2, CLIP_D)).astype(np.float32),
            caption=np.array("a cat"),
        )
    np.savez(src / "no_text.npz", latent=np.zeros((C, 1, 4, 4), np.float16))
    np.savez(src / "flat.npz", latent=np.zeros((C, 4, 4), np.float16), text_emb=np.zeros((2, CAP_D), np.float32))
    np.savez(src / "channels.npz", latent=np.zeros((3, 1, 4, 4), np.float16), text_emb=np.zeros((2, CAP_D), np.float32))
    (src / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip" * 4)
    assert (
        fmtrain_main(["data", "shard", "latents", str(src), "--out", str(tmp_path / "out"), "--channels", str(C)]) == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 3 latent samples in 1 shards" in printed and "4 of 7 files skipped" in printed
    log_text = caplog_data.text
    assert f"latent file {src / 'no_text.npz'} skipped: missing text_emb" in log_text
    assert f"latent file {src / 'flat.npz'} skipped: latent must be 4-D" in log_text
    assert f"latent file {src / 'channels.npz'} skipped: latent has 3 channels" in log_text
    assert f"latent file {src / 'junk.npz'} skipped: unreadable" in log_text
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["samples"] == 3 and len(index["skipped"]) == 4 and index["shapes"] == {"1x4x4": 2, "2x4x4": 1}
    lo = loader(tmp_path / "out", dp=1, buffer=0, gbs=2, mbs=2, patch_size=1)
    batch = lo.microbatches(0, 0)[0]
    assert sorted(batch["key"]) == ["good0", "good2"]
    assert batch["text_mask"][:, :3].tolist() == [[True, True, False]] * 2
    sample = next(s for _, s in read_shard(resolve_shards(str(tmp_path / "out"))[0]))
    assert sample["txt"] == b"a cat"
    # nothing usable: an error, exit status 1
    assert fmtrain_main(["data", "shard", "latents", str(src / "junk.npz"), "--out", str(tmp_path / "none")]) == 1
    assert "none of the 1 .npz files could be sharded" in capsys.readouterr().err


def test_shard_latent_preference_pairs_from_npz(tmp_path, caplog_data):
    """An .npz with ``rejected_latent`` beside ``latent`` is a Video-DPO pair (latent = chosen);
    a rejected latent of another shape is skipped, naming the file."""
    src = tmp_path / "npz"
    src.mkdir()
    rng = np.random.default_rng(1)
    chosen, rejected = (rng.standard_normal((C, 1, 4, 4)).astype(np.float16) for _ in range(2))
    text = rng.standard_normal((3, CAP_D)).astype(np.float32)
    np.savez(src / "pair.npz", latent=chosen, rejected_latent=rejected, text_emb=text)
    np.savez(src / "odd.npz", latent=chosen, rejected_latent=rejected[:, :, :2], text_emb=text)
    assert fmtrain_main(["data", "shard", "latents", str(src), "--out", str(tmp_path / "out")]) == 0
    assert f"latent file {src / 'odd.npz'} skipped: rejected_latent has shape (4, 1, 2, 4)" in caplog_data.text
    key, sample = next(iter(read_shard(resolve_shards(str(tmp_path / "out"))[0])))
    assert np.array_equal(np.load(io.BytesIO(sample["chosen.latent.npy"])), chosen)
    assert np.array_equal(np.load(io.BytesIO(sample["rejected.latent.npy"])), rejected)
