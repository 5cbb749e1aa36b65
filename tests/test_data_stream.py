"""Streaming text data: shard writers, index, layout, exact resume, bad input, the real trainer."""

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
from conftest import TINY_OVERRIDES, read_metrics, run_fmtrain

from fmtrain.cli import main as fmtrain_main
from fmtrain.config import Config, ConfigError, load_config
from fmtrain.data.shards import (
    INDEX_NAME,
    BadDataError,
    expand_shard_spec,
    read_shard,
    resolve_shards,
)
from fmtrain.data.stream import (
    StreamingLoader,
    StreamResumeError,
    StreamSpec,
    batch_hash,
    stream_order,
)
from fmtrain.data.stream import restore_state as stream_restore_state
from fmtrain.data.text import (
    EOS_ID,
    TextPipeline,
    document_position_ids,
    ensure_stream_tokenizer,
    load_tokenizer,
    prepare_corpus_shards,
    read_documents,
    split_documents,
)

SEQ = 5  # windows of 6 tokens


# --------------------------------------------------------------------------- helpers


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write(sample)
    return path


def token_dataset(root: Path, sizes=(7, 5, 0, 9, 3, 8, 6)) -> tuple[list, dict]:
    """Pre-tokenised shards; document d is ``[d + 10] * (1 + d % 5)``, so a token names its
    document. Returns (shards, {(shard index, position): tokens}) and writes index.json."""
    root.mkdir(parents=True, exist_ok=True)
    docs, entries, d = {}, [], 0
    for j, size in enumerate(sizes):
        samples = []
        for p in range(size):
            tokens = [d + 10] * (1 + d % 5)
            docs[(j, p)] = tokens
            samples.append({"__key__": f"doc-{d:05d}", "tokens.npy": npy(np.array(tokens, dtype=np.uint16))})
            d += 1
        write_tar(root / f"s-{j:02d}.tar", samples)
        entries.append({"url": f"s-{j:02d}.tar", "samples": size})
    (root / INDEX_NAME).write_text(
        json.dumps(
            {"format": "fmtrain.shards/1", "kind": "text", "fields": ["tokens.npy"], "samples": d, "shards": entries}
        )
    )
    return docs


def text_loader(root: Path, *, dp=2, workers=2, buffer=4, seed=5, gbs=8, mbs=2, bad=0.01, shards=None, **kw):
    spec = StreamSpec(
        shards or resolve_shards(str(root)),
        dp_size=dp,
        num_workers=workers,
        seed=seed,
        shuffle_buffer=buffer,
        max_bad_fraction=bad,
    )
    return StreamingLoader(
        TextPipeline(kw.pop("tokenizer", None), SEQ, vocab_size=1000, **kw),
        spec,
        global_batch_size=gbs,
        micro_batch_size=mbs,
    )


def hashes(loader, steps, dp=2) -> list[list[str]]:
    return [[batch_hash(b) for b in loader.microbatches(step, r)] for step in steps for r in range(dp)]


def windows_of(batch) -> list[tuple[list[int], int]]:
    """(seq + 1 window, real tokens) per row of a text microbatch."""
    out = []
    for tokens, labels, mask in zip(batch["tokens"], batch["labels"], batch["loss_mask"]):
        out.append((tokens.tolist() + labels[-1:].tolist(), int(mask.sum()) + 1))
    return out


def expected_windows(spec, stream, docs, count) -> list[tuple[list[int], int]]:
    """What stream ``stream`` must produce: its documents in stream_order, EOS after each,
    cut into windows, the last window of each epoch padded with EOS."""
    out, epoch = [], 0
    while len(out) < count:
        flat = [t for where in stream_order(spec, epoch, stream) for t in docs[where] + [EOS_ID]]
        for i in range(0, len(flat), SEQ + 1):
            window = flat[i : i + SEQ + 1]
            out.append((window + [EOS_ID] * (SEQ + 1 - len(window)), len(window)))
        epoch += 1
    return out[:count]


@pytest.fixture
def caplog_data(caplog):
    caplog.set_level(logging.WARNING, logger="fmtrain.data")
    return caplog


# --------------------------------------------------------------------------- layout


