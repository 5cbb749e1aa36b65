"""Writing checkpoints: synchronous or asynchronous, atomic, with retention.

One save, on every rank::

    step_N.tmp/ created (rank 0)  ->  state staged in host memory (HostStaging)  ->  sharded
    tensors written (megatron dist_checkpointing, every rank its shards, the optimizer state as
    every data-parallel rank's own pieces)  +  rng/rank_RRRRR.pt (every rank)  ->  [all ranks
    finished]  ->  finalize: fmtrain_state.json written, step_N.tmp renamed to step_N,
    ``latest`` replaced, retention started in a thread of rank 0

The loop waits for the staging: the device-to-host copy into reused buffers
(:mod:`fmtrain.checkpoint.staging`), with no exchange between ranks
(:mod:`fmtrain.engine.optimizer_checkpoint`), no per-save sharding validation (first save
only) and no per-save planning (the plan is cached: a run's checkpoints all have the same
structure). ``checkpoint.async_save=true`` then hands the writing to megatron's asynchronous
path: a forked process writes and fsyncs the files, and the training loop goes on.
:meth:`CheckpointWriter.poll`, called by the loop after every step on every rank, asks all
ranks (one small all-reduce) whether the writers are done and finalizes the checkpoint once
every rank's writer is; the rename and ``latest`` therefore only ever happen after all ranks
finished writing, and a failed write raises :class:`CheckpointError` on every rank with
``latest`` untouched. At most one save is in flight: a new save, the end of the run, a stop for
requeue and a numeric-fault stop first wait for the previous one (and log the wait). Where the
platform or the save strategy cannot do this (no ``fork``; a non-async strategy) the writer logs
the reason once and saves synchronously.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint.api import CheckpointException

from fmtrain.checkpoint import files, rng
from fmtrain.checkpoint.errors import CheckpointError
from fmtrain.checkpoint.staging import HostStaging
from fmtrain.config import Config


class _FreshDirectoryWarningFilter(logging.Filter):
    """megatron warns when a rank's files are already in the directory as rank 0 starts saving;
    the writer makes every ``.tmp`` directory fresh, so that only means another rank was faster."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Overwriting old incomplete" not in record.getMessage()


logging.getLogger("megatron.core.dist_checkpointing.serialization").addFilter(_FreshDirectoryWarningFilter())


