"""Checkpoints under faults, with real training processes on gloo.

Exact resume after SIGKILL, also while a background write is in flight; SIGTERM -> save ->
requeue status -> resume (asynchronous saves and retention on); the wall-clock budget;
resharding (TP, PP) = (2, 2) -> (1, 1), (2, 1) and DP=2, and DP=2 -> TP=2; partial saves left by
a kill; a background write that fails; truncated and mismatched checkpoints; NaN steps skipped
and the stop after too many. One uninterrupted 20-step run (module fixture) is the reference.
How a save is written: the host staging, the optimizer pieces' boxes, and the pieces against
megatron-core's own gathered save.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, TINY_RECIPE, Run, finish_ok, free_port, read_metrics

REQUEUE = 99  # fmtrain.train.signals.REQUEUE_EXIT_CODE, spelled out: the number is the contract
STEPS = ["train.max_steps=20", "checkpoint.interval=5"]


@pytest.fixture(scope="module")
def base_args(tiny_tokenizer) -> list[str]:
    return TINY_OVERRIDES + [f"data.tokenizer={tiny_tokenizer}"]


@pytest.fixture(scope="module")
def reference(base_args, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """20 steps at DP=2 without interruption, checkpoints every 5 steps."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish_ok(Run(base_args + STEPS + [f"run.dir={run_dir}"], 2, run_dir.parent, "reference"))
    return run_dir, read_metrics(run_dir)


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_names(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()}


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def test_exact_resume_after_sigkill_and_partial_saves(base_args, reference, tmp_path):
    """Killed after step 13 (SIGKILL to every process), resumed: steps 11-20 are bit-identical.

    Also the leftovers of a kill while writing: a step_*.tmp directory that looks complete
    inside, and a ``latest`` naming a directory that lacks files; both are reported, skipped.
    """
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    args = base_args + STEPS + [f"run.dir={run_dir}"]
    first = Run(args, 2, tmp_path, "killed", env={"FMTRAIN_TEST_HANG_AT_STEP": "13"})
    first.wait_for_step(run_dir, 13)
    first.signal_group(signal.SIGKILL)
    first.finish()
    assert latest(run_dir) == "step_0000010"
    assert max(read_metrics(run_dir)) == 13

    ckpts = run_dir / "checkpoints"
    shutil.copytree(ckpts / "step_0000010", ckpts / "step_0000015.tmp")  # complete inside, never renamed
    partial = ckpts / "step_0000014"
    shutil.copytree(ckpts / "step_0000010", partial)
    (partial / "metadata.json").unlink()  # megatron's completion marker missing
    (ckpts / "latest").write_text("step_0000014\n")

    out = finish_ok(Run(args, 2, tmp_path, "resumed"))
    assert f"ignoring incomplete checkpoint {ckpts / 'step_0000015.tmp'}" in out
    assert f"checkpoints/latest names {partial}, which is missing or incomplete" in out
    assert f"resumed from {ckpts / 'step_0000010'} at step 10" in out
    assert "restored the RNG states of all 2 ranks" in out

    resumed = read_metrics(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step]["loss"] == ref[step]["loss"], step
        assert resumed[step]["grad_norm"] == ref[step]["grad_norm"], step
    assert latest(run_dir) == "step_0000020"
    assert not (ckpts / "step_0000015.tmp").exists(), "the resumed run rewrote step 15 through its own .tmp"

    # Every rank's RNG states are in the checkpoint, as tensors that load with weights_only=True.
    for rank in range(2):
        states = torch.load(ckpts / "step_0000020" / "rng" / f"rank_{rank:05d}.pt", weights_only=True)
        assert {"python", "numpy_keys", "torch", "tracker/model-parallel-rng"} <= set(states)
    state = json.loads((ckpts / "step_0000020" / "fmtrain_state.json").read_text())
    assert state["consumed_samples"] == 20 * 8 and state["skipped_steps"] == 0