def test_partition_is_webdatasets_split_by_node_then_worker(tmp_path, monkeypatch):
    token_dataset(tmp_path)
    spec = StreamSpec(resolve_shards(str(tmp_path)), dp_size=2, num_workers=3, seed=1)
    for epoch in (0, 1):
        units = spec.epoch_units(epoch)
        for rank in range(2):
            for worker in range(3):
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                monkeypatch.setenv("WORKER", str(worker))
                monkeypatch.setenv("NUM_WORKERS", "3")
                ours = spec.stream_units(epoch, spec.stream_id(rank, worker))
                assert ours == list(wds.split_by_worker(wds.split_by_node(iter(units))))
    assert spec.epoch_units(0) != spec.epoch_units(1)  # a per-epoch shard shuffle from the seed


def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, caplog_data):
    docs = token_dataset(tmp_path)
    loader = text_loader(tmp_path, dp=2, workers=2, buffer=4)
    assert "s-02.tar is empty" in caplog_data.text
    spec = loader.spec
    for epoch in (0, 1, 2):
        seen = [where for s in range(spec.streams) for where in stream_order(spec, epoch, s)]
        assert sorted(seen) == sorted(docs), "every sample exactly once per epoch"
    assert stream_order(spec, 0, 0) != stream_order(spec, 1, 0)
    # The loader (2 ranks x 2 DataLoader workers) delivers exactly those streams: microbatch m
    # of a rank comes from worker m % 2; every window matches the stream's packed documents.
    got = {(r, w): [] for r in range(2) for w in range(2)}
    for step in range(9):
        for rank in range(2):
            for j, batch in enumerate(loader.microbatches(step, rank)):
                got[rank, (step * loader.num_microbatches + j) % 2] += windows_of(batch)
    loader.close()
    for (rank, worker), windows in got.items():
        assert windows == expected_windows(spec, spec.stream_id(rank, worker), docs, len(windows)), (rank, worker)
    for (rank, worker), windows in got.items():  # 9 steps covered more than one epoch of every stream
        tokens = sum(len(docs[where]) + 1 for where in stream_order(spec, 0, spec.stream_id(rank, worker)))
        assert len(windows) > -(-tokens // (SEQ + 1))


def test_few_shards_are_sliced_so_every_stream_gets_samples(tmp_path):
    docs = token_dataset(tmp_path, sizes=(10,))
    spec = StreamSpec(resolve_shards(str(tmp_path)), dp_size=2, num_workers=2, seed=0)
    assert [(u.start, u.stop) for u in spec.units] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    seen = [where for s in range(4) for where in stream_order(spec, 0, s)]
    assert sorted(seen) == sorted(docs)
    with pytest.raises(BadDataError, match="fewer than the 12 streams"):
        StreamSpec(resolve_shards(str(tmp_path)), dp_size=3, num_workers=4, seed=0)


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("buffer", [0, 3, 1000])
def test_resume_in_process_matches_uninterrupted(tmp_path, buffer):
    token_dataset(tmp_path)
    straight = hashes(text_loader(tmp_path, workers=0, buffer=buffer), range(12))
    carried = False
    for k in (1, 5, 8):
        first = text_loader(tmp_path, workers=0, buffer=buffer)
        assert hashes(first, range(k)) == straight[: 2 * k]
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))  # as stored in a checkpoint
        carried |= any(w["carry"] and w["offset"] for s in states for w in s["workers"])
        resumed = text_loader(tmp_path, workers=0, buffer=buffer)
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        assert hashes(resumed, range(k, 12)) == straight[2 * k :], f"resumed at step {k}"
    assert carried, "some resume point must fall inside a document"


