"""Preference data for DPO: (prompt, chosen, rejected) records -> shards -> pair microbatches.

Records are TRL's plain-text preference format, one JSON object per line:
``{"prompt": "...", "chosen": "...", "rejected": "..."}``, or its conversational format (lists
of messages) rendered to that text with a chat template when sharding (:mod:`fmtrain.data.chat`).
:func:`write_preference_shards`
(``fmtrain data shard preference FILE.jsonl --out DIR``) stores each as a sample with
``prompt.txt``, ``chosen.txt`` and ``rejected.txt``; the text is tokenized at training time with
the run's tokenizer, as TRL's ``DPOTrainer`` does:

- the prompt and each completion are encoded separately (SentencePiece ``encode``, BOS before
  the prompt only with ``objective.add_bos``), each completion followed by EOS;
- a sequence (prompt + completion) longer than ``model.seq_length + 1`` tokens (TRL's
  ``max_length``: the model reads all but the last token, whose logits are never used) keeps
  its last tokens (``keep_end``) or its first (``keep_start``), or the pair is skipped
  (``none``);
- only completion tokens count in the log-probabilities.

A sample is one *item* of the stream (:mod:`fmtrain.data.stream`): a microbatch of n pairs is
``{"tokens", "labels", "loss_mask"}`` of shape ``[2n, seq_length]``, the n chosen sequences
first and then the n rejected ones in the same order, right-padded with EOS (masked out). A
sample missing a field, with a field that is not UTF-8, or (``none``) too long is skipped and
counted by the stream, naming its shard and key.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fmtrain.data.shards import BadDataError, IndexedShardWriter, progress_bar, safe_key
from fmtrain.data.stream import BadSample, SampleContext
from fmtrain.data.text import BOS_ID, EOS_ID, load_tokenizer

if TYPE_CHECKING:
    from fmtrain.config import Config

FIELDS = ("prompt", "chosen", "rejected")


def read_preference_records(path: str | Path, chat_template: str | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, plain-text record) of a ``.jsonl`` (or ``.jsonl.gz``) file of preference
    records.

    Conversational records (lists of messages) become text through ``chat_template``
    (a template's Jinja source, :mod:`fmtrain.data.chat`). Raises BadDataError naming the file
    and line for a line that is not a JSON object, lacks one of prompt / chosen / rejected, holds
    something else than text there (messages without a template), or that the template cannot
    render."""
    from fmtrain.data.chat import ChatTemplateError, conversation_to_text

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadDataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise BadDataError(f"{path}:{number}: a preference record is a JSON object, got {kind}")
            missing = [name for name in FIELDS if name not in record]
            if missing:
                raise BadDataError(f"{path}:{number}: record has no {', '.join(repr(m) for m in missing)}")
            if chat_template is not None and any(isinstance(record[name], list) for name in FIELDS):
                try:
                    record = conversation_to_text(record, chat_template)
                except ChatTemplateError as exc:
                    raise BadDataError(f"{path}:{number}: {exc}") from None
            for name in FIELDS:
                if not isinstance(record[name], str):
                    raise BadDataError(
                        f"{path}:{number}: {name!r} is a {type(record[name]).__name__}; plain-text records hold "
                        "strings, and conversational ones (lists of messages) need --chat-template"
                    )
            yield number, {name: record[name] for name in FIELDS}


def write_preference_shards(
    path: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 64_000_000,
    max_count: int = 100_000,
    progress: bool = True,
    chat_template: str | None = None,
) -> dict:
    """A preference ``.jsonl`` file -> shards of ``prompt.txt`` / ``chosen.txt`` / ``rejected.txt``
    samples keyed ``FILESTEM-LINE``; conversational records rendered with ``chat_template`` (a
    built-in name, a template file or a tokenizer_config.json, :func:`fmtrain.data.chat.
    load_chat_template`). Returns the index it wrote."""
    from fmtrain.data.chat import load_chat_template

    path = Path(path)
    template = load_chat_template(chat_template) if chat_template else None
    meta = {"source": [str(path)], **({"chat_template": chat_template} if chat_template else {})}
    writer = IndexedShardWriter(out_dir, kind="preference", shard_size=shard_size, max_count=max_count, meta=meta)
    stem = safe_key(path.name.split(".")[0])
    bar = progress_bar(f"sharding preference pairs into {out_dir}", unit="pairs", enabled=progress)
    for number, record in read_preference_records(path, template):
        sample = {"__key__": f"{stem}-{number:09d}"}
        sample.update({f"{name}.txt": record[name].encode("utf-8") for name in FIELDS})
        writer.write(sample)
        bar.update(1)
    index = writer.close()
    bar.close()
    return index