def test_sigkill_during_a_background_write_resumes_from_the_previous_checkpoint(base_args, reference, tmp_path):
    """Asynchronous saves; every process SIGKILLed while step 10's checkpoint is being written
    in the background (the loop hangs right after scheduling it, so it is never finalized): it
    stays a ``.tmp``, ``latest`` names step 5, and the resumed run repeats steps 6-20 exactly."""
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    args = base_args + STEPS + [f"run.dir={run_dir}", "checkpoint.async_save=true"]
    first = Run(args, 2, tmp_path, "killed-writing", env={"FMTRAIN_TEST_HANG_AT_STEP": "10"})
    first.wait_for_step(run_dir, 10)
    first.signal_group(signal.SIGKILL)
    first.finish()
    assert latest(run_dir) == "step_0000005"
    assert checkpoint_names(run_dir) == {"step_0000005", "step_0000010.tmp"}

    out = finish_ok(Run(args, 2, tmp_path, "resumed-after-kill"))
    assert f"ignoring incomplete checkpoint {run_dir / 'checkpoints' / 'step_0000010.tmp'}" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000005'} at step 5" in out
    resumed = read_metrics(run_dir)
    for step in range(6, 21):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    assert latest(run_dir) == "step_0000020"


def test_sigterm_saves_requeues_and_resumes_with_async_saves_and_retention(base_args, reference, tmp_path):
    """SIGTERM to every process mid-run: a checkpoint of the current step, exit status 99, and
    the resumed run continues at the next step with the same data (losses equal the reference)."""
    ref_dir, ref = reference
    run_dir = tmp_path / "run"
    args = (
        base_args
        + STEPS
        + [f"run.dir={run_dir}", "checkpoint.async_save=true", "checkpoint.keep_last=2", "checkpoint.keep_every=10"]
    )
    first = Run(args, 2, tmp_path, "sigterm")
    first.wait_for_step(run_dir, 7)
    first.signal_group(signal.SIGTERM)
    out = finish_ok(first, expected=REQUEUE)

    stopped = max(read_metrics(run_dir))
    assert 7 <= stopped < 20
    assert f"stopping after step {stopped} (SIGTERM" in out
    assert latest(run_dir) == f"step_{stopped:07d}"
    assert (run_dir / "checkpoints" / f"step_{stopped:07d}" / "fmtrain_state.json").is_file()
    assert f"saved checkpoint {run_dir / 'checkpoints' / 'step_0000005'} (in the background" in out

    out = finish_ok(Run(args, 2, tmp_path, "after-sigterm"))
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:07d}'} at step {stopped}" in out
    steps = [rec["step"] for rec in metric_lines(run_dir)]
    assert steps == list(range(1, 21)), "every step ran exactly once: no data repeated, none skipped"
    resumed = read_metrics(run_dir)
    for step in range(stopped + 1, 21):
        assert resumed[step]["loss"] == ref[step]["loss"], step
    # Retention: the newest two (15, 20) and every 10th (10, 20); step 5 and the stop's went.
    assert checkpoint_names(run_dir) == {"step_0000010", "step_0000015", "step_0000020"}
    assert "retention (checkpoint.keep_last / keep_every) removed" in out
    # metrics.jsonl: the loop's wait on every step that saved, a background save's duration on
    # the step it completed (here, in the resumed run, 10's or 15's: 20's completes at the end).
    lines = metric_lines(run_dir)
    assert {rec["step"] for rec in lines if "checkpoint_wait_s" in rec} == {5, 10, 15, 20}
    waits = {rec["step"]: rec["checkpoint_wait_s"] for rec in lines if "checkpoint_wait_s" in rec}
    completed = [rec for rec in lines if "checkpoint_background_s" in rec and rec["step"] > stopped]
    assert completed
    for rec in completed:  # the save that completed began at the last save step before this one
        began = max(step for step in waits if step < rec["step"])
        assert waits[began] <= rec["checkpoint_background_s"] < 600, rec
    assert "ckpt wait " in out  # the progress line of a step that saved


def test_exit_after_minutes_saves_and_requeues(base_args, tmp_path):
    run_dir = tmp_path / "run"
    run = Run(base_args + STEPS + [f"run.dir={run_dir}", "train.exit_after_minutes=0.001"], 1, tmp_path, "budget")
    out = finish_ok(run, expected=REQUEUE)
    assert "stopping after step 1 (train.exit_after_minutes=0.001 reached)" in out
    assert sorted(read_metrics(run_dir)) == [1]
    assert latest(run_dir) == "step_0000001"