def test_resume_with_two_dataloader_workers_per_rank(tmp_path):
    token_dataset(tmp_path)
    loader = text_loader(tmp_path, dp=2, workers=2, buffer=3, mbs=1)  # 4 microbatches per rank-step
    straight = hashes(loader, range(9))
    loader.close()
    k = 3  # 12 microbatches per rank: the round-robin restarts at worker 0; k=5 (20) too
    for k in (3, 5):
        first = text_loader(tmp_path, dp=2, workers=2, buffer=3, mbs=1)
        assert hashes(first, range(k)) == straight[: 2 * k]
        states = json.loads(json.dumps([first.state_dict(r) for r in range(2)]))
        first.close()
        resumed = text_loader(tmp_path, dp=2, workers=2, buffer=3, mbs=1)
        for r in range(2):
            resumed.load_state_dict(r, states[r])
        assert hashes(resumed, range(k, 9)) == straight[2 * k :]
        resumed.close()
    # an odd number of microbatches per step shifts which worker serves the first one
    odd = text_loader(tmp_path, dp=1, workers=2, buffer=3, gbs=3, mbs=1)
    straight = hashes(odd, range(6), dp=1)
    first = text_loader(tmp_path, dp=1, workers=2, buffer=3, gbs=3, mbs=1)
    hashes(first, range(1), dp=1)
    state = first.state_dict(0)
    assert state["micro"] == 3
    resumed = text_loader(tmp_path, dp=1, workers=2, buffer=3, gbs=3, mbs=1)
    resumed.load_state_dict(0, state)
    assert hashes(resumed, range(1, 6), dp=1) == straight[1:]
    for x in (odd, first, resumed):
        x.close()


def test_resume_does_not_reopen_shards_already_emitted(tmp_path, monkeypatch):
    """Fast-forward replays the shuffle on integers: units whose samples were all emitted
    (and none still held by the buffer) are not opened again."""
    import fmtrain.data.stream as stream_module

    token_dataset(tmp_path, sizes=(10,) * 6)
    first = text_loader(tmp_path, dp=1, workers=0, buffer=3, gbs=2, mbs=2)
    hashes(first, range(12), dp=1)
    position = first.state_dict(0)["workers"][0]
    assert position["epoch"] == 0 and position["consumed"] > 30
    spec = first.spec
    shuffle = stream_module.PositionShuffle(60, 3, spec.shuffle_seed(0, 0))
    for _ in range(position["consumed"] - position["carry"]):
        shuffle.next()
    needed = set(shuffle.buffer) | set(range(shuffle.next_read, 60))
    units = spec.stream_units(0, 0)
    expected = [spec.shards[u.shard].url for i, u in enumerate(units) if needed & set(range(10 * i, 10 * i + 10))]
    assert len(expected) < 4
    opened = []
    real = stream_module.read_shard
    monkeypatch.setattr(
        stream_module, "read_shard", lambda shard, *a, **k: (opened.append(shard.url), real(shard, *a, **k))[1]
    )
    resumed = text_loader(tmp_path, dp=1, workers=0, buffer=3, gbs=2, mbs=2)
    resumed.load_state_dict(0, first.state_dict(0))
    resumed.microbatches(12, 0)
    assert opened and opened == expected[: len(opened)]


def _checkpoint(tmp_path: Path, loader, step: int, shards: str) -> Path:
    path = tmp_path / "ckpt" / f"step_{step:07d}"
    path.mkdir(parents=True)
    cfg = Config()
    cfg.data.shards = shards
    state = {
        "step": step,
        "config": cfg.to_dict(),
        "data": {"layout": loader.layout(), "ranks": [loader.state_dict(r) for r in range(loader.spec.dp_size)]},
    }
    (path / "fmtrain_state.json").write_text(json.dumps(state))
    return path


