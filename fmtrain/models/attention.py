"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local core attention materialises the full [b, heads, s, s] score matrix; SDPA
picks flash / memory-efficient kernels on GPU and a fused kernel on CPU, and handles GQA
without repeating keys and values. It is a drop-in for megatron's ``DotProductAttention``
in a layer spec (same constructor, same tensor layout), used when Transformer Engine is
absent.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> context [sq, b, np * hn] (this TP rank's heads)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed sequences need Transformer Engine's attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # [s, b, h, d] -> [b, h, s, d], materialised: megatron hands q/k/v over as strided views
        # of the fused QKV projection (for GQA, a head stride of the whole group), and some GPU
        # SDPA backends (cuDNN) have given wrong results on such views; the copy is cheap next
        # to the attention itself.
        q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))
        mask = None
        if not causal and attention_mask is not None:
            # megatron masks mark positions to drop with True; SDPA keeps True positions.
            mask = ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None,
                scale=self.softmax_scale, enable_gqa=self.groups_per_partition != self.heads_per_partition)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        b, h, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, h * d)

