"""The training loop, top to bottom.

    config -> process groups -> data -> engine -> (resume) -> steps -> checkpoints

Every step is a pure function of (step number, checkpointed state): the learning rate comes
from :func:`fmtrain.train.schedules.lr_at`, the batch from the stateless sampler, so a run
resumed from a checkpoint continues with exactly the batches and rates it would have seen.
Rank 0 prints and writes run files; the others stay quiet unless they fail.

After every step, in this order: a non-finite step is counted (``skipped_steps``; the engine
already skipped its update) and too many in a row stop the run; a background checkpoint that
every rank finished is finalized (:meth:`CheckpointWriter.poll`); an interval checkpoint is
started; and all ranks decide together whether to stop for a requeue (SIGTERM, SIGUSR1,
``train.exit_after_minutes``: save, then exit status 99; :mod:`fmtrain.train.signals`).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fmtrain import checkpoint, parallel
from fmtrain.checkpoint.hf.convert import init_from_hf
from fmtrain.config import Config, ConfigError, config_warnings
from fmtrain.data import stream as data_stream
from fmtrain.engine import build_engine
from fmtrain.models.registry import get_family
from fmtrain.train import signals
from fmtrain.train.faults import FaultInjection, NumericFaultError, SkipCounter
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


def evaluate(engine, valid, cfg: Config, topo: parallel.Topology, to_latents) -> tuple[dict[str, float], dict]:
    """Every reported validation mean (``loss``, and what the family reports besides: PSNR, ...),
    averaged over the first ``eval.steps`` global batches; and this rank's first microbatch."""
    totals: dict[str, float] = {}
    first = None
    for i in range(cfg.eval.steps):
        microbatches = to_latents(valid.microbatches(i, topo.dp_rank))
        first = first if first is not None else microbatches[0]
        for name, value in engine.eval_step(microbatches).items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: total / max(cfg.eval.steps, 1) for name, total in totals.items()}, first


def latents_on_the_fly(cfg: Config, data, family_name: str, device: torch.device):
    """microbatches -> microbatches: with ``data.vae``, the family's ``pixels_to_latents`` through that
    VAE (every rank encodes its own microbatches; each sample's posterior noise from its seed, as
    ``fmtrain data encode`` draws it); without, the identity."""
    if not cfg.data.vae:
        return lambda microbatches: microbatches
    if data.pixels_to_latents is None:
        raise ConfigError(f"data.vae={cfg.data.vae}: model.family={family_name} reads no pixel data to encode")
    from fmtrain.checkpoint.pretrained import latent_encoder, latent_vae_config, vae_family_of
    from fmtrain.models.vae_codec import posterior_generator

    vae_cfg = latent_vae_config(cfg.data.vae, cfg.model.in_channels, "data.vae", vae_family_of(cfg.data.vae))
    encode = latent_encoder(vae_cfg, cfg.data.vae, device)

    def encode_sample(pixels: torch.Tensor, seed: int) -> torch.Tensor:
        return encode(pixels, generator=posterior_generator(seed, device)).float()

    return lambda microbatches: [data.pixels_to_latents(batch, encode_sample) for batch in microbatches]


def eval_decoder(cfg: Config, family, device: torch.device):
    """``eval.sample_vae`` as latents -> pixels, or None."""
    if not cfg.eval.sample_vae:
        return None
    from fmtrain.checkpoint.pretrained import latent_decoder, latent_vae_config

    if not family.latent_vae:
        raise ConfigError(f"eval.sample_vae: model.family={family.name} does not generate VAE latents")
    vae_cfg = latent_vae_config(cfg.eval.sample_vae, cfg.model.in_channels, "eval.sample_vae", family.latent_vae)
    return latent_decoder(vae_cfg, cfg.eval.sample_vae, device)


@torch.no_grad()
def log_eval_videos(family, engine, batch: dict, cfg: Config, logger: MetricsLogger, step: int, decode) -> None:
    """The family's pictures of a validation microbatch (rank 0 only), e.g. the VAE's input beside
    its reconstruction, or a DiT's sample decoded by ``eval.sample_vae``."""
    from fmtrain.data.video import to_uint8_frames
    from fmtrain.engine.parts import family_module

    module = family_module(engine.unwrapped_chunks()[0])
    was_training = module.training
    module.eval()
    try:
        for name, video in family.eval_videos(cfg, module, batch, decode).items():
            logger.log_video(step, f"val/{name}", to_uint8_frames(video), fps=cfg.eval.video_fps)
    finally:
        module.train(was_training)


