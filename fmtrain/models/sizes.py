"""FLOP and memory arithmetic for transformers, on plain numbers: the families' size functions.

Used by MFU reporting and ``fmtrain info`` through each family's ``param_count``,
``flops_per_sample`` and (families without a :mod:`fmtrain.models.workload`)
``memory_estimate``. The FLOP count is Megatron-LM's (Narayanan et
al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", appendix; causal
attention counted half as Megatron-LM does since 2025); activation memory is Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models", Table 2; weights,
gradients and Adam state follow Megatron-LM's distributed-optimizer documentation. Everything is
a pure function so it can be tested by hand and evaluated for layouts far larger than the
machine running it.
"""

from __future__ import annotations

from dataclasses import dataclass


def _attention_widths(heads: int, kv_heads: int, head_dim: int) -> int:
    """Sum of the q, k, v and o projection output widths (o maps heads*head_dim back to h)."""
    q = heads * head_dim
    kv = kv_heads * head_dim
    return q + kv + kv + q


def _layer_linear_params(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, swiglu: bool) -> int:
    """Weights of one layer's linear layers: these are the ones tensor parallelism shards."""
    attn = hidden * _attention_widths(heads, kv_heads, head_dim)
    mlp = hidden * ffn * (3 if swiglu else 2)
    return attn + mlp


def transformer_param_count(
    num_layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    vocab: int,
    swiglu: bool = True,
    tied: bool = False,
    bias: bool = False,
) -> int:
    """Exact parameter count of a pre-norm decoder (Llama layout).

    Per layer: q/k/v/o projections, a gated (SwiGLU: gate, up, down) or plain (fc1, fc2)
    MLP and two RMSNorm weight vectors; then a final RMSNorm, the input embedding and,
    unless ``tied``, a separate output layer. ``bias`` adds biases to the linear layers
    only (RMSNorm has none).
    """
    per_layer = _layer_linear_params(hidden, heads, kv_heads, head_dim, ffn, swiglu) + 2 * hidden
    if bias:
        per_layer += (heads + 2 * kv_heads) * head_dim + hidden  # qkv + o biases
        per_layer += (2 * ffn if swiglu else ffn) + hidden  # up(+gate) + down biases
    embeddings = vocab * hidden * (1 if tied else 2)
    return num_layers * per_layer + hidden + embeddings


def transformer_training_flops_per_token(
    num_layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    ffn: int,
    vocab: int,
    seq_len: int,
    swiglu: bool = True,
    causal: bool = True,
) -> int:
    """Model FLOPs per trained token (forward + backward = 3x forward, recompute excluded).

    Per layer: ``6*h*(q+k+v+o widths)`` for the projections, ``6*h*ffn*(3|2)`` for the MLP,
    and ``6*2*s*(heads*head_dim)`` for QK^T and attention*V, halved for a causal mask
    because only the lower triangle of the score matrix is needed (Megatron counts it
    halved since March 2025; older published TFLOP/s count it in full). Plus ``6*h*V``
    for the output layer. Integer arithmetic: the result is exact.
    """
    proj = 6 * hidden * _attention_widths(heads, kv_heads, head_dim)
    mlp = 6 * hidden * ffn * (3 if swiglu else 2)
    core = 6 * 2 * seq_len * heads * head_dim
    if causal:
        core //= 2  # 12*s*q_width is even, so this is exact
    return num_layers * (proj + mlp + core) + 6 * hidden * vocab


# ----------------------------------------------------------------------------- memory


def state_bytes_per_param(bf16: bool, distributed_optimizer: bool, dp: int) -> float:
    """Weights + gradients + Adam state per parameter (Megatron distributed-optimizer docs).

    bf16 params with fp32 main grads: 2 + 4 + (4 master + 4 m + 4 v) = 18, or 6 + 12/d when
    the last 12 are sharded over d data-parallel ranks. fp32: 4 + 4 + (4 m + 4 v) = 16, or
    8 + 8/d.
    """
    if bf16:
        return 6 + 12 / dp if distributed_optimizer else 18.0
    return 8 + 8 / dp if distributed_optimizer else 16.0


@dataclass(frozen=True)
class ZeroStateBytes:
    """Model-state bytes per parameter on one GPU and in host memory under DeepSpeed ZeRO."""

    params: float
    grads: float
    optimizer: float
    host: float
    """What offload keeps in host memory instead (per parameter, per rank)."""

    @property
    def device(self) -> float:
        return self.params + self.grads + self.optimizer


