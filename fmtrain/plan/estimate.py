"""Per-GPU memory and step time of one layout of a :class:`~fmtrain.models.workload.Workload`.

Memory (bytes one GPU holds, for the busiest pipeline stage; computed in
:mod:`fmtrain.models.workload`, which ``fmtrain info`` shares):

- model state: the stage's parameters (its blocks' weights over TP; the embedding on the
  first stage, the output layer on the last) times the bytes per parameter of Megatron's
  distributed optimizer (bf16: 2 weight + 4 fp32 gradient + 12/(DP x CP) master, m, v; fp32:
  4 + 4 + 8/(DP x CP); without the distributed optimizer 18 / 16);
- activations: what each block keeps for backward per token (``Block.saved``) times the
  tokens of a microbatch on this rank (divided by CP), times the layer-microbatches in flight
  at the stage's peak under 1F1B (``in_flight_layer_microbatches``; full recompute keeps only
  the block inputs and, during one block's backward, that block's activations again); plus
  the stage's own tensors (RoPE tables; the last stage's final norm and the loss's softmax);
- the backward's working memory: one block's gradients, about the size of what it saved;
- an allowance for what none of that counts (CUDA context, NCCL buffers, the allocator's
  fragmentation): ``ALLOWANCE_BYTES`` plus ``ALLOWANCE_FRACTION`` of the rest. ``fits`` holds
  when the total with the allowance is within the device's memory.

Step time (one optimizer step):

- each microbatch's compute on the slowest stage: every matmul at ``gemm`` efficiency plus
  its HBM traffic, attention cores at ``attention`` efficiency on the FLOPs they execute, the
  memory-bound kernels at ``hbm`` bandwidth; backward is 2x the matmuls and 2.5x attention;
  recompute adds the forward it recomputes;
- tensor-parallel all-reduces (reduce-scatter + all-gather under SP) and Ulysses all-to-alls
  per layer, on NVLink inside a node, the fabric across nodes, exposed except the share
  ``overlap_tp`` hides;
- the pipeline: ``m`` microbatches plus the 1F1B bubble of ``(pp - 1) / vpp`` microbatches,
  and the point-to-point sends of each microbatch;
- the data-parallel gradient reduce-scatter and parameter all-gather, hidden behind the last
  microbatch's backward and the first one's forward where ``overlap_dp`` is set;
- the optimizer's update, memory-bound over the rank's shard.

On the deepspeed backend (``Layout.zero_stage``) the model state is ZeRO's split (ZeRO-3 also
holds its gathered weights) and the data-parallel collectives are DeepSpeed's
(:func:`zero_collectives`), exposed.

The FLOP counts come from the workload; MFU and TFLOP/s/GPU divide the family's model FLOPs
(``Workload.model_flops_per_sample``), as the training metrics do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fmtrain.models import workload as memory
from fmtrain.models.workload import (
    ALLOWANCE_BYTES,
    ALLOWANCE_FRACTION,
    Block,
    Layout,
    Matmul,
    StageMemory,
    Workload,
    stage_params,
)
from fmtrain.plan.hardware import GIB, Device, Efficiency


@dataclass(frozen=True)
class Settings:
    """What the layout does not fix: batch, precision, overlaps, the machine."""

    global_batch: int
    device: Device
    efficiency: Efficiency = Efficiency()
    gpus_per_node: int = 8
    bf16: bool = True
    overlap_tp: float = 0.0
    """Share of the TP collectives hidden behind compute (Transformer Engine's comm overlap)."""
    overlap_dp: bool = True
    overlap_pp: bool = False
    grad_reduce_bytes: int = 4
    """Bytes per gradient value in the data-parallel reduction (fp32 main gradients)."""
    backend: str = "megatron"
    """``megatron`` or ``deepspeed`` (``engine.backend``): which layouts exist."""

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


def stage_memory(w: Workload, lay: Layout, s: Settings, rank: int) -> StageMemory:
    return memory.stage_memory(w, lay, rank, global_batch=s.global_batch, bf16=s.bf16)


def peak_memory(w: Workload, lay: Layout, s: Settings) -> StageMemory:
    return memory.peak_memory(w, lay, global_batch=s.global_batch, bf16=s.bf16)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    tp_comm_s: float
    cp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float
    optimizer_s: float

    @property
    def total_s(self) -> float:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: StageMemory
    time: StepTime
    fits: bool
    units_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float

    def as_json(self) -> dict:
        lay, mem, t = self.layout, self.memory, self.time
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "vpp": lay.vpp,
            "cp": lay.cp,
            "dp": lay.dp,
            "mbs": lay.mbs,
            "recompute": lay.recompute,
            "sequence_parallel": lay.sequence_parallel,
            "distributed_optimizer": lay.distributed_optimizer,
            "zero_stage": lay.zero_stage,
            "memory_gib": round(mem.total_bytes / GIB, 3),
            "allocated_gib": round(mem.allocated_bytes / GIB, 3),
            "state_gib": round(mem.state_bytes / GIB, 3),
            "activation_gib": round(mem.activation_bytes / GIB, 3),
            "fits": self.fits,
            "step_time_s": round(t.total_s, 5),
            **{key: round(value, 5) for key, value in asdict(t).items()},
            "tokens_per_s_per_gpu": round(self.units_per_s_per_gpu, 1),
            "tflops_per_gpu": round(self.tflops_per_gpu, 1),
            "mfu": round(self.mfu, 4),
        }


