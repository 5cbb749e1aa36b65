"""Hugging Face interop: per-family converters over a shared, layout-aware core.

- :mod:`fmtrain.checkpoint.hf.io`: read safetensors checkpoints tensor by tensor (pickled
  ``.bin`` only on request), write sharded safetensors + ``config.json``;
- :mod:`fmtrain.checkpoint.hf.layout`: global tensors in and out of this rank's megatron
  chunks through ``sharded_state_dict()``, for any (TP, PP, VPP, DP);
- :mod:`fmtrain.checkpoint.hf.yi`: Yi <-> ``LlamaForCausalLM`` (config and key mapping).

A converter describes only whole (unsharded) tensors; slicing for a layout happens in
``layout``, so import works at any layout and export gathers to rank 0.
"""

from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError, save_hf_checkpoint

__all__ = ["HFCheckpoint", "HFCheckpointError", "save_hf_checkpoint"]