def test_restore_refuses_another_dp_size_and_restarts_without_state(tmp_path):
    token_dataset(tmp_path / "d")
    spec = str(tmp_path / "d")
    saved = text_loader(tmp_path / "d", dp=2, workers=0)
    hashes(saved, range(2))
    path = _checkpoint(tmp_path, saved, 2, spec)
    cfg = Config()
    cfg.data.shards = spec
    cfg.checkpoint.load = str(path)
    messages = []

    def restore_state(loader, topo, log_fn=print):  # what the trainer hands over: the checkpoint's state
        saved = json.loads((path / "fmtrain_state.json").read_text())
        stream_restore_state(loader, saved, 2, cfg, topo, log_fn=log_fn, source=path)

    same = text_loader(tmp_path / "d", dp=2, workers=0)
    restore_state(same, SimpleNamespace(dp=2, dp_rank=1), log_fn=messages.append)
    assert "data stream resumed at step 2" in messages[-1]
    assert hashes(same, [2])[1:] == hashes(text_loader(tmp_path / "d", dp=2, workers=0), range(3))[5:6]
    with pytest.raises(StreamResumeError, match=r"not re-partitioned.*: dp_size: checkpoint 2, now 1$"):
        restore_state(text_loader(tmp_path / "d", dp=1, workers=0), SimpleNamespace(dp=1, dp_rank=0))
    with pytest.raises(StreamResumeError, match=r"workers: checkpoint 1, now 2"):
        restore_state(text_loader(tmp_path / "d", dp=2, workers=2), SimpleNamespace(dp=2, dp_rank=0))
    # a checkpoint without stream state (converted weights, in-memory run): the stream restarts
    state = json.loads((path / "fmtrain_state.json").read_text())
    del state["data"]
    state["config"]["data"]["shards"] = ""
    (path / "fmtrain_state.json").write_text(json.dumps(state))
    fresh = text_loader(tmp_path / "d", dp=2, workers=0)
    restore_state(fresh, SimpleNamespace(dp=2, dp_rank=0), log_fn=messages.append)
    assert "starts from the beginning" in messages[-1]
    assert hashes(fresh, [2]) == hashes(text_loader(tmp_path / "d", dp=2, workers=0), [0])
    # ...unless it came from a run streaming the same shards: that state was lost, refuse
    state["config"]["data"]["shards"] = spec
    (path / "fmtrain_state.json").write_text(json.dumps(state))
    with pytest.raises(StreamResumeError, match="holds no stream state"):
        restore_state(text_loader(tmp_path / "d", dp=2, workers=0), SimpleNamespace(dp=2, dp_rank=0))


# --------------------------------------------------------------------------- text pipeline


def test_packing_pads_the_epoch_end_and_masks_padding():
    pipe = TextPipeline(None, 4, vocab_size=100, reset_position_ids=True)
    window, n = pipe.make_item([np.array([5, 6, EOS_ID]), np.array([7])], 4)
    assert window.tolist() == [5, 6, EOS_ID, 7, EOS_ID] and n == 4
    batch = pipe.collate([pipe.make_item([np.array([11, 12, 13, 14, 15])], 5), (window, n)])
    assert batch["tokens"].tolist() == [[11, 12, 13, 14], [5, 6, EOS_ID, 7]]
    assert batch["labels"].tolist() == [[12, 13, 14, 15], [6, EOS_ID, 7, EOS_ID]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]  # the pad label is masked
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    tokens = torch.tensor([[9, EOS_ID, EOS_ID, 4, 5, EOS_ID, 6]])
    assert document_position_ids(tokens, EOS_ID).tolist() == [[0, 1, 0, 0, 1, 2, 0]]


def test_text_samples_are_tokenized_in_the_worker(tmp_path, tiny_tokenizer):
    sp = load_tokenizer(tiny_tokenizer)
    docs = read_documents("builtin:shakespeare")[:6]
    write_tar(tmp_path / "t.tar", [{"__key__": f"k{i}", "txt": d.encode()} for i, d in enumerate(docs)])
    spec = StreamSpec(
        resolve_shards(str(tmp_path / "t.tar")), dp_size=1, num_workers=0, seed=0, shuffle_buffer=0, shuffle=False
    )
    loader = StreamingLoader(
        TextPipeline(tiny_tokenizer, 64, vocab_size=512), spec, global_batch_size=4, micro_batch_size=2
    )
    flat = [t for d in docs for t in sp.encode(d) + [EOS_ID]]
    got = [w for step in range(3) for b in loader.microbatches(step, 0) for w, _ in windows_of(b)]
    assert got == [flat[i * 65 : (i + 1) * 65] for i in range(12)]


# --------------------------------------------------------------------------- bad input


def good_samples(n, start=0):
    return [
        {"__key__": f"doc-{i:05d}", "tokens.npy": npy(np.array([i + 10] * 3, dtype=np.uint16))}
        for i in range(start, start + n)
    ]


def drain(loader, steps, dp=1):
    for step in range(steps):
        for r in range(dp):
            loader.microbatches(step, r)


