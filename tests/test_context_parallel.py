"""Context parallelism (``parallel.cp``): DeepSpeed-Ulysses around fmtrain's SDPA attention.

Yi runs are real ``fmtrain train --nproc N`` processes on gloo against the single-rank run of
the same seed and data (losses and gradient norms within 1e-5); checkpoints move between CP
sizes both ways. (The Step-Video DiT's CP layouts are in tests/test_step_video.py, beside its
other layouts.) Activation memory is counted with torch's saved-tensor hooks. The layout rules
are checked by the configuration, before any process starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, free_port, read_metrics, run_fmtrain

from fmtrain.config import ConfigError, load_config, validate

STEPS = 6
RTOL = 1e-5


def _train(tmp_path, base, name: str, nproc: int, *extra: str) -> dict[int, dict]:
    run_dir = tmp_path / name
    run_fmtrain(base + [f"run.dir={run_dir}", *extra], nproc=nproc)
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def base(tiny_tokenizer) -> list[str]:
    return TINY_OVERRIDES + [
        f"data.tokenizer={tiny_tokenizer}",
        f"train.max_steps={STEPS}",
        "checkpoint.interval=3",
    ]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The single-rank run (CP=1), with a checkpoint at step 3."""
    tmp = tmp_path_factory.mktemp("cp_reference")
    return tmp, _train(tmp, base, "cp1", 1)


def _assert_same(reference: dict, other: dict, steps, label: str) -> None:
    assert set(steps) <= set(other), f"{label}: steps {sorted(other)}"
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert other[step][key] == pytest.approx(reference[step][key], rel=RTOL), (
                f"{label} step {step} {key}: {other[step][key]} vs {reference[step][key]}"
            )


def test_yi_tp2_cp2_matches_single_rank(reference, base, tmp_path):
    """TP=2 x CP=2 splits the 64-token sequences in two and leaves one KV head per TP rank, which
    Ulysses repeats so that the two CP ranks can split it. (CP=2 alone: the next test.)"""
    _, ref = reference
    run = _train(tmp_path, base, "tp2cp2", 4, "parallel.tp=2", "parallel.cp=2")
    _assert_same(ref, run, range(1, STEPS + 1), "TP=2 CP=2")


def test_document_masks_under_context_parallelism(base, tmp_path):
    """Packed documents (data.reset_position_ids + reset_attention_mask): each CP rank holds a
    slice of the row, the attention after the all-to-all sees the whole row's document layout."""
    documents = ["data.reset_position_ids=true", "data.reset_attention_mask=true", f"train.max_steps={STEPS - 2}"]
    one = _train(tmp_path, base, "documents_cp1", 1, *documents)
    two = _train(tmp_path, base, "documents_cp2", 2, "parallel.cp=2", *documents)
    _assert_same(one, two, range(1, STEPS - 1), "documents, CP=2")


def test_checkpoints_move_between_context_parallel_sizes(reference, base, tmp_path):
    """A CP=2 run equals the single-rank run (6 steps); its step-3 checkpoint resumes at CP=1, and
    the CP=1 run's at CP=2: steps 4-6 are the uninterrupted run's."""
    ref_dir, ref = reference
    saved = _train(tmp_path, base, "saved_cp2", 2, "parallel.cp=2")
    _assert_same(ref, saved, range(1, STEPS + 1), "CP=2")
    for name, nproc, source in (
        ("cp2_to_cp1", 1, tmp_path / "saved_cp2"),
        ("cp1_to_cp2", 2, ref_dir / "cp1"),
    ):
        resumed = _train(
            tmp_path,
            base,
            name,
            nproc,
            f"parallel.cp={nproc}",
            f"checkpoint.load={source / 'checkpoints' / 'step_0000003'}",
        )
        assert min(resumed) == 4, f"{name}: resumed at step {min(resumed)}"
        _assert_same(ref, resumed, range(4, STEPS + 1), name)


def _activation_bytes(tmp_path, family: str, cp: int) -> float:
    out = tmp_path / f"{family}_cp{cp}.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(cp),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "cp_memory_worker.py"),
        str(out),
        family,
        str(cp),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)["bytes"]


@pytest.mark.parametrize("family", ["yi", "step_video"])
def test_activation_memory_per_rank_halves_at_cp2(tmp_path, family):
    """The bytes autograd saves for backward on the most loaded rank, for one 1024-token
    sample (Yi) or one 4x16x16 latent (the DiT): at most 0.6x at CP=2 (about 0.5: every saved
    tensor is per token, except RoPE tables and the DiT's text context, which each rank holds
    whole)."""
    one, two = _activation_bytes(tmp_path, family, 1), _activation_bytes(tmp_path, family, 2)
    assert two <= 0.6 * one, f"{family}: {two:.0f} bytes at CP=2 vs {one:.0f} at CP=1 ({two / one:.3f}x)"


# ----------------------------------------------------------------------------- the rules


def _refused(overrides: list[str], message: str, recipe=None, world: int | None = None) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg = load_config(recipe, overrides)
        validate(cfg, world)


def test_layout_rules_name_the_numbers():
    small = ["model.num_layers=2", "model.hidden_size=64", "model.num_query_groups=2"]
    _refused(
        small + ["model.num_attention_heads=4", "parallel.tp=2", "parallel.cp=4"],
        "model.num_attention_heads=4 is not divisible by parallel.tp x parallel.cp = 2 x 4 = 8",
    )
    _refused(
        small + ["model.num_attention_heads=4", "model.seq_length=66", "parallel.cp=4"],
        "model.seq_length=66 is not divisible by parallel.cp = 4",
    )
    _refused(
        small
        + ["model.num_attention_heads=4", "model.seq_length=70", "parallel.cp=2", "parallel.tp=2"]
        + ["parallel.sequence_parallel=true"],
        "model.seq_length=70 is not divisible by parallel.cp x parallel.tp (context and sequence parallelism) = 4",
    )
    _refused(
        ["parallel.cp=2", "model.attention_backend=local"],
        "model.attention_backend=local does not support it; use sdpa or auto",
    )
    _refused(
        ["parallel.cp=2", "parallel.tp=2"],
        "world size 6 is not divisible by parallel.tp x parallel.cp x parallel.pp = 2 x 2 x 1 = 4",
        world=6,
    )
    dit = REPO / "recipes" / "step_video" / "dit_tiny.yaml"
    _refused(
        ["parallel.cp=4", "data.synthetic_latent_shapes=[[2,8,8],[1,3,5]]"],
        "data.synthetic_latent_shapes: [1, 3, 5] is 15 tokens, not divisible by parallel.cp = 4",
        recipe=dit,
    )
    _refused(["parallel.cp=2", "objective.name=video_dpo", "objective.text_drop_prob=0"], "video_dpo is not a sum", dit)
    _refused(
        ["parallel.cp=2"],
        "parallel.cp=2: context parallelism is not implemented for model.family=videomae_v2",
        recipe=REPO / "recipes" / "videomae_v2" / "tiny.yaml",
    )
    dpo = REPO / "recipes" / "yi" / "dpo_tiny.yaml"
    _refused(["parallel.cp=2"], "objective.name=dpo is not a sum of per-token terms", dpo)
