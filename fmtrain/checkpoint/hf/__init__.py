"""Hugging Face interop: per-family converters over a shared, layout-aware core.

- :mod:`fmtrain.checkpoint.hf.io`: read safetensors checkpoints tensor by tensor (pickled
  ``.bin`` only on request), write sharded safetensors + ``config.json``;
- :mod:`fmtrain.checkpoint.hf.layout`: global tensors in and out of this rank's megatron
  chunks through ``sharded_state_dict()``, for any (TP, PP, VPP, DP);
- :mod:`fmtrain.checkpoint.hf.yi`: Yi <-> ``LlamaForCausalLM`` (config and key mapping);
- :mod:`fmtrain.checkpoint.hf.step_video`: Step-Video-T2V DiT <-> the release's ``transformer/``
  layout (diffusers-style ``diffusion_pytorch_model*.safetensors``);
- :mod:`fmtrain.checkpoint.hf.convert`: ``fmtrain convert from-hf | to-hf`` and
  ``model.init_from_hf``, family-generic (the command line is :mod:`fmtrain.cli_convert`);
- :mod:`fmtrain.checkpoint.hf.tokenizer`: tokenizer files that transformers encodes exactly as
  the SentencePiece model does.

A converter describes only whole (unsharded) tensors and, for import, which rows of which
Hugging Face tensors make each one; slicing for a layout happens in ``layout``, so import works
at any layout with each rank reading only its rows / columns. Export reads a distributed
checkpoint one global tensor at a time (``convert``), or gathers to rank 0 (``yi.save_hf``).
See docs/hf_interop.md.
"""

from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError, save_hf_checkpoint

__all__ = ["HFCheckpoint", "HFCheckpointError", "save_hf_checkpoint"]