def test_truncated_and_corrupt_shards_warn_with_shard_and_key(tmp_path, caplog_data):
    good = write_tar(tmp_path / "a.tar", good_samples(40))
    cut = write_tar(tmp_path / "b.tar", good_samples(40, 100))
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    junk = tmp_path / "c.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    shards = [type(s)(s.url, 40) for s in resolve_shards(f"{good}::{cut}::{junk}", count_missing=True)]
    assert "c.tar: unreadable at its start" in caplog_data.text  # counting found the damage
    loader = text_loader(tmp_path, dp=1, workers=0, buffer=0, bad=0.9, gbs=2, mbs=2, shards=shards)
    drain(loader, 40)
    text = caplog_data.text
    assert f"shard {cut}: unreadable after key doc-00" in text and "ReadError" in text
    assert f"shard {junk}: unreadable at its start" in text
    state = loader.state_dict(0)["workers"][0]
    assert state["bad"] > 40 and state["seen"] > state["bad"]
    # the same shards with the default limit stop the run, naming the limit and a shard
    strict = text_loader(tmp_path, dp=1, workers=0, buffer=0, gbs=2, mbs=2, shards=shards, bad=0.2)
    with pytest.raises(
        BadDataError,
        match=r"bad of \d+ samples read by DP rank 0 worker 0 .* "
        r"data.max_bad_fraction=0.2; last: shard .*[bc].tar",
    ):
        drain(strict, 60)


def test_missing_field_and_bad_utf8_warn_and_count(tmp_path, caplog_data):
    samples = good_samples(30)
    samples[3] = {"__key__": "doc-00003", "json": b"{}"}
    samples[7] = {"__key__": "doc-00007", "txt": b"\xff\xfe bad"}
    samples[9] = {"__key__": "doc-00009", "tokens.npy": npy(np.array([5000], dtype=np.int32))}
    write_tar(tmp_path / "m.tar", samples)
    loader = text_loader(
        tmp_path, dp=1, workers=0, buffer=0, bad=0.2, gbs=2, mbs=2, shards=resolve_shards(str(tmp_path / "m.tar"))
    )
    drain(loader, 10)
    text = caplog_data.text
    assert "m.tar key doc-00003: missing field: neither .txt nor .tokens.npy (has ['json'])" in text
    assert "m.tar key doc-00007: .txt is not UTF-8" in text
    assert "m.tar key doc-00009: .tokens.npy holds ids outside [0, 1000)" in text
    assert loader.state_dict(0)["workers"][0]["bad"] == 3


def test_bad_fraction_error_crosses_the_dataloader_worker(tmp_path):
    write_tar(tmp_path / "x.tar", [{"__key__": f"k{i}", "json": b"{}"} for i in range(10)] + good_samples(2))
    loader = text_loader(
        tmp_path, dp=1, workers=1, buffer=0, gbs=1, mbs=1, shards=resolve_shards(str(tmp_path / "x.tar"))
    )
    with pytest.raises(BadDataError, match=r"x.tar key k\d: missing field"):
        drain(loader, 5)
    loader.close()


def test_all_bad_never_hangs(tmp_path):
    write_tar(tmp_path / "x.tar", [{"__key__": f"k{i}", "json": b"{}"} for i in range(4)])
    loader = text_loader(
        tmp_path, dp=1, workers=0, buffer=0, gbs=1, mbs=1, bad=1.0, shards=resolve_shards(str(tmp_path / "x.tar"))
    )
    with pytest.raises(BadDataError, match="two epochs without one usable sample"):
        drain(loader, 1)


def test_empty_and_missing_shards(tmp_path, caplog_data):
    write_tar(tmp_path / "empty.tar", [])
    (tmp_path / "zero.tar").write_bytes(b"")
    write_tar(tmp_path / "ok.tar", good_samples(5))
    shards = resolve_shards(f"{tmp_path}/{{empty,zero,gone,ok}}.tar")
    assert [Path(s.url).name for s in shards] == ["empty.tar", "zero.tar", "ok.tar"]
    assert [s.samples for s in shards] == [0, 0, 5]
    assert "empty.tar is empty" in caplog_data.text and "zero.tar is empty" in caplog_data.text
    assert "gone.tar does not exist; skipped" in caplog_data.text
    with pytest.raises(BadDataError, match="names no readable shard"):
        resolve_shards(f"{tmp_path}/nothing-{{0..3}}.tar")
    with pytest.raises(BadDataError, match="hold no samples"):
        StreamSpec(resolve_shards(f"{tmp_path}/{{empty,zero}}.tar"), dp_size=1, num_workers=0, seed=0)
    with pytest.raises(BadDataError, match="empty shard spec"):
        expand_shard_spec("  ")


