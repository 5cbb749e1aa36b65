"""Text data: corpus reading, SentencePiece tokenizer, packing and the microbatch sampler."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from fmtrain.config import Config
from fmtrain.data.text import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    MicrobatchSampler,
    PackedTextDataset,
    build_text_datasets,
    default_tokenizer_path,
    ensure_tokenizer,
    load_tokenizer,
    read_documents,
    split_documents,
    train_tokenizer,
)

VOCAB = 2048


def small_config(**data) -> Config:
    cfg = Config()
    cfg.model.vocab_size = VOCAB
    cfg.model.seq_length = 128
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def tokenizer_path(run_dir):
    return ensure_tokenizer(small_config(), run_dir)


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return load_tokenizer(tokenizer_path)


# --------------------------------------------------------------------------- corpus


def test_builtin_corpus_is_plain_text_scenes():
    docs = read_documents("builtin:shakespeare")
    assert len(docs) == 235
    assert docs[0].startswith("Hamlet\nACT I\nSCENE I. Elsinore. A platform before the castle.\n\n")
    assert "BERNARDO.\nWho's there?\n\nFRANCISCO.\nNay, answer me: stand, and unfold yourself." in docs[0]
    plays = {doc.split("\n", 1)[0] for doc in docs}
    assert plays == {
        "Hamlet",
        "King Lear",
        "Macbeth",
        "Othello",
        "Romeo and Juliet",
        "Timon of Athens",
        "Antony and Cleopatra",
        "Coriolanus",
        "Julius Caesar",
        "Titus Andronicus",
    }
    text = "".join(docs)
    for markdown in ("**", "_", "\\", "#", "  \n"):
        assert markdown not in text, markdown
    assert "Enter HORATIO and MARCELLUS" in docs[0]


def test_read_txt_jsonl_and_gzip(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc line 1\nline 2\n\n\n  \nsecond doc\r\n\r\nthird\n")
    assert read_documents(str(txt)) == ["first doc line 1\nline 2", "second doc", "third"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "a\n\nb", "id": 1}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert read_documents(str(jsonl)) == ["a\n\nb", "c"]
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert read_documents(str(gz)) == ["a\n\nb", "c"]


def test_read_errors_name_the_corpus(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(ValueError, match="empty.txt"):
        read_documents(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        read_documents(str(bad))
    with pytest.raises(ValueError, match="builtin:shakespeare"):
        read_documents("builtin:marlowe")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match=r"c\.csv: unsupported"):
        read_documents(str(tmp_path / "c.csv"))


def test_split_is_seeded_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(100)]
    train, valid = split_documents(docs, 0.05, seed=7)
    assert len(valid) == 5 and len(train) == 95
    assert sorted(train + valid) == sorted(docs)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(7)).tolist()
    assert valid == [docs[i] for i in order[95:]]
    assert split_documents(docs, 0.05, seed=7) == (train, valid)
    assert split_documents(docs, 0.05, seed=8) != (train, valid)
    assert split_documents(docs, 0.0, seed=7)[1] == []
    with pytest.raises(ValueError, match="valid_fraction"):
        split_documents(["only one"], 0.05, seed=7)


# --------------------------------------------------------------------------- tokenizer


def test_special_token_ids(sp):
    assert sp.vocab_size() == VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (UNK_ID, BOS_ID, EOS_ID, -1) == (0, 1, 2, -1)
    assert sp.id_to_piece([0, 1, 2]) == ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    assert sp.piece_to_id("<|endoftext|>") == 2
    assert sp.is_byte(sp.piece_to_id("<0x0A>"))
    # the special pieces are control symbols: plain text never encodes to them
    assert not {0, 1, 2} & set(sp.encode("<|endoftext|> <unk> <|startoftext|>"))


def test_round_trip(sp):
    docs = read_documents("builtin:shakespeare")
    for doc in docs[:3] + docs[-3:]:
        assert sp.decode(sp.encode(doc)) == doc
    odd = "Zürich — naïve café 😀, 12345 and tabs\tand  double  spaces\n\nend"
    ids = sp.encode(odd)
    assert UNK_ID not in ids  # byte fallback covers characters the corpus never had
    assert sp.decode(ids) == odd
    assert sp.encode("Who's there?", out_type=str)[0].startswith("\u2581")  # Llama's dummy prefix
    assert all(len(sp.decode([i])) <= 1 for i in sp.encode("12345"))  # digits split


def test_training_is_deterministic(tmp_path, tokenizer_path):
    train_docs, _ = split_documents(read_documents("builtin:shakespeare"), 0.05, Config().run.seed)
    again = train_tokenizer(train_docs, VOCAB, tmp_path / "again" / "tok")
    assert again == tmp_path / "again" / "tok.model"
    assert again.read_bytes() == tokenizer_path.read_bytes()
    assert (tmp_path / "again" / "tok.vocab").read_text().splitlines()[2] == "<|endoftext|>\t0"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        load_tokenizer(junk)
    with pytest.raises(ValueError, match="64000"):
        train_tokenizer(["a tiny corpus"], 64000, tmp_path / "big")


def test_transformers_llama_tokenizer_agrees(sp, tokenizer_path):
    transformers = pytest.importorskip("transformers")
    # transformers 5 has no sentencepiece-based LlamaTokenizer: LlamaTokenizer is the
    # tokenizers-backed class, LlamaTokenizer(vocab_file=...) ignores the file, and
    # from_pretrained converts the .model. Yi's special pieces must be named explicitly.
    hf = transformers.LlamaTokenizer.from_pretrained(
        str(tokenizer_path), bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    assert len(hf) == VOCAB
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    docs = read_documents("builtin:shakespeare")
    lines = [line for doc in docs[::40] for line in doc.split("\n")[:12] if line]
    lines += ["Zürich — naïve café 😀 1999", "two\nlines", docs[1][:2000]]
    for line in lines:
        assert hf.encode(line, add_special_tokens=False) == sp.encode(line), line
        assert hf.decode(sp.encode(line)) == line


# --------------------------------------------------------------------------- packing


def test_packing_puts_eos_after_each_document():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    stream = [10, 11, 12, EOS_ID, 20, 21, EOS_ID, 30, 31, 32, 33, EOS_ID]
    ds = PackedTextDataset(docs, seq_length=3)
    assert ds.num_tokens == 12 and len(ds) == 3
    assert torch.cat([ds.window(i) for i in range(3)]).tolist() == stream
    assert ds.window(0).dtype == torch.int64 and ds.window(0).shape == (4,)
    ds = PackedTextDataset(docs, seq_length=4)  # windows of 5: the last 2 tokens are dropped
    assert len(ds) == 2
    assert [ds.window(i).tolist() for i in range(2)] == [stream[0:5], stream[5:10]]
    assert len(PackedTextDataset(docs, seq_length=20)) == 0
    with pytest.raises(IndexError):
        ds.window(2)


def test_packed_real_text_and_shifted_labels(sp):
    docs = read_documents("builtin:shakespeare")[:5]
    encoded = [sp.encode(d) for d in docs]
    ds = PackedTextDataset(encoded, seq_length=64)
    reference = [t for doc in encoded for t in doc + [EOS_ID]]
    assert len(ds) == len(reference) // 65
    assert torch.cat([ds.window(i) for i in range(len(ds))]).tolist() == reference[: len(ds) * 65]
    eos_positions = [i for i, t in enumerate(reference) if t == EOS_ID]
    assert len(eos_positions) == len(docs)  # EOS never occurs inside text
    batch = MicrobatchSampler(ds, 4, 2, 1, seed=0).microbatches(0, 0)[0]
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, 64)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    first = MicrobatchSampler(ds, 4, 2, 1, seed=0).window_indices(0, 0)[0]
    assert batch["tokens"][0].tolist() == reference[first * 65 : first * 65 + 64]
    assert batch["labels"][0].tolist() == reference[first * 65 + 1 : first * 65 + 65]
    assert "position_ids" not in batch


def test_reset_position_ids_restart_after_each_eos_in_memory_corpus():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ds = PackedTextDataset(docs, seq_length=11)  # one window: 5 6 7 EOS 8 9 EOS 10 11 12 13 | EOS
    batch = MicrobatchSampler(ds, 1, 1, 1, seed=0, reset_position_ids=True).microbatches(0, 0)[0]
    assert batch["tokens"][0].tolist() == [5, 6, 7, EOS_ID, 8, 9, EOS_ID, 10, 11, 12, 13]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]


# --------------------------------------------------------------------------- sampler


def indexed_dataset(num_windows: int, seq_length: int = 3) -> PackedTextDataset:
    """Window i starts with token i * (seq_length + 1), so a batch names its windows."""
    window = seq_length + 1
    ds = PackedTextDataset([list(range(num_windows * window - 1))], seq_length, eos_id=10**6)
    assert len(ds) == num_windows
    return ds


def window_ids(batch: dict, seq_length: int = 3) -> list[int]:
    return (batch["tokens"][:, 0] // (seq_length + 1)).tolist()


def test_one_epoch_covers_every_window_once():
    ds = indexed_dataset(48)
    sampler = MicrobatchSampler(ds, global_batch_size=12, micro_batch_size=2, dp_size=3, seed=5)
    assert sampler.num_microbatches == 2
    seen = []
    for step in range(4):
        for rank in range(3):
            batches = sampler.microbatches(step, rank)
            assert len(batches) == 2
            for batch in batches:
                seen += window_ids(batch)
    assert sorted(seen) == list(range(48))
    assert seen == torch.randperm(48, generator=torch.Generator().manual_seed(5)).tolist()


def test_epochs_roll_over_without_a_gap():
    ds = indexed_dataset(10)
    sampler = MicrobatchSampler(ds, global_batch_size=4, micro_batch_size=1, dp_size=2, seed=3)
    stream = [i for e in range(4) for i in torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist()]
    got = [i for step in range(9) for rank in range(2) for b in sampler.microbatches(step, rank) for i in window_ids(b)]
    assert got == stream[:36]
    assert sampler.epoch(2) == 0 and sampler.epoch(3) == 1


def test_sampler_is_stateless():
    ds = indexed_dataset(37)
    a = MicrobatchSampler(ds, 8, 2, 2, seed=11)
    b = MicrobatchSampler(ds, 8, 2, 2, seed=11)
    for step, rank in [(0, 0), (100, 1), (3, 0), (0, 1)]:
        b.microbatches(step + 7, 1 - rank)  # different history
        for x, y in zip(a.microbatches(step, rank), b.microbatches(step, rank), strict=True):
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(x[key], y[key])
    assert window_ids(a.microbatches(0, 0)[0]) != window_ids(
        MicrobatchSampler(ds, 8, 2, 2, seed=12).microbatches(0, 0)[0]
    )


def test_dp2_union_equals_dp1():
    ds = indexed_dataset(29)
    one = MicrobatchSampler(ds, 8, 2, 1, seed=2)
    two = MicrobatchSampler(ds, 8, 2, 2, seed=2)
    for step in (0, 1, 3, 17):
        whole = torch.cat([b["tokens"] for b in one.microbatches(step, 0)])
        parts = torch.cat([b["tokens"] for r in range(2) for b in two.microbatches(step, r)])
        assert torch.equal(whole, parts)


def test_sampler_rejects_bad_layouts():
    ds = indexed_dataset(8)
    with pytest.raises(ValueError, match="global_batch_size=6"):
        MicrobatchSampler(ds, 6, 2, 2, seed=0)
    sampler = MicrobatchSampler(ds, 4, 1, 2, seed=0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        sampler.microbatches(0, 2)
    with pytest.raises(ValueError, match="no windows"):
        MicrobatchSampler(PackedTextDataset([[1, 2]], 8), 1, 1, 1, seed=0)


# --------------------------------------------------------------------------- from a Config


def test_build_text_datasets(run_dir, tokenizer_path, sp):
    assert tokenizer_path == default_tokenizer_path(run_dir)
    cfg = small_config()
    train, valid = build_text_datasets(cfg, tokenizer_path)
    train_docs, valid_docs = split_documents(read_documents(cfg.data.corpus), cfg.data.valid_fraction, cfg.run.seed)
    assert train.num_tokens == sum(len(ids) + 1 for ids in sp.encode(train_docs))
    assert valid.num_tokens == sum(len(ids) + 1 for ids in sp.encode(valid_docs))
    assert len(train) == train.num_tokens // 129 and len(valid) == valid.num_tokens // 129
    assert len(valid_docs) == 12
    # a second call (another rank) builds the same data
    again, _ = build_text_datasets(cfg, tokenizer_path)
    assert torch.equal(again.window(len(again) - 1), train.window(len(train) - 1))
    _, none = build_text_datasets(small_config(valid_fraction=0.0), tokenizer_path)
    assert none is None


def test_existing_tokenizer_is_reused_and_checked(tmp_path, run_dir, tokenizer_path):
    mtime = tokenizer_path.stat().st_mtime_ns
    assert ensure_tokenizer(small_config(), run_dir) == tokenizer_path
    assert tokenizer_path.stat().st_mtime_ns == mtime
    assert ensure_tokenizer(small_config(tokenizer=str(tokenizer_path)), tmp_path) == tokenizer_path
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        ensure_tokenizer(small_config(tokenizer=str(tmp_path / "none.model")), tmp_path)
    cfg = small_config()
    cfg.model.vocab_size = 4096
    with pytest.raises(ValueError, match=rf"{tokenizer_path}.*2048.*model.vocab_size=4096"):
        build_text_datasets(cfg, tokenizer_path)


def test_valid_split_shorter_than_a_window_is_named(tmp_path, tokenizer_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(["short"] + [f"a long document number {i} " * 100 for i in range(19)]))
    docs = read_documents(str(corpus))
    seed = next(s for s in range(1000) if split_documents(docs, 0.05, s)[1] == ["short"])
    cfg = small_config(corpus=str(corpus), valid_fraction=0.05)
    cfg.run.seed = seed
    with pytest.raises(ValueError, match=r"tiny.txt: the validation split .*fewer than one window"):
        build_text_datasets(cfg, tokenizer_path)
