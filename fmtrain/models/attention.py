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

Under context parallelism (``parallel.cp``) the same attention runs inside DeepSpeed-Ulysses
(:class:`UlyssesAttention`): each rank passes its slice of the sequence in, attends over the
whole sequence for its share of the heads, and gets its slice back.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.models.rope import rope_1d_cos_sin, rotate_half
from fmtrain.parallel import context


@dataclass
class DocumentLayout(PackedSeqParams):
    """Several documents packed into each row of a microbatch, as megatron hands it to core
    attention (``packed_seq_params``): per token its position inside its document (RoPE) and,
    when attention must not cross documents, its document index. Whole rows: under context
    parallelism every rank holds the full layout, since attention runs over the whole sequence."""

    position_ids: torch.Tensor | None = None
    """[b, s] position of each token in its document."""
    document_ids: torch.Tensor | None = None
    """[b, s] document index of each token; None: attention crosses documents (causal only)."""

    def __post_init__(self):
        self.qkv_format = "sbhd"  # not megatron's THD path: tensors keep their [s, b, ...] layout
        self._mask: torch.Tensor | None = None

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, mask_documents: bool) -> DocumentLayout:
        """Documents begin where the positions restart at 0 (and at each row's start)."""
        restarts = position_ids == 0
        restarts[:, 0] = True
        return cls(position_ids=position_ids, document_ids=restarts.cumsum(dim=1) if mask_documents else None)

    def mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True = attend: causal, and within the document when they are masked.
        Built once per microbatch: every layer's attention asks for it."""
        if self._mask is None:
            self._mask = self._build_mask()
        return self._mask

    def _build_mask(self) -> torch.Tensor:
        s = self.position_ids.shape[1]
        index = torch.arange(s, device=self.position_ids.device)
        allowed = (index[None, :, None] >= index[None, None, :]).expand(self.position_ids.shape[0], s, s)
        if self.document_ids is not None:
            allowed = allowed & (self.document_ids[:, :, None] == self.document_ids[:, None, :])
        return allowed[:, None]


def _rotate_to_bhsd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [s, b, h, d] with cos/sin [s, 1, 1, d] or (per-sample positions) [s, b, 1, d] in x's
    dtype, returned as contiguous [b, h, s, d]."""
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
            raise ValueError(
                "SDPACoreAttention runs context parallelism itself (DeepSpeed-Ulysses over megatron's "
                "CP group); build the TransformerConfig with context_parallel_size=1"
            )
        self.ulysses = UlyssesAttention(self._attend) if context.size() > 1 else None
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale  # None: SDPA's default 1/sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None and not isinstance(packed_seq_params, DocumentLayout):
            raise ValueError("megatron's THD packed sequences need Transformer Engine's attention")
        if self.ulysses is not None:
            if attention_mask is not None and (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
                raise ValueError("context parallelism supports causal or unmasked attention, not an explicit mask")
            context_4d = self.ulysses(query, key, value, None, attn_mask_type, packed_seq_params)
        else:
            context_4d = self._attend(query, key, value, attention_mask, attn_mask_type, packed_seq_params)
        s, b, h, d = context_4d.shape
        return context_4d.reshape(s, b, h * d)

    def _attend(self, query, key, value, attention_mask, attn_mask_type=None, documents=None) -> torch.Tensor:
        """SDPA over the whole sequence: q [s, b, np, hn], k/v [s, b, ng, hn] -> [s, b, np, hn].
        ``documents`` (a :class:`DocumentLayout`): RoPE at each token's position in its document,
        and the mask that keeps attention inside documents."""
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # [s, b, h, d] -> [b, h, s, d], materialised: megatron hands q/k/v over as strided views
        # of the fused QKV projection (for GQA, a head stride of the whole group), and some GPU
        # SDPA backends (cuDNN) have given wrong results on such views; the copy is cheap next
        # to the attention itself.
        if self.rotary_base is not None:
            # Positions 0..s-1 of the whole sequence (sequence parallelism has gathered it by now,
            # and under context parallelism the all-to-all has), or each document's own.
            seq, head_dim = query.shape[0], query.shape[-1]
            cos, sin = rope_1d_cos_sin(seq, head_dim, self.rotary_base, query.device, query.dtype)
            if documents is not None:
                positions = documents.position_ids.to(query.device).t()  # [s, b]
                cos, sin = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
            else:
                cos, sin = cos[:, None, None, :], sin[:, None, None, :]
            q, k = self.rotate(query, cos, sin), self.rotate(key, cos, sin)
        else:
            q, k = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key))
        v = value.permute(1, 2, 0, 3).contiguous()
        mask = None
        if documents is not None and documents.document_ids is not None:
            mask = documents.mask().to(query.device)
        elif not causal and attention_mask is not None:
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
                enable_gqa=k.shape[1] != q.shape[1],
            )
        return context.permute(2, 0, 1, 3)  # [b, np, sq, hn] -> [sq, b, np, hn]


def replicate_kv_heads(key: torch.Tensor, value: torch.Tensor, query_heads: int, ways: int):
    """k/v [s, b, ng, hn] with each head repeated until ``ways`` ranks can take an equal share:
    lcm(ng, ways) heads. Query head i keeps attending to its group's head (heads are repeated in
    place, so group j becomes heads j*r .. j*r + r - 1), which needs ``query_heads`` divisible
    by the new count: true whenever ``ways`` and ``ng`` both divide ``query_heads``."""
    groups = key.shape[2]
    if groups % ways == 0:
        return key, value
    repeats = math.lcm(groups, ways) // groups
    if query_heads % (groups * repeats):
        raise ValueError(
            f"{query_heads} query heads cannot share {groups} key/value heads over {ways} context-parallel ranks"
        )
    return key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)


class UlyssesAttention(torch.nn.Module):
    """DeepSpeed-Ulysses around a local attention function (``deepspeed.sequence.layer.
    DistributedAttention`` over megatron's context-parallel group).

    ``attend(q, k, v, *args) -> [S, b, n/cp, d]`` sees the whole sequence S for 1/cp of this TP
    rank's heads; the module takes and returns sequence slices: q [S/cp, b, n, d] and k/v
    [S/cp, b, g, d] (key/value heads repeated first when g does not divide by cp, see
    :func:`replicate_kv_heads`) -> [S/cp, b, n, d]. Rotary embeddings belong inside ``attend``
    (positions 0..S-1 there) or before the call with each rank's true positions."""

    def __init__(self, attend: Callable[..., torch.Tensor]):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.ways = context.size()
        # scatter heads (dim 2), gather the sequence (dim 0); the batch is dim 1.
        self.distributed = DistributedAttention(_Local(attend), context.group(), scatter_idx=2, gather_idx=0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args) -> torch.Tensor:
        if query.shape[2] % self.ways:
            raise ValueError(f"{query.shape[2]} attention heads per rank are not divisible by parallel.cp={self.ways}")
        key, value = replicate_kv_heads(key, value, query.shape[2], self.ways)
        return self.distributed(query, key, value, 1, None, *args)


class _Local(torch.nn.Module):
    """A function as the module DistributedAttention expects (no parameters of its own)."""

    def __init__(self, attend: Callable[..., torch.Tensor]):
        super().__init__()
        self.attend = attend

    def forward(self, *args):
        return self.attend(*args)
