"""Hugging Face / release interop: the file work behind every family's converter.

- :mod:`fmtrain.checkpoint.hf.io`: read safetensors checkpoints tensor by tensor (pickled
  ``.bin`` only on request), write sharded safetensors + ``config.json``;
- :mod:`fmtrain.checkpoint.hf.layout`: global tensors in and out of this rank's megatron
  chunks through ``sharded_state_dict()``, for any (TP, PP, VPP, DP);
- :mod:`fmtrain.checkpoint.hf.convert`: ``fmtrain convert from-hf | to-hf`` and
  ``model.init_from_hf``, family-generic (the command line is :mod:`fmtrain.cli.convert`).

The converters themselves are the families' (``FAMILY.converter``): Yi <-> ``LlamaForCausalLM``
(:mod:`fmtrain.models.yi.convert`), the Step-Video-T2V DiT <-> the release's ``transformer/``
layout (:mod:`fmtrain.models.step_video.convert`). A converter describes only whole (unsharded)
tensors and, for import, which rows of which release tensors make each one; slicing for a
layout happens in ``layout``, so import works at any layout with each rank reading only its
rows / columns. Export reads a distributed checkpoint one global tensor at a time
(``convert``). See docs/hf_interop.md.
"""

from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError, save_hf_checkpoint

__all__ = ["HFCheckpoint", "HFCheckpointError", "save_hf_checkpoint"]
