"""The Yi family's registry entry: one trainable part (the GPTModel), next-token prediction,
its size functions, its data (text) and its Hugging Face converter."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from fmtrain.config import Config, family_settings
from fmtrain.models import sizes
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.models.yi import convert
from fmtrain.models.yi.config import YiModelConfig
from fmtrain.models.yi.model import build_chunk, init_rule, transformer_config
from fmtrain.objectives.lm import masked_token_loss


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """One microbatch through this rank's chunk: per-token cross entropy on the last stage
    (``objective.name=lm``), hidden states elsewhere."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    else:
        position_ids = position_ids.to(device, non_blocking=True)
    # [b, s] per-token cross entropy on the last stage, hidden states elsewhere.
    output = model(tokens, position_ids, None, labels=labels)
    return output, functools.partial(masked_token_loss, loss_mask)


def parts(cfg: Config) -> list[PartSpec]:
    return [
        PartSpec(
            name="model",
            build=build_chunk,
            init_rule=init_rule,
            megatron_config=transformer_config,
            forward_step=lambda cfg, parts, progress: forward_step,
        )
    ]


# ----------------------------------------------------------------------------- sizes


def _check_family(cfg: Config) -> None:
    try:
        section = family_settings(cfg.model.family).model
    except ValueError:
        section = None
    if section is None or not issubclass(section, YiModelConfig):
        raise ValueError(
            f"model.family={cfg.model.family!r}: the FLOP/parameter formulas here assume a "
            "decoder-only SwiGLU transformer (the Yi family's model section)"
        )


def _shape_args(cfg: Config) -> dict:
    _check_family(cfg)
    m = cfg.model
    return dict(
        num_layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        ffn=m.ffn_hidden_size,
        vocab=m.vocab_size,
    )


def flops_per_token(cfg: Config) -> int:
    """Training FLOPs per token (SwiGLU, causal attention counted half)."""
    return sizes.transformer_training_flops_per_token(
        **_shape_args(cfg), seq_len=cfg.model.seq_length, swiglu=True, causal=True
    )


def param_count(cfg: Config) -> int:
    """Exact parameter count (untied unless model.tie_embeddings)."""
    return sizes.transformer_param_count(**_shape_args(cfg), swiglu=True, tied=cfg.model.tie_embeddings)


def memory_estimate(
    cfg: Config,
    dp: int,
    num_microbatches: int | None = None,
    flash_attention: bool | None = None,
    bf16: bool | None = None,
) -> sizes.MemoryEstimate:
    """:func:`fmtrain.models.sizes.memory_per_gpu` for a config and a data-parallel size.

    ``flash_attention`` defaults to every backend but ``local`` (megatron's own core attention
    materialises the score matrix; TE and SDPA fused kernels do not). ``bf16`` defaults to the
    configured precision, ``auto`` counting as bf16 (GPU)."""
    m, p = cfg.model, cfg.parallel
    shape = _shape_args(cfg)
    if flash_attention is None:
        flash_attention = m.attention_backend != "local"
    if bf16 is None:
        bf16 = cfg.train.precision != "fp32"
    return sizes.memory_per_gpu(
        **shape,
        seq_len=m.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        dp=dp,
        sequence_parallel=p.sequence_parallel,
        recompute=m.recompute,
        flash_attention=flash_attention,
        distributed_optimizer=p.distributed_optimizer,
        bf16=bf16,
        num_microbatches=num_microbatches,
        swiglu=True,
        tied=m.tie_embeddings,
    )


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """Text: in-memory corpus or streamed shards; every checkpoint carries the tokenizer."""
    from fmtrain.data.text import prepare_text_data

    tokenizer, train, valid = prepare_text_data(cfg, topo, run_dir)
    return RunData(train=train, valid=valid, files={"tokenizer.model": tokenizer})


FAMILY = ModelFamily(
    name="yi",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=lambda cfg: cfg.model.seq_length * flops_per_token(cfg),
    units_per_sample=lambda cfg: cfg.model.seq_length,
    memory_estimate=memory_estimate,
    throughput_unit="tokens",
    converter=convert,
)