def async_unsupported_reason() -> str | None:
    """Why asynchronous saving cannot work here, or None when it can."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "this platform cannot fork the writer process megatron's async save uses"
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy

    strategy = get_default_save_sharded_strategy()
    if not isinstance(strategy, AsyncSaveShardedStrategy):
        return f"megatron's default save strategy {type(strategy).__name__} has no asynchronous mode"
    return None


def start_helper_processes() -> None:
    """Start the helper processes megatron's writer uses, shielded from SIGTERM and SIGUSR1.

    megatron collects write results through a queue served by a *spawned* manager process (and
    multiprocessing's resource tracker). A spawned process does not inherit the training
    process's handlers, so a signal sent to the whole process group -- what SLURM does at a
    time limit, and ``kill -TERM -PGID`` -- would kill it, and the save that the signal asks
    for would then fail. Spawned with both signals blocked, they inherit the blocked mask and
    ignore them; a signal that reaches this process meanwhile stays pending and is handled
    right after.
    """
    import signal
    from multiprocessing import resource_tracker

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    shielded = {signal.SIGTERM, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, shielded)
    try:
        resource_tracker.ensure_running()  # it unblocks SIGTERM when it starts the tracker...
        signal.pthread_sigmask(signal.SIG_BLOCK, shielded)  # ...so block again for the manager
        start_queue = getattr(filesystem_async, "_get_write_results_queue", None)  # megatron-core 0.16
        if start_queue is not None:
            start_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if start_queue is not None:
        # The writers report through that manager, which is a fresh interpreter: the first
        # report it unpickles imports torch.distributed.checkpoint there (about 6 s on 2 CPU
        # cores), inside the first save. Have it import them now, beside the run's start-up.
        global _warm_up_thread
        _warm_up_thread = threading.Thread(target=_warm_up_results_queue, args=(start_queue(),), daemon=True)
        _warm_up_thread.start()


_warm_up_thread: threading.Thread | None = None


def wait_for_helper_warm_up(timeout_s: float = 300.0) -> None:
    """Block until the manager has finished importing torch.distributed.checkpoint.

    The manager serves each connection in its own thread, and two threads importing the same
    package at once can fail with ``KeyError: 'torch.distributed.checkpoint'`` (CPython's import
    of a partially initialised parent package). A save's write results must therefore not reach
    the manager while the warm-up is still importing there: every save waits for it first (at
    most a few seconds, on the first save of a run that saves right after start-up).
    """
    thread = _warm_up_thread
    if thread is not None and thread.is_alive():
        thread.join(timeout_s)


def _warm_up_results_queue(results_queue) -> None:
    """Make the manager serving ``results_queue`` unpickle a torch.distributed.checkpoint object,
    through a scratch dict of the same manager (the results queue itself stays untouched)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    manager = getattr(results_queue, "_manager", None)  # the SyncManager that made the proxy
    if manager is None:
        return
    try:
        scratch = manager.dict()
        scratch["warm-up"] = MetadataIndex("fmtrain-warm-up")
    except Exception:  # noqa: BLE001 - an optimisation only; the first save pays the import instead
        pass


class CheckpointWriter:
    """Saves checkpoints of one run into ``RUN_DIR/checkpoints`` (collective: every rank)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        topo,
        *,
        files: dict[str, Path | None] | None = None,
        log: Callable[[str], None] = print,
        async_save: bool | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.topo = topo
        self.files = {name: Path(path) for name, path in (files or {}).items() if path is not None}
        """Files every checkpoint carries, by name in the checkpoint (the tokenizer)."""
        self.log = log
        self.keep_last = cfg.checkpoint.keep_last
        self.keep_every = cfg.checkpoint.keep_every
        self.async_save = cfg.checkpoint.async_save if async_save is None else async_save
        self._queue = None
        if self.async_save:
            reason = async_unsupported_reason()
            if reason is not None:
                log(f"checkpoint.async_save=true: saving synchronously instead ({reason})")
                self.async_save = False
            else:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                # Non-persistent: each save forks a fresh writer, whose copy-on-write memory is the
                # snapshot of the state (a persistent, spawned worker would share live CPU tensors).
                self._queue = AsyncCallsQueue(persistent=False)
        self._in_flight: Path | None = None
        self._helpers_started = False
        if cfg.checkpoint.interval or cfg.checkpoint.save_at_end:
            start_helper_processes()  # at start-up, so that the first save does not start them
            self._helpers_started = True
        self._staging = HostStaging()
        self._pruning: threading.Thread | None = None
        self._validated = False
        # One save strategy for the run, told that every save has the same structure: megatron then
        # plans the writes (a gather of every rank's plan) once and reuses the plan (Megatron-LM's
        # --ckpt-assume-constant-structure).
        self._strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
        self.last_saved: Path | None = None
        self.blocked_s = 0.0
        """Seconds the caller spent inside save / poll / wait (the loop's wait for checkpoints)."""
        self.last_wait_s = 0.0
        """Seconds the last :meth:`save` call blocked its caller, including the wait for the previous save."""
        self.last_duration_s = 0.0
        """Seconds from the start of the last completed save until it was complete."""
        self._completed_background_s: float | None = None
        self._said_sync = False

    @property
    def in_flight(self) -> Path | None:
        """The ``.tmp`` directory of the save being written in the background, if any."""
        return self._in_flight

    # ------------------------------------------------------------------ saving

    def save(self, step: int, engine, extra_state: dict | None = None) -> Path:
        """Checkpoint ``engine`` after ``step`` optimizer steps; returns the final directory.

        Synchronous: the checkpoint is complete on return. Asynchronous: it is scheduled, and
        completes in a later :meth:`poll` or :meth:`wait`.
        """
        started = time.perf_counter()
        self.wait()
        self._finish_pruning()
        if not self._helpers_started:
            start_helper_processes()
            self._helpers_started = True
        wait_for_helper_warm_up()
        final = files.step_dir(self.run_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        rng_states = rng.capture()
        if self.topo.is_writer:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        finalize = partial(self._finalize, step, tmp, final, self._state(step, engine, extra_state), started)
        if getattr(engine, "backend", "megatron") == "deepspeed":
            try:  # DeepSpeed writes its own files, synchronously
                engine.save_checkpoint(tmp)
                rng.save(tmp, self.topo.rank, rng_states)
                self._finalize_sync(finalize)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"writing checkpoint {tmp} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self.last_wait_s = time.perf_counter() - started
                self.blocked_s += self.last_wait_s
            return final
        # The sharding is the same at every save of a run: megatron's check that every shard is
        # written exactly once (an all-gather of every rank's tensor metadata) runs on the first.
        validate, self._validated = not self._validated, True
        try:
            sharded = self._staging.stage(engine.state_dict())
            if self.async_save:
                request = dist_checkpointing.save(
                    sharded,
                    str(tmp),
                    self._strategy,
                    async_sharded_save=True,
                    validate_access_integrity=validate,
                )
                rng.save(tmp, self.topo.rank, rng_states)
                request.add_finalize_fn(finalize)
                self._queue.schedule_async_request(request)
                self._in_flight = tmp
            else:
                dist_checkpointing.save(sharded, str(tmp), self._strategy, validate_access_integrity=validate)
                rng.save(tmp, self.topo.rank, rng_states)
                finalize()
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
            raise CheckpointError(f"writing checkpoint {tmp} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.last_wait_s = time.perf_counter() - started
            self.blocked_s += self.last_wait_s
        return final

    def _finalize_sync(self, finalize) -> None:
        if self.async_save and not self._said_sync:
            self.log("checkpoint.async_save=true: the deepspeed backend saves synchronously (DeepSpeed's own writer)")
            self._said_sync = True
            self.async_save = False
        finalize()

    def _state(self, step: int, engine, extra_state: dict | None) -> dict:
        t, topo = self.cfg.train, self.topo
        backend = getattr(engine, "backend", "megatron")
        engine_state = {"backend": backend}
        if backend == "deepspeed":
            engine_state.update(zero_stage=engine.zero_stage, deepspeed_tags=engine.checkpoint_tags)
        return {
            **engine_state,
            "step": step,
            "consumed_samples": step * t.global_batch_size,
            "global_batch_size": t.global_batch_size,
            "layout": topo.layout,
            "world_size": topo.world_size,
            "rng": f"{rng.RNG_DIR}/rank_NNNNN.pt per rank; restored when the layout is unchanged",
            "config": self.cfg.to_dict(),
            **(extra_state or {}),
        }

    def _finalize(self, step: int, tmp: Path, final: Path, state: dict, started: float) -> None:
        """Every rank, once every rank's files are written: make the checkpoint visible."""
        dist.barrier()
        if self.topo.is_writer:
            (tmp / files.STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            for name, source in self.files.items():
                if source.is_file():
                    shutil.copy2(source, tmp / name)
            if final.exists():  # the same step written again (a run restarted from an older one)
                files._remove(final)
            tmp.rename(final)
            files.write_latest(self.run_dir, final)
            # Deleting old checkpoints (gigabytes of files) is not the loop's business: a thread
            # does it, and the next save waits for it.
            self._pruning = threading.Thread(
                target=files.prune,
                args=(self.run_dir, self.keep_last, self.keep_every, step),
                kwargs={"log": self.log},
                name="fmtrain-checkpoint-retention",
                daemon=True,
            )
            self._pruning.start()
            mode = "in the background" if self.async_save else "synchronously"
            self.log(f"saved checkpoint {final} ({mode}, {time.perf_counter() - started:.1f}s after it began)")
        dist.barrier()
        self.last_saved = final
        self.last_duration_s = time.perf_counter() - started
        if self.async_save:
            self._completed_background_s = self.last_duration_s

    # ------------------------------------------------------------------ async bookkeeping

    def poll(self) -> None:
        """Finalize a background save if every rank's writer is done (every rank, every step)."""
        if self._in_flight is not None:
            self._finalize_async(blocking=False)

    def take_completed(self) -> float | None:
        """Start-to-complete seconds of a background save completed since the last call, else None."""
        completed, self._completed_background_s = self._completed_background_s, None
        return completed

    def wait(self) -> None:
        """Block until a background save is complete (every rank); a wait is reported."""
        if self._in_flight is None:
            return
        tmp, started = self._in_flight, time.perf_counter()
        self._finalize_async(blocking=True)
        waited = time.perf_counter() - started
        if waited >= 0.01:
            self.log(f"waited {waited:.2f}s for the background save of {tmp.name.removesuffix('.tmp')} to complete")

    def _finalize_async(self, blocking: bool) -> None:
        started = time.perf_counter()
        try:
            finished = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as exc:  # on every rank: megatron broadcasts a failure
            tmp, self._in_flight = self._in_flight, None
            previous = files.find_latest(self.run_dir, log=lambda message: None)
            raise CheckpointError(
                f"the background write of checkpoint {tmp} failed: {type(exc).__name__}: {exc}; it stays "
                f"incomplete, and {files.LATEST} names {previous or 'no checkpoint'}"
            ) from exc
        finally:
            self.blocked_s += time.perf_counter() - started
        if finished:
            self._in_flight = None

    def _finish_pruning(self) -> None:
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None

    def close(self) -> None:
        """Finish any background save and retention (every rank)."""
        self.wait()
        self._finish_pruning()

    def abort(self) -> None:
        """Stop a background writer without finalizing (its ``.tmp`` stays incomplete)."""
        if self._queue is None:
            return
        for call in list(self._queue.async_calls):
            call.async_caller.close(abort=True)
        self._queue.async_calls.clear()
        self._in_flight = None
