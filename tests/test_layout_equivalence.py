"""The same seed and data give the same training run under every (TP, PP, VPP, DP) layout.

Each layout is a real multi-process run (`fmtrain train --nproc N`, torchrun on gloo). The
single-rank run is the reference: it is plain single-process math, with no collective in the
way. Losses *and* gradient norms are compared: Adam normalises gradient scale away, so a
layout that got its gradients wrong by a constant factor would still match on loss alone.
"""

from __future__ import annotations

import pytest
from conftest import read_metrics, run_fmtrain

STEPS = 10
RTOL = 1e-4

# (tp, pp, vpp, dp) -> extra overrides
LAYOUTS = {
    (2, 1, 1, 1): [],
    (1, 2, 1, 1): [],
    (1, 1, 1, 2): [],
    (2, 2, 1, 1): [],
    (1, 2, 2, 1): [],
}


def _run(tmp_path, tiny_args, tp, pp, vpp, dp, extra=(), expect_log=None):
    run_dir = tmp_path / f"tp{tp}pp{pp}vpp{vpp}dp{dp}{'-'.join(extra)}"
    args = [a for a in tiny_args if not a.startswith("run.dir=")] + [
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.vpp={vpp}",
        *extra,
    ]
    proc = run_fmtrain(args, nproc=tp * pp * dp)
    if expect_log is not None:
        assert expect_log in proc.stdout, f"{expect_log!r} not in the start-up log:\n{proc.stdout[:3000]}"
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    from conftest import TINY_OVERRIDES

    tmp = tmp_path_factory.mktemp("reference")
    args = TINY_OVERRIDES + [f"data.tokenizer={tiny_tokenizer}"]
    # CPU defaults: torch's fused AdamW, no compiled kernels.
    return _run(tmp, args, 1, 1, 1, 1, expect_log="kernels: optimizer torch AdamW (fused); fused kernels: none")


def _assert_same_run(reference, other, label):
    assert sorted(other) == list(range(1, STEPS + 1)), f"{label}: steps {sorted(other)}"
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            ref, got = reference[step][key], other[step][key]
            assert got == pytest.approx(ref, rel=RTOL), f"{label} step {step} {key}: {got} vs {ref}"


def test_reference_run_learns(reference):
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS]["loss"] < reference[1]["loss"] - 0.5


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: "tp{}-pp{}-vpp{}-dp{}".format(*layout))
def test_layout_matches_single_rank(reference, tmp_path, tiny_args, layout):
    tp, pp, vpp, dp = layout
    _assert_same_run(reference, _run(tmp_path, tiny_args, tp, pp, vpp, dp, LAYOUTS[layout]), str(layout))


def test_sequence_parallel_matches_single_rank(reference, tmp_path, tiny_args):
    run = _run(tmp_path, tiny_args, 2, 1, 1, 1, ["parallel.sequence_parallel=true"])
    _assert_same_run(reference, run, "tp2+sp")


def test_plain_ddp_optimizer_matches_single_rank(reference, tmp_path, tiny_args):
    run = _run(tmp_path, tiny_args, 1, 1, 1, 2, ["parallel.distributed_optimizer=false"])
    _assert_same_run(reference, run, "dp2 without distributed optimizer")


def test_fused_kernels_match_unfused(reference, tmp_path, tiny_args):
    # megatron's compiled SwiGLU and fmtrain's compiled RoPE (what CUDA runs by default)
    # against the reference's plain ops; the fused cross entropy is bf16-only
    # (tests/test_fused_kernels.py).
    run = _run(
        tmp_path,
        tiny_args,
        2,
        1,
        1,
        1,
        ["parallel.sequence_parallel=true", "model.fused_kernels=on"],
        expect_log="fused kernels: activation, RoPE\n",
    )
    _assert_same_run(reference, run, "tp2+sp with fused kernels")


def test_foreach_adam_matches_fused_adam(reference, tmp_path, tiny_args):
    run = _run(tmp_path, tiny_args, 1, 1, 1, 2, ["train.fused_adam=off"], expect_log="optimizer torch AdamW (foreach)")
    _assert_same_run(reference, run, "dp2 with foreach AdamW")
