"""Text data: read a corpus, train or load a SentencePiece tokenizer, pack, sample, stream, shard.

The in-memory path from a corpus to one data-parallel rank's microbatches:

    read_documents(cfg.data.corpus)            -> list[str], one entry per document
    split_documents(docs, valid_fraction, seed) -> (train docs, validation docs)
    ensure_tokenizer(cfg, run_dir)              -> tokenizer.model (rank 0 only; it may train)
    build_text_datasets(cfg, tokenizer_path)    -> (train PackedTextDataset, valid or None)
    MicrobatchSampler(ds, gbs, mbs, dp, seed).microbatches(global_step, dp_rank)
                                                -> [{"tokens", "labels", "loss_mask"}] * (gbs / (mbs * dp))

The sampler is a pure function of (global_step, dp_rank): resuming at step N needs no saved
sampler state, only N.

The streaming path (``data.shards`` set): :class:`TextPipeline` on the modality-free stream
(:mod:`fmtrain.data.stream`) tokenizes in the worker and packs ``seq_length + 1`` windows.
Each sample's token ids (its ``.tokens.npy``, or its ``.txt`` encoded with the run's
SentencePiece model) are followed by EOS; the stream of samples is concatenated and cut into
windows of ``seq_length + 1`` tokens, documents running across window boundaries as in
:class:`PackedTextDataset`. At the end of a stream's epoch the last partial window is padded
with EOS and its padding masked out of the loss, so an epoch never spills into the next. A
microbatch is ``{"tokens", "labels", "loss_mask"}`` (``[mbs, seq_length]`` each), plus
``"position_ids"`` restarting at 0 after every EOS when ``reset_position_ids`` (Megatron's
``reset_position_ids``; a model that takes positions from the batch uses them).
:func:`write_text_shards` writes text shards (``fmtrain data shard text``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm
import torch

from fmtrain.config import microbatches_per_rank
from fmtrain.data.shards import (
    INDEX_NAME,
    BadDataError,
    IndexedShardWriter,
    iter_samples,
    npy_bytes,
    progress_bar,
    resolve_shards,
    safe_key,
    write_atomic,
)
from fmtrain.data.stream import BadSample, SampleContext, stream_loaders

if TYPE_CHECKING:
    from fmtrain.config import Config

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
"""Yi's special-token ids, which every tokenizer trained here uses."""
UNK_PIECE, BOS_PIECE, EOS_PIECE = "<unk>", "<|startoftext|>", "<|endoftext|>"

BUILTIN_CORPORA = {"shakespeare": "shakespeare.jsonl.gz"}
"""``builtin:NAME`` corpora shipped in fmtrain/data/corpus/ (see its README.md)."""

_MAX_SENTENCE_BYTES = 1 << 16
"""Training lines longer than this are skipped by SentencePiece (its default is 4192)."""


# --------------------------------------------------------------------------- documents