def test_pipe_urls_read_like_local_paths(tmp_path, caplog_data):
    token_dataset(tmp_path)
    local = resolve_shards(str(tmp_path))
    piped = [type(s)(f"pipe:cat {s.url}", s.samples) for s in local]
    a = hashes(text_loader(tmp_path, dp=1, workers=0, gbs=2, shards=local), range(6), dp=1)
    b = hashes(text_loader(tmp_path, dp=1, workers=0, gbs=2, shards=piped), range(6), dp=1)
    assert a == b
    # counting through a pipe, and a pipe whose command fails
    assert resolve_shards(f"pipe:cat {tmp_path}/s-00.tar")[0].samples == 7
    broken = type(local[0])(f"pipe:cat {tmp_path}/missing.tar", 3)
    assert [s for _, s in read_shard(broken)] == [None, None, None]
    assert "missing.tar: unreadable at its start" in caplog_data.text


# --------------------------------------------------------------------------- writers and commands


def test_shard_text_command_writes_shards_and_index(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    docs = [f"document {i} " + "word " * (i * 7 % 50) for i in range(40)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert (
        fmtrain_main(["data", "shard", "text", str(corpus), "--out", str(tmp_path / "out"), "--shard-size", "4kB"]) == 0
    )
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["samples"] == 40 and len(index["shards"]) > 2 and index["fields"] == ["txt"]
    assert sum(s["samples"] for s in index["shards"]) == 40
    shards = resolve_shards(str(tmp_path / "out"))
    read = [s for shard in shards for _, s in read_shard(shard)]
    assert [s["__key__"] for s in read] == [f"c-{i:09d}" for i in range(40)]
    assert [s["txt"].decode() for s in read] == docs
    # byte-identical when written again (tar mtime 0)
    first = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    fmtrain_main(["data", "shard", "text", str(corpus), "--out", str(tmp_path / "out"), "--shard-size", "4kB"])
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == first
    assert not list((tmp_path / "out").glob("*.partial"))
    # an index for shards made elsewhere
    assert (
        fmtrain_main(
            ["data", "index", f"{tmp_path}/out/shard-{{000000..000002}}.tar", "--out", str(tmp_path / "other.json")]
        )
        == 0
    )
    other = json.loads((tmp_path / "other.json").read_text())
    assert [s["samples"] for s in other["shards"]] == [s["samples"] for s in index["shards"][:3]]
    assert fmtrain_main(["data", "shard", "text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x")]) == 1
    assert "corpus not found" in capsys.readouterr().err


def test_tokenizer_commands_and_pretokenised_shards(tmp_path, tiny_tokenizer, capsys):
    sp = load_tokenizer(tiny_tokenizer)
    docs = read_documents("builtin:shakespeare")[:25]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert (
        fmtrain_main(
            [
                "data",
                "shard",
                "text",
                str(tmp_path / "c.jsonl"),
                "--out",
                str(tmp_path / "tok"),
                "--tokenizer",
                str(tiny_tokenizer),
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "tok" / INDEX_NAME).read_text())
    assert index["fields"] == ["tokens.npy"] and index["tokenizer"]["dtype"] == "uint16"
    sample = next(s for _, s in read_shard(resolve_shards(str(tmp_path / "tok"))[0]))
    assert np.load(io.BytesIO(sample["tokens.npy"])).tolist() == sp.encode(docs[0])
    # tokenizer train on text shards == train_tokenizer on the same documents
    assert fmtrain_main(["data", "shard", "text", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "txt")]) == 0
    assert (
        fmtrain_main(
            [
                "tokenizer",
                "train",
                "--shards",
                str(tmp_path / "txt"),
                "--vocab-size",
                "400",
                "--out",
                str(tmp_path / "tk" / "m"),
            ]
        )
        == 0
    )
    from fmtrain.data.text import train_tokenizer

    reference = train_tokenizer(docs, 400, tmp_path / "ref" / "m")
    assert (tmp_path / "tk" / "m.model").read_bytes() == reference.read_bytes()
    capsys.readouterr()
    assert fmtrain_main(["tokenizer", "encode", "--model", str(tiny_tokenizer), "--text", "Who's there?"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ids": sp.encode("Who's there?")}


def test_config_keys_for_streaming():
    cfg = load_config(None, ["data.shards=a/{0..3}.tar", "data.num_workers=0", "data.reset_position_ids=true"])
    assert cfg.data.shards == "a/{0..3}.tar" and cfg.data.num_workers == 0 and cfg.data.reset_position_ids
    for bad, match in (
        ("data.max_bad_fraction=1.5", "max_bad_fraction"),
        ("data.num_workers=-1", "num_workers"),
        ("data.video_crop=left", "video_crop"),
        ("data.shard=x", "did you mean 'shards'"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


# --------------------------------------------------------------------------- the demo path and a real run


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    cfg = load_config(Path(__file__).parent.parent / "recipes" / "yi" / "tiny.yaml", TINY_OVERRIDES)
    out = tmp_path_factory.mktemp("demo") / "data"
    train, valid = prepare_corpus_shards(
        cfg.data.corpus, out, valid_fraction=cfg.data.valid_fraction, seed=cfg.run.seed, progress=False
    )
    return cfg, train, valid


def test_demo_shards_hold_the_split_and_give_the_same_tokenizer(demo_shards, tiny_tokenizer, tmp_path):
    cfg, train, valid = demo_shards
    want_train, want_valid = split_documents(read_documents(cfg.data.corpus), cfg.data.valid_fraction, cfg.run.seed)
    got = [[s["txt"].decode() for sh in resolve_shards(str(p)) for _, s in read_shard(sh)] for p in (train, valid)]
    assert got == [want_train, want_valid]
    assert len(resolve_shards(str(train))) == 8
    assert prepare_corpus_shards(
        cfg.data.corpus, train.parent.parent, valid_fraction=0.05, seed=cfg.run.seed, progress=False
    ) == (train, valid)  # second run: reused
    cfg.data.shards = str(train)
    path = ensure_stream_tokenizer(cfg, tmp_path)
    assert path.read_bytes() == Path(tiny_tokenizer).read_bytes()  # same as the in-memory path's


def test_two_rank_training_run_resumes_the_stream_exactly(demo_shards, tiny_args, tmp_path):
    """2 DP ranks x 2 DataLoader workers: 3 steps straight (checkpoint at 2), then resume from
    step 2: the batch hashes and loss of step 3 equal the uninterrupted run's. (Refusing
    another DP size is tested on restore_state directly, above.)"""
    _, train, valid = demo_shards
    run_dir = tmp_path / "run"
    args = tiny_args + [
        f"data.shards={train}",
        f"data.valid_shards={valid}",
        "data.num_workers=2",
        "data.log_batch_hashes=true",
        "train.max_steps=3",
        "checkpoint.interval=2",
        "eval.interval=3",
        "eval.steps=1",
    ]
    run_fmtrain(args, nproc=2)
    logs = [run_dir / "data" / f"batch_hashes.rank{r}.jsonl" for r in range(2)]
    straight = [[json.loads(line) for line in log.read_text().splitlines()] for log in logs]
    assert [rec["step"] for rec in straight[0]] == [0, 1, 2] and straight[1][0]["dp_rank"] == 1
    assert straight[0][0]["hashes"] != straight[1][0]["hashes"]
    state = json.loads((run_dir / "checkpoints" / "step_0000002" / "fmtrain_state.json").read_text())
    assert state["data"]["layout"]["dp_size"] == 2 and state["data"]["layout"]["workers"] == 2
    assert [r["step"] for r in state["data"]["ranks"]] == [2, 2]
    before = read_metrics(run_dir)

    # stop after step 2: only its checkpoint is left; the resumed run continues the stream
    assert not (run_dir / "checkpoints" / "step_0000003").exists()
    for log in logs:
        log.unlink()
    proc = run_fmtrain(args, nproc=2)
    assert "data stream resumed at step 2" in proc.stdout
    resumed = [[json.loads(line) for line in log.read_text().splitlines()] for log in logs]
    assert resumed == [s[2:] for s in straight]
    after = read_metrics(run_dir)
    assert after[3]["loss"] == pytest.approx(before[3]["loss"], rel=1e-5)
    assert after[3]["val_loss"] == pytest.approx(before[3]["val_loss"], rel=1e-5)
