"""Layouts of a :class:`~fmtrain.models.workload.TracedWorkload` (the VAEs' conv nets): data
parallel only, so the choice is the micro-batch, recompute (none / full: every ResNet and
attention block checkpointed) and, on the deepspeed backend, the ZeRO stage.

Memory per GPU: model state as for the transformer families (the distributed optimizer's or
ZeRO's bytes per parameter, ZeRO-3's gathered weights), activations = the traced peak of what
autograd keeps for one sample x the micro-batch (a conv net's saved maps grow with the batch
and nothing else), the backward's working memory = twice the largest tensor kept (its gradient
and the one flowing in), and the same allowance. Step time: the traced FLOPs at the GEMM
efficiency (cuDNN runs convolutions as implicit GEMMs), the memory-bound kernels (norms,
activations, residual adds) as passes over the maps the forward produces at HBM bandwidth, the
data-parallel collectives as for the transformer families, and the optimizer.
"""

from __future__ import annotations

from fmtrain.models.sizes import state_bytes_per_param, zero_state_bytes_per_param
from fmtrain.models.workload import ZERO3_LIVE_PARAMETERS, Layout, StageMemory, TracedWorkload
from fmtrain.plan.estimate import (
    Prediction,
    Settings,
    StepTime,
    _half_collective_time,
    _zero_dp_time,
    zero_collectives,
)
from fmtrain.plan.search import MICRO_BATCHES, ZERO_STAGES

ELEMENTWISE_PASSES = {"none": 4, "full": 6}
"""Passes of the memory-bound kernels over the maps a forward produces (the bytes kept without
recompute): written and read in the forward, twice in the backward; full recompute runs the
forward again."""


def memory(w: TracedWorkload, lay: Layout, bf16: bool) -> StageMemory:
    act_bytes = 2 if bf16 else 4
    gathered = 0.0
    if lay.zero_stage:
        state = w.params * zero_state_bytes_per_param(lay.zero_stage, lay.dp, bf16).device
        if lay.zero_stage == 3:
            gathered = min(w.params, ZERO3_LIVE_PARAMETERS) * act_bytes
    else:
        state = w.params * state_bytes_per_param(bf16, lay.distributed_optimizer, lay.dp)
    return StageMemory(
        w.params,
        state,
        w.saved_bytes[lay.recompute] * lay.mbs,
        workspace_bytes=2 * w.largest_saved_bytes * lay.mbs,
        gathered_bytes=gathered,
    )


def dp_bytes(w: TracedWorkload, lay: Layout, s: Settings) -> float:
    """Bytes one rank hands to the data-parallel collectives per step (as
    :func:`fmtrain.plan.estimate.communication_bytes` counts them)."""
    if lay.dp == 1:
        return 0.0
    if lay.zero_stage:
        m = max(1, s.global_batch // lay.dp // lay.mbs)
        return sum(nbytes for _, nbytes in zero_collectives(w.params, m, lay, s))
    return w.params * s.grad_reduce_bytes + (w.params * s.act_bytes if lay.distributed_optimizer else 0)


def step_time(w: TracedWorkload, lay: Layout, s: Settings) -> StepTime:
    e, dev = s.efficiency, s.device
    m = max(1, s.global_batch // lay.dp // lay.mbs)
    per_sample = w.flops[lay.recompute] / (dev.peak_flops * e.gemm)
    per_sample += ELEMENTWISE_PASSES[lay.recompute] * w.saved_bytes["none"] / (dev.hbm_bytes_per_s * e.hbm)
    compute = m * lay.mbs * per_sample
    dp_comm = 0.0
    if lay.dp > 1 and lay.zero_stage:
        dp_comm = _zero_dp_time(w.params, m, lay, s)
    elif lay.dp > 1:
        reduce = _half_collective_time(w.params * s.grad_reduce_bytes, lay.dp, 1, s)
        gather = _half_collective_time(w.params * s.act_bytes, lay.dp, 1, s) if lay.distributed_optimizer else 0.0
        if s.overlap_dp:  # behind the last microbatch's backward and the first one's forward
            backward, forward = 2 / 3 * lay.mbs * per_sample, 1 / 3 * lay.mbs * per_sample
            dp_comm = max(0.0, reduce - backward) + max(0.0, gather - forward)
        else:
            dp_comm = reduce + gather
    shard = w.params / (lay.dp if lay.distributed_optimizer or lay.zero_stage else 1)
    optimizer = (shard * (24 + 4 + s.act_bytes) + w.params * s.grad_reduce_bytes) / (dev.hbm_bytes_per_s * e.hbm)
    return StepTime(
        compute_s=compute,
        tp_comm_s=0.0,
        cp_comm_s=0.0,
        pp_comm_s=0.0,
        bubble_s=0.0,
        dp_comm_s=dp_comm,
        optimizer_s=optimizer,
    )


def predict(w: TracedWorkload, lay: Layout, s: Settings) -> Prediction:
    mem = memory(w, lay, s.bf16)
    time = step_time(w, lay, s)
    samples_per_s = s.global_batch / time.total_s
    flops = samples_per_s * w.model_flops_per_sample / lay.dp
    return Prediction(
        layout=lay,
        memory=mem,
        time=time,
        fits=mem.total_bytes <= s.device.memory_bytes,
        units_per_s_per_gpu=samples_per_s / lay.dp,
        tflops_per_gpu=flops / 1e12,
        mfu=flops / s.device.peak_flops,
    )


def layouts(w: TracedWorkload, gpus: int, s: Settings, fixed: dict | None = None) -> list[Layout]:
    """DP = all GPUs (dividing the global batch), micro-batches dividing a replica's share,
    recompute none or full, the distributed optimizer (megatron) or a ZeRO stage (deepspeed)."""
    fixed = fixed or {}
    deepspeed = s.backend == "deepspeed"
    if s.global_batch % gpus:
        return []
    per_replica = s.global_batch // gpus
    out = []
    for mbs in MICRO_BATCHES:
        if per_replica % mbs:
            continue
        for recompute in w.saved_bytes:
            for zero in ZERO_STAGES if deepspeed else (0,):
                lay = Layout(
                    dp=gpus,
                    mbs=mbs,
                    recompute=recompute,
                    distributed_optimizer=fixed.get("distributed_optimizer", not deepspeed),
                    zero_stage=zero,
                )
                if all(getattr(lay, key) == value for key, value in fixed.items()):
                    out.append(lay)
    return out


def plan(w: TracedWorkload, gpus: int, s: Settings, fixed: dict | None = None) -> tuple[list[Prediction], int]:
    """(the layouts that fit, fastest first; how many were considered)."""
    if fixed and "zero_stage" in fixed and s.backend != "deepspeed":
        raise ValueError("--layout zero=N: the ZeRO stage is the deepspeed backend's (engine.backend=deepspeed)")
    candidates = layouts(w, gpus, s, fixed)
    fitting = [p for p in (predict(w, lay, s) for lay in candidates) if p.fits]
    fitting.sort(key=lambda p: (p.time.total_s, p.memory.total_bytes))
    return fitting, len(candidates)


__all__ = ["dp_bytes", "layouts", "memory", "plan", "predict", "step_time"]