def train(cfg: Config) -> dict:
    """Run ``cfg`` to ``train.max_steps``; returns the last step's metrics (on every rank).

    Asked to stop (SIGTERM, SIGUSR1, ``train.exit_after_minutes``), every rank saves after the
    current step and raises :class:`fmtrain.train.signals.RequeueRequested` (exit status 99);
    after ``train.max_consecutive_skips`` non-finite steps in a row it raises
    :class:`fmtrain.train.faults.NumericFaultError`.
    """
    previous_handlers = signals.install()  # the CLI installs them earlier, for the whole process
    try:
        return _train(cfg)
    finally:
        signals.uninstall(previous_handlers)


def _train(cfg: Config) -> dict:
    started_monotonic = time.monotonic()
    injected = FaultInjection.from_env()
    family = get_family(cfg.model.family)
    topo = parallel.initialize(cfg)
    run_dir = Path(cfg.run.dir)
    if topo.is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    for warning in config_warnings(cfg):
        log0(topo, f"warning: {warning}")

    if cfg.eval.sample_vae and family.eval_videos is None:
        raise ConfigError(f"eval.sample_vae: model.family={cfg.model.family} draws no videos at validation")
    data = family.prepare_data(cfg, topo, run_dir)
    train_batches, valid_batches = data.train, data.valid
    to_latents = latents_on_the_fly(cfg, data, family.name, topo.device)
    engine = build_engine(cfg, topo, family)
    log0(
        topo,
        f"fmtrain: {cfg.model.family} with {family.param_count(cfg) / 1e6:.2f}M parameters, "
        f"layout {topo.describe()} on {topo.world_size} "
        f"{topo.device.type} rank(s), run dir {run_dir}",
    )
    log0(topo, f"kernels: {engine.kernel_summary()}")

    # Frozen parts from their sources; model.init_from_hf for a run without a checkpoint of its own.
    checkpoint.load_frozen_parts(cfg, engine, log=lambda m: log0(topo, m))
    init_from_hf(cfg, run_dir, engine, topo, log=lambda m: log0(topo, m))
    resumed = checkpoint.resume_state(cfg, run_dir, engine, topo, log=lambda m: log0(topo, m))
    start_step = resumed.step if resumed else 0
    if resumed:
        checkpoint.check_data_position(resumed, cfg)
    data_stream.restore_state(
        train_batches,
        resumed.state if resumed else None,
        start_step,
        cfg,
        topo,
        log_fn=lambda m: log0(topo, m),
        source=resumed.path if resumed else "",
    )

    peak, peak_source = device_peak_tflops(cfg.logging, topo.device) if topo.is_writer else (0.0, "")
    peak = _broadcast_float(peak, topo)
    log0(topo, f"MFU against {peak:.3f} TFLOP/s per device ({peak_source})")

    t = cfg.train
    units_per_step = t.global_batch_size * family.units_per_sample(cfg)
    timer = StepTimer(
        flops_per_unit=family.flops_per_sample(cfg) / family.units_per_sample(cfg),
        num_devices=topo.world_size,
        peak_tflops=peak,
        device=topo.device,
        unit=family.throughput_unit,
    )
    logger = MetricsLogger(
        run_dir,
        is_writer=topo.is_writer,
        tensorboard=cfg.logging.tensorboard,
        total_steps=t.max_steps,
        start_step=start_step,
    )
    writer = checkpoint.CheckpointWriter(cfg, run_dir, topo, files=data.files, log=lambda m: log0(topo, m))
    skips = SkipCounter(
        limit=t.max_consecutive_skips, total=int(resumed.state.get("skipped_steps", 0)) if resumed else 0
    )
    stop = signals.StopCheck(t.exit_after_minutes, topo.device, started=started_monotonic)
    if injected.active:
        log0(topo, injected.describe())
    # Last before the first step: nothing after this may draw random numbers out of turn.
    checkpoint.restore_rng(resumed, cfg, topo, log=lambda m: log0(topo, m))

    def save(done: int) -> Path:
        extra = data_stream.checkpoint_state(train_batches, topo) or {}
        return writer.save(done, engine, extra_state={**extra, "skipped_steps": skips.total})

    pictures = family.eval_videos is not None and cfg.eval.videos and valid_batches is not None
    if pictures and (topo.tp > 1 or topo.pp > 1) and not cfg.eval.sample_vae:
        # The pictures run the whole primary module on rank 0.
        log0(topo, f"eval.videos: no validation pictures at TP={topo.tp} PP={topo.pp} (they need TP = PP = 1)")
        pictures = False
    decode = eval_decoder(cfg, family, topo.device) if pictures and topo.is_writer else None
    started = time.perf_counter()
    metrics: dict = {}
    try:
        for step in range(start_step, t.max_steps):
            done = step + 1
            lrs = {part.name: lr_at(step, part.train) for part in engine.trainable_parts}
            lr = lrs[engine.primary.name]
            microbatches = to_latents(train_batches.microbatches(step, topo.dp_rank))
            timer.start()
            result = engine.train_step(microbatches, lrs, step=step, poison_loss=injected.poison_loss(done))
            skips.count(done, result.update_applied)
            metrics = {
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                **timer.stop(units_per_step),
                "memory_gb": _memory_gb(topo.device),
                "update_applied": float(result.update_applied),
                "skipped_steps": skips.total,
            }
            metrics.update(result.extra)
            if step == 0 and family.first_step_check is not None:
                note = family.first_step_check(cfg, result.loss, result.extra)
                if note:
                    log0(topo, note)
            metrics.update({f"{name}/lr": rate for name, rate in lrs.items() if f"{name}/loss" in result.extra})
            if valid_batches is not None and (done % cfg.eval.interval == 0 or done == t.max_steps):
                values, first = evaluate(engine, valid_batches, cfg, topo, to_latents)
                metrics.update({f"val_{name}": value for name, value in values.items()})
                if pictures and topo.is_writer and first is not None:
                    log_eval_videos(family, engine, first, cfg, logger, done, decode)
            saved_now = (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or (
                done == t.max_steps and cfg.checkpoint.save_at_end
            )
            if not skips.exhausted():
                writer.poll()
                if saved_now:
                    save(done)
                    metrics["checkpoint_wait_s"] = writer.last_wait_s
                background_s = writer.take_completed()
                if background_s is not None:
                    metrics["checkpoint_background_s"] = background_s
            logger.log(done, metrics)
            if topo.is_writer and (done % t.log_interval == 0 or done == t.max_steps or done == start_step + 1):
                print(logger.progress_line(done, metrics, time.perf_counter() - started), flush=True)
            if not result.update_applied:
                log0(
                    topo,
                    f"step {done}: loss {result.loss:.4g}, grad norm {result.grad_norm:.4g}: not finite, "
                    f"update skipped ({len(skips.streak)} in a row, {skips.total} in the run)",
                )
            if skips.exhausted():
                writer.close()  # a save still in flight holds the last good state: complete it
                skips.raise_fault(result.loss, result.grad_norm, checkpoint.find_latest(run_dir, log=lambda m: None))
            injected.after_step(done, topo.rank, topo.world_size)
            reason = stop.check() if done < t.max_steps else None
            if reason:
                if not saved_now:
                    save(done)
                writer.close()
                log0(
                    topo,
                    f"stopping after step {done} ({reason}): checkpoint {writer.last_saved} is "
                    f"complete; exiting with status {signals.REQUEUE_EXIT_CODE} (requeue)",
                )
                raise signals.RequeueRequested(done, reason, str(writer.last_saved))
        writer.close()
    except (signals.RequeueRequested, NumericFaultError):
        raise
    except BaseException:
        writer.abort()  # a failing rank leaves a background save's .tmp incomplete, never half-renamed
        raise
    finally:
        logger.close()
    if topo.is_writer and metrics:
        (run_dir / "last_metrics.json").write_text(json.dumps({"step": t.max_steps, **metrics}) + "\n")
    return metrics