def read_documents(corpus: str) -> list[str]:
    """Documents of a corpus, in file order.

    ``builtin:NAME``: a corpus shipped with fmtrain (``builtin:shakespeare``: one document per
    scene). ``*.txt``: one document per block of lines separated by blank lines.
    ``*.jsonl``: one JSON object per line, the document in its ``"text"`` field. Either file
    may be gzipped (``.txt.gz``, ``.jsonl.gz``). Blank documents are skipped.
    """
    if corpus.startswith("builtin:"):
        name = corpus.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise ValueError(
                f"unknown built-in corpus '{corpus}'; known: "
                + ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_CORPORA))
            )
        resource = resources.files("fmtrain.data").joinpath("corpus", BUILTIN_CORPORA[name])
        documents = _parse_jsonl(gzip.decompress(resource.read_bytes()).decode("utf-8"), corpus)
    else:
        path = Path(corpus)
        if not path.exists():
            raise FileNotFoundError(f"corpus not found: {path}")
        if not path.is_file():
            raise ValueError(f"corpus {path} is not a file")
        suffixes = path.name.lower().split(".")[1:]
        gzipped = bool(suffixes) and suffixes[-1] == "gz"
        kind = (suffixes[-2] if gzipped and len(suffixes) > 1 else suffixes[-1]) if suffixes else ""
        if kind not in ("txt", "jsonl"):
            raise ValueError(
                f"corpus {path}: unsupported file type; expected .txt or .jsonl (optionally .gz), or builtin:NAME"
            )
        raw = path.read_bytes()
        try:
            text = (gzip.decompress(raw) if gzipped else raw).decode("utf-8")
        except (OSError, EOFError) as exc:
            raise ValueError(f"corpus {path}: not a readable gzip file: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"corpus {path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
        documents = _parse_txt(text) if kind == "txt" else _parse_jsonl(text, str(path))
    if not documents:
        raise ValueError(f"corpus {corpus} has no documents")
    return documents


def _parse_txt(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = re.split(r"\n[ \t]*\n", text)
    return [block.strip("\n") for block in blocks if block.strip()]


def _parse_jsonl(text: str, source: str) -> list[str]:
    documents = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{source}:{lineno}: expected an object with a string 'text' field")
        if record["text"].strip():
            documents.append(record["text"])
    return documents


def split_documents(documents: Sequence[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle document order with ``seed``, then hold out the last ``valid_fraction`` of them.

    Returns (train, valid). At least one document is held out when ``valid_fraction`` > 0;
    validation is empty when it is 0.
    """
    n = len(documents)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [documents[i] for i in order]
    n_valid = max(1, round(n * valid_fraction)) if valid_fraction > 0 else 0
    if n_valid >= n:
        raise ValueError(
            f"data.valid_fraction={valid_fraction} holds out {n_valid} of the corpus's "
            f"{n} documents, leaving none for training; lower it or use 0"
        )
    return shuffled[: n - n_valid], shuffled[n - n_valid :]


# --------------------------------------------------------------------------- tokenizer


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        for line in document.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_prefix: str | Path) -> Path:
    """Train a byte-fallback BPE SentencePiece model on ``documents``; write ``{prefix}.model``.

    The model follows Llama's SentencePiece settings (identity normalisation, a dummy prefix
    space, digits split, whitespace kept as is) with Yi's special pieces: ``<unk>``=0,
    ``<|startoftext|>``=1 (BOS), ``<|endoftext|>``=2 (EOS), no padding piece. Each non-blank
    line of a document is one training sentence; newlines encode through byte fallback.
    Training is single-threaded over every line in order, so the same documents give a
    byte-identical model. Also writes ``{prefix}.vocab`` (piece and score per line).
    Returns the path of the ``.model`` file.
    """
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    documents = list(documents)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            normalization_rule_name="identity",
            character_coverage=0.99995,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            unk_piece=UNK_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(
            f"training a {vocab_size}-piece tokenizer for {model_path} on {len(documents)} documents failed: {exc}"
        ) from None
    model = buffer.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(processor.vocab_size()))
    write_atomic(model_path.with_suffix(".vocab"), vocab.encode("utf-8"))
    write_atomic(model_path, model)
    return model_path


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: not a SentencePiece model: {exc}") from None
    return processor


# --------------------------------------------------------------------------- packing


class PackedTextDataset:
    """Documents joined into one token stream and cut into training windows.

    Each document is followed by ``eos_id``; the stream is cut into consecutive,
    non-overlapping windows of ``seq_length + 1`` tokens, and the last partial window is
    dropped. A window yields ``tokens = window[:-1]`` and ``labels = window[1:]``.
    """

    def __init__(self, documents: Sequence[Sequence[int]], seq_length: int, eos_id: int = EOS_ID):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be at least 1")
        self.seq_length = seq_length
        self.eos_id = eos_id
        total = sum(len(doc) + 1 for doc in documents)
        stream = torch.empty(total, dtype=torch.int64)
        offset = 0
        for doc in documents:
            stream[offset : offset + len(doc)] = torch.as_tensor(doc, dtype=torch.int64)
            stream[offset + len(doc)] = eos_id
            offset += len(doc) + 1
        self.num_tokens = total
        """Tokens in the stream, EOS separators included (before dropping the partial window)."""
        window = seq_length + 1
        self._windows = stream[: (total // window) * window].view(-1, window)  # (N, S + 1)

    def __len__(self) -> int:
        return self._windows.shape[0]

    def window(self, i: int) -> torch.Tensor:
        """Window ``i`` as a LongTensor of ``seq_length + 1`` token ids."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        return self._windows[i].clone()


class MicrobatchSampler:
    """Deterministic, stateless assignment of windows to (global step, data-parallel rank).

    Epoch ``e`` visits the windows in the order ``torch.randperm(len(dataset))`` drawn from
    ``torch.Generator().manual_seed(seed + e)``; the epochs' orders are concatenated into one
    endless stream. Global batch ``g`` (0-based optimizer step) is stream positions
    ``[g * GBS, (g + 1) * GBS)``, rolling into the next epoch without a gap. Data-parallel
    rank ``r`` takes the contiguous ``GBS / dp`` positions from ``g * GBS + r * GBS / dp``,
    cut into microbatches of ``mbs`` windows.
    """

    def __init__(
        self,
        dataset: PackedTextDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        seed: int,
        reset_position_ids: bool = False,
    ):
        if len(dataset) == 0:
            raise ValueError("dataset has no windows: the corpus is shorter than one sequence")
        num_microbatches = microbatches_per_rank(global_batch_size, micro_batch_size, dp_size)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.seed = seed
        self.num_microbatches = num_microbatches
        """Microbatches per rank per global step."""
        self.reset_position_ids = reset_position_ids
        self._permutations: dict[int, list[int]] = {}

    def epoch_permutation(self, epoch: int) -> list[int]:
        """Window order of ``epoch``."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 4:
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations[epoch] = torch.randperm(len(self.dataset), generator=generator).tolist()
        return self._permutations[epoch]

    def epoch(self, global_step: int) -> int:
        """Epoch of the first window of ``global_step``."""
        return global_step * self.global_batch_size // len(self.dataset)

    def window_indices(self, global_step: int, dp_rank: int) -> list[int]:
        """Dataset windows of this rank at this step, in microbatch order."""
        if global_step < 0:
            raise ValueError(f"global_step={global_step} must be non-negative")
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={self.dp_size})")
        per_rank = self.global_batch_size // self.dp_size
        start = global_step * self.global_batch_size + dp_rank * per_rank
        n = len(self.dataset)
        return [self.epoch_permutation(p // n)[p % n] for p in range(start, start + per_rank)]

    def microbatches(self, global_step: int, dp_rank: int) -> list[dict[str, torch.Tensor]]:
        """This rank's microbatches for one optimizer step.

        Each is ``{"tokens": LongTensor[mbs, S], "labels": LongTensor[mbs, S],
        "loss_mask": FloatTensor[mbs, S]}`` with S = the dataset's seq_length, plus
        ``"position_ids"`` restarting after each EOS with ``reset_position_ids``.
        """
        indices = self.window_indices(global_step, dp_rank)
        mbs = self.micro_batch_size
        batches = []
        for k in range(0, len(indices), mbs):
            windows = torch.stack([self.dataset.window(i) for i in indices[k : k + mbs]])  # (mbs, S + 1)
            tokens = windows[:, :-1].contiguous()
            labels = windows[:, 1:].contiguous()
            batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(tokens.shape, dtype=torch.float32)}
            if self.reset_position_ids:
                batch["position_ids"] = document_position_ids(tokens, self.dataset.eos_id)
            batches.append(batch)
        return batches


# --------------------------------------------------------------------------- from a Config


def default_tokenizer_path(run_dir: str | Path) -> Path:
    """Where ``ensure_tokenizer`` trains a tokenizer when ``data.tokenizer`` is empty."""
    return Path(run_dir) / "tokenizer" / "tokenizer.model"


def existing_tokenizer(cfg: Config, run_dir: str | Path) -> Path:
    """``data.tokenizer`` (which must exist), else RUN_DIR/tokenizer/tokenizer.model, which a
    caller trains when it is not there yet."""
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer}: file not found")
        return path
    return default_tokenizer_path(run_dir)


def ensure_tokenizer(cfg: Config, run_dir: str | Path) -> Path:
    """The run's tokenizer model, trained now if needed. Call on one rank only, then barrier.

    ``data.tokenizer`` when set (it must exist); otherwise RUN_DIR/tokenizer/tokenizer.model,
    reused when present (a resumed run), else trained with ``model.vocab_size`` pieces on the
    training split of ``data.corpus`` (the same split ``build_text_datasets`` makes).
    """
    path = existing_tokenizer(cfg, run_dir)
    if path.is_file():
        return path
    train_docs, _ = split_documents(read_documents(cfg.data.corpus), cfg.data.valid_fraction, cfg.run.seed)
    return train_tokenizer(train_docs, cfg.model.vocab_size, path.with_suffix(""))


def build_text_datasets(cfg: Config, tokenizer_path: str | Path) -> tuple[PackedTextDataset, PackedTextDataset | None]:
    """(train, validation) datasets of ``model.seq_length`` windows; validation is None when
    ``data.valid_fraction`` is 0. Deterministic, so every rank builds the same datasets."""
    processor = load_tokenizer(tokenizer_path)
    if processor.vocab_size() != cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {processor.vocab_size()} pieces but "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    eos_id = processor.eos_id()
    if eos_id < 0:
        raise ValueError(f"tokenizer {tokenizer_path} has no end-of-sequence piece to separate documents")
    train_docs, valid_docs = split_documents(read_documents(cfg.data.corpus), cfg.data.valid_fraction, cfg.run.seed)
    seq_length = cfg.model.seq_length
    train = PackedTextDataset(processor.encode(train_docs), seq_length, eos_id)
    if len(train) == 0:
        raise ValueError(
            f"corpus {cfg.data.corpus}: the training split has {train.num_tokens} tokens, "
            f"fewer than one window of model.seq_length + 1 = {seq_length + 1}"
        )
    if not valid_docs:
        return train, None
    valid = PackedTextDataset(processor.encode(valid_docs), seq_length, eos_id)
    if len(valid) == 0:
        raise ValueError(
            f"corpus {cfg.data.corpus}: the validation split (data.valid_fraction="
            f"{cfg.data.valid_fraction}, {len(valid_docs)} documents) has {valid.num_tokens} "
            f"tokens, fewer than one window of model.seq_length + 1 = {seq_length + 1}"
        )
    return train, valid


def sample_text(sample: dict) -> str | None:
    """The ``.txt`` field of a raw sample as text, None when absent."""
    raw = sample.get("txt")
    return None if raw is None else raw.decode("utf-8")


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
            stem = safe_key(name.split(":", 1)[1] if name.startswith("builtin:") else Path(name).name.split(".")[0])
            if stem in stems:
                stem = f"{stem}_{number}"
            stems[stem] = number
            for i, doc in enumerate(read_documents(str(name))):
                yield f"{stem}-{i:09d}", doc

    bar = progress_bar(f"sharding text into {out_dir}", unit="docs", enabled=progress)
    for key, doc in documents if documents is not None else generate():
        sample = {"__key__": key}
        if processor is not None:
            sample["tokens.npy"] = npy_bytes(np.asarray(processor.encode(doc), dtype=dtype))
        else:
            sample["txt"] = doc.encode("utf-8")
        writer.write(sample)
        bar.set_postfix_str(f"{len(writer.shards)} shards done", refresh=False)
        bar.update(1)
    index = writer.close()
    bar.set_postfix_str(f"{len(index['shards'])} shards, {index['samples']} samples")
    bar.close()
    return index


def prepare_corpus_shards(
    corpus: str, out_dir: str | Path, *, valid_fraction: float, seed: int, shards: int = 8, progress: bool = True
) -> tuple[Path, Path | None]:
    """Train/validation text shards of a corpus, split as the in-memory path splits it
    (:func:`fmtrain.data.text.split_documents`), written once and reused: ``OUT/train/`` and
    ``OUT/valid/``, each with an index. Returns the two index paths (valid None when
    ``valid_fraction`` is 0). Used by ``fmtrain demo``."""
    out_dir = Path(out_dir)
    train_index, valid_index = out_dir / "train" / INDEX_NAME, out_dir / "valid" / INDEX_NAME
    if train_index.is_file() and (valid_fraction == 0 or valid_index.is_file()):
        return train_index, valid_index if valid_fraction else None
    docs = read_documents(corpus)
    train, valid = split_documents(docs, valid_fraction, seed)
    stem = safe_key(corpus.split(":", 1)[-1])
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


class TextPipeline:
    """``units`` = a document's token ids + EOS; ``item`` = one ``seq_length + 1`` window."""

    pad_at_epoch_end = True

    def __init__(
        self,
        tokenizer_path: str | Path | None,
        seq_length: int,
        *,
        eos_id: int = EOS_ID,
        vocab_size: int | None = None,
        reset_position_ids: bool = False,
    ):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be at least 1")
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        self.seq_length = seq_length
        self.item_size = seq_length + 1
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.reset_position_ids = reset_position_ids
        self._processor = None

    def _sp(self):
        if self._processor is None:  # loaded in the worker process that first needs it
            if self.tokenizer_path is None:
                raise BadSample("a .txt sample needs a tokenizer (data.tokenizer) and none is set")
            self._processor = load_tokenizer(self.tokenizer_path)
        return self._processor

    def units(self, sample: dict, ctx: SampleContext) -> np.ndarray:
        if "tokens.npy" in sample:
            try:
                ids = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise BadSample(f"unreadable .tokens.npy ({exc})") from None
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise BadSample(f".tokens.npy must be a 1-D integer array, got {ids.dtype} {ids.shape}")
            if ids.size and (ids.min() < 0 or (self.vocab_size is not None and ids.max() >= self.vocab_size)):
                raise BadSample(f".tokens.npy holds ids outside [0, {self.vocab_size})")
        elif "txt" in sample:
            try:
                text = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample(f".txt is not UTF-8 (byte {exc.start}: {exc.reason})") from None
            ids = self._sp().encode(text)
        else:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"missing field: neither .txt nor .tokens.npy (has {fields or 'nothing'})")
        if len(ids) == 0:
            return np.empty(0, dtype=np.int64)
        out = np.empty(len(ids) + 1, dtype=np.int64)
        out[:-1] = ids
        out[-1] = self.eos_id
        return out

    def make_item(self, pieces: list[Sequence], size: int) -> tuple[np.ndarray, int]:
        window = np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0], dtype=np.int64)
        if size < self.item_size:  # the padded last window of an epoch
            window = np.concatenate([window, np.full(self.item_size - size, self.eos_id, dtype=np.int64)])
        return window, size

    def collate(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        windows = torch.from_numpy(np.stack([w for w, _ in items]))  # (mbs, S + 1)
        real = torch.tensor([n for _, n in items])  # real tokens per window
        tokens = windows[:, :-1].contiguous()
        labels = windows[:, 1:].contiguous()
        # label i is window[i + 1]: real when i + 1 < n
        loss_mask = (torch.arange(self.seq_length).unsqueeze(0) < (real - 1).unsqueeze(1)).float()
        batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
        if self.reset_position_ids:
            batch["position_ids"] = document_position_ids(tokens, self.eos_id)
        return batch

    def fingerprint(self) -> dict:
        return {
            "kind": "text",
            "seq_length": self.seq_length,
            "eos_id": self.eos_id,
            "reset_position_ids": self.reset_position_ids,
            "tokenizer": _file_digest(self.tokenizer_path),
        }


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def document_position_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions that restart at 0 on the token after each EOS. ``tokens``: (B, S) -> (B, S)."""
    b, s = tokens.shape
    index = torch.arange(s).expand(b, s)
    after_eos = torch.zeros_like(tokens)
    after_eos[:, 1:] = torch.where(tokens[:, :-1] == eos_id, index[:, 1:], 0)
    starts = torch.cummax(after_eos, dim=1).values
    return index - starts


def ensure_stream_tokenizer(cfg, run_dir: str | Path) -> Path:
    """The streaming run's tokenizer: ``data.tokenizer``, else RUN_DIR/tokenizer/tokenizer.model,
    trained now (``model.vocab_size`` pieces) on the ``.txt`` of every ``data.shards`` sample
    when absent. Call on one rank, then barrier."""
    path = existing_tokenizer(cfg, run_dir)
    if path.is_file():
        return path
    docs = []
    for sample in iter_samples(resolve_shards(cfg.data.shards)):
        try:
            text = sample_text(sample)
        except UnicodeDecodeError:
            text = None
        if text:
            docs.append(text)
    if not docs:
        raise BadDataError(
            f"data.shards={cfg.data.shards}: no .txt samples to train a tokenizer on "
            "(pre-tokenised shards need data.tokenizer)"
        )
    return train_tokenizer(docs, cfg.model.vocab_size, path.with_suffix(""))


def text_pipeline(cfg: Config, tokenizer_path: str | Path) -> TextPipeline:
    """The stream pipeline of a text run: ``model.seq_length`` windows of ``model.vocab_size`` ids."""
    return TextPipeline(
        tokenizer_path,
        cfg.model.seq_length,
        vocab_size=cfg.model.vocab_size,
        reset_position_ids=cfg.data.reset_position_ids,
    )


__all__ = [
    "TextPipeline",
    "document_position_ids",
    "ensure_stream_tokenizer",
    "prepare_corpus_shards",
    "prepare_text_data",
    "sample_text",
    "text_pipeline",
    "write_text_shards",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "BUILTIN_CORPORA",
    "read_documents",
    "split_documents",
    "train_tokenizer",
    "load_tokenizer",
    "PackedTextDataset",
    "MicrobatchSampler",
    "default_tokenizer_path",
    "existing_tokenizer",
    "ensure_tokenizer",
    "build_text_datasets",
]


def prepare_text_data(cfg: Config, topo, run_dir: Path):
    """The LLM families' data: (tokenizer path, train batches, validation batches or None).

    Streams WebDataset shards when ``data.shards`` is set (the stream's position goes into
    checkpoints); otherwise reads ``data.corpus`` into memory. The tokenizer is trained once,
    by rank 0, when it does not exist yet (on the ``.txt`` of the shards when streaming)."""
    import torch.distributed as dist

    ensure = ensure_stream_tokenizer if cfg.data.shards else ensure_tokenizer
    if topo.is_writer:
        tokenizer_path = ensure(cfg, run_dir)
    dist.barrier()
    if not topo.is_writer:
        tokenizer_path = ensure(cfg, run_dir)  # now present: only loads and checks
    if cfg.data.shards:
        return (tokenizer_path, *stream_loaders(cfg, text_pipeline(cfg, tokenizer_path), topo, run_dir))
    train_ds, valid_ds = build_text_datasets(cfg, tokenizer_path)
    t = cfg.train
    reset = cfg.data.reset_position_ids
    train = MicrobatchSampler(train_ds, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed, reset)
    valid = None
    if cfg.eval.interval and valid_ds is not None and len(valid_ds) >= t.global_batch_size:
        valid = MicrobatchSampler(valid_ds, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed, reset)
    return tokenizer_path, train, valid
