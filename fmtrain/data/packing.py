"""Text pipeline of the stream: tokenize in the worker, pack into ``seq_length + 1`` windows.

Each sample's token ids (its ``.tokens.npy``, or its ``.txt`` encoded with the run's
SentencePiece model) are followed by EOS; the stream of samples is concatenated and cut into
windows of ``seq_length + 1`` tokens, documents running across window boundaries as in
:class:`fmtrain.data.text.PackedTextDataset`. At the end of a stream's epoch the last partial
window is padded with EOS and its padding masked out of the loss, so an epoch never spills
into the next. A microbatch is ``{"tokens", "labels", "loss_mask"}`` (``[mbs, seq_length]``
each), plus ``"position_ids"`` restarting at 0 after every EOS when ``reset_position_ids``
(Megatron's ``reset_position_ids``; a model that takes positions from the batch uses them).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fmtrain.data.stream import BadSample, SampleContext
from fmtrain.data.text import EOS_ID


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
            from fmtrain.data.text import load_tokenizer

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


__all__ = ["TextPipeline", "document_position_ids"]
