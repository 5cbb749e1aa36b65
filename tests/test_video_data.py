"""Streaming video data: synthetic mp4 shards, PyAV decode + clip sampling, exact resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from fmtrain.cli import main as fmtrain_main
from fmtrain.data.shards import INDEX_NAME, read_shard, resolve_shards
from fmtrain.data.stream import SampleContext, StreamingLoader, StreamSpec, batch_hash, stream_order
from fmtrain.data.video import IMAGENET_MEAN, IMAGENET_STD, VideoPipeline, decode_frames, probe_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """10 synthetic mp4 videos (12 frames, 40x32) in 4 shards, made by the tool."""
    spec = importlib.util.spec_from_file_location("make_synthetic_videos", REPO / "tools" / "make_synthetic_videos.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path_factory.mktemp("video")
    assert (
        tool.main(
            [
                "--out",
                str(root),
                "--count",
                "10",
                "--frames",
                "12",
                "--width",
                "40",
                "--height",
                "32",
                "--max-count",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    return root


def pipeline(**kw) -> VideoPipeline:
    return VideoPipeline(**{"frames": 4, "stride": 2, "size": 16, "crop": "random", "clips": 2, **kw})


def video_loader(root, *, dp=2, workers=2, gbs=4, mbs=1, **kw):
    spec = StreamSpec(
        resolve_shards(str(root / "shards")),
        dp_size=dp,
        num_workers=workers,
        seed=11,
        shuffle_buffer=2,
        max_bad_fraction=kw.pop("bad", 0.01),
    )
    return StreamingLoader(pipeline(**kw), spec, global_batch_size=gbs, micro_batch_size=mbs)


def test_synthetic_videos_are_real_mp4_shards(video_dir):
    index = json.loads((video_dir / "shards" / INDEX_NAME).read_text())
    assert index["samples"] == 10 and [s["samples"] for s in index["shards"]] == [3, 3, 3, 1]
    assert index["fields"] == ["json", "mp4", "txt"] and index["skipped"] == []
    captions = {
        json.loads(line)["video"]: json.loads(line)["caption"]
        for line in (video_dir / "captions.jsonl").read_text().splitlines()
    }
    samples = [s for shard in resolve_shards(str(video_dir / "shards")) for _, s in read_shard(shard)]
    assert [s["__key__"] for s in samples] == [f"vid-{i:04d}" for i in range(10)]
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta == {**probe_video(sample["mp4"]), "source": meta["source"]}
        assert (meta["frames"], meta["width"], meta["height"], meta["fps"]) == (12, 40, 32, 8.0)
        assert sample["txt"].decode() == captions[meta["source"]]
        assert sample["mp4"] == (video_dir / "videos" / meta["source"]).read_bytes()


def test_clip_sampling_resize_crop_and_normalise(video_dir):
    sample = next(s for _, s in read_shard(resolve_shards(str(video_dir / "shards"))[0]))
    ctx = SampleContext(seed=1, epoch=0, stream=0, index=0, shard="s", key="k")
    center = VideoPipeline(frames=4, stride=3, size=16, crop="center", clips=3)
    clips = center.units(sample, ctx)
    assert len(clips) == 3 and all(c["video"].shape == (3, 4, 16, 16) for c in clips)
    assert clips[0]["key"] == sample["__key__"] and clips[0]["caption"] == sample["txt"].decode()
    # the reference: the same start frames, resized to shorter side 16 (32x40 -> 16x20), centre crop
    rng = ctx.rng()
    starts = [int(rng.integers(0, 12 - 10 + 1)) for _ in range(3)]
    frames, _ = decode_frames(sample["mp4"], range(12), 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    for start, clip in zip(starts, clips):
        raw = np.stack([frames[start + 3 * k] for k in range(4)])[:, :, 2:18]  # (T, 16, 16, 3)
        want = (torch.from_numpy(raw).permute(3, 0, 1, 2).float() / 255 - mean) / std
        assert torch.allclose(clip["video"], want, atol=1e-5)
    # the same sample position gives the same clips; random crops differ between positions
    again = center.units(sample, ctx)
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(clips, again))
    rand = pipeline(clips=4)
    one = [c["video"] for c in rand.units(sample, ctx)]
    other = [c["video"] for c in rand.units(sample, SampleContext(1, 0, 0, 1, "s", "k"))]
    assert not all(torch.equal(a, b) for a, b in zip(one, other))
    # a video shorter than the clip span repeats its last frame
    long = VideoPipeline(frames=5, stride=4, size=16, crop="center").units(sample, ctx)[0]["video"]
    assert torch.equal(long[:, 3], long[:, 4])  # frames 12 and 16 both clamp to frame 11


def test_multiscale_crop_and_flip_are_drawn_per_sample(video_dir):
    sample = next(s for _, s in read_shard(resolve_shards(str(video_dir / "shards"))[0]))
    ctx = SampleContext(seed=1, epoch=0, stream=0, index=0, shard="s", key="k")
    multiscale = VideoPipeline(frames=4, stride=3, size=16, crop="multiscale", clips=3)
    clips = [c["video"] for c in multiscale.units(sample, ctx)]
    assert all(c.shape == (3, 4, 16, 16) for c in clips)
    assert all(torch.equal(a, b["video"]) for a, b in zip(clips, multiscale.units(sample, ctx)))
    low, high = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD), (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert all(low - 1e-4 <= float(c.min()) and float(c.max()) <= high + 1e-4 for c in clips)
    # Flipping draws after the start frames: each clip is the centre crop or its mirror image.
    plain = VideoPipeline(frames=4, stride=3, size=16, crop="center", clips=8).units(sample, ctx)
    flipped = VideoPipeline(frames=4, stride=3, size=16, crop="center", clips=8, flip=True).units(sample, ctx)
    mirrored = [not torch.equal(f["video"], p["video"]) for f, p in zip(flipped, plain)]
    for f, p, m in zip(flipped, plain, mirrored):
        assert torch.equal(f["video"], p["video"].flip(-1) if m else p["video"])
    assert 0 < sum(mirrored) < 8


def test_video_stream_resume_and_coverage_dp2_workers2(video_dir):
    straight_loader = video_loader(video_dir)
    batches = {(s, r): straight_loader.microbatches(s, r) for s in range(7) for r in range(2)}
    straight_loader.close()
    straight = [[batch_hash(b) for b in batches[s, r]] for s in range(7) for r in range(2)]
    assert batches[0, 0][0]["video"].shape == (1, 3, 4, 16, 16)
    # every video once per epoch in every stream, each cut into 2 clips, across ranks and workers
    spec = straight_loader.spec
    for rank in range(2):
        keys = {0: [], 1: []}
        for step in range(7):
            for j, batch in enumerate(batches[step, rank]):
                keys[(step * 2 + j) % 2] += batch["key"]
        for worker, got in keys.items():
            order = [
                k
                for e in range(4)
                for sh, p in stream_order(spec, e, spec.stream_id(rank, worker))
                for k in [f"vid-{3 * sh + p:04d}"] * 2
            ]
            assert got == order[: len(got)]
    epoch0 = [w for s in range(4) for w in stream_order(spec, 0, s)]
    assert sorted(3 * sh + p for sh, p in epoch0) == list(range(10))
    # stop after k steps, resume from the JSON state: the same batches
    for k in (2, 5):
        first = video_loader(video_dir)
        for s in range(k):
            for r in range(2):
                first.microbatches(s, r)
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))
        first.close()
        resumed = video_loader(video_dir)
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        got = [[batch_hash(b) for b in resumed.microbatches(s, r)] for s in range(k, 7) for r in range(2)]
        resumed.close()
        assert got == straight[2 * k :], f"resumed at step {k}"


def test_undecodable_and_missing_videos_warn_and_count(video_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fmtrain.data")
    good = [s for shard in resolve_shards(str(video_dir / "shards")) for _, s in read_shard(shard)][:4]
    with wds.TarWriter(str(tmp_path / "v.tar"), encoder=False) as writer:
        for sample in good:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
        writer.write({"__key__": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(500), "json": b"{}"})
        writer.write({"__key__": "nomp4", "txt": b"a caption without a video"})
    spec = StreamSpec(
        resolve_shards(str(tmp_path / "v.tar")),
        dp_size=1,
        num_workers=0,
        seed=0,
        shuffle_buffer=0,
        max_bad_fraction=0.5,
    )
    loader = StreamingLoader(pipeline(clips=1), spec, global_batch_size=2, micro_batch_size=2)
    keys = [k for step in range(3) for b in loader.microbatches(step, 0) for k in b["key"]]
    assert "broken" not in keys and "nomp4" not in keys and len(keys) == 6
    assert "v.tar key broken: undecodable video" in caplog.text
    assert "v.tar key nomp4: missing field: no video" in caplog.text
    assert loader.state_dict(0)["workers"][0]["bad"] == 2


def test_shard_video_command(video_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fmtrain.data")
    videos = tmp_path / "in"
    videos.mkdir()
    for name in ("vid-0000.mp4", "vid-0001.mp4", "vid-0002.mp4"):
        (videos / name).write_bytes((video_dir / "videos" / name).read_bytes())
    (videos / "zz-broken.mp4").write_bytes(b"not a video")
    latents = tmp_path / "lat"
    latents.mkdir()
    for i in range(3):
        np.save(latents / f"vid-{i:04d}.npy", np.full((4, 2, 2), i, dtype=np.float32))
    captions = tmp_path / "captions.tsv"
    captions.write_text("vid-0000.mp4\tzero\nvid-0001\tone\nvid-0002.mp4\ttwo\nzz-broken.mp4\tbroken\n")
    assert (
        fmtrain_main(
            [
                "data",
                "shard",
                "video",
                str(videos),
                "--captions",
                str(captions),
                "--latents",
                str(latents),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["samples"] == 3 and index["fields"] == ["json", "latent.npy", "mp4", "txt"]
    assert [s["file"] for s in index["skipped"]] == [str(videos / "zz-broken.mp4")]
    assert "zz-broken.mp4 skipped: undecodable" in caplog.text
    spec = StreamSpec(
        resolve_shards(str(tmp_path / "out")), dp_size=1, num_workers=0, seed=0, shuffle_buffer=0, shuffle=False
    )
    batch = StreamingLoader(pipeline(clips=1), spec, global_batch_size=3, micro_batch_size=3).microbatches(0, 0)[0]
    assert batch["caption"] == ["zero", "one", "two"]
    assert batch["latent"].shape == (3, 4, 2, 2) and batch["latent"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
