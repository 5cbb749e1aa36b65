"""Layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


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


class StageChunk(MegatronModule):
    """A family's own module for one (virtual) pipeline stage, with what megatron's schedules,
    DDP and checkpoints ask of it: the ``pre_process`` / ``post_process`` flags, the tensor the
    schedule hands in from the previous stage (``input_tensor``), no tied embeddings, and, when
    ``BLOCKS`` names the attribute holding this stage's blocks, checkpoint keys with each block
    under its global index (``layer_offset`` + local index, ``num_stage_layers`` of them here)."""

    BLOCKS: str | None = "blocks"

    def __init__(self, config: TransformerConfig, *, pre_process: bool, post_process: bool, vp_stage: int | None):
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        # megatron's gradient finalisation asks every pipeline chunk about tied embeddings.
        self.share_embeddings_and_output_weights = False
        self.input_tensor: torch.Tensor | None = None
        self.layer_offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        self.num_stage_layers = get_num_layers_to_build(config, vp_stage=vp_stage)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return sharded_state_dict_with_global_blocks(
            self, prefix, sharded_offsets, metadata, blocks=self.BLOCKS, layer_offset=self.layer_offset
        )


def scatter_to_sequence_parallel(x: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of ``x`` [S, b, h] (all tokens) under sequence parallelism, as a
    tensor of its own. megatron's ``scatter_to_sequence_parallel_region`` returns a view of the
    slice, so a first block that keeps its input for backward would keep every token on every
    TP rank alive, per microbatch in flight; megatron's own embedding clones it for the same
    reason (``clone_scatter_output_in_embedding``)."""
    return tensor_parallel.scatter_to_sequence_parallel_region(x).clone()


def run_blocks(blocks, streams, *conditioning, recompute: bool):
    """``streams`` (a tensor, or a tuple of them for a two-stream DiT) through each block, which
    maps ``(*streams, *conditioning)`` to the new streams; with ``recompute`` every block's
    activations are recomputed in backward (megatron's ``tensor_parallel.checkpoint``)."""
    single = torch.is_tensor(streams)
    state = (streams,) if single else tuple(streams)
    for block in blocks:
        if recompute:
            out = tensor_parallel.checkpoint(block, False, *state, *conditioning)
        else:
            out = block(*state, *conditioning)
        state = (out,) if single else tuple(out)
    return state[0] if single else state
