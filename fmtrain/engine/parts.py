"""Building one part of a run on this rank, the same way for training, conversion and inference.

A part is either a megatron-core part (its family gives a ``TransformerConfig``: one module
per virtual pipeline stage, tensor / sequence parallel as the layout says) or a plain
``torch.nn.Module`` (a conv net): one module, replicated on every rank, trained data-parallel
only. megatron's DDP, distributed optimizer and schedules expect a ``MegatronModule`` with a
``config``; :class:`PlainModule` gives a plain module exactly that, with a *replicated* sharded
state dict whose keys are the module's own ``state_dict`` names, so its checkpoints reshard
over any data-parallel size like every other part's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from fmtrain.config import Config
from fmtrain.models.init import PartitionedParameters, initialize_layout_invariant
from fmtrain.models.registry import PartSpec


def plain_module_config(cfg: Config, *, params_dtype: torch.dtype) -> TransformerConfig:
    """The TransformerConfig megatron's DDP, optimizer and schedules read for a plain module.

    Only its layout, dtype and loss-convention fields matter: the module is not a transformer,
    so the shape fields are the smallest valid ones. The loss is a sum divided by the step's
    count (``calculate_per_token_loss``), as for every other part."""
    return TransformerConfig(
        num_layers=1,
        hidden_size=1,
        num_attention_heads=1,
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
    )


class PlainModule(MegatronModule):
    """A family's plain ``torch.nn.Module`` in megatron's clothes (never pipelined)."""

    def __init__(self, config: TransformerConfig, module: torch.nn.Module):
        super().__init__(config=config)
        # Not ``self.module``: megatron looks attributes up through ``.module`` wrappers
        # (``decoder.layers`` of a GPT model, say) and must not reach into a family's module.
        self.inner = module
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = self.post_process = True

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand every chunk its stage input; a plain module has no stages."""

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # Replicated tensors, replica id (0, TP rank, DP rank): one copy is written, any DP size loads it.
        return make_sharded_tensors_for_checkpoint(self.inner.state_dict(keep_vars=True), prefix, {}, sharded_offsets)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


def megatron_config_of(cfg: Config, spec: PartSpec, *, params_dtype: torch.dtype, use_cpu: bool) -> TransformerConfig:
    """The part's own TransformerConfig (a fresh object per part: the engine hangs per-part
    schedule hooks on it)."""
    if spec.megatron_config is None:
        return plain_module_config(cfg, params_dtype=params_dtype)
    return spec.megatron_config(cfg, params_dtype=params_dtype, use_cpu=use_cpu)


def build_part_chunks(
    cfg: Config, spec: PartSpec, config: TransformerConfig, device: torch.device
) -> list[MegatronModule]:
    """This rank's module(s) of ``spec``: one per virtual pipeline stage for a megatron part, one
    :class:`PlainModule` otherwise; on ``device``, weights as megatron's constructors left them."""
    if spec.megatron_config is None:
        module = spec.build(cfg, None, pre_process=True, post_process=True, vp_stage=None)
        chunks = [PlainModule(config, module)]
    else:
        p = cfg.parallel
        chunks = []
        for vp in range(p.vpp):
            vp_stage = vp if p.vpp > 1 else None
            chunk = spec.build(
                cfg,
                config,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
            chunk.model_type = getattr(chunk, "model_type", None) or ModelType.encoder_or_decoder
            chunks.append(chunk)
    for chunk in chunks:
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    return [chunk.to(device) for chunk in chunks]


def initialize_part(
    cfg: Config, spec: PartSpec, chunks: list[MegatronModule], partitioned: PartitionedParameters | None = None
) -> int:
    """Draw the part's weights from the run seed, the same whatever the layout (``partitioned``:
    the engine's partitioned parameters, see :func:`initialize_layout_invariant`)."""
    return initialize_layout_invariant(chunks, cfg.run.seed, spec.init_rule(cfg), partitioned)


def family_module(chunk: torch.nn.Module) -> torch.nn.Module:
    """The family's own module inside a chunk (a :class:`PlainModule`'s inner module)."""
    return chunk.inner if isinstance(chunk, PlainModule) else chunk


def sharded_state_dict(chunks: list[MegatronModule], prefix: str = "") -> dict:
    """The distributed-checkpoint state of a part's chunks (one chunk: its own; several virtual
    stages: ``{"model0": ..., "model1": ...}``, megatron's nesting)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict(prefix=prefix)
    return {f"model{i}": chunk.sharded_state_dict(prefix=prefix) for i, chunk in enumerate(chunks)}


def load_chunks(chunks: list[MegatronModule], state: dict, prefix: str = "") -> None:
    """Load what :func:`sharded_state_dict` described (after ``dist_checkpointing.load``)."""
    states = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, chunk_state in zip(chunks, states):
        if prefix:
            chunk_state = {key.removeprefix(prefix): value for key, value in chunk_state.items()}
        chunk.load_state_dict(chunk_state, strict=True)


def build_for_inference(cfg: Config, spec: PartSpec, device: torch.device) -> torch.nn.Module:
    """The whole part on one device (bf16 on GPU, fp32 on CPU), weights from the run seed (load
    a checkpoint into it with :func:`fmtrain.checkpoint.load_model_weights`). Needs megatron's
    process groups of a one-rank layout (``fmtrain.parallel.initialize``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = megatron_config_of(cfg, spec, params_dtype=dtype, use_cpu=device.type == "cpu")
    (chunk,) = build_part_chunks(cfg, spec, config, device)
    initialize_part(cfg, spec, [chunk])
    return chunk


__all__ = [
    "PlainModule",
    "build_for_inference",
    "build_part_chunks",
    "family_module",
    "initialize_part",
    "load_chunks",
    "megatron_config_of",
    "plain_module_config",
    "sharded_state_dict",
]