def truncate(prompt: Sequence[int], completion: Sequence[int], max_length: int, mode: str) -> tuple[np.ndarray, int]:
    """(sequence, tokens of it that are prompt) of prompt + completion cut to ``max_length``
    tokens, TRL's ``truncation_mode`` (keep_end / keep_start); raises BadSample for ``none``."""
    sequence = np.asarray([*prompt, *completion], dtype=np.int64)
    prompt_tokens = len(prompt)
    if len(sequence) > max_length:
        if mode == "keep_start":
            sequence = sequence[:max_length]
            prompt_tokens = min(prompt_tokens, max_length)
        elif mode == "keep_end":
            cut = len(sequence) - max_length
            sequence = sequence[cut:]
            prompt_tokens = max(prompt_tokens - cut, 0)
        else:
            raise BadSample(
                f"prompt + completion is {len(sequence)} tokens, more than model.seq_length + 1 = {max_length} "
                "(objective.truncation=none)"
            )
    return sequence, prompt_tokens


class PreferencePipeline:
    """``units`` = one tokenized pair and its sample key; ``item`` = that pair; ``collate`` = chosen
    rows, then rejected, and the pairs' keys (``key``: what precomputed reference log-probs are
    looked up by)."""

    item_size = 1
    pad_at_epoch_end = False

    def __init__(
        self,
        tokenizer_path: str | Path,
        seq_length: int,
        *,
        truncation: str = "keep_end",
        add_bos: bool = False,
        eos_id: int = EOS_ID,
        bos_id: int = BOS_ID,
        packing: bool = False,
        packed_rows: int | None = None,
    ):
        self.tokenizer_path = str(tokenizer_path)
        self.seq_length = seq_length
        self.truncation = truncation
        self.add_bos = add_bos
        self.packing = packing
        self.packed_rows = packed_rows
        self.eos_id, self.bos_id = eos_id, bos_id
        self._processor = None

    @classmethod
    def from_config(cls, cfg: Config, tokenizer_path: str | Path) -> PreferencePipeline:
        """The pipeline of a DPO run: ``model.seq_length`` and the objective's truncation and BOS."""
        o, p = cfg.objective, cfg.parallel
        # Pipeline stages exchange one tensor shape: packed rows padded back to 2 per pair.
        rows = 2 * cfg.train.micro_batch_size if o.packing and p.pp > 1 else None
        return cls(
            tokenizer_path,
            cfg.model.seq_length,
            truncation=o.truncation,
            add_bos=o.add_bos,
            packing=o.packing,
            packed_rows=rows,
        )

    def _sp(self):
        if self._processor is None:  # loaded in the worker process that first needs it
            self._processor = load_tokenizer(self.tokenizer_path)
        return self._processor

    def _text(self, sample: dict, name: str) -> str:
        raw = sample.get(f"{name}.txt")
        if raw is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample(f"missing field: {name}.txt (has {fields or 'nothing'})")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSample(f"{name}.txt is not UTF-8 (byte {exc.start}: {exc.reason})") from None

    def encode_pair(self, prompt: str, chosen: str, rejected: str) -> tuple[np.ndarray, int, np.ndarray, int]:
        """(chosen sequence, its prompt tokens, rejected sequence, its prompt tokens)."""
        sp = self._sp()
        prompt_ids = ([self.bos_id] if self.add_bos else []) + sp.encode(prompt)
        out = []
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            sequence, prompt_tokens = truncate(
                prompt_ids, [*sp.encode(text), self.eos_id], self.seq_length + 1, self.truncation
            )
            if len(sequence) - max(prompt_tokens, 1) < 1:
                raise BadSample(
                    f"no {name} completion token is left after truncation (objective.truncation={self.truncation})"
                )
            out += [sequence, prompt_tokens]
        return tuple(out)

    def units(self, sample: dict, ctx: SampleContext) -> list:
        prompt, chosen, rejected = (self._text(sample, name) for name in FIELDS)
        return [(*self.encode_pair(prompt, chosen, rejected), sample.get("__key__", ctx.key))]

    def make_item(self, pieces: list[Sequence], size: int):
        return pieces[0][0]

    def _rows(self, sequences: list[tuple[np.ndarray, int]]) -> dict:
        """The microbatch tensors of ``sequences`` (each: token ids, how many are prompt), right-
        padded with EOS (masked out of the loss): one sequence per row, or with ``packing`` as
        many per row as fit (:meth:`_placement`), each with positions from 0 (the model's attention
        keeps to it: documents begin where positions restart) and ``sequence_index`` naming it (-1
        on padding, whose positions restart too, so it is a document of its own), and
        ``sequences``: how many there are."""
        s = self.seq_length
        rows, placed = (
            self._placement(sequences) if self.packing else (len(sequences), [(j, 0) for j in range(len(sequences))])
        )
        tokens = torch.full((rows, s), self.eos_id, dtype=torch.int64)
        labels = torch.full((rows, s), self.eos_id, dtype=torch.int64)
        loss_mask = torch.zeros(rows, s)
        index = torch.full((rows, s), -1, dtype=torch.int64)
        positions = torch.zeros(rows, s, dtype=torch.int64)
        used = [0] * rows
        for j, ((sequence, prompt_tokens), (row, start)) in enumerate(zip(sequences, placed)):
            ids = torch.from_numpy(sequence)
            n = len(ids) - 1  # predictions: token i + 1 from tokens 0..i
            tokens[row, start : start + n] = ids[:-1]
            labels[row, start : start + n] = ids[1:]
            # label i is sequence[i + 1]: a completion token when i + 1 >= prompt_tokens
            loss_mask[row, start + max(prompt_tokens - 1, 0) : start + n] = 1.0
            index[row, start : start + n] = j
            positions[row, start : start + n] = torch.arange(n)
            used[row] = start + n
        batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}
        if not self.packing:
            return batch
        for row, end in enumerate(used):
            positions[row, end:] = torch.arange(s - end)
        return {**batch, "position_ids": positions, "sequence_index": index, "sequences": len(sequences)}

    def _placement(self, sequences: list[tuple[np.ndarray, int]]) -> tuple[int, list[tuple[int, int]]]:
        """(rows, (row, start) of each sequence): first fit into rows of ``seq_length`` predictions;
        ``packed_rows`` rows when set (pipeline parallelism's one tensor shape)."""
        free: list[int] = []  # room left in each row
        placed = []
        for sequence, _ in sequences:
            n = len(sequence) - 1
            row = next((r for r, room in enumerate(free) if room >= n), None)
            if row is None:
                row = len(free)
                free.append(self.seq_length)
            placed.append((row, self.seq_length - free[row]))
            free[row] -= n
        rows = len(free) if self.packed_rows is None else self.packed_rows
        if rows < len(free):
            raise ValueError(f"{len(sequences)} sequences need {len(free)} packed rows, more than {rows}")
        return rows, placed

    def collate(self, items: list) -> dict:
        """Items ``(chosen, its prompt tokens, rejected, its prompt tokens[, key])`` -> the
        microbatch (``key``: the pairs' sample keys, when the items have them)."""
        chosen = [(item[0], item[1]) for item in items]
        rejected = [(item[2], item[3]) for item in items]
        batch = self._rows(chosen + rejected)
        if all(len(item) > 4 for item in items):
            batch["key"] = [str(item[4]) for item in items]
        return batch

    def fingerprint(self) -> dict:
        from fmtrain.data.text import _file_digest

        return {
            "kind": "preference",
            "seq_length": self.seq_length,
            "truncation": self.truncation,
            "add_bos": self.add_bos,
            "packing": self.packing,
            "tokenizer": _file_digest(self.tokenizer_path),
        }