def zero_state_bytes_per_param(stage: int, dp: int, bf16: bool, offload: str = "none") -> ZeroStateBytes:
    """Rajbhandari et al. 2020 (ZeRO), section 5: with mixed precision and Adam, 2 bytes of 16-bit
    weights, 2 of 16-bit gradients and K = 12 of fp32 master weights, momentum and variance per
    parameter; stage 1 shards the K bytes over the d data-parallel ranks, stage 2 also the
    gradients, stage 3 also the weights (16/d in all). fp32 training on this backend: 4 + 4 and
    K = 12 (DeepSpeed keeps its own fp32 copy beside the module's fp32 weights). Offload moves the
    sharded optimizer state (ZeRO-Offload), and at stage 3 also the sharded weights, to the host."""
    p, g, k = (2.0, 2.0, 12.0) if bf16 else (4.0, 4.0, 12.0)
    shard = {1: (p, g, k / dp), 2: (p, g / dp, k / dp), 3: (p / dp, g / dp, k / dp)}[stage]
    params, grads, optimizer = shard
    host = 0.0
    if offload in ("optimizer", "optimizer+params"):
        host, optimizer = host + optimizer, 0.0
    if offload == "optimizer+params":
        host, params = host + params, 0.0
    return ZeroStateBytes(params=params, grads=grads, optimizer=optimizer, host=host)


def activation_bytes_per_layer(
    seq_len: int,
    micro_batch_size: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute: str = "none",
    flash_attention: bool = False,
) -> float:
    """Activation bytes one transformer layer keeps for backward, per microbatch.

    Korthikanti et al. 2022, Table 2, which assumes 16-bit activations (1-byte dropout
    masks) and a GPT layer with a 4h MLP; a SwiGLU MLP of width ~8h/3 stores about as much.
    ``5*a*s/h`` is the score matrix; flash attention never stores it, and selective
    recompute recomputes it, so both drop that term. Full recompute keeps only the layer
    input (2 bytes per value), which sequence parallelism shards over t.
    """
    s, b, h, a, t = seq_len, micro_batch_size, hidden, heads, tp
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute={recompute!r} is not one of none, selective, full")
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    scores = 0.0 if (flash_attention or recompute == "selective") else 5 * a * s / h
    if sequence_parallel:
        return sbh / t * (34 + scores)
    # Without SP only the 24 sbh inside the TP regions (and the scores) are split over t;
    # the LayerNorm/dropout 10 sbh are replicated. At t = 1 this is 34 + 5as/h.
    return sbh * (10 + 24 / t + scores / t)


def in_flight_layer_microbatches(
    rank: int, num_layers: int, pp: int, vpp: int = 1, num_microbatches: int | None = None
) -> float:
    """Layer-microbatches of activations pipeline rank ``rank`` holds at its peak under 1F1B.

    Non-interleaved: rank r runs p - r warm-up forwards before its first backward, each
    over l/p layers, so rank 0 holds l layers' worth (Korthikanti 4.2.3). Interleaved with
    v chunks of l/(p*v) layers: Megatron's warm-up is 2(p-r-1) + (v-1)p chunk-forwards plus
    the one in steady state; at r = 0 that is l*(1 + (p-1)/(p*v)). Fewer microbatches than
    the warm-up caps the count.
    """
    if vpp == 1:
        count = pp - rank
        if num_microbatches is not None:
            count = min(count, num_microbatches)
        return count * num_layers / pp
    chunks = 2 * (pp - rank - 1) + (vpp - 1) * pp + 1
    if num_microbatches is not None:
        chunks = min(chunks, num_microbatches * vpp)
    return chunks * num_layers / (pp * vpp)


@dataclass
class MemoryEstimate:
    """Estimated peak bytes on the most loaded GPU of a layout (16-bit activations)."""

    params_per_gpu: int
    weights_grads_optimizer_bytes: float
    activation_bytes: float
    total_bytes: float

    def format(self) -> str:
        gib = 2**30
        return (
            f"{self.params_per_gpu / 1e6:,.1f}M params/GPU | "
            f"weights+grads+optimizer {self.weights_grads_optimizer_bytes / gib:.2f} GiB | "
            f"activations {self.activation_bytes / gib:.2f} GiB | "
            f"total {self.total_bytes / gib:.2f} GiB "
            "(estimate; excludes CUDA context, allocator fragmentation and comm buffers)"
        )


__all__ = [
    "MemoryEstimate",
    "activation_bytes_per_layer",
    "in_flight_layer_microbatches",
    "state_bytes_per_param",
    "transformer_param_count",
    "transformer_training_flops_per_token",
]
