"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local core attention materialises the full [b, heads, s, s] score matrix; SDPA
picks flash / memory-efficient kernels on GPU and a fused kernel on CPU, and handles GQA
without repeating keys and values. It is a drop-in for megatron's ``DotProductAttention``
in a layer spec (same constructor, same tensor layout), used when Transformer Engine is
absent.

With ``rotary_base`` set, it also applies the rotary position embedding (the model is then
built with ``position_embedding_type="none"``): megatron's unfused RoPE costs a concatenation
with an empty pass-through slice, a rotate-half concatenation and four elementwise passes per
q and k, and the [s, b, h, d] -> [b, h, s, d] copy SDPA wants comes on top. Here the rotation
and the copy are one expression, which ``compile_rope`` hands to torch.compile as one kernel
(forward and backward) when ``model.fused_kernels`` is on.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from fmtrain.models.rope import rope_1d_cos_sin, rotate_half


def _rotate_to_bhsd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [s, b, h, d] with cos/sin [s, 1, 1, d] (x's dtype), returned as contiguous [b, h, s, d]."""
    return (x * cos + rotate_half(x) * sin).permute(1, 2, 0, 3).contiguous()


@functools.lru_cache(maxsize=1)
def _compiled_rotate_to_bhsd():
    return torch.compile(_rotate_to_bhsd, dynamic=False)


class SDPACoreAttention(MegatronModule):
    """q [sq, b, np, hn], k/v [sk, b, ng, hn] -> context [sq, b, np * hn] (this TP rank's heads)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        rotary_base: float | None = None,
        compile_rope: bool = False,
    ):
        super().__init__(config=config)
        self.rotary_base = rotary_base
        self.compile_rope = compile_rope and rotary_base is not None
        self.rotate = _compiled_rotate_to_bhsd() if self.compile_rope else _rotate_to_bhsd
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None:
            raise ValueError("packed sequences need Transformer Engine's attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # [s, b, h, d] -> [b, h, s, d], materialised: megatron hands q/k/v over as strided views
        # of the fused QKV projection (for GQA, a head stride of the whole group), and some GPU
        # SDPA backends (cuDNN) have given wrong results on such views; the copy is cheap next
        # to the attention itself.
        if self.rotary_base is not None:
            # Positions 0..s-1 of this sequence (sequence parallelism has gathered it by now).
            seq, head_dim = query.shape[0], query.shape[-1]
            cos, sin = (
                t[:, None, None, :] for t in rope_1d_cos_sin(seq, head_dim, self.rotary_base, query.device, query.dtype)
            )
            q, k = self.rotate(query, cos, sin), self.rotate(key, cos, sin)
        else:
            q, k = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key))
        v = value.permute(1, 2, 0, 3).contiguous()
        mask = None
        if not causal and attention_mask is not None:
            # megatron masks mark positions to drop with True; SDPA keeps True positions.
            mask = ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal and mask is None,
                scale=self.softmax_scale,
                enable_gqa=self.groups_per_partition != self.heads_per_partition,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        b, h, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, h * d)
