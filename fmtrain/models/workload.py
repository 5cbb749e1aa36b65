"""What a model asks of a GPU per training sample, described for the layout planner (``fmtrain plan``).

A :class:`Workload` is a stack of identical blocks plus what the first and last pipeline stages
add (on the last, possibly a second stack at its own width: a :class:`Tower`, VideoMAE's
decoder). Each block lists its matrix multiplies (with how tensor parallelism splits them), its
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

from fmtrain.models.sizes import in_flight_layer_microbatches, state_bytes_per_param, zero_state_bytes_per_param


@dataclass(frozen=True)
class Matmul:
    """One linear layer over every token: ``[tokens, inputs] @ [inputs, outputs]``.

    ``split``: ``column`` (outputs divided over TP), ``row`` (inputs divided; an all-reduce or
    reduce-scatter follows), or ``none`` (replicated on every TP rank). ``rows``: ``tokens``
    (the sample's tokens), ``context`` (the sample's context tokens, e.g. the DiT's text) or
    ``sample`` (one row per sample, e.g. a modulation computed from the timestep embedding).
    ``share``: the fraction of those rows that go through it (a layer only one token stream
    reads).
    """

    name: str
    inputs: int
    outputs: int
    split: str = "column"
    rows: str = "tokens"
    share: float = 1.0

    def __post_init__(self):
        if self.split not in ("column", "row", "none") or self.rows not in ("tokens", "context", "sample"):
            raise ValueError(f"Matmul {self.name}: split={self.split!r}, rows={self.rows!r}")


@dataclass(frozen=True)
class AttentionCore:
    """softmax(Q K^T) V over ``heads`` query heads (divided over TP) of ``head_dim``; keys from
    the tokens themselves (``keys="tokens"``, ``causal`` or not) or from the context.
    ``queries``: the fraction of the tokens that query (all of them but for a block whose other
    outputs feed nothing)."""

    heads: int
    head_dim: int
    causal: bool = False
    keys: str = "tokens"
    queries: float = 1.0


@dataclass(frozen=True)
class SavedValues:
    """Values autograd keeps for backward, per token of one layer (or per context token).

    ``whole``: in the activation dtype, held whole on every TP rank (norm inputs and outputs,
    residual-stream tensors; sequence parallelism divides them over TP); ``split``: in the
    activation dtype, divided over TP (per-head and MLP tensors); ``gathered``: in the
    activation dtype, whole on every TP rank even under sequence parallelism (a sequence-parallel
    input gathered once and kept for several column-parallel layers, the work of replicated
    layers); ``fp32_whole`` / ``fp32_split`` / ``fp32_gathered``: fp32 values (norm
    reciprocals, softmax log-sum-exp, inputs a layer upcasts before keeping them) likewise.
    """

    whole: float = 0.0
    split: float = 0.0
    fp32_whole: float = 0.0
    fp32_split: float = 0.0
    gathered: float = 0.0
    fp32_gathered: float = 0.0

    def bytes_per_token(self, act_bytes: int, tp: int, sequence_parallel: bool) -> float:
        whole_div = tp if sequence_parallel else 1
        return (
            (self.whole * act_bytes + self.fp32_whole * 4) / whole_div
            + (self.split * act_bytes + self.fp32_split * 4) / tp
            + self.gathered * act_bytes
            + self.fp32_gathered * 4
        )

    def __add__(self, other: SavedValues) -> SavedValues:
        return SavedValues(
            whole=self.whole + other.whole,
            split=self.split + other.split,
            fp32_whole=self.fp32_whole + other.fp32_whole,
            fp32_split=self.fp32_split + other.fp32_split,
            gathered=self.gathered + other.gathered,
            fp32_gathered=self.fp32_gathered + other.fp32_gathered,
        )


@dataclass(frozen=True)
class FusedQKV:
    """The q, k and v a checkpointed core attention keeps under selective recompute, when they
    come out of megatron's fused QKV projection as it splits them (``get_query_key_value_tensors``)
    and reach the checkpoint before RoPE (fmtrain's SDPA core attention rotates inside it).

    The projection's output is laid out per key/value group (the group's queries, its key, its
    value); k and v are views of it, so the checkpoint keeps that whole output alive. The query
    is reshaped from ``[groups, queries of a group]`` to ``[heads]``: with several groups of
    several query heads on a TP rank that is a copy, kept beside the output; with one group per
    rank, or one query head per group (multi-head attention: the shape does not change), it is
    a view of the same storage and costs nothing more. With fewer groups than TP ranks megatron all-gathers the
    projection's output over TP and slices this rank's group out of it: every rank keeps the
    whole output, all tokens (the projection has already gathered the sequence; read from
    megatron's code, not measured: fmtrain's Yi refuses fewer groups than TP ranks).
    """

    groups: int
    """Key/value groups."""
    query: int
    """Query values per token (all heads)."""
    key_value: int
    """Key and value values per token (all groups)."""

    def saved(self, tp: int) -> SavedValues:
        if self.groups < tp:
            return SavedValues(gathered=self.query + self.key_value)
        copy = self.query if self.groups > tp and 2 * self.query > self.key_value else 0
        return SavedValues(split=self.query + self.key_value + copy)


@dataclass(frozen=True)
class Block:
    """One transformer block as the planner sees it."""

    matmuls: tuple[Matmul, ...]
    attention: tuple[AttentionCore, ...]
    saved: SavedValues
    """Kept per token without recompute."""
    saved_selective: SavedValues | None
    """Kept per token with ``model.recompute=selective`` (None: the family refuses it), besides
    ``selective_qkv``."""
    saved_input: SavedValues
    """Kept per token with full recompute: the block's checkpointed input."""
    split_params: int
    """Weights tensor parallelism divides (the matmuls' weights)."""
    whole_params: int
    """Weights every TP rank holds (norms, biases of row-parallel layers, modulation tables)."""
    tp_reductions: float
    """All-reduces of a ``[tokens, hidden]`` activation per forward (each a reduce-scatter plus
    an all-gather under sequence parallelism); the backward has as many. An average over the
    tokens where streams differ: a stream whose column-parallel layers feed no row-parallel one
    counts half (only its input's gradient is reduced)."""
    elementwise_whole: float
    """Values per token the forward's non-matmul kernels on whole tensors read and write (norms,
    residual adds, modulation; divided over TP only under sequence parallelism): memory-bound
    work, about twice this in backward."""
    elementwise_split: float
    """The same for tensors divided over TP (RoPE, the MLP's activation)."""
    saved_context: SavedValues = field(default_factory=SavedValues)
    """Kept per context token (keys and values of a cross-attention over the context)."""
    tp_regather: bool = True
    """Under sequence parallelism the column-parallel layers all-gather their input again in
    backward for the weight gradient (megatron's linears: five collectives per reduction);
    False: the gathered input is kept (``saved.gathered``), four collectives per reduction."""
    tp_streams: int = 1
    """Token streams whose TP collectives are issued separately (each costs its latency)."""
    tp_stat_values: float = 0.0
    """fp32 values per token all-reduced over TP in forward, as many in backward (the sum of
    squares of a norm over a TP-split width), one call per value and stream."""
    selective_qkv: FusedQKV | None = None
    """What selective recompute's checkpoint of the core attention keeps of its q, k, v inputs
    where that depends on TP (None: counted in ``saved_selective``)."""
    tp_saved: SavedValues = field(default_factory=SavedValues)
    """Kept per token besides ``saved`` only at TP > 1, by a layer that runs differently once
    its weight is split (VideoMAE's q and v biases: fused into the qkv GEMM unsharded, added
    apart after the sharded one, which on CPU keeps new q and v beside the GEMM's output)."""

    def saved_for(self, recompute: str, tp: int) -> SavedValues:
        """Kept per token without recompute or with selective recompute at tensor parallelism ``tp``."""
        extra = self.tp_saved if tp > 1 else SavedValues()
        if recompute != "selective":
            return self.saved + extra
        if self.saved_selective is None:
            raise ValueError("selective recompute is not supported by this family")
        if self.selective_qkv is not None:
            extra = extra + self.selective_qkv.saved(tp)
        return self.saved_selective + extra


@dataclass(frozen=True)
class Tower:
    """A second stack of blocks the last pipeline stage runs after the model's own on every
    microbatch, at its own width and over its own tokens, never split over pipeline stages
    (VideoMAE's decoder). 1F1B runs a microbatch's last-stage forward straight into its
    backward, so that stage holds one microbatch's tower activations at a time."""

    layers: int
    hidden: int
    tokens: int
    """Tokens of one sample through the tower's blocks."""
    block: Block
    entry_saved: SavedValues = field(default_factory=SavedValues)
    """Kept per token of the model's blocks (``Workload.tokens``) by the layers leading into the
    tower (a final norm, the projection to the tower's width): alive through the tower's
    backward, freed before the model's blocks' backward."""


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
    first_saved: SavedValues = field(default_factory=SavedValues)
    """Kept per token by the first stage outside the blocks (embedders), for each microbatch in
    flight on the first model chunk."""
    last_block: Block | None = None
    """The model's final block where it does less than the others (the last of ``layers``, on
    the last pipeline stage's last chunk); None: like the others."""
    tables_fp32_per_token: float = 0.0
    """Like ``tables_per_token``, kept in fp32 whatever the activation dtype."""
    stage_rows: int = 0
    """Rows per sample a pipeline stage sends beside the tokens (conditioning vectors), whole
    under sequence parallelism."""
    first_sp_scatter: float = 0.0
    """Share of the tokens replicated first-stage layers scatter to the sequence-parallel ranks
    (the backward all-gathers their gradient)."""
    last_sp_gather: float = 0.0
    """Share of the tokens the last stage all-gathers from the sequence-parallel ranks for a
    replicated head."""
    last_tower: Tower | None = None
    """A second stack of blocks on the last pipeline stage (VideoMAE's decoder); ``last_saved``
    is then what the layers after it keep."""
    virtual_pipeline: bool = True
    """Whether the family runs interleaved pipeline chunks (``parallel.vpp``)."""
    context_tokens: int = 0
    rows_per_sample: int = 1
    """Sequences one sample trains (DPO: the chosen and the rejected one)."""
    model_flops_per_sample: float = 0.0
    """The family's model FLOPs of one sample (what MFU and TFLOP/s/GPU divide)."""
    context_parallel: bool = False
    """Whether the family splits a sample's tokens over CP ranks."""
    tied_embeddings: bool = False
    frozen_copy: bool = False
    """A co-located frozen copy of the model in the same layout (DPO's reference): its 16-bit
    (fp32) weights on every rank, no gradients or optimizer state; its forward-only
    activations are freed before the trained model's forward."""


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
    score_matrix: bool = False,
    frozen_copy: bool = False,
) -> Workload:
    """A pre-norm decoder (Llama layout with ``swiglu``, GPT's 4h GELU MLP without) as fmtrain's
    Yi layer runs it: megatron-core's linear layers, fmtrain's RMSNorm and SDPA core attention.

    Saved per token (measured): the two norms' inputs and outputs and the two column-parallel
    layers' inputs (6h, whole), the attention output and the output projection's input, the
    queries, keys and values after RoPE (split), the softmax log-sum-exp (one fp32 per head) and
    one fp32 reciprocal per norm; the MLP keeps 3 ffn (SwiGLU, fused: its two-wide input and the
    second layer's input) or 5 ffn (unfused: the gate's SiLU and the product besides), a GELU
    MLP 2 ffn. Selective recompute keeps, in place of what the core attention saves (rotated q
    and k, the copy of v, SDPA's output, the log-sum-exp), its checkpointed inputs: the fused
    QKV output, and a copy of the query where a TP rank holds several key/value groups
    (:class:`FusedQKV`); the output projection's input stays. Full recompute keeps the block
    input (h) per layer. ``score_matrix``: a core attention that materialises the scores and the
    softmax (megatron's ``local`` backend) keeps 2 x heads x seq values per token more, which
    selective recompute drops; that backend's checkpoint receives q and k after RoPE, so there
    selective recompute keeps the count without recompute less the log-sum-exp (not measured).
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
    scores = 2 * heads * seq if score_matrix else 0
    saved = SavedValues(whole=6 * hidden, split=split_saved + scores, fp32_whole=2, fp32_split=heads)
    block = Block(
        matmuls=matmuls,
        attention=(AttentionCore(heads, head_dim, causal=causal),),
        saved=saved,
        saved_selective=(
            SavedValues(whole=6 * hidden, split=split_saved, fp32_whole=2)
            if score_matrix
            else SavedValues(whole=6 * hidden, split=q + mlp_saved, fp32_whole=2)
        ),
        selective_qkv=None if score_matrix else FusedQKV(kv_heads, q, 2 * kv),
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
        frozen_copy=frozen_copy,
    )


def _dense_flops_per_token(layers, hidden, q, kv, ffn, vocab, seq, swiglu, causal) -> int:
    proj = 6 * hidden * (2 * q + 2 * kv)
    mlp = 6 * hidden * ffn * (3 if swiglu else 2)
    core = 6 * 2 * seq * q
    if causal:
        core //= 2
    return layers * (proj + mlp + core) + 6 * hidden * vocab


@dataclass(frozen=True)
class TracedWorkload:
    """A family that is no stack of identical token blocks (the VAEs' conv nets), as the planner
    sees it: its training step run once on the meta device (no memory, no GPU) with autograd's
    saved-tensor hooks counting the distinct storages kept for backward and torch's
    FlopCounterMode counting FLOPs, per sample, for each recompute setting. Such a family trains
    data parallel only (no TP, PP or CP)."""

    params: int
    """Trainable parameters (the autoencoder, and the discriminator with the GAN on)."""
    saved_bytes: dict[str, float]
    """Recompute setting (``none``, ``full``) -> peak bytes autograd keeps for one sample's
    backward (full: every checkpointed block's input, and one block's activations again while
    its backward runs)."""
    flops: dict[str, float]
    """Recompute setting -> FLOPs of one sample's forward and backward (full: the forward again)."""
    model_flops_per_sample: float
    """What training reports (recompute not counted)."""
    largest_saved_bytes: float
    """The largest single tensor kept (per sample): the backward's working memory is taken as
    twice it (its gradient and the gradient flowing in)."""


def family_workload(cfg, on_gpu: bool) -> Workload | None:
    """The workload of ``cfg``'s family, or None when it describes none. Looked up in the
    family's ``sizes`` module first (plain arithmetic: no model code to import), else on its
    ``ModelFamily``."""
    from fmtrain.config import ConfigError, import_family_part

    try:
        workload = import_family_part(cfg.model.family, "sizes", "workload")
    except ConfigError:
        from fmtrain.models.registry import get_family

        workload = get_family(cfg.model.family).workload
    return None if workload is None else workload(cfg, on_gpu)


def layout_of(cfg, dp: int) -> Layout:
    """The layout a config trains with at data-parallel size ``dp``."""
    p = cfg.parallel
    deepspeed = cfg.engine.backend == "deepspeed"
    return Layout(
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        cp=p.cp,
        dp=dp,
        mbs=cfg.train.micro_batch_size,
        recompute=getattr(cfg.model, "recompute", "none"),
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=p.distributed_optimizer and not deepspeed,
        zero_stage=cfg.engine.zero_stage if deepspeed else 0,
    )


# ----------------------------------------------------------------------------- a layout's memory
#
# Per pipeline stage: model state (the stage's parameters x the distributed optimizer's bytes per
# parameter), activations (what each block saves per token x the rank's tokens x the
# layer-microbatches 1F1B keeps in flight), one block's backward workspace, and an allowance for
# the CUDA context, NCCL buffers and fragmentation. Used by ``fmtrain info`` and ``fmtrain plan``.

ALLOWANCE_BYTES = 2 * 2**30
ALLOWANCE_FRACTION = 0.05


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    mbs: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    zero_stage: int = 0
    """0: the megatron backend (DDP, ``distributed_optimizer``); 1-3: the deepspeed backend's
    ZeRO stage (TP without SP, no PP or CP)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        sp = " sp" if self.sequence_parallel else ""
        return (
            f"tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} dp={self.dp} mbs={self.mbs} "
            f"recompute={self.recompute}{sp}" + (f" zero={self.zero_stage}" if self.zero_stage else "")
        )


@dataclass(frozen=True)
class StageMemory:
    params: int
    state_bytes: float
    activation_bytes: float
    workspace_bytes: float
    gathered_bytes: float = 0.0
    """ZeRO-3: the 16-bit weights gathered for use (``ZERO3_LIVE_PARAMETERS`` at most)."""

    @property
    def allocated_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes + self.workspace_bytes + self.gathered_bytes

    @property
    def total_bytes(self) -> float:
        """With the allowance for the CUDA context, NCCL and fragmentation."""
        return self.allocated_bytes * (1 + ALLOWANCE_FRACTION) + ALLOWANCE_BYTES


ZERO3_LIVE_PARAMETERS = 10**9
"""``stage3_max_live_parameters`` of the DeepSpeed config fmtrain writes: ZeRO-3 gathers a
module's weights when it runs and keeps gathered up to this many parameters (whole for the
forward and the backward of a model below it, measured), so a rank holds that many 16-bit
weights beside its 16/d bytes per parameter."""


def model_state_bytes(params: int, lay: Layout, bf16: bool) -> tuple[float, float]:
    """(weights + gradients + optimizer state, ZeRO-3's gathered 16-bit weights) one rank holds
    for ``params`` parameters: megatron's distributed optimizer over DP x CP, or ZeRO's split."""
    if not lay.zero_stage:
        return params * state_bytes_per_param(bf16, lay.distributed_optimizer, lay.dp * lay.cp), 0.0
    state = params * zero_state_bytes_per_param(lay.zero_stage, lay.dp, bf16).device
    gathered = min(params, ZERO3_LIVE_PARAMETERS) * (2 if bf16 else 4) if lay.zero_stage == 3 else 0.0
    return state, gathered


def microbatches(layout: Layout, global_batch: int) -> int:
    return max(1, global_batch // layout.dp // layout.mbs)


def first_chunk_microbatches(pp: int, vpp: int, num_microbatches: int) -> int:
    """Microbatches whose first-chunk activations pipeline rank 0 holds at its peak under 1F1B.

    Non-interleaved: its ``pp`` warm-up forwards. Interleaved: megatron runs forwards in groups
    of ``pp`` microbatches per chunk and backwards from the last chunk down, so the first chunk
    has two groups in flight (one step after the warm-up) before its first backward."""
    return min(pp if vpp == 1 else 2 * pp, num_microbatches)


def _block_params(b: Block, tp: int) -> int:
    return b.split_params // tp + b.whole_params


def stage_params(w: Workload, lay: Layout, rank: int) -> int:
    params = (w.layers // lay.pp) * _block_params(w.block, lay.tp)
    if rank == 0:
        params += w.first_params_split // lay.tp + w.first_params_whole
    if rank == lay.pp - 1:
        params += w.last_params_split // lay.tp + w.last_params_whole
        if w.last_block is not None:
            params += _block_params(w.last_block, lay.tp) - _block_params(w.block, lay.tp)
        if w.tied_embeddings and lay.pp > 1:
            params += w.first_params_split // lay.tp  # megatron keeps a copy of the tied embedding
        if w.last_tower is not None:
            params += w.last_tower.layers * _block_params(w.last_tower.block, lay.tp)
    return params


def _block_bytes(
    b: Block, saved: SavedValues, w: Workload, lay: Layout, act_bytes: int, sample_tokens: int | None = None
) -> float:
    """Bytes one microbatch keeps in block ``b`` (over ``sample_tokens`` tokens per sample; the
    model's by default)."""
    tokens = lay.mbs * w.rows_per_sample * (w.tokens if sample_tokens is None else sample_tokens) / lay.cp
    per_token = saved.bytes_per_token(act_bytes, lay.tp, lay.sequence_parallel)
    context = b.saved_context.bytes_per_token(act_bytes, lay.tp, False) * lay.mbs * w.context_tokens
    return per_token * tokens + context


def stage_memory(w: Workload, lay: Layout, rank: int, *, global_batch: int, bf16: bool) -> StageMemory:
    """Bytes pipeline stage ``rank`` holds at its peak (any rank of the stage), with 16-bit
    (``bf16``) or fp32 activations and weights."""
    act_bytes = 2 if bf16 else 4
    params = stage_params(w, lay, rank)
    state, gathered = model_state_bytes(params, lay, bf16)
    if w.frozen_copy:
        state += params * act_bytes
    m = microbatches(lay, global_batch)
    in_flight = in_flight_layer_microbatches(rank, w.layers, lay.pp, lay.vpp, m)
    full_block = _block_bytes(w.block, w.block.saved_for("none", lay.tp), w, lay, act_bytes)
    tokens = lay.mbs * w.rows_per_sample * w.tokens / lay.cp
    tables = (w.tables_per_token * act_bytes + w.tables_fp32_per_token * 4) * w.tokens / lay.cp
    last = first = 0.0
    if rank == lay.pp - 1:
        last = w.last_saved.bytes_per_token(act_bytes, lay.tp, lay.sequence_parallel) * tokens
    if rank == 0:
        first = w.first_saved.bytes_per_token(act_bytes, lay.tp, lay.sequence_parallel) * tokens
        first *= first_chunk_microbatches(lay.pp, lay.vpp, m)
    # the model's last block is in the last stage's peak once: 1F1B runs a microbatch's last
    # chunk forward straight into its backward. Interleaved over more than one group of
    # microbatches, that stage also peaks holding only earlier chunks' microbatches.
    end = w.last_block if rank == lay.pp - 1 and (lay.vpp == 1 or m <= lay.pp) else None
    tower = w.last_tower if rank == lay.pp - 1 else None
    workspace = full_block
    if tower is not None:
        t = tower.block
        tower_full = _block_bytes(t, t.saved_for("none", lay.tp), w, lay, act_bytes, tower.tokens)
        workspace = max(workspace, tower_full)
        # what leads into the tower, alive through its backward
        entry = tower.entry_saved.bytes_per_token(act_bytes, lay.tp, lay.sequence_parallel) * tokens
    if lay.recompute == "full":
        inputs = _block_bytes(w.block, w.block.saved_input, w, lay, act_bytes)
        # the forward's end (every block input and the loss) or one block's backward (its
        # recomputed activations in place of its input; the loss's buffers are freed by then)
        backward = (in_flight - 1) * inputs + full_block
        if end is not None:
            end_block = _block_bytes(end, end.saved_for("none", lay.tp), w, lay, act_bytes)
            backward = (in_flight - 1) * inputs + end_block
            if in_flight >= 2:  # then the block before it
                backward = max(backward, (in_flight - 2) * inputs + full_block)
        forward_end = in_flight * inputs + last
        if tower is not None:
            tower_inputs = _block_bytes(t, t.saved_input, w, lay, act_bytes, tower.tokens)
            forward_end += tower.layers * tower_inputs + entry
            # a tower block's backward: the model's block inputs, the tower's other inputs and
            # what leads into it (the loss's buffers are freed by then)
            tower_backward = in_flight * inputs + (tower.layers - 1) * tower_inputs + tower_full + entry
            backward = max(backward, tower_backward)
        activations = max(forward_end, backward) + tables + first
    else:
        per_block = _block_bytes(w.block, w.block.saved_for(lay.recompute, lay.tp), w, lay, act_bytes)
        activations = in_flight * per_block + last + tables + first
        if end is not None:
            activations += _block_bytes(end, end.saved_for(lay.recompute, lay.tp), w, lay, act_bytes) - per_block
        if tower is not None:
            saved = t.saved_for(lay.recompute, lay.tp)
            activations += tower.layers * _block_bytes(t, saved, w, lay, act_bytes, tower.tokens) + entry
    return StageMemory(params, state, activations, workspace_bytes=workspace, gathered_bytes=gathered)


def peak_memory(w: Workload, lay: Layout, *, global_batch: int, bf16: bool) -> StageMemory:
    """The busier of the first and the last pipeline stage."""
    stages = [stage_memory(w, lay, 0, global_batch=global_batch, bf16=bf16)]
    if lay.pp > 1:
        stages.append(stage_memory(w, lay, lay.pp - 1, global_batch=global_batch, bf16=bf16))
    return max(stages, key=lambda stage: stage.allocated_bytes)


__all__ = [
    "ALLOWANCE_BYTES",
    "ALLOWANCE_FRACTION",
    "AttentionCore",
    "Block",
    "FusedQKV",
    "Layout",
    "Matmul",
    "SavedValues",
    "StageMemory",
    "Tower",
    "TracedWorkload",
    "Workload",
    "dense_transformer",
    "family_workload",
    "first_chunk_microbatches",
    "layout_of",
    "microbatches",
    "model_state_bytes",
    "peak_memory",
    "stage_memory",
    "stage_params",
]