# ----------------------------------------------------------------------------- time


def _matmul_time(mm: Matmul, rows: float, lay: Layout, s: Settings) -> float:
    rows *= mm.share
    n, k = mm.outputs, mm.inputs
    if mm.split == "column":
        n /= lay.tp
    elif mm.split == "row":
        k /= lay.tp
    flops = 2 * rows * n * k
    traffic = s.act_bytes * (rows * k + k * n + rows * n)
    e = s.efficiency
    return flops / (s.device.peak_flops * e.gemm) + traffic / (s.device.hbm_bytes_per_s * e.hbm)


def _layer_times(
    w: Workload, b: Block, lay: Layout, s: Settings, sample_tokens: int | None = None
) -> tuple[float, float, float]:
    """(forward, backward, attention forward) seconds of block ``b`` for one microbatch (over
    ``sample_tokens`` tokens per sample, attending to each other; the model's by default)."""
    e, dev = s.efficiency, s.device
    sample_tokens = w.tokens if sample_tokens is None else sample_tokens
    rows = {
        "tokens": lay.mbs * w.rows_per_sample * sample_tokens / lay.cp,
        "context": lay.mbs * w.context_tokens,
        "sample": lay.mbs * w.rows_per_sample,
    }
    tokens = rows["tokens"]
    gemm = sum(_matmul_time(mm, rows[mm.rows], lay, s) for mm in b.matmuls)
    attention = 0.0
    for core in b.attention:
        keys = sample_tokens if core.keys == "tokens" else w.context_tokens
        flops = 4 * tokens * core.queries * keys * (core.heads / lay.tp) * core.head_dim
        if core.causal and core.keys == "tokens":
            flops /= 2
        attention += flops / (dev.peak_flops * e.attention)
    whole = b.elementwise_whole / (lay.tp if lay.sequence_parallel else 1)
    elementwise = (whole + b.elementwise_split / lay.tp) * tokens * s.act_bytes / (dev.hbm_bytes_per_s * e.hbm)
    # every kernel also pays a launch and tail cost: about eight memory-bound kernels per block
    # forward (norms, residual adds, RoPE, the activation), twelve in backward
    kernels_fwd = len(b.matmuls) + len(b.attention) + 8
    kernels_bwd = 2 * len(b.matmuls) + len(b.attention) + 12
    forward = gemm + attention + elementwise + kernels_fwd * e.kernel_s
    backward = 2 * gemm + 2.5 * attention + 2 * elementwise + kernels_bwd * e.kernel_s
    return forward, backward, attention


