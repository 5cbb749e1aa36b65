"""The deepspeed engine backend (ZeRO stages 1-3) against the megatron backend, with real ranks on gloo.

Parity: the same weights, batches and optimizer give the same losses and gradient norms on both
backends (Yi at ZeRO-1/2/3, the Step-Video DiT and the video VAE at ZeRO-3). Memory: ZeRO-3 builds
a part without any rank holding it whole. Checkpoints: exact
resume of a deepspeed run after SIGKILL, resume at another data-parallel size and ZeRO stage,
checkpoints that move between backends (weights and Adam state), and the release export of a
deepspeed-backend checkpoint. Bad input: layouts and DeepSpeed JSON the backend refuses.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, Run, finish_ok, free_port, read_metrics

WORKER = REPO / "tests" / "deepspeed_worker.py"
YI = REPO / "recipes" / "yi" / "tiny.yaml"
SMALL_YI = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=512",
    "model.seq_length=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "checkpoint.save_at_end=false",
]


def torchrun(nproc: int, *args: str, timeout: int = 900) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    proc = subprocess.run(
        [*cmd, str(WORKER), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def parity(tmp_path: Path, recipe: Path, steps: int, backends: str, overrides: list[str], nproc: int = 2) -> dict:
    out = tmp_path / "parity.json"
    torchrun(nproc, str(out), str(recipe), str(steps), backends, *overrides, f"run.dir={tmp_path / 'run'}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def yi_stages(tmp_path_factory) -> dict:
    """Yi tiny at DP=2 for 6 steps on the megatron backend and ZeRO-1, -2 and -3 (one 2-rank run)."""
    return parity(tmp_path_factory.mktemp("yi-stages"), YI, 6, "megatron,zero1,zero2,zero3", SMALL_YI)


def test_zero_stages_give_the_megatron_backends_losses_and_gradient_norms(yi_stages):
    """Yi tiny at DP=2 (two microbatches per rank, 20% of the tokens masked, weight decay on
    matrices only, clipping): ZeRO-1, -2 and -3 against megatron's DDP + distributed optimizer."""
    results = yi_stages
    reference = results["megatron"]
    for stage in ("zero1", "zero2", "zero3"):
        for key in ("loss", "grad_norm"):
            for step, (a, b) in enumerate(zip(results[stage][key], reference[key]), 1):
                assert abs(a - b) <= 1e-5, (stage, key, step, a, b)
    # What rank 0 holds after a step (weights, gradients, optimizer state; fp32), against the
    # ZeRO paper's split that `fmtrain info` prints: ZeRO-1/2 free their gradients after the step,
    # ZeRO-3 keeps its flat gradient partition, megatron its gradient buffer.
    from fmtrain.config import load_config
    from fmtrain.models.registry import get_family
    from fmtrain.models.sizes import state_bytes_per_param, zero_state_bytes_per_param

    cfg = load_config(YI, SMALL_YI)
    params = get_family("yi").param_count(cfg)
    assert reference["state_bytes"] == pytest.approx(params * state_bytes_per_param(False, True, 2), rel=5e-3)
    for stage in (1, 2, 3):
        z = zero_state_bytes_per_param(stage, 2, bf16=False)
        held = results[f"zero{stage}"]["state_bytes"]
        kept_grads = z.grads if stage == 3 else 0.0
        assert held == pytest.approx(params * (z.params + kept_grads + z.optimizer), rel=5e-3), stage


def test_zero3_never_holds_the_whole_model_while_building_it(yi_stages):
    """ZeRO-3 constructs a part under ``deepspeed.zero.Init`` and draws its weights one gathered
    parameter at a time (the same weights: the parity above): while the engine is built, rank 0
    never holds more than the largest parameter (the embedding) whole. The other stages and the
    megatron backend build the whole model on every rank."""
    from fmtrain.config import load_config
    from fmtrain.models.registry import get_family

    params = get_family("yi").param_count(load_config(YI, SMALL_YI))
    zero3 = yi_stages["zero3"]
    assert zero3["build_peak_elements"] <= zero3["largest_param"] < params / 2, zero3
    for backend in ("megatron", "zero1", "zero2"):
        assert yi_stages[backend]["build_peak_elements"] == params, backend


