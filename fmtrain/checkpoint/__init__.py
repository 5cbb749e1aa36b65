"""Distributed checkpoints through megatron-core ``dist_checkpointing``.

Layout of one run directory::

    RUN_DIR/checkpoints/step_0000100/      a complete checkpoint (megatron's sharded format)
        fmtrain_state.json                 step, consumed samples, layout, resolved config
        tokenizer.model                    the run's tokenizer, when it has one
    RUN_DIR/checkpoints/latest             text file: the name of the newest complete one

A checkpoint is written into ``step_NNNNNNN.tmp`` and renamed only when every rank has
finished, then ``latest`` is replaced atomically; a ``.tmp`` directory is never loaded.
Tensors are reshardable: a checkpoint saved under one (TP, PP, VPP, DP) loads under another.
Loading goes through ``torch.load`` with its default ``weights_only=True`` (megatron-core
registers the few non-tensor types it stores as safe globals); fmtrain's own metadata is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from fmtrain.config import Config

STATE_FILE = "fmtrain_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the path and the reason."""


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "metadata.json").is_file()


def save(cfg: Config, run_dir: Path, step: int, engine, topo, *,
         tokenizer_path: Optional[Path] = None) -> Path:
    """Write a checkpoint of ``engine`` after ``step`` completed optimizer steps (all ranks)."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if topo.is_writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(engine.state_dict(), str(tmp))
    dist.barrier()
    if topo.is_writer:
        state = {
            "step": step,
            "consumed_samples": step * cfg.train.global_batch_size,
            "layout": {"tp": topo.tp, "pp": topo.pp, "vpp": topo.vpp, "dp": topo.dp},
            "config": cfg.to_dict(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        if tokenizer_path is not None and Path(tokenizer_path).is_file():
            shutil.copy2(tokenizer_path, tmp / "tokenizer.model")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = checkpoints_dir(run_dir) / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, checkpoints_dir(run_dir) / "latest")
    dist.barrier()
    return final


def find_latest(run_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint ``latest`` names, or the newest complete one; incomplete ones are reported."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    for partial in sorted(root.glob("step_*.tmp")):
        log(f"ignoring incomplete checkpoint {partial}")
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
        log(f"checkpoints/latest names {named}, which is missing or incomplete; "
            "looking for the newest complete checkpoint")
    complete = [p for p in sorted(root.glob("step_*")) if p.is_dir() and is_complete(p)]
    return complete[-1] if complete else None


def read_state(path: Path) -> dict:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete fmtrain checkpoint (no {STATE_FILE})")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None


def load(path: Path, engine) -> dict:
    """Load model and optimizer state from ``path`` into ``engine`` (any layout); returns metadata."""
    state = read_state(path)
    try:
        loaded = dist_checkpointing.load(engine.state_dict(for_loading=True), str(path))
    except Exception as exc:  # megatron raises many types; name the checkpoint and the cause
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    engine.load_state_dict(loaded)
    return state


def resume(cfg: Config, run_dir: Path, engine, topo, log: Callable[[str], None] = print) -> int:
    """Load ``checkpoint.load`` or the run's latest checkpoint; returns the step to start from."""
    if cfg.checkpoint.load:
        path = Path(cfg.checkpoint.load)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.load={path}: no such directory")
    else:
        path = find_latest(run_dir, log=log)
        if path is None:
            return 0
    state = load(path, engine)
    step = int(state["step"])
    layout = state.get("layout", {})
    log(f"resumed from {path} at step {step} (saved with TP={layout.get('tp')} PP={layout.get('pp')} "
        f"VPP={layout.get('vpp')} DP={layout.get('dp')})")
    return step