def _bandwidth(ranks: int, stride: int, s: Settings) -> float:
    """Bytes/s per rank of a collective over ``ranks`` ranks ``stride`` apart in rank order.

    Inside one node: NVLink. Across nodes NCCL runs one ring per NIC, so a group with ``k``
    members on each node moves its inter-node traffic over ``k`` NICs at once (capped by
    NVLink); a group with one member per node has its own NIC only.
    """
    per_node = max(1, min(ranks, s.gpus_per_node // stride)) if stride < s.gpus_per_node else 1
    if ranks * stride <= s.gpus_per_node:
        link = s.device.nvlink_bytes_per_s
    else:
        link = min(s.device.nvlink_bytes_per_s, s.device.internode_bytes_per_s * per_node)
    return link * s.efficiency.network


def _all_reduce_time(nbytes: float, ranks: int, stride: int, s: Settings) -> float:
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / _bandwidth(ranks, stride, s) + s.efficiency.latency_s


def _half_collective_time(nbytes: float, ranks: int, stride: int, s: Settings) -> float:
    """A reduce-scatter, all-gather or all-to-all of ``nbytes`` per rank."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / _bandwidth(ranks, stride, s) + s.efficiency.latency_s


def _tp_passes(b: Block, lay: Layout) -> tuple[int, int]:
    """(TP collectives per ``[tokens, hidden]`` reduction, passes over the block's fp32
    statistics) per microbatch: forward and backward, and full recompute's second forward."""
    if lay.sequence_parallel:  # forward: all-gather + reduce-scatter
        per_reduction, forward = (5 if b.tp_regather else 4), 2
    else:  # forward: one all-reduce
        per_reduction, forward = 2, 1
    if lay.recompute == "full":
        return per_reduction + forward, 3
    return per_reduction, 2


def _tp_block_time(b: Block, tokens: float, activation: float, lay: Layout, s: Settings) -> float:
    """Seconds of block ``b``'s TP collectives for one microbatch (none hidden)."""
    if lay.tp == 1:
        return 0.0
    per_reduction, stat_passes = _tp_passes(b, lay)
    one = (_half_collective_time if lay.sequence_parallel else _all_reduce_time)(activation, lay.tp, 1, s)
    # a collective per stream: the same bytes, each call's latency again
    calls = per_reduction * math.ceil(b.tp_reductions) * (b.tp_streams - 1)
    seconds = per_reduction * b.tp_reductions * one + calls * s.efficiency.latency_s
    if b.tp_stat_values:
        stats = _all_reduce_time(tokens * b.tp_stat_values * 4, lay.tp, 1, s)
        seconds += stat_passes * (stats + (math.ceil(b.tp_stat_values) * b.tp_streams - 1) * s.efficiency.latency_s)
    return seconds


@dataclass(frozen=True)
class Communication:
    """Bytes one rank hands to the collectives of each group in one step: the tensor of an
    all-reduce, the whole (unsharded) tensor of a reduce-scatter or all-gather, the tensor a
    point-to-point send carries."""

    tp: float
    cp: float
    pp: float
    dp: float


def communication_bytes(w: Workload, lay: Layout, s: Settings, rank: int) -> Communication:
    """Per-step collective volume of pipeline stage ``rank`` (any rank of the stage).

    TP, per block and microbatch: each of the block's ``tp_reductions`` row-parallel outputs is
    all-reduced in forward and its paired column-parallel input gradient in backward; under
    sequence parallelism the forward is an all-gather plus a reduce-scatter, the backward a
    reduce-scatter, an all-gather of the gradient and (``Block.tp_regather``) the all-gather
    that rebuilds the column-parallel input for its weight gradient (megatron keeps the input
    sharded); plus the fp32 statistics of ``Block.tp_stat_values``; full recompute runs the
    forward's collectives again. The model's last block counts its own
    (``Workload.last_block``). The embedding's output is reduced on the first stage; the output
    layer's input is gathered (SP) or its gradient reduced on the last, and the vocab-parallel
    cross entropy reduces three fp32 values per token; replicated layers outside the blocks
    scatter (first stage) or gather (last) their tokens under SP. CP: Ulysses' all-to-alls of
    q, k, v and the output, in both directions. PP: each microbatch's activation (and
    ``Workload.stage_rows``) sent forward and its gradient backward across each boundary. DP:
    the distributed optimizer's gradient reduce-scatter and parameter all-gather
    (or one all-reduce) over DP x CP.
    """
    b = w.block
    m = memory.microbatches(lay, s.global_batch)
    layers = w.layers // lay.pp
    tokens = lay.mbs * w.rows_per_sample * w.tokens / lay.cp
    activation = tokens * w.hidden * s.act_bytes
    tp = 0.0
    if lay.tp > 1:

        def block_bytes(block: Block) -> float:
            per_reduction, stat_passes = _tp_passes(block, lay)
            return block.tp_reductions * per_reduction * activation + stat_passes * block.tp_stat_values * tokens * 4

        tp = layers * block_bytes(b)
        if rank == lay.pp - 1 and w.last_block is not None:
            tp += block_bytes(w.last_block) - block_bytes(b)
        if rank == lay.pp - 1 and w.last_tower is not None:
            t = w.last_tower
            t_tokens = lay.mbs * w.rows_per_sample * t.tokens / lay.cp
            per_reduction, stat_passes = _tp_passes(t.block, lay)
            t_activation = t_tokens * t.hidden * s.act_bytes
            t_block = t.block.tp_reductions * per_reduction * t_activation
            tp += t.layers * (t_block + stat_passes * t.block.tp_stat_values * t_tokens * 4)
        if rank == 0 and w.first_params_split:
            # the vocab-parallel embedding's reduction (SP: reduce-scatter, gathered in backward)
            tp += (2 if lay.sequence_parallel else 1) * activation
        if rank == lay.pp - 1 and w.last_params_split:
            tp += (3 if lay.sequence_parallel else 1) * activation + 3 * tokens * 4
        if lay.sequence_parallel:
            tp += (w.first_sp_scatter if rank == 0 else 0.0) * activation
            tp += (w.last_sp_gather if rank == lay.pp - 1 else 0.0) * activation
        tp *= m
    cp = 0.0
    if lay.cp > 1:
        widths = sum(2 * core.heads * core.head_dim for core in b.attention if core.keys == "tokens")
        widths += 2 * w.kv_heads * (w.hidden // w.heads)
        cp = m * layers * 2 * tokens * widths / lay.tp * s.act_bytes
    pp = 0.0
    if lay.pp > 1:
        sent = _stage_send_bytes(w, lay, s)
        forward_sends = m * lay.vpp - (m if rank == lay.pp - 1 else 0)
        backward_sends = m * lay.vpp - (m if rank == 0 else 0)
        pp = (forward_sends + backward_sends) * sent
    dp = dp_collective_bytes(stage_params(w, lay, rank), m, lay, s)
    return Communication(tp=tp, cp=cp, pp=pp, dp=dp)


def dp_collective_bytes(params: int, m: int, lay: Layout, s: Settings) -> float:
    """Bytes one rank holding ``params`` parameters hands to the data-parallel (x CP)
    collectives in a step of ``m`` microbatches: the distributed optimizer's gradient
    reduce-scatter and weight all-gather (or one all-reduce), or DeepSpeed's."""
    if lay.dp * lay.cp == 1:
        return 0.0
    if lay.zero_stage:
        return sum(nbytes for _, nbytes in zero_collectives(params, m, lay, s))
    return params * s.grad_reduce_bytes + (params * s.act_bytes if lay.distributed_optimizer else 0)


def dp_time(
    params: int, m: int, lay: Layout, s: Settings, *, last_backward: float, first_forward: float, buckets: int = 0
) -> float:
    """Exposed seconds of the data-parallel collectives of one step. Megatron: with
    ``overlap_dp`` the gradient reduce-scatter hides behind the last microbatch's backward and
    the weight all-gather behind the first one's forward, ``1 / buckets`` of each exposed (the
    last bucket; 0: none). DeepSpeed: all of it (``_zero_dp_time``)."""
    shards = lay.dp * lay.cp
    if shards == 1:
        return 0.0
    if lay.zero_stage:
        return _zero_dp_time(params, m, lay, s)
    if lay.distributed_optimizer:
        reduce = _half_collective_time(params * s.grad_reduce_bytes, shards, lay.tp, s)
        gather = _half_collective_time(params * s.act_bytes, shards, lay.tp, s)
    else:
        reduce = _all_reduce_time(params * s.grad_reduce_bytes, shards, lay.tp, s)
        gather = 0.0
    if not s.overlap_dp:
        return reduce + gather
    tail = (reduce + gather) / buckets if buckets else 0.0
    return max(0.0, reduce - last_backward) + max(0.0, gather - first_forward) + tail


def optimizer_time(params: int, lay: Layout, s: Settings) -> float:
    """Adam over the rank's shard: fp32 master, m and v read and written, the gradient read, the
    16-bit weight written; the gradient norm reads the gradients once more."""
    sharded = lay.distributed_optimizer or lay.zero_stage
    shard = params / (lay.dp * lay.cp if sharded else 1)
    return (shard * (24 + 4 + s.act_bytes) + params * s.grad_reduce_bytes) / (
        s.device.hbm_bytes_per_s * s.efficiency.hbm
    )


def _zero_dp_time(params: int, m: int, lay: Layout, s: Settings) -> float:
    """Exposed: fmtrain's DeepSpeed config does not overlap communication with compute."""
    total = 0.0
    for kind, nbytes in zero_collectives(params, m, lay, s):
        if kind == "all_reduce":
            total += _all_reduce_time(nbytes, lay.dp, lay.tp, s)
        else:
            total += _half_collective_time(nbytes, lay.dp, lay.tp, s)
    return total


def zero_collectives(params: int, m: int, lay: Layout, s: Settings) -> list[tuple[str, float]]:
    """The data-parallel collectives of one step on the deepspeed backend, as (kind, bytes handed
    over), from what DeepSpeed runs with fmtrain's config (counted on gloo, tests/test_plan.py):
    16-bit gradients (fp32 in fp32 training), no communication overlap (``overlap_comm`` off).

    - ZeRO-1: the whole gradient all-reduced once, at the last microbatch; the updated weights
      all-gathered after the step;
    - ZeRO-2: the gradient all-reduced after every microbatch's backward (each rank keeps only
      its partition's sum); the weights all-gathered after the step;
    - ZeRO-3: per microbatch, the weights all-gathered for the forward (and again for the
      backward beyond the live-parameter budget, which releases them in between) and the
      gradient reduce-scattered.
    """
    grads = params * s.act_bytes
    weights = params * s.act_bytes
    if lay.zero_stage == 1:
        return [("all_reduce", grads), ("all_gather", weights)]
    if lay.zero_stage == 2:
        return [("all_reduce", grads)] * m + [("all_gather", weights)]
    regathered = max(0.0, 1.0 - memory.ZERO3_LIVE_PARAMETERS / params) if params else 0.0
    return [("all_gather", weights * (1 + regathered)), ("reduce_scatter", grads)] * m


def _stage_send_bytes(w: Workload, lay: Layout, s: Settings) -> float:
    """Bytes of the tensor one microbatch sends across a pipeline boundary (each direction)."""
    tokens = lay.mbs * w.rows_per_sample * w.tokens / lay.cp / (lay.tp if lay.sequence_parallel else 1)
    return (tokens + lay.mbs * w.rows_per_sample * w.stage_rows) * w.hidden * s.act_bytes


def step_time(w: Workload, lay: Layout, s: Settings) -> StepTime:
    b, e, dev = w.block, s.efficiency, s.device
    m = memory.microbatches(lay, s.global_batch)
    layers = w.layers // lay.pp
    tokens = lay.mbs * w.rows_per_sample * w.tokens / lay.cp
    activation = tokens * w.hidden * s.act_bytes

    def block_times(block: Block) -> tuple[float, float, float, float]:
        """(forward, backward, recompute, TP collectives) seconds of one block."""
        forward, backward, attention_fwd = _layer_times(w, block, lay, s)
        recompute = {"none": 0.0, "selective": attention_fwd, "full": forward}[lay.recompute]
        return forward, backward, recompute, _tp_block_time(block, tokens, activation, lay, s)

    forward, backward, recompute, tp_layer = block_times(b)
    layer = forward + backward + recompute
    # the output layer and the loss on the last stage (the embedding lookup is negligible)
    head = sum(3 * _matmul_time(mm, tokens, lay, s) for mm in w.head_matmuls)
    logits = sum(mm.outputs * mm.share / lay.tp for mm in w.head_matmuls)
    head += 3 * logits * tokens * 4 * 2 / (dev.hbm_bytes_per_s * e.hbm)
    # the slowest stage: the last one (the head), unless the model's last block there does
    # less than the first stage's
    compute_mb, tp_mb = layers * layer + head, layers * tp_layer
    if w.last_tower is not None:  # a tower on the last stage, at its own width and tokens
        t = w.last_tower
        t_tokens = lay.mbs * w.rows_per_sample * t.tokens / lay.cp
        t_forward, t_backward, t_attention = _layer_times(w, t.block, lay, s, t.tokens)
        t_recompute = {"none": 0.0, "selective": t_attention, "full": t_forward}[lay.recompute]
        t_tp = _tp_block_time(t.block, t_tokens, t_tokens * t.hidden * s.act_bytes, lay, s)
        compute_mb += t.layers * (t_forward + t_backward + t_recompute)
        tp_mb += t.layers * t_tp
    if lay.sequence_parallel:
        tp_mb += w.last_sp_gather * _half_collective_time(activation, lay.tp, 1, s)
    if w.last_block is not None:
        end_forward, end_backward, end_recompute, end_tp = block_times(w.last_block)
        compute_mb += end_forward + end_backward + end_recompute - layer
        tp_mb += end_tp - tp_layer
        first_compute, first_tp = layers * layer, layers * tp_layer
        if lay.sequence_parallel:
            first_tp += w.first_sp_scatter * _half_collective_time(activation, lay.tp, 1, s)
        if lay.pp > 1 and first_compute + first_tp * (1 - s.overlap_tp) > compute_mb + tp_mb * (1 - s.overlap_tp):
            compute_mb, tp_mb = first_compute, first_tp
    tp_mb *= 1 - s.overlap_tp
    cp_mb = 0.0
    if lay.cp > 1:
        q_kv_out = sum(2 * core.heads * core.head_dim for core in b.attention if core.keys == "tokens")
        q_kv_out += 2 * w.kv_heads * (w.hidden // w.heads)
        exchanged = tokens * q_kv_out / lay.tp * s.act_bytes
        cp_mb = layers * 2 * _half_collective_time(exchanged, lay.cp, lay.tp, s)

    per_mb = compute_mb + tp_mb + cp_mb
    bubble = (lay.pp - 1) / lay.vpp * per_mb
    pp_comm = 0.0
    if lay.pp > 1:
        sent = _stage_send_bytes(w, lay, s)
        # megatron's rank order is tp-cp-dp-pp: neighbouring stages are tp*cp*dp ranks apart
        one = sent / _bandwidth(2, lay.tp * lay.cp * lay.dp, s) + e.latency_s
        pp_comm = 2 * m * lay.vpp * one * (0.2 if s.overlap_pp else 1.0)

    params = stage_params(w, lay, 0 if lay.pp == 1 else lay.pp - 1)
    dp_comm = dp_time(
        params,
        m,
        lay,
        s,
        last_backward=layers * (backward + recompute),
        first_forward=layers * forward,
        buckets=max(1, layers),
    )
    optimizer = optimizer_time(params, lay, s)

    return StepTime(
        compute_s=m * compute_mb,
        tp_comm_s=m * tp_mb,
        cp_comm_s=m * cp_mb,
        pp_comm_s=pp_comm,
        bubble_s=bubble,
        dp_comm_s=dp_comm,
        optimizer_s=optimizer,
    )


def predict(w: Workload, lay: Layout, s: Settings) -> Prediction:
    return prediction(
        lay, peak_memory(w, lay, s), step_time(w, lay, s), s, w.tokens * w.rows_per_sample, w.model_flops_per_sample
    )


def prediction(
    lay: Layout, mem: StageMemory, time: StepTime, s: Settings, units_per_sample: float, model_flops_per_sample: float
) -> Prediction:
    """A layout's memory and step time with what follows from them: whether it fits, units
    (tokens, samples) and model TFLOP/s per GPU, MFU."""
    samples_per_s = s.global_batch / time.total_s
    flops = samples_per_s * model_flops_per_sample / lay.gpus
    return Prediction(
        layout=lay,
        memory=mem,
        time=time,
        fits=mem.total_bytes <= s.device.memory_bytes,
        units_per_s_per_gpu=samples_per_s * units_per_sample / lay.gpus,
        tflops_per_gpu=flops / 1e12,
        mfu=flops / s.device.peak_flops,
    )


__all__ = [
    "ALLOWANCE_BYTES",
    "ALLOWANCE_FRACTION",
    "Layout",
    "Prediction",
    "Settings",
    "StageMemory",
    "StepTime",
    "Communication",
    "communication_bytes",
    "dp_collective_bytes",
    "dp_time",
    "optimizer_time",
    "peak_memory",
    "predict",
    "prediction",
    "stage_memory",
    "step_time",
    "zero_collectives",
]
