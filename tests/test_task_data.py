"""In-context task data (LaVin-DiT): manifest and synthetic pixel task shards, their stream
pipeline and bad samples, latent task shards, the synthetic latent tasks and exact resume."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from fmtrain.cli import main as fmtrain_main
from fmtrain.config import Config, ConfigError, validate
from fmtrain.data.shards import INDEX_NAME, read_shard, resolve_shards
from fmtrain.data.stream import SampleContext, StreamingLoader, StreamSpec, batch_hash
from fmtrain.data.tasks import (
    LatentTaskPipeline,
    PixelTaskPipeline,
    SyntheticTasks,
    TaskMicrobatchSampler,
    apply_latent_task,
    blur_sigma,
    fit_frames,
    greyscale,
    pixel_task_sample,
    prepare_task_data,
    read_image,
    write_latent_task_shards,
    write_manifest_task_shards,
)
from fmtrain.data.video import decode_frames, encode_mp4, moving_shapes, synthetic_video, write_video_shards

C = 4
IMAGE_TASKS = ("colorize", "flip_h", "flip_v", "deblur", "edges")


def png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def frame(seed: int, width: int = 24, height: int = 24) -> np.ndarray:
    return moving_shapes(seed, frames=1, width=width, height=height)[0][0]


@pytest.fixture
def caplog_data(caplog):
    caplog.set_level(logging.WARNING, logger="fmtrain.data")
    return caplog


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    """8 mp4 videos of moving shapes (12 frames, 40x32) as video shards, 3 per shard."""
    root = tmp_path_factory.mktemp("videos")
    paths = []
    for i in range(8):
        data, _ = synthetic_video(100 + i, frames=12, width=40, height=32)
        paths.append(root / f"vid-{i}.mp4")
        paths[-1].write_bytes(data)
    write_video_shards(paths, root / "shards", max_count=3, progress=False)
    return root / "shards"


def cfg_for(**data) -> SimpleNamespace:
    """A config with the sections the task data reads (the family's model section is only
    asked for in_channels)."""
    base = Config()
    base.train.global_batch_size, base.train.micro_batch_size = 4, 2
    base.run.seed = 5
    for key, value in {"num_workers": 0, "shuffle_buffer": 3, **data}.items():
        setattr(base.data, key, value)
    model = SimpleNamespace(family="lavin_dit", in_channels=C, patch_size=1)
    return SimpleNamespace(data=base.data, train=base.train, run=base.run, eval=base.eval, model=model)


def topo(dp=1, dp_rank=0):
    return SimpleNamespace(dp=dp, dp_rank=dp_rank, tp_rank=0, pp_rank=0, rank=dp_rank)


def loader(spec_text, pipeline, *, dp=1, buffer=0, gbs=2, mbs=2, bad=0.01, seed=3) -> StreamingLoader:
    spec = StreamSpec(
        resolve_shards(spec_text), dp_size=dp, num_workers=0, seed=seed, shuffle_buffer=buffer, max_bad_fraction=bad
    )
    return StreamingLoader(pipeline, spec, global_batch_size=gbs, micro_batch_size=mbs)


def raw_samples(spec_text) -> list[dict]:
    return [s for shard in resolve_shards(spec_text) for _, s in read_shard(shard)]


def ctx(key="k") -> SampleContext:
    return SampleContext(seed=1, epoch=0, stream=0, index=0, shard="s.tar", key=key)


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] in [-1, 1], as the pipeline normalises."""
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------- manifest shards