def test_resharding_resume(base_args, reference, tmp_path):
    """Saved at (TP, PP) = (2, 2); resumed at (1, 1), (2, 1) and DP=2, and the DP=2 run's
    checkpoint at TP=2: steps 6-10 match the uninterrupted run (which ran at DP=2) within 1e-4."""
    ref_dir, ref = reference
    saved_dir = tmp_path / "tp2pp2"
    stop_at_5 = {"FMTRAIN_TEST_SIGNAL_AT_STEP": "5"}
    finish_ok(
        Run(
            base_args + STEPS + [f"run.dir={saved_dir}", "parallel.tp=2", "parallel.pp=2"],
            4,
            tmp_path,
            "tp2pp2",
            env=stop_at_5,
        ),
        expected=REQUEUE,
    )
    saved = read_metrics(saved_dir)
    for step in range(1, 6):
        assert saved[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
    ckpt = saved_dir / "checkpoints" / "step_0000005"
    assert json.loads((ckpt / "fmtrain_state.json").read_text())["layout"] == {
        "tp": 2,
        "pp": 2,
        "vpp": 1,
        "cp": 1,
        "dp": 1,
    }

    layouts = {
        "tp1pp1": (1, ["parallel.tp=1", "parallel.pp=1"]),
        "tp2pp1": (2, ["parallel.tp=2", "parallel.pp=1"]),
        "dp2": (2, ["parallel.tp=1", "parallel.pp=1", "parallel.dp=2"]),
    }
    # And the DP=2 reference's own checkpoint (every data-parallel rank wrote its optimizer pieces)
    # under tensor parallelism.
    ref_ckpt = ref_dir / "checkpoints" / "step_0000005"
    sources = {name: ckpt for name in layouts} | {"from-dp2-tp2": ref_ckpt}
    layouts["from-dp2-tp2"] = (2, ["parallel.tp=2", "parallel.pp=1"])
    runs = {
        name: Run(
            base_args + STEPS + [f"run.dir={tmp_path / name}", f"checkpoint.load={sources[name]}", *layout],
            nproc,
            tmp_path,
            name,
            env={"FMTRAIN_TEST_SIGNAL_AT_STEP": "10"},
        )
        for name, (nproc, layout) in layouts.items()
    }
    for name, run in runs.items():
        out = finish_ok(run, expected=REQUEUE)
        saved_with = "TP=1 PP=1 VPP=1 DP=2" if name == "from-dp2-tp2" else "TP=2 PP=2"
        assert f"resumed from {sources[name]} at step 5 (saved with {saved_with}" in out, name
        assert "RNG states re-derived from run.seed=" in out and "the layout changed" in out, name
        got = read_metrics(tmp_path / name)
        assert sorted(got) == list(range(6, 11)), name
        for step in range(6, 11):
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), (name, step)


