"""``fmtrain plan --calibrate RUN_DIR``: fit the GEMM efficiency the time model assumes to a measured run.

The run's config (``RUN_DIR/config.yaml``), its layout (the latest checkpoint's
``fmtrain_state.json``, else ``parallel.dp`` of the config) and the median ``step_time_s`` of
its ``metrics.jsonl`` (the first two steps, compilation and warm-up, left out) give one
measured point; the GEMM efficiency is the value for which the planner predicts that step
time for that layout on the ``--gpu`` the run used. Everything else in the model stays as
documented, so the fit absorbs what the model leaves out on that machine.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from fmtrain.config import ConfigError, load_config
from fmtrain.models.workload import family_workload, layout_of
from fmtrain.plan.estimate import Settings, step_time
from fmtrain.plan.hardware import Device, Efficiency

WARMUP_STEPS = 2


def _run_layout(run_dir: Path, cfg) -> dict:
    from fmtrain.checkpoint import CheckpointError, read_state, resolve_checkpoint

    try:
        layout = dict(read_state(resolve_checkpoint(run_dir)).get("layout", {}))
    except CheckpointError:
        layout = {}
    if not layout:
        p = cfg.parallel
        if p.dp < 1:
            raise ConfigError(
                f"--calibrate {run_dir}: no checkpoint there to read the layout from, and its config has "
                "parallel.dp=0 (derived at start-up); calibrate from a run that saved a checkpoint"
            )
        layout = {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "dp": p.dp}
    return {"cp": 1, "vpp": 1, **layout}


def measured_step_time(metrics: Path) -> tuple[float, int]:
    """(median step time, steps used) of a metrics.jsonl, without the warm-up steps."""
    if not metrics.is_file():
        raise ConfigError(f"--calibrate: {metrics} does not exist")
    times = []
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"--calibrate: {metrics} line {number} is not JSON") from None
        if "step_time_s" in record and record.get("step", 0) > WARMUP_STEPS:
            times.append(float(record["step_time_s"]))
    if len(times) < 3:
        raise ConfigError(f"--calibrate: {metrics} has {len(times)} timed steps after warm-up; at least 3 are needed")
    return statistics.median(times), len(times)


def fit_gemm_efficiency(run_dir: str | Path, device: Device, efficiency: Efficiency) -> Efficiency:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"--calibrate {run_dir}: no config.yaml (not an fmtrain run directory)")
    cfg = load_config(config, [])
    layout = _run_layout(run_dir, cfg)
    measured, steps = measured_step_time(run_dir / "metrics.jsonl")
    workload = family_workload(cfg, True)
    if workload is None:
        raise ConfigError(f"--calibrate {run_dir}: model.family={cfg.model.family!r} has no planner description")
    lay = replace(layout_of(cfg, layout["dp"]), tp=layout["tp"], pp=layout["pp"], vpp=layout["vpp"], cp=layout["cp"])
    settings = Settings(
        global_batch=cfg.train.global_batch_size,
        device=device,
        bf16=cfg.train.precision != "fp32",
        overlap_dp=cfg.parallel.overlap_grad_reduce,
    )

    def predicted(gemm: float) -> float:
        return step_time(
            workload, lay, Settings(**{**settings.__dict__, "efficiency": efficiency.calibrated(gemm)})
        ).total_s

    low, high = 0.01, 1.0  # predicted time falls as the efficiency rises
    if predicted(high) > measured:
        raise ConfigError(
            f"--calibrate {run_dir}: the run's median step ({measured:.4f} s) is faster than the model allows "
            f"at 100% GEMM efficiency on {device.name} ({predicted(high):.4f} s): was it another GPU?"
        )
    if predicted(low) < measured:
        raise ConfigError(
            f"--calibrate {run_dir}: the run's median step ({measured:.4f} s) is slower than 1% GEMM efficiency "
            f"on {device.name} explains ({predicted(low):.4f} s): was it another GPU, or a stalled run?"
        )
    for _ in range(60):
        mid = (low + high) / 2
        if predicted(mid) > measured:
            low = mid
        else:
            high = mid
    print(f"calibrated GEMM efficiency {high:.3f} from {steps} steps of {run_dir} (median {measured:.4f} s/step)")
    return efficiency.calibrated(high)


__all__ = ["fit_gemm_efficiency", "measured_step_time"]
