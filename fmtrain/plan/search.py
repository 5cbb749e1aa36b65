"""Enumerate the layouts of a workload on N GPUs and rank the ones that fit by predicted step time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

from fmtrain.models.workload import Workload
from fmtrain.plan.estimate import Layout, Prediction, Settings, predict

FIELDS = {f.name for f in fields(Layout)}
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)
ZERO_STAGES = (1, 2, 3)


def parse_layout(text: str) -> dict:
    """``tp=8,pp=2,vpp=1,cp=1,mbs=1,recompute=selective,sp=1,distopt=1,zero=3`` -> fixed Layout
    fields."""
    fixed: dict = {}
    aliases = {"sp": "sequence_parallel", "distopt": "distributed_optimizer", "zero": "zero_stage"}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not sep or key not in FIELDS:
            raise ValueError(
                f"--layout {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(FIELDS | set(aliases)))}"
            )
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ValueError(f"--layout recompute={value!r}: not one of {', '.join(RECOMPUTE)}")
            fixed[key] = value
        elif key in ("sequence_parallel", "distributed_optimizer"):
            if value.lower() not in ("0", "1", "true", "false"):
                raise ValueError(f"--layout {key}={value!r}: expected 0 or 1")
            fixed[key] = value.lower() in ("1", "true")
        else:
            try:
                fixed[key] = int(value)
            except ValueError:
                raise ValueError(f"--layout {key}={value!r}: expected an integer") from None
            if key == "zero_stage" and fixed[key] not in ZERO_STAGES:
                raise ValueError(f"--layout zero={value}: the ZeRO stage is 1, 2 or 3")
            if fixed[key] < 1:
                raise ValueError(f"--layout {key}={value}: must be at least 1")
    return fixed


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(w: Workload, gpus: int, s: Settings, fixed: dict | None = None) -> Iterator[Layout]:
    """Every layout megatron can run: TP within a node dividing the heads (and the key/value
    heads; a generic --arch description may also repeat them), PP dividing the layers, VPP
    dividing a stage's layers (at PP > 1, with the microbatches a multiple of PP), CP dividing
    the tokens and the heads per TP rank (families that support it), DP the rest; micro-batches
    dividing a replica's share of the global batch. Sequence parallelism is on whenever TP > 1
    (it only saves memory), the distributed optimizer always, unless ``fixed`` says otherwise.
    On the deepspeed backend (``Settings.backend``): TP without SP, DP the rest, ZeRO stage 1,
    2 or 3 (what fmtrain's deepspeed engine runs: no pipeline or context parallelism)."""
    fixed = fixed or {}
    deepspeed = s.backend == "deepspeed"
    zero_stages = ZERO_STAGES if deepspeed else (0,)
    recomputes = [r for r in RECOMPUTE if r != "selective" or w.block.saved_selective is not None]
    for tp in _divisors(min(gpus, s.gpus_per_node)):
        # megatron runs fewer key/value heads than TP ranks by repeating them (a generic --arch
        # description may use that); fmtrain's families refuse it when the config is validated.
        repeats_kv_heads = w.family == "gpt" and tp % w.kv_heads == 0
        if w.heads % tp or (w.kv_heads % tp and not repeats_kv_heads):
            continue
        if w.last_tower is not None and any(core.heads % tp for core in w.last_tower.block.attention):
            continue  # a tower's heads split over TP too
        for cp in _divisors(gpus // tp) if w.context_parallel and not deepspeed else [1]:
            if cp > 1 and (w.tokens % cp or w.heads % (tp * cp)):
                continue
            for pp in _divisors(gpus // (tp * cp)) if not deepspeed else [1]:
                if w.layers % pp:
                    continue
                dp = gpus // (tp * cp * pp)
                if s.global_batch % dp:
                    continue
                for vpp in _divisors(w.layers // pp) if pp > 1 and w.virtual_pipeline else [1]:
                    for mbs in MICRO_BATCHES:
                        per_replica = s.global_batch // dp
                        if per_replica % mbs:
                            continue
                        if vpp > 1 and (per_replica // mbs) % pp:
                            continue
                        for recompute in recomputes:
                            for zero in zero_stages:
                                lay = Layout(
                                    tp=tp,
                                    pp=pp,
                                    vpp=vpp,
                                    cp=cp,
                                    dp=dp,
                                    mbs=mbs,
                                    recompute=recompute,
                                    sequence_parallel=fixed.get("sequence_parallel", tp > 1 and not deepspeed),
                                    distributed_optimizer=fixed.get("distributed_optimizer", not deepspeed),
                                    zero_stage=zero,
                                )
                                if lay.sequence_parallel and (tp == 1 or deepspeed):
                                    continue
                                if deepspeed and lay.distributed_optimizer:
                                    continue
                                if all(getattr(lay, key) == value for key, value in fixed.items()):
                                    yield lay


def check_backend(fixed: dict | None, s: Settings) -> None:
    if fixed and "zero_stage" in fixed and s.backend != "deepspeed":
        raise ValueError("--layout zero=N: the ZeRO stage is the deepspeed backend's (engine.backend=deepspeed)")


def plan(w: Workload, gpus: int, s: Settings, fixed: dict | None = None) -> tuple[list[Prediction], int]:
    """(the layouts that fit, fastest first; how many layouts were considered)."""
    if fixed and fixed.get("sequence_parallel") and fixed.get("tp", 2) == 1:
        raise ValueError("--layout sp=1 needs tp > 1")
    check_backend(fixed, s)
    considered = 0
    fitting = []
    for lay in layouts(w, gpus, s, fixed):
        considered += 1
        prediction = predict(w, lay, s)
        if prediction.fits:
            fitting.append(prediction)
    fitting.sort(key=lambda p: (p.time.total_s, p.memory.total_bytes))
    return fitting, considered


__all__ = ["check_backend", "layouts", "parse_layout", "plan"]