def test_truncated_and_mismatched_checkpoints_fail_clearly(base_args, reference, tmp_path):
    """A cut .distcp file and a checkpoint of another model size: one line naming the checkpoint
    and the file / the first mismatching tensor with both shapes, no traceback, nothing trained."""
    ref_dir, _ = reference
    source = ref_dir / "checkpoints" / "step_0000020"
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated)
    data_file = truncated / "__0_1.distcp"
    full_size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(full_size // 2)

    cases = {
        "truncated": (
            [f"checkpoint.load={truncated}"],
            f"checkpoint {truncated} is truncated: __0_1.distcp has {full_size // 2} bytes",
        ),
        "wrong_shape": (
            [f"checkpoint.load={source}", "model.hidden_size=128"],
            f"checkpoint {source} does not fit this model: tensor 'embedding.word_embeddings.weight' "
            "has shape (512, 64) in the checkpoint and (512, 128) in the model "
            "(model.hidden_size: checkpoint 64, this run 128)",
        ),
    }
    runs = {
        name: Run(base_args + STEPS + [f"run.dir={tmp_path / name / 'run'}", *extra], 1, tmp_path, name)
        for name, (extra, _) in cases.items()
    }
    for name, run in runs.items():
        rc, out, err = run.finish()
        assert rc == 1, (name, rc, err[-3000:])
        assert f"fmtrain: rank 0: checkpoint error: {cases[name][1]}" in err, (name, err[-3000:])
        assert "Traceback" not in err, (name, err[-3000:])
        assert not (tmp_path / name / "run" / "metrics.jsonl").exists(), "nothing trained"


def test_missing_data_file_and_foreign_index_are_refused(reference, tmp_path):
    """The file check itself (no training process needed): a deleted .distcp file is named, and
    a tensor index that would unpickle anything but checkpoint metadata is not read."""
    import pickle

    from fmtrain.checkpoint import CheckpointError, verify

    ref_dir, _ = reference
    missing = tmp_path / "missing"
    shutil.copytree(ref_dir / "checkpoints" / "step_0000020", missing)
    verify.check_files(missing)  # intact
    (missing / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {missing} is incomplete: __0_0.distcp is missing"):
        verify.check_files(missing)
    (missing / ".metadata").write_bytes(pickle.dumps(os.system))  # a pickle that names a callable
    with pytest.raises(CheckpointError, match=r"refusing to read .metadata: posix.system is not a checkpoint"):
        verify.check_files(missing)


def _flat_checkpoint(path: Path, tmp_path: Path) -> tuple[dict, list]:
    """All tensors of a checkpoint (model + optimizer, global shapes) and its optimizer step counts."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(path, flat)
    tensors = {k: v for k, v in torch.load(flat, weights_only=True).items() if torch.is_tensor(v)}
    common = torch.load(path / "common.pt", weights_only=True)
    steps = [group["step"] for group in common["optimizer"]["optimizer"]["param_groups"]]
    return tensors, steps


def test_nan_steps_skip_the_update_and_too_many_stop_the_run(base_args, tmp_path):
    """NaN loss at step 3, then at 6, 7, 8 with max_consecutive_skips=3 (2 ranks, distributed
    optimizer): the skipped steps leave weights and Adam state bit-identical, are counted, and
    the third in a row stops the run with a clear error; the checkpoints stay intact."""
    run_dir = tmp_path / "run"
    run = Run(
        base_args
        + [f"run.dir={run_dir}", "train.max_steps=10", "checkpoint.interval=1", "train.max_consecutive_skips=3"],
        2,
        tmp_path,
        "nan",
        env={"FMTRAIN_TEST_NAN_AT_STEP": "3,6,7,8"},
    )
    rc, out, err = run.finish()
    assert rc == 1, err[-3000:]
    assert (
        "numeric fault: steps 6-8: 3 consecutive steps had a non-finite loss or gradient norm "
        "(last: loss=nan, grad_norm=nan); stopping (train.max_consecutive_skips=3)"
    ) in err
    assert "Traceback" not in err

    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, 9))
    applied = {step: rec["update_applied"] for step, rec in metrics.items()}
    assert applied == {1: 1, 2: 1, 3: 0, 4: 1, 5: 1, 6: 0, 7: 0, 8: 0}
    assert [metrics[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2, 4, 5)) and math.isnan(metrics[3]["loss"])

    ckpts = run_dir / "checkpoints"
    assert latest(run_dir) == "step_0000007", "nothing saved on the way out; the last checkpoint is intact"
    updates = {2: 2.0, 5: 4.0}  # Adam's step count: applied updates only (step 3 was skipped)
    for before, after in ((2, 3), (5, 6), (5, 7)):
        a, a_steps = _flat_checkpoint(ckpts / f"step_{before:07d}", tmp_path)
        b, b_steps = _flat_checkpoint(ckpts / f"step_{after:07d}", tmp_path)
        assert a.keys() == b.keys() and any(k.startswith("optimizer.state.exp_avg.") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), (before, after, key)
        assert a_steps == b_steps == [updates[before]] * len(a_steps)
    state = json.loads((ckpts / "step_0000007" / "fmtrain_state.json").read_text())
    assert state["skipped_steps"] == 3


def test_rng_states_round_trip(tmp_path):
    """capture -> draw -> restore -> the same draws; the file loads with weights_only=True."""
    import random

    import numpy as np

    from fmtrain.checkpoint import rng

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng.save(tmp_path, 3, rng.capture())

    def draw():
        return random.random(), random.gauss(0, 1), float(np.random.rand()), torch.rand(3).tolist()

    first = draw()
    draw()
    rng.restore(rng.load(tmp_path, 3))
    assert draw() == first
    assert rng.load(tmp_path, 4) is None


def test_retention_keeps_last_k_every_mth_and_latest(tmp_path):
    from fmtrain.checkpoint import files

    root = files.checkpoints_dir(tmp_path)
    for step in (5, 10, 15, 20, 25, 30):
        path = files.step_dir(tmp_path, step)
        path.mkdir(parents=True)
        (path / files.STATE_FILE).write_text("{}")
        (path / "metadata.json").write_text("{}")
    (root / "step_0000012.tmp").mkdir()  # a save that can no longer finish
    (root / "step_0000035.tmp").mkdir()  # a newer save still being written: kept
    files.write_latest(tmp_path, files.step_dir(tmp_path, 15))  # e.g. a rollback: latest is protected
    removed = files.prune(tmp_path, keep_last=2, keep_every=10, newest_step=30, log=lambda m: None)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step_0000010",
        "step_0000015",
        "step_0000020",
        "step_0000025",
        "step_0000030",
        "step_0000035.tmp",
    ]
    assert {p.name for p in removed} == {"step_0000005", "step_0000012.tmp"}


def test_failed_background_write_is_reported_and_latest_stays(single_rank, tmp_path, monkeypatch):
    """The background writer fails (the disk is full): every rank gets an error naming the
    checkpoint and the cause, ``latest`` keeps naming the previous complete checkpoint, and the
    failed one stays a ``.tmp`` that is never loaded."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = load_config(TINY_RECIPE, TINY_OVERRIDES + [f"run.dir={tmp_path}", "checkpoint.async_save=true"])
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    writer = checkpoint.CheckpointWriter(cfg, tmp_path, topo, log=lambda message: None)
    writer.save(1, engine)
    writer.wait()
    assert latest(tmp_path) == "step_0000001"

    def disk_full(*args, serialization_format=None, **kwargs):
        raise OSError(28, "No space left on device")

    # The forked writer inherits the patch: its first tensor write fails as a full disk would.
    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    writer.save(2, engine)
    with pytest.raises(checkpoint.CheckpointError) as failure:
        writer.wait()
    message = str(failure.value)
    assert "background write of checkpoint" in message and "step_0000002.tmp failed" in message
    assert "No space left on device" in message
    assert f"latest names {tmp_path / 'checkpoints' / 'step_0000001'}" in message
    writer.abort()
    assert latest(tmp_path) == "step_0000001"
    assert checkpoint_names(tmp_path) == {"step_0000001", "step_0000002.tmp"}
    assert checkpoint.find_latest(tmp_path, log=lambda message: None) == tmp_path / "checkpoints" / "step_0000001"


def test_host_staging_aliases_views_copies_the_rest_and_reuses_its_buffers():
    """What megatron's writer gets from the staging: tensors that own exactly their bytes. A
    contiguous view is an alias over its bytes (no copy), a non-contiguous one is copied into a
    buffer reused by the next save, an owning tensor and another rank's replica are left alone."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from fmtrain.checkpoint.staging import HostStaging

    flat = torch.arange(24, dtype=torch.float32)  # e.g. DDP's flat parameter buffer
    owner = torch.ones(3)
    matrix = torch.arange(12.0).view(3, 4)

    def state() -> dict:
        return {
            "view": ShardedTensor.from_rank_offsets("view", flat[4:10].view(2, 3)),
            "owner": ShardedTensor.from_rank_offsets("owner", owner),
            "strided": ShardedTensor.from_rank_offsets("strided", matrix.t()),
            "replica": ShardedTensor.from_rank_offsets("replica", flat[0:4], replica_id=1),
        }

    staging = HostStaging()
    first = staging.stage(state())
    view = first["view"].data
    assert torch.equal(view, flat[4:10].view(2, 3))
    assert view.untyped_storage().nbytes() == 6 * 4  # exactly its bytes: written without a clone
    flat[4] = -1.0
    assert view[0, 0] == -1.0  # shared memory, not a copy
    assert first["owner"].data is owner
    strided = first["strided"].data
    assert torch.equal(strided, matrix.t()) and strided.is_contiguous()
    assert strided.untyped_storage().data_ptr() != matrix.untyped_storage().data_ptr()
    assert first["replica"].data.untyped_storage().nbytes() == 24 * 4  # not written here: untouched

    matrix += 100
    second = staging.stage(state())
    assert second["strided"].data is strided and torch.equal(strided, matrix.t())  # reused, refreshed


def test_flat_range_boxes_tile_the_range_in_order():
    """A data-parallel rank's flat range of a row-major tensor, as boxes: exactly the range's
    elements, in flat order, in at most 2 x ndim - 1 boxes (checked against indexing)."""
    import random

    from fmtrain.engine.optimizer_checkpoint import flat_range_boxes

    rng = random.Random(0)
    for _ in range(2000):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 4)))
        numel = math.prod(shape)
        start = rng.randint(0, numel)
        stop = rng.randint(start, numel)
        index = torch.arange(numel).view(shape)
        boxes = list(flat_range_boxes(shape, start, stop))
        assert len(boxes) <= max(1, 2 * len(shape) - 1), (shape, start, stop, boxes)
        covered = [
            i
            for offset, size in boxes
            for i in index[tuple(slice(o, o + n) for o, n in zip(offset, size))].flatten().tolist()
        ]
        assert covered == list(range(start, stop)), (shape, start, stop, boxes)


def test_optimizer_pieces_equal_megatrons_gathered_checkpoint(tmp_path):
    """Every data-parallel rank writes its own optimizer pieces; the checkpoint holds exactly the
    tensors megatron-core's gathering ``fully_reshardable`` save writes (same names, shapes and
    values; the same common state), at TP=2 x DP=2 with SwiGLU's split fc1, stacked layers,
    replicated norms and a padded vocabulary."""
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fmtrain.checkpoint.verify import read_dcp_metadata

    overrides = [
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.ffn_hidden_size=96",
        "model.vocab_size=500",
        "model.seq_length=32",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "parallel.tp=2",
        f"run.dir={tmp_path / 'run'}",
    ]
    worker = REPO / "tests" / "optimizer_checkpoint_worker.py"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    subprocess.run(
        [*launch, str(worker), str(tmp_path), *overrides],
        check=True,
        env=env,
        timeout=600,
    )

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        index = read_dcp_metadata(path).state_dict_metadata
        out = {
            key: torch.empty(item.size, dtype=item.properties.dtype)
            for key, item in index.items()
            if isinstance(item, TensorStorageMetadata)
        }
        dcp.load(out, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
        return out

    pieces_dir = tmp_path / "pieces" / "checkpoints" / "step_0000002"
    gathered_dir = tmp_path / "gathered" / "checkpoints" / "step_0000002"
    pieces, gathered = tensors(pieces_dir), tensors(gathered_dir)
    assert sorted(pieces) == sorted(gathered)
    optimizer_keys = [k for k in pieces if k.startswith("optimizer.state.exp_avg_sq.")]
    assert len(optimizer_keys) == 9 and any(k.endswith("linear_fc1.weight") for k in optimizer_keys), optimizer_keys
    for key in pieces:
        assert torch.equal(pieces[key], gathered[key]), key
    assert all(pieces[k].abs().sum() > 0 for k in optimizer_keys)  # trained moments, not zeros
    common = [torch.load(d / "common.pt", weights_only=True) for d in (pieces_dir, gathered_dir)]
    assert common[0] == common[1]
    # Gathered: data-parallel rank 0 of each TP rank writes the optimizer state; pieces: all four ranks.
    assert len(list(pieces_dir.glob("__*_*.distcp"))) > len(list(gathered_dir.glob("__*_*.distcp")))


def test_saves_wait_for_the_writer_manager_to_finish_importing(single_rank, tmp_path, monkeypatch):
    """megatron's write-result manager imports torch.distributed.checkpoint when the warm-up
    reaches it; a save's results reaching it meanwhile made two threads import the package at
    once (``KeyError: 'torch.distributed.checkpoint'`` in CI). Every save waits for the warm-up."""
    import threading
    import time

    from fmtrain import checkpoint, parallel
    from fmtrain.checkpoint import writer as writer_module
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    warmed = threading.Event()
    original_warm_up = writer_module._warm_up_results_queue

    def slow_warm_up(results_queue):
        time.sleep(1.5)  # what the import costs a freshly spawned manager on a busy 2-core machine
        original_warm_up(results_queue)
        warmed.set()

    seen_at_save = []
    original_save = writer_module.dist_checkpointing.save

    def recording_save(*args, **kwargs):
        seen_at_save.append(warmed.is_set())
        return original_save(*args, **kwargs)

    monkeypatch.setattr(writer_module, "_warm_up_results_queue", slow_warm_up)
    monkeypatch.setattr(writer_module.dist_checkpointing, "save", recording_save)
    cfg = load_config(TINY_RECIPE, TINY_OVERRIDES + [f"run.dir={tmp_path}", "checkpoint.interval=1"])
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    writer = checkpoint.CheckpointWriter(cfg, tmp_path, topo, log=lambda message: None)  # starts the warm-up
    writer.save(1, engine)
    writer.close()
    assert seen_at_save == [True]
    assert latest(tmp_path) == "step_0000001"
