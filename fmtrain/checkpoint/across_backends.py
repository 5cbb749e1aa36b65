"""Loading a checkpoint whichever backend wrote it, into whichever backend runs now.

=========================  ==========================  =============================================
written by                 loaded by                   how
=========================  ==========================  =============================================
deepspeed, same DP, stage  deepspeed                   DeepSpeed's own ``load_checkpoint`` (exact)
deepspeed, other DP/stage  deepspeed                   unsharded per-parameter state, re-partitioned
megatron (any layout)      deepspeed                   megatron-core reads whole tensors, re-partitioned
deepspeed                  megatron (any layout)       unsharded state, sliced into megatron's shards
=========================  ==========================  =============================================

Weights, Adam's moments and its step count move in every case (:mod:`fmtrain.checkpoint.backends`);
a weights-only checkpoint (``fmtrain convert from-hf``) leaves the optimizer fresh.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fmtrain.checkpoint import backends, verify
from fmtrain.checkpoint.errors import CheckpointError


def _deepspeed_tag_dir(path: Path, part: str, primary: bool) -> Path:
    from fmtrain.engine.deepspeed import checkpoint_tag

    tag_dir = path / checkpoint_tag(part, primary)
    if not tag_dir.is_dir():
        raise CheckpointError(
            f"checkpoint {path} holds no DeepSpeed state for part {part!r} ({tag_dir.name}/ is missing)"
        )
    return tag_dir


def load_across(path: Path, state: dict, engine, log: Callable[[str], None] = lambda m: None) -> None:
    """Load checkpoint ``path`` (its fmtrain_state.json: ``state``) into ``engine`` when either side is
    the deepspeed backend (collective)."""
    from fmtrain.checkpoint import is_model_only, saved_backend

    written_by = saved_backend(state)
    running = getattr(engine, "backend", "megatron")
    model_only = is_model_only(state)
    saved_layout = state.get("layout", {})
    if running == "deepspeed":
        same = (
            written_by == "deepspeed"
            and saved_layout.get("dp") == engine.topo.dp
            and saved_layout.get("tp", 1) == engine.topo.tp
            and state.get("zero_stage") == engine.zero_stage
        )
        if same:
            try:
                engine.load_checkpoint(path)
            except Exception as exc:
                raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
            return
        _refuse_tensor_parallel_deepspeed(path, written_by, saved_layout, engine.topo.tp)
        states = _full_states_for_deepspeed(path, state, engine, written_by, model_only)
        try:
            engine.load_full_state(states)
        except ValueError as exc:  # a parameter the checkpoint lacks, or of another shape
            raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
        if written_by == "deepspeed":
            saved_dp = state.get("layout", {}).get("dp")
            log(
                f"checkpoint {path}: DeepSpeed ZeRO-{state.get('zero_stage')} state of DP={saved_dp} "
                f"re-partitioned for ZeRO-{engine.zero_stage} at DP={engine.topo.dp} (weights and Adam state)"
            )
        elif not model_only:
            log(
                f"checkpoint {path}: written by the megatron backend; weights and Adam state moved to "
                f"DeepSpeed ZeRO-{engine.zero_stage}"
            )
        return
    # A megatron engine and a deepspeed-backend checkpoint.
    _refuse_tensor_parallel_deepspeed(path, written_by, saved_layout, 1)
    states = {
        part.name: backends.read_deepspeed(_deepspeed_tag_dir(path, part.name, part is engine.primary))
        for part in engine.trainable_parts
    }
    sharded = engine.state_dict(for_loading=True)
    loaded: dict = {}
    primary_model = {k: v for k, v in sharded["model"].items() if k != "parts"}
    loaded["model"], loaded["optimizer"] = backends.fill_sharded(
        primary_model, sharded["optimizer"], states[engine.primary.name], f"checkpoint {path}"
    )
    others = {}
    for name, part_state in sharded.get("parts", {}).items():
        model, optimizer = backends.fill_sharded(
            part_state["model"], part_state["optimizer"], states[name], f"checkpoint {path}"
        )
        others[name] = {"model": model, "optimizer": optimizer}
    if others:
        loaded["parts"] = others
    engine.load_state_dict(loaded)
    log(
        f"checkpoint {path}: written by the deepspeed backend (ZeRO-{state.get('zero_stage')}); weights and "
        "Adam state moved to megatron's layout"
    )


def _refuse_tensor_parallel_deepspeed(path: Path, written_by: str, saved_layout: dict, running_tp: int) -> None:
    """The unsharded-state bridge reads and writes one model-parallel rank's DeepSpeed files: a
    deepspeed run at TP > 1 resumes only at its own TP, DP and ZeRO stage (DeepSpeed's own load)."""
    saved_tp = saved_layout.get("tp", 1)
    if (written_by == "deepspeed" and saved_tp > 1) or running_tp > 1:
        raise CheckpointError(
            f"checkpoint {path} (written by the {written_by} backend at TP={saved_tp}): a deepspeed-backend run "
            f"at TP={running_tp} loads only a deepspeed checkpoint of its own TP, DP and ZeRO stage, and a "
            "deepspeed checkpoint at TP > 1 loads only that way; resume with the layout it was written with"
        )


def _full_states_for_deepspeed(path: Path, state: dict, engine, written_by: str, model_only: bool) -> dict:
    if written_by == "deepspeed":
        return {
            part.name: backends.read_deepspeed(_deepspeed_tag_dir(path, part.name, part is engine.primary))
            for part in engine.trainable_parts
        }
    verify.check_files(path)
    parts = [engine.primary] if model_only else engine.trainable_parts
    out = {}
    for part in parts:
        primary = part is engine.primary
        prefix = "" if primary else f"{part.name}."
        common = {} if model_only else backends.megatron_optimizer_common(path, None if primary else part.name)
        with engine.full_weights(part.name):
            out[part.name] = backends.read_megatron(
                path, part.module, prefix=prefix, step_of=common, with_optimizer=not model_only
            )
    return out


def load_deepspeed_weights(path: Path, chunks: list[torch.nn.Module]) -> None:
    """The primary part's weights of deepspeed-backend checkpoint ``path`` into ``chunks`` (any
    megatron layout's chunks of that part, or a plain module)."""
    from fmtrain.checkpoint import read_state
    from fmtrain.engine.parts import load_chunks, sharded_state_dict

    _refuse_tensor_parallel_deepspeed(path, "deepspeed", read_state(path).get("layout", {}), 1)
    full = backends.read_deepspeed(_deepspeed_tag_dir(path, "", True), with_optimizer=False)
    model, _ = backends.fill_sharded(sharded_state_dict(chunks), None, full, f"checkpoint {path}")
    load_chunks(chunks, model)
