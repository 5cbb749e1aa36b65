"""Data: corpora and tokenizers, packed text windows, and per-rank microbatch sampling.

``fmtrain.data.text`` covers plain-text corpora (``builtin:shakespeare``, ``.txt``, ``.jsonl``)
read into memory. Streaming WebDataset shards (``data.shards``): ``shards`` (naming, index,
reading with bad-input accounting, writers), ``stream`` (the resumable per-rank, per-worker
stream and its checkpoint state), ``packing`` (text), ``video`` (PyAV clips), ``latents``
(DiT latent shards, shape buckets, synthetic latents), ``commands``
(``fmtrain data`` / ``fmtrain tokenizer``). See docs/data.md.
"""

from fmtrain.data.text import (
    BOS_ID,
    BUILTIN_CORPORA,
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

__all__ = [
    "BOS_ID",
    "BUILTIN_CORPORA",
    "EOS_ID",
    "UNK_ID",
    "MicrobatchSampler",
    "PackedTextDataset",
    "build_text_datasets",
    "default_tokenizer_path",
    "ensure_tokenizer",
    "load_tokenizer",
    "read_documents",
    "split_documents",
    "train_tokenizer",
]
