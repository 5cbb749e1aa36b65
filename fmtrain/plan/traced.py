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

from fmtrain.models.workload import Layout, StageMemory, TracedWorkload, microbatches, model_state_bytes
from fmtrain.plan.estimate import (
    Prediction,
    Settings,
    StepTime,
    dp_collective_bytes,
    dp_time,
    optimizer_time,
    prediction,
)
from fmtrain.plan.search import MICRO_BATCHES, ZERO_STAGES, check_backend

ELEMENTWISE_PASSES = {"none": 4, "full": 6}
"""Passes of the memory-bound kernels over the maps a forward produces (the bytes kept without
recompute): written and read in the forward, twice in the backward; full recompute runs the
forward again."""


def memory(w: TracedWorkload, lay: Layout, bf16: bool) -> StageMemory:
    state, gathered = model_state_bytes(w.params, lay, bf16)
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
    return dp_collective_bytes(w.params, microbatches(lay, s.global_batch), lay, s)


def step_time(w: TracedWorkload, lay: Layout, s: Settings) -> StepTime:
    e, dev = s.efficiency, s.device
    m = microbatches(lay, s.global_batch)
    per_sample = w.flops[lay.recompute] / (dev.peak_flops * e.gemm)
    per_sample += ELEMENTWISE_PASSES[lay.recompute] * w.saved_bytes["none"] / (dev.hbm_bytes_per_s * e.hbm)
    # the gradient reduction behind the last microbatch's backward (2/3 of its compute), the
    # weights' gather behind the first one's forward; no per-layer buckets to expose
    microbatch = lay.mbs * per_sample
    dp_comm = dp_time(w.params, m, lay, s, last_backward=2 / 3 * microbatch, first_forward=1 / 3 * microbatch)
    return StepTime(
        compute_s=m * microbatch,
        tp_comm_s=0.0,
        cp_comm_s=0.0,
        pp_comm_s=0.0,
        bubble_s=0.0,
        dp_comm_s=dp_comm,
        optimizer_s=optimizer_time(w.params, lay, s),
    )


def predict(w: TracedWorkload, lay: Layout, s: Settings) -> Prediction:
    return prediction(lay, memory(w, lay, s.bf16), step_time(w, lay, s), s, 1, w.model_flops_per_sample)


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
    check_backend(fixed, s)
    candidates = layouts(w, gpus, s, fixed)
    fitting = [p for p in (predict(w, lay, s) for lay in candidates) if p.fits]
    fitting.sort(key=lambda p: (p.time.total_s, p.memory.total_bytes))
    return fitting, len(candidates)


__all__ = ["dp_bytes", "layouts", "memory", "plan", "predict", "step_time"]