def prepare_preference_data(cfg: Config, topo, run_dir: Path):
    """The DPO run's (tokenizer path, train loader, validation loader or None) over ``data.shards``."""
    from fmtrain.data.stream import stream_loaders
    from fmtrain.data.text import existing_tokenizer

    if not cfg.data.shards:
        raise BadDataError(
            "objective.name=dpo trains on preference shards: set data.shards "
            "(written by `fmtrain data shard preference FILE.jsonl --out DIR`)"
        )
    tokenizer = existing_tokenizer(cfg, run_dir)
    if not tokenizer.is_file():
        raise BadDataError(
            f"objective.name=dpo needs the policy's tokenizer: data.tokenizer ({tokenizer} does not exist); "
            "DPO does not train a tokenizer"
        )
    return (tokenizer, *stream_loaders(cfg, PreferencePipeline.from_config(cfg, tokenizer), topo, run_dir))


SYNTHETIC_WORDS = (
    "king queen lord lady sword crown night day love death heart blood honour fool grace heaven "
    "earth fire water storm moon sun star rose ghost witch castle crown friend enemy father mother"
).split()
"""Words of the synthetic preference task (common in the built-in Shakespeare corpus, so a tokenizer
trained on it encodes them in a few pieces)."""


def synthetic_preference_records(pairs: int, seed: int = 0, words: int = 4) -> list[dict[str, str]]:
    """A preference task with a learnable rule: the prompt asks to repeat ``words`` random words;
    the chosen completion repeats them, the rejected one says ``words`` other random words."""
    rng = np.random.default_rng(seed)
    vocabulary = sorted(set(SYNTHETIC_WORDS))
    records = []
    for _ in range(pairs):
        picked = rng.choice(len(vocabulary), size=2 * words, replace=False)
        asked = " ".join(vocabulary[i] for i in picked[:words])
        other = " ".join(vocabulary[i] for i in picked[words:])
        records.append({"prompt": f"repeat: {asked} ->", "chosen": f" {asked}", "rejected": f" {other}"})
    return records


