"""Data: modality-free WebDataset shards and the resumable stream, and one module per modality.

- ``shards``: naming shards (patterns, ``index.json``), counting, reading with bad-input
  accounting, the indexed shard writer;
- ``stream``: the resumable per-rank, per-worker stream, its checkpoint state and the loader
  builder every modality uses (``build_stream_loader``, ``stream_loaders``);
- ``text``: corpora, SentencePiece tokenizers, packed windows, the in-memory sampler, the text
  stream pipeline and text shards; ``hf_tokenizer``: the tokenizer files transformers reads;
- ``video``: PyAV clips and video shards; ``latents``: DiT latent shards, shape buckets and
  synthetic latents; ``tasks``: in-context task shards (pixels and latents) and synthetic
  latent tasks for LaVin-DiT;
- ``commands``: ``fmtrain data`` / ``fmtrain tokenizer``.

Nothing is imported here, so a light user (the launcher's input check) pays only for what it
uses. See docs/data.md.
"""