def test_manifest_shards_read_back_equal_to_the_sources(tmp_path, capsys, caplog_data):
    src = tmp_path / "files"
    src.mkdir()
    pixels = {}
    for i in range(7):
        pixels[f"img{i}.png"] = frame(i)
        (src / f"img{i}.png").write_bytes(png(pixels[f"img{i}.png"]))
    Image.fromarray(frame(20)).save(src / "photo.jpg", quality=90)
    pixels["photo.jpg"] = np.asarray(Image.open(src / "photo.jpg").convert("RGB"))
    Image.fromarray(frame(21, width=32)).save(src / "wide.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    lines = [
        {
            "task": "recolour",
            "pairs": [["files/img0.png", "files/img1.png"], ["files/img2.png", "files/img3.png"]],
            "query": "files/img4.png",
            "target": "files/img5.png",
        },
        {
            "task": "recolour",
            "pairs": [
                ["files/img6.png", "files/photo.jpg"],
                ["files/img1.png", "files/img0.png"],
                ["files/img3.png", "files/img2.png"],
            ],
            "query": str(src / "img5.png"),
            "target": "files/img4.png",
        },
        {
            "task": "x",
            "pairs": [["files/img0.png", "files/missing.png"]],
            "query": "files/img4.png",
            "target": "files/img5.png",
        },
        {
            "task": "x",
            "pairs": [["files/img0.png", "files/broken.png"]],
            "query": "files/img4.png",
            "target": "files/img5.png",
        },
        {
            "task": "x",
            "pairs": [["files/img0.png", "files/wide.png"]],
            "query": "files/img4.png",
            "target": "files/img5.png",
        },
        {"task": "x", "pairs": [["files/img0.png"]], "query": "files/img4.png", "target": "files/img5.png"},
        "not json",
    ]
    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert fmtrain_main(["data", "shard", "tasks", "--manifest", str(manifest), "--out", str(out)]) == 0
    assert "wrote 2 task samples (recolour 2) in 1 shards" in capsys.readouterr().out
    text = caplog_data.text
    assert f"{manifest}:3 skipped: {src / 'missing.png'}: cannot read" in text
    assert f"{manifest}:4 skipped: {src / 'broken.png'}: unreadable image" in text
    assert f"{manifest}:5 skipped: {src / 'wide.png'} is 32x24, {src / 'img0.png'} is 24x24" in text
    assert f"{manifest}:6 skipped: pairs[0] must be [input path, output path]" in text
    assert f"{manifest}:7 skipped: not valid JSON" in text
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["kind"] == "tasks" and index["tasks"] == {"recolour": 2} and index["item_kinds"] == {"image": 2}
    assert [s["line"] for s in index["skipped"]] == [3, 4, 5, 6, 7]
    first, second = raw_samples(str(out))
    assert json.loads(first["json"]) == {"pairs": 2, "kind": "image", "frames": 1, "height": 24, "width": 24, "line": 1}
    assert json.loads(second["json"])["pairs"] == 3 and second["task.txt"] == b"recolour"
    # read back through the stream: the first two pairs, pixels equal to the files' own
    cfg = cfg_for(shards=str(out), task_pairs=2, task_size=24)
    train, valid = prepare_task_data(cfg, topo(), tmp_path)
    assert isinstance(train.pipeline, PixelTaskPipeline) and valid is None
    batch = train.microbatches(0, 0)[0]
    assert set(batch) == {"context_pixels", "target_pixels", "sample_seed", "task", "key"}
    assert batch["context_pixels"].shape == (2, 5, 3, 1, 24, 24) and batch["context_pixels"].dtype == torch.float32
    assert batch["target_pixels"].shape == (2, 3, 1, 24, 24) and batch["sample_seed"].dtype == torch.int64
    assert batch["task"] == ["recolour", "recolour"] and sorted(batch["key"]) == [
        "recolour-000000001",
        "recolour-000000002",
    ]
    files = {
        "recolour-000000001": ["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "img5.png"],
        "recolour-000000002": ["img6.png", "photo.jpg", "img1.png", "img0.png", "img5.png", "img4.png"],
    }
    for j, key in enumerate(batch["key"]):
        want = [to_unit(pixels[name][None]) for name in files[key]]
        assert torch.equal(batch["context_pixels"][j], torch.stack(want[:5]))
        assert torch.equal(batch["target_pixels"][j], want[5])
        assert batch["context_pixels"][j].min() >= -1 and batch["context_pixels"][j].max() <= 1
    # fewer stored pairs than asked: bad; a third pair is used when asked for
    three = PixelTaskPipeline(pairs=3, size=24)
    assert three.units(second, ctx())[0]["context"].shape == (7, 3, 1, 24, 24)
    with pytest.raises(Exception, match=r"holds 2 example pairs, data.task_pairs=3"):
        three.units(first, ctx())


def test_manifest_of_clips(tmp_path, caplog_data):
    clips = {}
    for i in range(4):
        clips[f"c{i}.mp4"] = moving_shapes(30 + i, frames=4, width=16, height=16)[0]
        (tmp_path / f"c{i}.mp4").write_bytes(encode_mp4(clips[f"c{i}.mp4"]))
    (tmp_path / "short.mp4").write_bytes(encode_mp4(clips["c0.mp4"][:3]))
    lines = [
        {"task": "t", "pairs": [["c0.mp4", "c1.mp4"]], "query": "c2.mp4", "target": "c3.mp4"},
        {"task": "t", "pairs": [["c0.mp4", "short.mp4"]], "query": "c2.mp4", "target": "c3.mp4"},
        {"task": "t", "pairs": [["c0.mp4", "c1.mp4"]], "query": "c2.mp4", "target": "img.png"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    index = write_manifest_task_shards(tmp_path / "m.jsonl", tmp_path / "out", progress=False)
    assert index["samples"] == 1 and index["item_kinds"] == {"video": 1}
    assert (
        f"m.jsonl:2 skipped: {tmp_path / 'short.mp4'} is 16x16 x 3 frames, {tmp_path / 'c0.mp4'} is 16x16 x 4 frames"
        in caplog_data.text
    )
    assert "m.jsonl:3 skipped: mixes images and clips" in caplog_data.text
    (sample,) = raw_samples(str(tmp_path / "out"))
    assert sample["in0.mp4"] == (tmp_path / "c0.mp4").read_bytes(), "clips are stored as they are"
    assert json.loads(sample["json"])["frames"] == 4
    item = PixelTaskPipeline(pairs=1, size=16).units(sample, ctx())[0]
    assert item["context"].shape == (3, 3, 4, 16, 16) and item["target"].shape == (3, 4, 16, 16)
    for k, name in enumerate(["c0.mp4", "c1.mp4", "c2.mp4"]):
        got, _ = decode_frames((tmp_path / name).read_bytes(), range(4), None)
        assert torch.equal(item["context"][k], to_unit(np.stack([got[i] for i in range(4)])))
    assert (item["context"][0] - to_unit(clips["c0.mp4"])).abs().mean() < 0.05  # mp4 is lossy, but close


def test_fit_modes():
    wide = moving_shapes(3, frames=2, width=32, height=16)[0]
    crop = fit_frames(wide, 16, "center_crop")  # shorter side already 16: the centre square, untouched
    assert torch.equal(crop, torch.from_numpy(wide[:, :, 8:24]).permute(3, 0, 1, 2).float())
    squash = fit_frames(wide, 16, "resize")
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(wide).permute(0, 3, 1, 2).float(), size=(16, 16), mode="bicubic", antialias=True
    ).clamp(0, 255)
    assert squash.shape == (3, 2, 16, 16) and torch.allclose(squash, reference.permute(1, 0, 2, 3))
    with pytest.raises(ValueError, match="fit='stretch' is not one of resize, center_crop"):
        fit_frames(wide, 16, "stretch")


# --------------------------------------------------------------------------- synthetic pixel tasks


def _torch_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (taps / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).double().reshape(-1, 1, *x.shape[1:3])  # (F*3, 1, H, W)
    t = torch.nn.functional.pad(t, (radius, radius, radius, radius), mode="reflect")
    t = torch.nn.functional.conv2d(t, k.view(1, 1, 1, -1))
    t = torch.nn.functional.conv2d(t, k.view(1, 1, -1, 1))
    return t.reshape(x.shape[0], 3, *x.shape[1:3]).permute(0, 2, 3, 1).numpy()


def _torch_sobel(x: np.ndarray) -> np.ndarray:
    luma = torch.from_numpy(x).double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    luma = torch.nn.functional.pad(luma[:, None] / 255, (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
    gx = torch.nn.functional.conv2d(luma, sobel.view(1, 1, 3, 3))
    gy = torch.nn.functional.conv2d(luma, sobel.T.reshape(1, 1, 3, 3))
    return (torch.sqrt(gx**2 + gy**2) / 4).clamp(0, 1)[:, 0].numpy() * 255


def _items(sample: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(inputs, outputs) of a PNG task sample, the query and target last."""
    pairs = json.loads(sample["json"])["pairs"]
    ins = [read_image(sample[f"in{i}.png"])[0] for i in range(pairs)] + [read_image(sample["query.png"])[0]]
    outs = [read_image(sample[f"out{i}.png"])[0] for i in range(pairs)] + [read_image(sample["target.png"])[0]]
    return ins, outs


def test_synthetic_image_tasks_are_what_their_names_say(tmp_path, video_shards, capsys, caplog_data):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(frame(50 + i, width=30, height=20)).save(images / f"im{i}.png")
    (images / "junk.png").write_bytes(b"nope")
    out = tmp_path / "tasks"
    args = ["data", "shard", "tasks", "--from", str(video_shards), str(images), "--synthetic", ",".join(IMAGE_TASKS)]
    args += ["--pairs", "2", "--size", "16", "--samples", "15", "--seed", "4", "--out", str(out), "--max-count", "6"]
    assert fmtrain_main(args) == 0
    assert (
        "wrote 15 task samples (colorize 3, deblur 3, edges 3, flip_h 3, flip_v 3) in 3 shards"
        in capsys.readouterr().out
    )
    assert f"source {images / 'junk.png'} skipped: unreadable image" in caplog_data.text
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["synthetic"]["source_items"] == 12 and len(index["skipped"]) == 1
    seen_sources, strongest = set(), 0
    for sample in raw_samples(str(out)):
        task = sample["task.txt"].decode()
        meta = json.loads(sample["json"])
        assert meta["kind"] == "image" and meta["pairs"] == 2 and sample["__key__"].startswith(task)
        assert len(set(meta["sources"])) == 3, "the pairs and the query come from different source items"
        seen_sources.update(meta["sources"])
        ins, outs = _items(sample)
        assert all(x.shape == (16, 16, 3) for x in ins + outs)
        for x, y in zip(ins, outs):
            if task == "flip_h":
                assert np.array_equal(y, x[:, ::-1]) and not np.array_equal(x, y)
            elif task == "flip_v":
                assert np.array_equal(y, x[::-1]) and not np.array_equal(x, y)
            elif task == "colorize":
                assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2])
                assert np.array_equal(x, greyscale(y[None])[0]) and np.ptp(y.astype(int), axis=-1).max() > 50
            elif task == "deblur":
                assert np.abs(x.astype(float) - _torch_blur(y[None], blur_sigma(16))[0]).max() <= 0.5 + 1e-9
                assert np.abs(np.diff(x.astype(float), axis=1)).mean() < np.abs(np.diff(y.astype(float), axis=1)).mean()
            elif task == "edges":
                assert np.array_equal(y[..., 0], y[..., 2])
                assert np.abs(y[..., 0].astype(float) - _torch_sobel(x[None])[0]).max() <= 0.5 + 1e-6
                strongest = max(strongest, int(y.max()))
    assert strongest > 100, "the shapes' outlines are bright in some edge map"
    assert any("key" in s for s in seen_sources) and any(s.endswith(".png") for s in seen_sources)


def test_synthetic_clip_tasks_and_frame_prediction(tmp_path, video_shards):
    out = tmp_path / "clips"
    args = ["data", "shard", "tasks", "--from", str(video_shards), "--synthetic", "frame_prediction,flip_h"]
    args += ["--pairs", "1", "--size", "16", "--frames", "3", "--samples", "4", "--out", str(out)]
    assert fmtrain_main(args) == 0
    sources = {f"{s['__url__']} key {s['__key__']}": s for s in raw_samples(str(video_shards))}
    for sample in raw_samples(str(out)):
        meta = json.loads(sample["json"])
        assert meta["kind"] == "video" and meta["frames"] == 3 and "in0.mp4" in sample and "target.mp4" in sample
        query = decode_frames(sample["query.mp4"], range(3), None)[0]
        target = decode_frames(sample["target.mp4"], range(3), None)[0]
        query, target = (np.stack([d[i] for i in range(3)]).astype(float) for d in (query, target))
        assert query.shape == (3, 16, 16, 3)
        if sample["task.txt"] == b"flip_h":
            assert np.abs(target - query[:, :, ::-1]).mean() < 6 < np.abs(target - query).mean()
            continue
        # the target continues the query: the next 3 frames of the query's source video
        video = sources[meta["sources"][-1]]["mp4"]
        got, _ = decode_frames(video, range(12), None)
        source = np.stack(
            [fit_frames(got[i][None], 16, "center_crop")[:, 0].permute(1, 2, 0).numpy() for i in range(12)]
        )
        errors = [np.abs(source[s : s + 3] - query).mean() for s in range(7)]
        start = int(np.argmin(errors))
        assert errors[start] < 6
        assert (
            np.abs(source[start + 3 : start + 6] - target).mean()
            < 6
            < np.abs(source[start : start + 3] - target).mean()
        )


# --------------------------------------------------------------------------- bad pixel samples


def _image_sample(key, pairs=2, size=8, **changes) -> dict:
    rng = np.random.default_rng(len(key))
    items = [("png", png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))) for _ in range(2 * pairs + 2)]
    sample = pixel_task_sample(key, "flip_h", items, kind="image", frames=1, height=size, width=size)
    for name, value in changes.items():
        if value is None:
            sample.pop(name)
        else:
            sample[name] = value
    return sample


def test_bad_pixel_samples_are_skipped_and_counted(tmp_path, caplog_data):
    rng = np.random.default_rng(0)
    samples = [_image_sample(f"s{i:02d}") for i in range(10)]
    samples[1] = _image_sample("s01", **{"out1.png": None})
    samples[3] = _image_sample("s03", **{"in0.png": png(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))})
    samples[5] = _image_sample("s05", **{"query.png": b"\x89PNG garbage"})
    samples[6] = _image_sample("s06", pairs=1)
    samples[8] = _image_sample("s08", **{"target.png": None})
    with wds.TarWriter(str(tmp_path / "x.tar"), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample)
    lo = loader(str(tmp_path / "x.tar"), PixelTaskPipeline(pairs=2, size=8), bad=0.6)
    keys = [k for step in range(3) for b in lo.microbatches(step, 0) for k in b["key"]]
    assert keys == [f"s{i:02d}" for i in (0, 2, 4, 7, 9, 0)]
    text = caplog_data.text
    assert "x.tar key s01: missing pair 1's output: no .out1.png (the .json says 2 pairs of images" in text
    assert "x.tar key s03: .out0.png is 8x8, .in0.png is 6x8: the items of a sample must share one size" in text
    assert "x.tar key s05: unreadable .query.png (not a readable image" in text
    assert "x.tar key s06: holds 1 example pairs, data.task_pairs=2" in text
    assert "x.tar key s08: missing the target: no .target.png" in text
    assert lo.state_dict(0)["workers"][0]["bad"] == 5
    # clips: frame counts must agree with the .json and with each other
    clip = moving_shapes(1, frames=4, width=8, height=8)[0]
    four, three = encode_mp4(clip), encode_mp4(clip[:3])
    good = pixel_task_sample("c", "t", [("mp4", four)] * 4, kind="video", frames=4, height=8, width=8)
    item = PixelTaskPipeline(pairs=1, size=8).units(good, ctx())[0]
    assert item["context"].shape == (3, 3, 4, 8, 8) and item["target"].shape == (3, 4, 8, 8)
    assert PixelTaskPipeline(pairs=1, size=8, frames=2).units(good, ctx())[0]["target"].shape == (3, 2, 8, 8)
    short = pixel_task_sample(
        "c", "t", [("mp4", four)] * 3 + [("mp4", three)], kind="video", frames=4, height=8, width=8
    )
    with pytest.raises(Exception, match=r"\.target\.mp4 has 3 frames, the \.json says 4"):
        PixelTaskPipeline(pairs=1, size=8).units(short, ctx())
    with pytest.raises(Exception, match=r"clips of 4 frames, data.task_frames=5"):
        PixelTaskPipeline(pairs=1, size=8, frames=5).units(good, ctx())


# --------------------------------------------------------------------------- latent task shards


def test_latent_task_shards_round_trip(tmp_path, caplog_data):
    tasks = SyntheticTasks(items=24, channels=C, size=4, tasks=["flip_h", "negate"], pairs=3, seed=2)
    samples = [tasks.draw(i) for i in range(7)]
    samples[2] = {**samples[2], "context": samples[2]["context"].astype(np.float16)}
    index = write_latent_task_shards(samples, tmp_path / "lat", max_count=3, progress=False)
    assert index["kind"] == "task_latents" and index["samples"] == 7 and index["shapes"] == {f"{C}x7x4x4": 7}
    cfg = cfg_for(shards=str(tmp_path / "lat"), task_pairs=3, shuffle_buffer=0)
    train, _ = prepare_task_data(cfg, topo(), tmp_path)
    assert isinstance(train.pipeline, LatentTaskPipeline)
    by_key = {s["key"]: s for s in samples}
    seen = set()
    for batch in train.microbatches(0, 0) + train.microbatches(1, 0):
        assert set(batch) == {"context", "target", "item_frames", "pairs", "sample_seed", "task", "key"}
        assert batch["item_frames"] == 1 and batch["pairs"] == 3 and batch["context"].shape == (2, C, 7, 4, 4)
        for j, key in enumerate(batch["key"]):
            want = by_key[key]
            assert torch.equal(batch["context"][j], torch.from_numpy(want["context"].astype(np.float32)))
            assert torch.equal(batch["target"][j], torch.from_numpy(want["target"]))
            assert batch["task"][j] == want["task"]
            seen.add(key)
    assert len(seen) == 7
    # fewer pairs asked than stored: the first pairs and the query
    two = LatentTaskPipeline(in_channels=C, pairs=2)
    raw = raw_samples(str(tmp_path / "lat"))[0]
    item = two.units(raw, ctx())[0]
    want = by_key[raw["__key__"]]["context"]
    assert np.array_equal(item["context"], np.concatenate([want[:, :4], want[:, 6:]], axis=1))

    # bad ones named: channels, frames against the .json, pairs
    def bad(**over):
        sample = dict(raw)
        sample.update(over)
        return sample

    npy = lambda a: (lambda b: (np.save(b, a), b.getvalue())[1])(io.BytesIO())  # noqa: E731
    cases = {
        r"\.context\.npy has 3 channels, model\.in_channels=4": bad(
            **{"context.npy": npy(np.zeros((3, 7, 4, 4), np.float32))}
        ),
        r"\.context\.npy has 5 frames; the \.json's pairs=3 and item_frames=1 make \(2 x 3 \+ 1\) x 1 = 7": bad(
            **{"context.npy": npy(np.zeros((C, 5, 4, 4), np.float32))}
        ),
        r"\.target\.npy has 2 frames, the \.json's item_frames=1": bad(
            **{"target.npy": npy(np.zeros((C, 2, 4, 4), np.float32))}
        ),
        r"holds 3 example pairs, data\.task_pairs=4": raw,
        r"missing field: \.target\.npy": {k: v for k, v in raw.items() if k != "target.npy"},
        r"\.json field 'item_frames' must be a positive integer": bad(json=b'{"pairs": 3}'),
    }
    for match, sample in cases.items():
        pipe = LatentTaskPipeline(in_channels=C, pairs=4 if "task_pairs=4" in match else 3)
        with pytest.raises(Exception, match=match):
            pipe.units(sample, ctx())
    with wds.TarWriter(str(tmp_path / "bad.tar"), encoder=False, mtime=0.0) as writer:
        for i, sample in enumerate(raw_samples(str(tmp_path / "lat"))):
            if i == 1:
                sample = {**sample, "context.npy": npy(np.zeros((3, 7, 4, 4), np.float32))}
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    lo = loader(str(tmp_path / "bad.tar"), LatentTaskPipeline(in_channels=C, pairs=3), bad=0.5)
    lo.microbatches(0, 0)
    assert f"key {raw_samples(str(tmp_path / 'lat'))[1]['__key__']}: .context.npy has 3 channels" in caplog_data.text
    assert lo.state_dict(0)["workers"][0]["bad"] == 1
    # the kind decides the pipeline; other kinds are refused, naming the setting
    (tmp_path / "lat" / INDEX_NAME).write_text(json.dumps({**index, "kind": "latent"}))
    with pytest.raises(ConfigError, match=r"data.shards=.*says kind 'latent'"):
        prepare_task_data(cfg, topo(), tmp_path)


# --------------------------------------------------------------------------- synthetic latent tasks


def test_synthetic_latent_tasks_deterministic_and_held_out(tmp_path):
    cfg = cfg_for(corpus="synthetic:tasks", synthetic_samples=40, task_latent_size=6, task_pairs=2)
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 2
    cfg.eval.interval = 5
    train, valid = prepare_task_data(cfg, topo(dp=2), tmp_path)
    again, _ = prepare_task_data(cfg, topo(dp=2, dp_rank=1), tmp_path)
    one, _ = prepare_task_data(cfg, topo(dp=1), tmp_path)
    assert isinstance(train, TaskMicrobatchSampler) and isinstance(valid, TaskMicrobatchSampler)
    hashes = [batch_hash(b) for s in (3, 0, 7) for r in range(2) for b in train.microbatches(s, r)]
    assert hashes == [batch_hash(b) for s in (3, 0, 7) for r in range(2) for b in again.microbatches(s, r)]
    assert hashes[:4] == [batch_hash(b) for b in one.microbatches(3, 0)], "the global batch is the same at DP 1"
    batch = train.microbatches(0, 1)[0]
    assert set(batch) == {"context", "target", "item_frames", "pairs", "sample_seed", "task", "key"}
    assert batch["context"].shape == (2, C, 5, 6, 6) and batch["target"].shape == (2, C, 1, 6, 6)
    assert batch["item_frames"] == 1 and batch["pairs"] == 2 and batch["context"].dtype == torch.float32
    data = train.tasks
    assert len(data.valid_queries) == 5 and not set(data.valid_queries) & set(data.train_items)
    items = torch.from_numpy(data.items[:, :, 0])  # (N, C, h, w)

    def which(x: torch.Tensor) -> int:
        match = [i for i in range(len(items)) if torch.equal(items[i], x)]
        assert len(match) == 1
        return match[0]

    tasks_seen = set()
    for step in range(6):
        for r in range(2):
            for b in train.microbatches(step, r):
                for j in range(2):
                    frames = b["context"][j].permute(1, 0, 2, 3)  # (5, C, h, w)
                    used = [which(frames[k]) for k in (0, 2, 4)]
                    assert not set(used) & set(data.valid_queries), "held-out items never appear in training"
                    assert len(set(used)) == 3
                    task = b["task"][j]
                    tasks_seen.add(task)
                    for k in (0, 2):
                        assert np.array_equal(frames[k + 1].numpy(), apply_latent_task(task, frames[k].numpy()))
                    assert np.array_equal(b["target"][j, :, 0].numpy(), apply_latent_task(task, frames[4].numpy()))
    assert tasks_seen == {"flip_h", "flip_v"}
    for b in valid.microbatches(0, 0) + valid.microbatches(1, 1):
        for j in range(2):
            assert which(b["context"][j, :, 4]) in data.valid_queries
    # a flip changes an item a lot; one held-out query paired with examples of either task
    change = [
        np.linalg.norm(apply_latent_task(t, x) - x) / np.linalg.norm(x)
        for t in ("flip_h", "flip_v")
        for x in data.items
    ]
    assert min(change) > 0.5
    query = data.valid_queries[0]
    examples = data.train_items[:2]
    h, v = data.sample(query, "flip_h", examples), data.sample(query, "flip_v", examples)
    assert np.array_equal(h["context"][:, 4], v["context"][:, 4]) and not np.array_equal(h["target"], v["target"])
    assert np.array_equal(h["target"], data.items[query][..., ::-1])
    with pytest.raises(ValueError, match="must be different items"):
        data.sample(examples[0], "flip_h", examples)
    cfg.eval.interval = 0
    assert prepare_task_data(cfg, topo(), tmp_path)[1] is None
    cfg.data.corpus = "builtin:shakespeare"
    with pytest.raises(ConfigError, match=r"data.corpus='builtin:shakespeare'.*data.corpus=synthetic:tasks"):
        prepare_task_data(cfg, topo(), tmp_path)


def test_config_fields_are_validated():
    validate(Config())
    for key, value, match in (
        ("task_pairs", 0, r"data.task_pairs=0 must be at least 1"),
        ("task_frames", -1, r"data.task_frames=-1 must be at least 0"),
        ("task_fit", "stretch", r"data.task_fit='stretch' is not one of resize, center_crop"),
        ("synthetic_tasks", ["flip_h", "flip_x"], r"data.synthetic_tasks\[1\]='flip_x' is not one of .*flip_h"),
        ("synthetic_tasks", [], r"data.synthetic_tasks is empty"),
        ("synthetic_tasks", ["negate", "negate"], r"'negate' is listed twice"),
    ):
        cfg = Config()
        setattr(cfg.data, key, value)
        with pytest.raises(ConfigError, match=match):
            validate(cfg)


# --------------------------------------------------------------------------- exact resume


def test_resume_of_a_bucketed_pixel_stream_is_exact(tmp_path, video_shards):
    """Image tasks (F=1) and clip tasks (F=2) in one stream, two buckets: resumed from any
    step's state the stream gives the same microbatches as the run that was never stopped."""
    common = ["--from", str(video_shards), "--synthetic", "flip_h,flip_v", "--pairs", "1", "--size", "8"]
    assert (
        fmtrain_main(
            ["data", "shard", "tasks", *common, "--samples", "9", "--out", str(tmp_path / "a"), "--max-count", "4"]
        )
        == 0
    )
    assert (
        fmtrain_main(
            ["data", "shard", "tasks", *common, "--frames", "2", "--samples", "7", "--out", str(tmp_path / "b")]
        )
        == 0
    )
    spec = f"{tmp_path / 'a'}/shard-{{000000..000002}}.tar::{tmp_path / 'b' / 'shard-000000.tar'}"

    def fresh():
        return loader(spec, PixelTaskPipeline(pairs=1, size=8), dp=2, buffer=3, gbs=4, mbs=2)

    straight_loader = fresh()
    straight = [[batch_hash(b) for b in straight_loader.microbatches(s, r)] for s in range(8) for r in range(2)]
    held = False
    for k in range(1, 8):
        first = fresh()
        for s in range(k):
            for r in range(2):
                first.microbatches(s, r)
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))
        held |= any(p["held"] for state in states for p in state["workers"])
        resumed = fresh()
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        again = [[batch_hash(b) for b in resumed.microbatches(s, r)] for s in range(k, 8) for r in range(2)]
        assert again == straight[2 * k :], f"resumed at step {k}"
    assert held, "some resume point holds samples waiting in a bucket"
