"""Distributed checkpoints through megatron-core ``dist_checkpointing``.

Layout of one run directory::

    RUN_DIR/checkpoints/step_0000100/      a complete checkpoint (megatron's sharded format)
        fmtrain_state.json                 step, consumed samples, skipped steps, layout, config
        rng/rank_00000.pt ...              every rank's RNG states (tensors only)
        tokenizer.model                    the run's tokenizer, when it has one
    RUN_DIR/checkpoints/latest             text file: the name of the newest complete one

A checkpoint is written into ``step_NNNNNNN.tmp`` and renamed only when every rank has
finished, then ``latest`` is replaced atomically; a ``.tmp`` directory is never loaded
(:mod:`fmtrain.checkpoint.writer`, also for asynchronous saves and retention).
Tensors are reshardable: a checkpoint saved under one (TP, PP, VPP, DP) loads under another.
RNG states are restored when the layout is unchanged and re-derived from ``run.seed`` and the
step otherwise (:mod:`fmtrain.checkpoint.rng`). The data position is the step: the sampler is a
stateless function of (step, DP rank), and a resume checks that the checkpoint's consumed
samples equal step x ``train.global_batch_size``.

Before any tensor is read, every rank checks the files against the tensor index and the
model's tensors against the checkpoint's shapes (:mod:`fmtrain.checkpoint.verify`), so a
truncated or mismatched checkpoint fails with one line naming it. Tensor data goes through
``torch.load`` with its default ``weights_only=True`` (megatron-core registers the few
non-tensor types it stores as safe globals), the tensor index through an allow-listing
unpickler, and fmtrain's own metadata is JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from fmtrain.checkpoint import rng, verify
from fmtrain.checkpoint.errors import CheckpointError
from fmtrain.checkpoint.files import (
    STATE_FILE,
    checkpoints_dir,
    complete_checkpoints,
    find_latest,
    is_complete,
    prune,
    read_state,
    step_dir,
    step_of,
)
from fmtrain.checkpoint.writer import CheckpointWriter, async_unsupported_reason
from fmtrain.config import Config
from fmtrain.engine.parts import load_chunks, sharded_state_dict


def save(
    cfg: Config,
    run_dir: Path,
    step: int,
    engine,
    topo,
    *,
    files: dict[str, Path] | None = None,
    extra_state: dict | None = None,
) -> Path:
    """Write a checkpoint of ``engine`` after ``step`` completed optimizer steps (all ranks, synchronous).

    ``extra_state``: more JSON-serialisable top-level entries for fmtrain_state.json (the data
    stream's position, ``"data"``; see fmtrain.data.stream.checkpoint_state). The training loop
    keeps one :class:`CheckpointWriter` instead (asynchronous saves, retention). ``files``: files
    the checkpoint carries, by name (the tokenizer: ``{"tokenizer.model": path}``)."""
    writer = CheckpointWriter(cfg, run_dir, topo, files=files, log=lambda message: None, async_save=False)
    return writer.save(step, engine, extra_state)


def saved_backend(state: dict) -> str:
    """The engine backend that wrote a checkpoint (checkpoints from before the field: megatron)."""
    return state.get("backend", "megatron")


def is_model_only(state: dict) -> bool:
    """A checkpoint of weights only (``"contents": ["model"]``, e.g. ``fmtrain convert from-hf``)."""
    return state.get("contents", ["model", "optimizer"]) == ["model"]


def load(path: Path, engine, cfg: Config | None = None, log: Callable[[str], None] = lambda message: None) -> dict:
    """Load model and optimizer state from ``path`` into ``engine`` (any layout); returns metadata.

    A model-only checkpoint (converted release weights) loads the primary part's weights and
    leaves the optimizers fresh (the engine refreshes its main weights from them); the run's other
    trainable parts keep their initialisation. The files and the tensor shapes are checked first
    (:mod:`fmtrain.checkpoint.verify`); ``cfg`` adds the differing model fields to a shape error."""
    state = read_state(path)
    if saved_backend(state) == "deepspeed" or getattr(engine, "backend", "megatron") == "deepspeed":
        from fmtrain.checkpoint.across_backends import load_across

        load_across(path, state, engine, log)
        return state
    verify.check_files(path)
    difference = verify.config_difference(state.get("config", {}), cfg.to_dict()["model"]) if cfg else ""
    model_only = is_model_only(state)
    verify.check_shapes(path, engine.model_sharded_state_dict(primary_only=model_only), difference)
    # A fresh state for loading: the check builds the sharded-tensor factories of the one it read.
    sharded = (
        {"model": engine.model_sharded_state_dict(primary_only=True)}
        if model_only
        else engine.state_dict(for_loading=True)
    )
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as exc:  # megatron raises many types; name the checkpoint and the cause
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    engine.load_state_dict(loaded)
    return state


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its ``latest`` checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = find_latest(path, log=lambda m: None)
    if latest is None:
        raise CheckpointError(f"{path} is neither an fmtrain checkpoint nor a run directory with one")
    return latest


def load_model_weights(path: Path, chunks: torch.nn.Module | list[torch.nn.Module], cfg: Config | None = None) -> dict:
    """Load only the primary model weights of checkpoint (or run directory) ``path`` into
    ``chunks`` (this rank's chunk(s) of a part, any layout the checkpoint was saved in): for
    inference or a frozen part, without building an optimizer. Returns the checkpoint's
    fmtrain_state.json."""
    chunks = chunks if isinstance(chunks, list) else [chunks]
    path = resolve_checkpoint(path)
    state = read_state(path)
    if saved_backend(state) == "deepspeed":
        from fmtrain.checkpoint.across_backends import load_deepspeed_weights

        load_deepspeed_weights(path, chunks)
        return state
    verify.check_files(path)
    difference = verify.config_difference(state.get("config", {}), cfg.to_dict()["model"]) if cfg else ""
    verify.check_shapes(path, sharded_state_dict(chunks), difference)
    try:  # a fresh state: the check builds the sharded-tensor factories (SwiGLU's) of the one it read
        loaded = dist_checkpointing.load({"model": sharded_state_dict(chunks)}, str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the weights of checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    load_chunks(chunks, loaded["model"])
    return state


def load_frozen_parts(cfg: Config, engine, log: Callable[[str], None] = print) -> int:
    """Load every frozen part that names a source (``PartSpec.source``): an fmtrain checkpoint or
    run directory (its primary model's weights, any layout), or else a release / Hugging Face
    directory read by the family's converter; each rank reads only its slices. Returns how many
    parts were loaded. Frozen parts are not in checkpoints: a resumed run loads them again."""
    loaded = 0
    for part in engine.parts.values():
        if part.trainable or not part.spec.source:
            continue
        source = Path(part.spec.source)
        if (source / STATE_FILE).is_file() or (source / "checkpoints").is_dir():
            load_model_weights(source, part.modules, cfg)
        elif source.is_dir():
            from fmtrain.checkpoint.hf.convert import load_hf_weights

            load_hf_weights(part.modules, source, cfg)
        else:
            raise CheckpointError(f"frozen part {part.name!r}: its source {source} is not a directory")
        log(f"frozen part {part.name!r}: weights from {source}")
        loaded += 1
    return loaded


@dataclass
class Resumed:
    """Where a run continues from: the checkpoint, its step and its fmtrain_state.json."""

    path: Path
    step: int
    state: dict

    @property
    def model_only(self) -> bool:
        return is_model_only(self.state)


def _choose(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """``checkpoint.load``, or the run's own latest checkpoint once it has one.

    A ``checkpoint.load`` inside this run's own checkpoints directory is taken as given (going
    back to an earlier checkpoint); one elsewhere (another run, converted weights) starts the
    run, and a requeued run with its own checkpoints continues those instead of starting over.
    """
    own = find_latest(run_dir, log=log)
    if not cfg.checkpoint.load:
        return own
    path = Path(cfg.checkpoint.load)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.load={path}: no such directory")
    if own is not None and path.resolve().parent != checkpoints_dir(run_dir).resolve():
        log(f"checkpoint.load={path} started this run; it continues from its own {own}")
        return own
    return path


def resume_state(cfg: Config, run_dir: Path, engine, topo, log: Callable[[str], None] = print) -> Resumed | None:
    """Load ``checkpoint.load`` or the run's latest checkpoint into ``engine``; None for a fresh run."""
    path = _choose(cfg, run_dir, log)
    if path is None:
        return None
    state = load(path, engine, cfg, log)
    resumed = Resumed(path=path, step=int(state["step"]), state=state)
    layout = state.get("layout", {})
    saved_cp = f" CP={layout['cp']}" if layout.get("cp", 1) > 1 else ""
    if resumed.model_only:
        log(
            f"initialised the model from {path} (weights only, written at TP={layout.get('tp')} "
            f"PP={layout.get('pp')}); fresh optimizer, step {resumed.step}"
        )
        return resumed
    log(
        f"resumed from {path} at step {resumed.step} (saved with TP={layout.get('tp')} PP={layout.get('pp')} "
        f"VPP={layout.get('vpp')}{saved_cp} DP={layout.get('dp')})"
    )
    return resumed


def resume(cfg: Config, run_dir: Path, engine, topo, log: Callable[[str], None] = print) -> int:
    """Load ``checkpoint.load`` or the run's latest checkpoint; returns the step to start from."""
    resumed = resume_state(cfg, run_dir, engine, topo, log)
    return resumed.step if resumed else 0


def check_data_position(resumed: Resumed, cfg: Config) -> None:
    """The sampler resumes at sample step x global_batch_size: the checkpoint must agree."""
    consumed = resumed.state.get("consumed_samples")
    expected = resumed.step * cfg.train.global_batch_size
    if resumed.model_only or consumed is None or consumed == expected:
        return
    raise CheckpointError(
        f"checkpoint {resumed.path} consumed {consumed} samples in {resumed.step} steps, but with "
        f"train.global_batch_size={cfg.train.global_batch_size} this run would continue the data at "
        f"sample {expected}; resume with the global batch size it was saved with "
        f"({resumed.state.get('global_batch_size', consumed // max(resumed.step, 1))})"
    )


def restore_rng(resumed: Resumed | None, cfg: Config, topo, log: Callable[[str], None] = print) -> None:
    """Every rank's RNG states from the checkpoint when the layout is unchanged, else re-derived.

    Collective (every rank): the ranks agree on restoring only when every rank has its file.
    """
    if resumed is None or resumed.model_only:
        return
    # Checkpoints written before context parallelism existed were all CP=1.
    saved_layout = {"cp": 1, **resumed.state.get("layout", {})}
    layout = topo.layout
    same = saved_layout == layout and resumed.state.get("world_size", topo.world_size) == topo.world_size
    states = rng.load(resumed.path, topo.rank) if same else None
    have = torch.tensor([0 if states is None else 1], dtype=torch.int32, device=topo.device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    if have.item() == 1:
        rng.restore(states)
        log(f"restored the RNG states of all {topo.world_size} ranks from {resumed.path}")
        return
    rng.reseed(cfg.run.seed, resumed.step)
    reason = (
        f"the layout changed from {saved_layout} to {layout}"
        if not same
        else "the checkpoint has no RNG states for every rank"
    )
    log(f"RNG states re-derived from run.seed={cfg.run.seed} and step {resumed.step} ({reason})")


__all__ = [
    "CheckpointError",
    "CheckpointWriter",
    "Resumed",
    "STATE_FILE",
    "async_unsupported_reason",
    "check_data_position",
    "checkpoints_dir",
    "complete_checkpoints",
    "find_latest",
    "is_complete",
    "is_model_only",
    "load",
    "load_frozen_parts",
    "load_model_weights",
    "prune",
    "read_state",
    "restore_rng",
    "resume",
    "resume_state",
    "save",
    "step_dir",
    "step_of",
]
