"""The training loop, top to bottom.

    config -> process groups -> data -> engine -> (resume) -> steps -> checkpoints

Every step is a pure function of (step number, checkpointed state): the learning rate comes
from :func:`fmtrain.train.schedules.lr_at`, the batch from the stateless sampler, so a run
resumed from a checkpoint continues with exactly the batches and rates it would have seen.
Rank 0 prints and writes run files; the others stay quiet unless they fail.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fmtrain import checkpoint, parallel
from fmtrain.config import Config
from fmtrain.data.text import MicrobatchSampler, build_text_datasets, ensure_tokenizer
from fmtrain.engine import build_engine
from fmtrain.models.registry import get_family
from fmtrain.train.metrics import MetricsLogger, StepTimer, device_peak_tflops
from fmtrain.train.schedules import lr_at


def log0(topo: parallel.Topology, message: str) -> None:
    if topo.is_writer:
        print(message, flush=True)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Peak resident set size of this process (kilobytes on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _broadcast_float(value: float, topo: parallel.Topology) -> float:
    holder = torch.tensor([value], dtype=torch.float64, device=topo.device)
    dist.broadcast(holder, src=0)
    return float(holder.item())


def prepare_data(cfg: Config, topo: parallel.Topology, run_dir: Path):
    """Tokenizer (trained once, by rank 0) and the train / validation samplers."""
    if topo.is_writer:
        tokenizer_path = ensure_tokenizer(cfg, run_dir)
    dist.barrier()
    if not topo.is_writer:
        tokenizer_path = ensure_tokenizer(cfg, run_dir)  # now present: only loads and checks
    train_ds, valid_ds = build_text_datasets(cfg, tokenizer_path)
    t = cfg.train
    train = MicrobatchSampler(train_ds, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed)
    valid = None
    if cfg.eval.interval and valid_ds is not None and len(valid_ds) >= t.global_batch_size:
        valid = MicrobatchSampler(valid_ds, t.global_batch_size, t.micro_batch_size, topo.dp, cfg.run.seed)
    return tokenizer_path, train, valid


def evaluate(engine, valid: MicrobatchSampler, cfg: Config, topo: parallel.Topology) -> float:
    """Token-weighted validation loss over the first ``eval.steps`` global batches."""
    total, weight = 0.0, 0
    for i in range(cfg.eval.steps):
        result = engine.eval_step(valid.microbatches(i, topo.dp_rank))
        total += result["loss"]
        weight += 1
    return total / max(weight, 1)


def train(cfg: Config) -> dict:
    """Run ``cfg`` to ``train.max_steps``; returns the last step's metrics (on every rank)."""
    topo = parallel.initialize(cfg)
    run_dir = Path(cfg.run.dir)
    if topo.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    family = get_family(cfg.model.family)

    tokenizer_path, train_batches, valid_batches = prepare_data(cfg, topo, run_dir)
    engine = build_engine(cfg, topo, family)
    log0(topo, f"fmtrain: {cfg.model.family} with {family.param_count(cfg) / 1e6:.2f}M parameters, "
               f"layout TP={topo.tp} PP={topo.pp} VPP={topo.vpp} DP={topo.dp} on {topo.world_size} "
               f"{topo.device.type} rank(s), run dir {run_dir}")

    start_step = checkpoint.resume(cfg, run_dir, engine, topo, log=lambda m: log0(topo, m))

    peak, peak_source = device_peak_tflops(cfg.logging, topo.device) if topo.is_writer else (0.0, "")
    peak = _broadcast_float(peak, topo)
    log0(topo, f"MFU against {peak:.3f} TFLOP/s per device ({peak_source})")

    t = cfg.train
    tokens_per_step = t.global_batch_size * family.tokens_per_sample(cfg)
    flops_per_token = family.flops_per_sample(cfg) / family.tokens_per_sample(cfg)
    timer = StepTimer(flops_per_token=flops_per_token, num_devices=topo.world_size,
                      peak_tflops=peak, device=topo.device)
    logger = MetricsLogger(run_dir, is_writer=topo.is_writer, tensorboard=cfg.logging.tensorboard,
                           total_steps=t.max_steps, start_step=start_step)
    started = time.perf_counter()
    metrics: dict = {}
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, t)
        microbatches = train_batches.microbatches(step, topo.dp_rank)
        timer.start()
        result = engine.train_step(microbatches, lr)
        metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                   **timer.stop(tokens_per_step), "memory_gb": _memory_gb(topo.device),
                   "update_applied": float(result.update_applied)}
        metrics.update({f"{k}": v for k, v in result.extra.items()})
        done = step + 1
        if valid_batches is not None and (done % cfg.eval.interval == 0 or done == t.max_steps):
            metrics["val_loss"] = evaluate(engine, valid_batches, cfg, topo)
        logger.log(done, metrics)
        if topo.is_writer and (done % t.log_interval == 0 or done == t.max_steps or done == start_step + 1):
            print(logger.progress_line(done, metrics, time.perf_counter() - started), flush=True)
        if (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or (
                done == t.max_steps and cfg.checkpoint.save_at_end):
            path = checkpoint.save(cfg, run_dir, done, engine, topo, tokenizer_path=tokenizer_path)
            log0(topo, f"saved checkpoint {path}")
    logger.close()
    if topo.is_writer and metrics:
        (run_dir / "last_metrics.json").write_text(json.dumps({"step": t.max_steps, **metrics}) + "\n")
    return metrics
