"""Layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm for megatron layer specs, on ``torch.nn.functional.rms_norm``.

    megatron's fallback norm (``WrappedTorchNorm``) refuses sequence parallelism; the only
    thing sequence parallelism needs from a norm is that its weight is marked
    ``sequence_parallel`` so ``finalize_model_grads`` sums its gradient over the
    tensor-parallel group (each rank saw a different slice of the sequence). This does that.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class HeadRMSNorm(torch.nn.Module):
    """Per-head RMSNorm of queries or keys ([..., heads, head_dim], one weight of head_dim).

    Under tensor parallelism each rank normalises only its own heads, so the gradient of the
    shared weight is a partial sum; the weight goes through megatron's
    ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the gradient
    backward) to make every rank's gradient the full one. Normalises in fp32.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        weight = copy_to_tensor_model_parallel_region(self.weight)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight


def sharded_state_dict_with_global_blocks(
    module: torch.nn.Module,
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict | None,
    *,
    blocks: str | None = None,
    layer_offset: int = 0,
    tensor_parallel_axes: dict[str, int] | None = None,
) -> dict:
    """megatron's sharded state dict of a module whose ``blocks`` (a ``ModuleList``, if any) hold
    pipeline layers ``layer_offset ..``: each block is keyed by its global index, so a checkpoint
    is the same whatever the pipeline layout. The module's own parameters are replicated, except
    those named in ``tensor_parallel_axes`` (split over TP along that axis)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
        sharded_state_dict_default,
    )

    # The TP group is passed explicitly: megatron only falls back to it when metadata is
    # absent, and replicated tensors need the TP rank in their replica id.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    state = {}
    for name, child in module.named_children():
        if name != blocks:
            state.update(
                sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            )
    own: dict = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    if own:
        state.update(
            make_sharded_tensors_for_checkpoint(
                own,
                prefix,
                tensor_parallel_axes or {},
                sharded_offsets,
                tp_group=tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
    for local, block in enumerate(getattr(module, blocks) if blocks else ()):
        local_prefix = f"{prefix}{blocks}.{local}."
        block_state = block.sharded_state_dict(local_prefix, sharded_offsets, metadata)
        replace_prefix_for_sharding(block_state, local_prefix, f"{prefix}{blocks}.{layer_offset + local}.")
        state.update(block_state)
    return state