def test_zero2_with_tensor_parallelism_matches_megatron_tp2_dp2(tmp_path):
    """World 4 as TP=2 x DP=2: ZeRO-2 partitions over the data-parallel group and counts each
    tensor-parallel shard once in the gradient norm (megatron's groups as DeepSpeed's ``mpu``)."""
    results = parity(tmp_path, YI, 6, "megatron,zero2", [*SMALL_YI, "parallel.tp=2"], nproc=4)
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(results["zero2"][key], results["megatron"][key]), 1):
            assert abs(a - b) <= 1e-5, (key, step, a, b)


def test_dit_and_vae_at_zero3_match_the_megatron_backend(tmp_path):
    """The Step-Video DiT (megatron layers) and the video VAE (a plain conv net, images mixed in
    with clips) from their own synthetic data pipelines, ZeRO-3 at DP=2."""
    dit = parity(
        tmp_path / "dit",
        REPO / "recipes" / "step_video" / "dit_tiny.yaml",
        4,
        "megatron,zero3",
        ["train.global_batch_size=8", "train.micro_batch_size=2", "eval.interval=0", "logging.tensorboard=false"],
    )
    for key in ("loss", "grad_norm"):
        for a, b in zip(dit["zero3"][key], dit["megatron"][key]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (key, a, b)
    vae = parity(
        tmp_path / "vae",
        REPO / "recipes" / "step_video" / "vae_tiny.yaml",
        3,
        "megatron,zero3",
        [
            "data.video_frames=9",
            "data.synthetic_samples=16",
            "train.global_batch_size=4",
            "train.micro_batch_size=1",
            "objective.gan_weight=0",
            "objective.image_ratio=0.5",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    for a, b in zip(vae["zero3"]["loss"], vae["megatron"]["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), ("loss", a, b)
    for a, b in zip(vae["zero3"]["grad_norm"], vae["megatron"]["grad_norm"]):
        # GroupNorm's gradients cancel: the two backends' summation orders give norms 4e-6 apart
        # from the first step (measured), and the VAE's Adam turns rounding-level gradient
        # differences into lr-sized steps (see test_video_vae's DP test).
        assert abs(a - b) <= 3e-5 * abs(b), ("grad_norm", a, b)


def test_checkpoints_move_between_backends_with_their_adam_state(tmp_path):
    """Three steps, a checkpoint, three more steps after loading it on another backend or ZeRO
    stage: the losses of an uninterrupted run. Step 5 depends on Adam's moments and step count
    (a fresh optimizer changes it by far more than 1e-5). And a deepspeed checkpoint exports to
    the same Hugging Face weights as its copy in megatron's format."""
    out = tmp_path / "moves.json"
    torchrun(2, "checkpoints", str(out), str(tmp_path / "work"), *SMALL_YI)
    results = json.loads(out.read_text())
    reference = results["megatron uninterrupted"]
    assert results["zero3 -> zero3"] == results["zero3 uninterrupted"], "DeepSpeed's own resume is exact"
    for name in (
        "zero3 -> zero1",
        "megatron -> zero2",
        "zero2 -> megatron",
        "zero3 -> megatron",
        "megatron -> zero3 -> megatron",
    ):
        for a, b in zip(results[name], reference):
            assert abs(a - b) <= 1e-5, (name, a, b)

    from safetensors.torch import load_file

    from fmtrain.checkpoint.hf.convert import export_to_hf

    work = tmp_path / "work"
    exported = {}
    for name, ckpt in (
        ("deepspeed", work / "zero3-megatron" / "checkpoints" / "step_0000003"),
        ("megatron", work / "zero3-as-megatron" / "checkpoints" / "step_0000003"),
    ):
        export_to_hf(ckpt, tmp_path / f"hf-{name}", log=lambda message: None)
        exported[name] = load_file(tmp_path / f"hf-{name}" / "model.safetensors")
    assert exported["deepspeed"].keys() == exported["megatron"].keys()
    for key, tensor in exported["megatron"].items():
        assert torch.equal(exported["deepspeed"][key], tensor), key


@pytest.fixture(scope="module")
def ds_args(tiny_tokenizer) -> list[str]:
    return TINY_OVERRIDES + [
        f"data.tokenizer={tiny_tokenizer}",
        "engine.backend=deepspeed",
        "train.max_steps=8",
        "checkpoint.interval=4",
    ]


def test_deepspeed_run_resumes_exactly_after_sigkill_and_at_another_dp_size(ds_args, tmp_path):
    """ZeRO-3 at DP=2 with a NaN at step 2 (skipped: weights and Adam state unchanged): the
    reference; killed after step 6 and resumed from step 4: bit-identical; step 4's checkpoint
    resumed at DP=1 with ZeRO-2: the same losses within 1e-5."""
    nan = {"FMTRAIN_TEST_NAN_AT_STEP": "2"}
    ref_dir = tmp_path / "reference"
    out = finish_ok(Run(ds_args + ["engine.zero_stage=3", f"run.dir={ref_dir}"], 2, tmp_path, "reference", env=nan))
    assert "DeepSpeed ZeRO-3" in out
    ref = read_metrics(ref_dir)
    assert ref[2]["update_applied"] == 0 and math.isnan(ref[2]["grad_norm"]) and ref[8]["skipped_steps"] == 1
    ((part, ds_config),) = json.loads((ref_dir / "deepspeed_config.json").read_text()).items()
    assert ds_config["zero_optimization"]["stage"] == 3 and ds_config["train_batch_size"] == 8
    state = json.loads((ref_dir / "checkpoints" / "step_0000004" / "fmtrain_state.json").read_text())
    assert state["backend"] == "deepspeed" and state["zero_stage"] == 3
    assert state["deepspeed_tags"] == {part: "deepspeed"}

    killed_dir = tmp_path / "killed"
    args = ds_args + ["engine.zero_stage=3", f"run.dir={killed_dir}"]
    first = Run(args, 2, tmp_path, "killed", env={**nan, "FMTRAIN_TEST_HANG_AT_STEP": "6"})
    first.wait_for_step(killed_dir, 6)
    first.signal_group(signal.SIGKILL)
    first.finish()
    out = finish_ok(Run(args, 2, tmp_path, "resumed", env=nan))
    assert "resumed from" in out and "at step 4" in out and "restored the RNG states of all 2 ranks" in out
    resumed = read_metrics(killed_dir)
    for step in range(5, 9):
        assert resumed[step]["loss"] == ref[step]["loss"], step
        assert resumed[step]["grad_norm"] == ref[step]["grad_norm"], step

    dp1_dir = tmp_path / "dp1"
    load = f"checkpoint.load={ref_dir / 'checkpoints' / 'step_0000004'}"
    out = finish_ok(Run(ds_args + ["engine.zero_stage=2", load, f"run.dir={dp1_dir}"], 1, tmp_path, "dp1"))
    assert "DeepSpeed ZeRO-3 state of DP=2 re-partitioned for ZeRO-2 at DP=1" in out
    dp1 = read_metrics(dp1_dir)
    for step in range(5, 9):
        assert abs(dp1[step]["loss"] - ref[step]["loss"]) <= 1e-5, step


def test_layouts_and_deepspeed_json_the_backend_refuses(tmp_path):
    from fmtrain.config import ConfigError, load_config

    def refused(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(YI, [*SMALL_YI, *overrides])
        return str(info.value)

    message = refused("engine.backend=deepspeed", "parallel.pp=2")
    assert "engine.backend=deepspeed" in message and "parallel.pp=2" in message
    assert "engine.offload=optimizer+params needs engine.zero_stage=3" in refused(
        "engine.backend=deepspeed", "engine.zero_stage=2", "engine.offload=optimizer+params"
    )
    assert "is a deepspeed setting, but engine.backend=megatron" in refused("engine.zero_stage=2")
    assert "parallel.sequence_parallel=true" in refused(
        "engine.backend=deepspeed", "parallel.tp=2", "parallel.sequence_parallel=true"
    )
    load_config(YI, [*SMALL_YI, "engine.backend=deepspeed", "parallel.tp=2"])  # TP without SP is supported

    from fmtrain.checkpoint import CheckpointError
    from fmtrain.checkpoint.across_backends import _refuse_tensor_parallel_deepspeed

    with pytest.raises(CheckpointError, match=r"written by the deepspeed backend at TP=2"):
        _refuse_tensor_parallel_deepspeed(tmp_path, "deepspeed", {"tp": 2, "dp": 2}, 1)
    with pytest.raises(CheckpointError, match=r"a deepspeed-backend run at TP=2"):
        _refuse_tensor_parallel_deepspeed(tmp_path, "megatron", {"tp": 1}, 2)
    _refuse_tensor_parallel_deepspeed(tmp_path, "megatron", {"tp": 2}, 1)  # megatron reshards into TP=1
    assert "engine.deepspeed_config=/nonexistent.json: no such file" in refused(
        "engine.backend=deepspeed", "engine.deepspeed_config=/nonexistent.json"
    )
    assert "engine.zero_stage=3: the adaptive GAN weight" in str(
        pytest.raises(
            ConfigError, load_config, REPO / "recipes" / "step_video" / "vae_tiny.yaml", ["engine.backend=deepspeed"]
        ).value
    )

    from fmtrain.engine.deepspeed import deepspeed_config, merge_user_config

    cfg = load_config(YI, [*SMALL_YI, "engine.backend=deepspeed"])
    generated = deepspeed_config(cfg, cfg.train, dp=2, bf16=False)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1000}, "flops_profiler": {}}))
    merged = merge_user_config(generated, str(user))
    assert merged["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert merged["zero_optimization"]["stage"] == 3 and merged["train_batch_size"] == 8
    user.write_text(json.dumps({"train_batch_size": 16}))
    with pytest.raises(ConfigError, match=r"train_batch_size=16 conflicts with 8"):
        merge_user_config(generated, str(user))
    user.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed key\(s\) zero_optimisation"):
        merge_user_config(generated, str(user))
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 conflicts with 3"):
        merge_user_config(generated, str(user))


def test_info_prints_the_zero_stages_model_state_beside_megatrons(capsys):
    """Yi-6B at DP=8: ZeRO-3 holds 16/8 = 2 bytes per parameter in bf16, ZeRO-2 + offload keeps
    the 2 bytes of weights and 2/8 of gradients on the GPU and 12/8 in host memory; the megatron
    backend's distributed optimizer 6 + 12/8."""
    from fmtrain.cli import main as fmtrain_main
    from fmtrain.config import load_config
    from fmtrain.models.registry import get_family

    recipe = REPO / "recipes" / "yi" / "6b.yaml"
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false", "engine.backend=deepspeed"]
    params = get_family("yi").param_count(load_config(recipe, layout))
    gib = 2**30
    assert fmtrain_main(["info", str(recipe), *layout, "engine.zero_stage=3", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert f"= {params * 2.0 / gib:.2f} GiB (2.00 B/param at DP=8)" in out
    assert f"distributed optimizer: {params * 7.5 / gib:.2f} GiB" in out
    args = ["info", str(recipe), *layout, "engine.zero_stage=2", "engine.offload=optimizer", "--gpus", "8"]
    assert fmtrain_main(args) == 0
    out = capsys.readouterr().out
    assert (
        f"= {params * 2.25 / gib:.2f} GiB (2.25 B/param at DP=8) | host (offload) {params * 1.5 / gib:.2f} GiB" in out
    )