def write_synthetic_preference(
    out_dir: str | Path, *, pairs: int, valid_pairs: int = 0, seed: int = 0, progress: bool = True
) -> tuple[Path, Path | None]:
    """``OUT/train.jsonl`` (and ``OUT/valid.jsonl``) of :func:`synthetic_preference_records` and
    their shards ``OUT/train/``, ``OUT/valid/`` (``fmtrain data synth-preference``). Returns the
    shard directories."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = synthetic_preference_records(pairs + valid_pairs, seed)
    made: list[Path | None] = []
    for name, part in (("train", records[:pairs]), ("valid", records[pairs:])):
        if not part:
            made.append(None)
            continue
        source = out_dir / f"{name}.jsonl"
        source.write_text("".join(json.dumps(record) + "\n" for record in part))
        write_preference_shards(source, out_dir / name, max_count=max(1, len(part) // 4 + 1), progress=progress)
        made.append(out_dir / name)
    return made[0], made[1]


def pair_batch(pipeline: PreferencePipeline, records: Sequence[dict[str, str]]) -> dict:
    """The microbatch of ``records`` (in-process tests and tools: no shards, no stream); a
    record's optional ``key`` becomes the pair's sample key."""
    items = [pipeline.encode_pair(r["prompt"], r["chosen"], r["rejected"]) for r in records]
    if all("key" in r for r in records):
        items = [(*item, r["key"]) for item, r in zip(items, records)]
    return pipeline.collate(items)


def pairs_of_shards(pipeline: PreferencePipeline, spec: str) -> Iterator[tuple[str, tuple]]:
    """(sample key, encoded pair) of every usable sample of the shards of ``spec``, in shard
    order; what the stream would skip as a bad sample is skipped here too."""
    from fmtrain.data.shards import iter_samples, resolve_shards

    for sample in iter_samples(resolve_shards(spec)):
        key = sample.get("__key__", "")
        ctx = SampleContext(seed=0, epoch=0, stream=0, index=0, shard="", key=key)
        try:
            (item,) = pipeline.units(sample, ctx)
        except BadSample:
            continue
        yield key, item


__all__ = [
    "FIELDS",
    "PreferencePipeline",
    "pair_batch",
    "pairs_of_shards",
    "prepare_preference_data",
    "read_preference_records",
    "synthetic_preference_records",
    "write_synthetic_preference",
    "truncate",
    "write_preference_shards",
]
