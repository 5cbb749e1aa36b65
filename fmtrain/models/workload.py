"""What a model asks of a GPU per training sample, described for the layout planner (``fmtrain plan``).

A :class:`Workload` is a stack of identical blocks plus what the first and last pipeline stages
add. Each block lists its matrix multiplies (with how tensor parallelism splits them), its
attention cores, its tensor-parallel collectives, and the values autograd keeps for backward
per token, split into what tensor parallelism divides and what every TP rank holds whole
(sequence parallelism divides those too). Families build theirs from their config
(``ModelFamily.workload``); :func:`dense_transformer` describes a Llama- or GPT-style decoder
from its dimensions alone, for published runs.

The saved-value counts are the tensors fmtrain's own layers keep, counted with torch's
saved-tensor hooks (tests/test_plan.py measures them at several layouts); where a fused kernel
changes what is kept (``fused``: megatron's fused SwiGLU keeps its input only) both counts are
given.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Matmul:
    """One linear layer over every token: ``[tokens, inputs] @ [inputs, outputs]``.

    ``split``: ``column`` (outputs divided over TP), ``row`` (inputs divided; an all-reduce or
    reduce-scatter follows), or ``none`` (replicated on every TP rank). ``rows``: ``tokens``
    (the sample's tokens) or ``context`` (the sample's context tokens, e.g. the DiT's text).
    """

    name: str
    inputs: int
    outputs: int
    split: str = "column"
    rows: str = "tokens"

    def __post_init__(self):
        if self.split not in ("column", "row", "none") or self.rows not in ("tokens", "context"):
            raise ValueError(f"Matmul {self.name}: split={self.split!r}, rows={self.rows!r}")


@dataclass(frozen=True)
class AttentionCore:
    """softmax(Q K^T) V over ``heads`` query heads (divided over TP) of ``head_dim``; keys from
    the tokens themselves (``keys="tokens"``, ``causal`` or not) or from the context."""

    heads: int
    head_dim: int
    causal: bool = False
    keys: str = "tokens"


@dataclass(frozen=True)
class SavedValues:
    """Values autograd keeps for backward, per token of one layer (or per context token).

    ``whole``: in the activation dtype, held whole on every TP rank (norm inputs and outputs,
    residual-stream tensors; sequence parallelism divides them over TP); ``split``: in the
    activation dtype, divided over TP (per-head and MLP tensors); ``fp32_whole`` /
    ``fp32_split``: fp32 statistics (norm reciprocals, softmax log-sum-exp) likewise.
    """

    whole: float = 0.0
    split: float = 0.0
    fp32_whole: float = 0.0
    fp32_split: float = 0.0

    def bytes_per_token(self, act_bytes: int, tp: int, sequence_parallel: bool) -> float:
        whole_div = tp if sequence_parallel else 1
        return (self.whole * act_bytes + self.fp32_whole * 4) / whole_div + (
            self.split * act_bytes + self.fp32_split * 4
        ) / tp


@dataclass(frozen=True)
class Block:
    """One transformer block as the planner sees it."""

    matmuls: tuple[Matmul, ...]
    attention: tuple[AttentionCore, ...]
    saved: SavedValues
    """Kept per token without recompute."""
    saved_selective: SavedValues | None
    """Kept per token with ``model.recompute=selective`` (None: the family refuses it)."""
    saved_input: SavedValues
    """Kept per token with full recompute: the block's checkpointed input."""
    split_params: int
    """Weights tensor parallelism divides (the matmuls' weights)."""
    whole_params: int
    """Weights every TP rank holds (norms, biases of row-parallel layers, modulation tables)."""
    tp_reductions: int
    """All-reduces of a ``[tokens, hidden]`` activation per forward (each a reduce-scatter plus
    an all-gather under sequence parallelism); the backward has as many."""
    elementwise_whole: float
    """Values per token the forward's non-matmul kernels on whole tensors read and write (norms,
    residual adds, modulation; divided over TP only under sequence parallelism): memory-bound
    work, about twice this in backward."""
    elementwise_split: float
    """The same for tensors divided over TP (RoPE, the MLP's activation)."""
    saved_context: SavedValues = field(default_factory=SavedValues)
    """Kept per context token (keys and values of a cross-attention over the context)."""


@dataclass(frozen=True)
class Workload:
    """A model's per-sample work for the planner: ``layers`` blocks and the outer layers."""

    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    tokens: int
    """Tokens of one sample through the blocks (sequence length, video tokens)."""
    block: Block
    first_params_split: int = 0
    """First stage, outside the blocks, divided over TP (a vocab-parallel embedding)."""
    first_params_whole: int = 0
    """First stage, replicated (patch and condition embedders)."""
    last_params_split: int = 0
    """Last stage, divided over TP (the vocab-parallel output layer)."""
    last_params_whole: int = 0
    """Last stage, replicated (final norm, a DiT's final layer)."""
    head_matmuls: tuple[Matmul, ...] = ()
    """Matmuls of the last stage outside the blocks (the output layer)."""
    tables_per_token: float = 0.0
    """Values per token every stage keeps for the whole step, whole on every rank (RoPE cos
    and sin tables)."""
    last_saved: SavedValues = field(default_factory=SavedValues)
    """Kept per token by the last stage outside the blocks until the loss's backward (final
    norm, the output layer's input, the loss's fp32 softmax)."""
    context_tokens: int = 0
    rows_per_sample: int = 1
    """Sequences one sample trains (DPO: the chosen and the rejected one)."""
    model_flops_per_sample: float = 0.0
    """The family's model FLOPs of one sample (what MFU and TFLOP/s/GPU divide)."""
    context_parallel: bool = False
    """Whether the family splits a sample's tokens over CP ranks."""
    tied_embeddings: bool = False


def dense_transformer(
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    ffn: int,
    vocab: int,
    seq: int,
    swiglu: bool = True,
    fused: bool = True,
    causal: bool = True,
    tied: bool = False,
    family: str = "gpt",
    context_parallel: bool = True,
    rows_per_sample: int = 1,
    model_flops_per_sample: float | None = None,
) -> Workload:
    """A pre-norm decoder (Llama layout with ``swiglu``, GPT's 4h GELU MLP without) as fmtrain's
    Yi layer runs it: megatron-core's linear layers, fmtrain's RMSNorm and SDPA core attention.

    Saved per token (measured): the two norms' inputs and outputs and the two column-parallel
    layers' inputs (6h, whole), the attention output and the output projection's input, the
    queries, keys and values after RoPE (split), the softmax log-sum-exp (one fp32 per head) and
    one fp32 reciprocal per norm; the MLP keeps 3 ffn (SwiGLU, fused: its two-wide input and the
    second layer's input) or 5 ffn (unfused: the gate's SiLU and the product besides), a GELU
    MLP 2 ffn. Selective recompute drops the log-sum-exp (SDPA never stores the score matrix);
    full recompute keeps the block input (h) per layer.
    """
    kv_heads = kv_heads or heads
    head_dim = head_dim or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    if swiglu:
        mlp = (Matmul("fc1", hidden, 2 * ffn), Matmul("fc2", ffn, hidden, "row"))
        mlp_saved = 3 * ffn if fused else 5 * ffn
        mlp_elementwise = 3 * ffn
    else:
        mlp = (Matmul("fc1", hidden, ffn), Matmul("fc2", ffn, hidden, "row"))
        mlp_saved = 2 * ffn
        mlp_elementwise = 2 * ffn
    matmuls = (Matmul("qkv", hidden, q + 2 * kv), Matmul("proj", q, hidden, "row"), *mlp)
    split_saved = 3 * q + 2 * kv + mlp_saved
    saved = SavedValues(whole=6 * hidden, split=split_saved, fp32_whole=2, fp32_split=heads)
    block = Block(
        matmuls=matmuls,
        attention=(AttentionCore(heads, head_dim, causal=causal),),
        saved=saved,
        saved_selective=SavedValues(whole=6 * hidden, split=split_saved, fp32_whole=2),
        saved_input=SavedValues(whole=hidden),
        split_params=sum(m.inputs * m.outputs for m in matmuls),
        whole_params=2 * hidden,
        tp_reductions=2,
        elementwise_whole=4 * hidden + 6 * hidden,  # two norms (read, write), two residual adds
        elementwise_split=2 * (q + kv) + mlp_elementwise,  # RoPE on q and k, the MLP's activation
    )
    embedding = vocab * hidden
    return Workload(
        family=family,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        tokens=seq,
        block=block,
        first_params_split=embedding,
        last_params_split=0 if tied else embedding,
        last_params_whole=hidden,
        head_matmuls=(Matmul("output_layer", hidden, vocab),),
        tables_per_token=2 * head_dim,  # RoPE cos and sin, head_dim values each per position
        # the final norm's input and output and the output layer's input (whole), and the
        # loss's fp32 softmax over the vocabulary shard
        last_saved=SavedValues(whole=3 * hidden, fp32_split=vocab),
        rows_per_sample=rows_per_sample,
        model_flops_per_sample=(
            model_flops_per_sample
            if model_flops_per_sample is not None
            else float(
                seq * rows_per_sample * _dense_flops_per_token(layers, hidden, q, kv, ffn, vocab, seq, swiglu, causal)
            )
        ),
        context_parallel=context_parallel,
        tied_embeddings=tied,
    )


def _dense_flops_per_token(layers, hidden, q, kv, ffn, vocab, seq, swiglu, causal) -> int:
    proj = 6 * hidden * (2 * q + 2 * kv)
    mlp = 6 * hidden * ffn * (3 if swiglu else 2)
    core = 6 * 2 * seq * q
    if causal:
        core //= 2
    return layers * (proj + mlp + core) + 6 * hidden * vocab


__all__ = ["AttentionCore", "Block", "Matmul", "SavedValues", "Workload", "dense_transformer"]
