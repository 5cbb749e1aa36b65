"""The engine's parts (fmtrain.models.registry.PartSpec), with real gloo ranks.

A frozen copy of a trainable Yi model at (TP, PP) = (2, 1) and (1, 2); a plain conv net at
DP=2 with the distributed optimizer against single-process torch math; two trainable parts
with two optimizers resumed exactly after SIGKILL, and resharded to DP=1. The families are the
tests' own (tests/families/), found by module path as a user's family would be.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, Run, finish_ok, free_port, read_metrics

TINY_YI = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=512",
    "model.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.precision=fp32",
]
CONV = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=1e-2",
    "train.lr_schedule=constant",
    "train.weight_decay=0.1",
    "train.grad_clip=0.5",
    "train.precision=fp32",
    "parallel.distributed_optimizer=true",
]


def run_worker(worker: str, out, nproc: int, overrides: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master-port={free_port()}",
        str(REPO / "tests" / worker),
        str(out),
        *map(str, overrides),
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


def test_frozen_copy_matches_at_step_0_never_changes_and_loads_from_a_checkpoint(tmp_path):
    """At (TP, PP) = (2, 1) and (1, 2): the frozen copy's outputs equal the trainable model's at
    step 0, its weights are bit-identical after 3 steps, it has no gradient, DDP buffer or
    optimizer state and is not checkpointed. Then, on one rank, a frozen part whose source is
    the TP=2 run's checkpoint computes what that run's trained model computed."""
    for layout in ("parallel.tp=2", "parallel.pp=2"):
        name = layout.split(".")[1].replace("=", "")
        report = run_worker(
            "frozen_worker.py", tmp_path / f"{name}.pt", 2, [tmp_path / f"ckpt_{name}"] + TINY_YI + [layout]
        )
        assert report["outputs_at_step_0"] == 2 and report["outputs_equal_at_step_0"], layout
        assert report["trained_outputs_changed"] and report["trained_weights_changed"], layout
        assert report["frozen_weights_identical"] and report["frozen_outputs_unchanged"], layout
        # No gradient, no DDP gradient buffer, no optimizer state, not in checkpoints.
        assert not report["frozen_requires_grad"] and not report["frozen_grads"], layout
        assert report["trained_ddp_wrapped"] and not report["frozen_ddp_wrapped"], layout
        assert report["trained_in_optimizer"] and not report["frozen_in_optimizer"], layout
        assert not report["frozen_optimizer"] and not report["frozen_in_checkpoint"], layout
        assert report["frozen_param_count"] > 0 and report["loaded_frozen_parts"] == 0, layout
        if name == "tp2":
            trained_tp2 = report["trained_outputs"]
    loaded = run_worker(
        "frozen_worker.py",
        tmp_path / "loaded.pt",
        1,
        [tmp_path / "ckpt_loaded"] + TINY_YI + [f"model.reference_source={tmp_path / 'ckpt_tp2'}"],
    )
    assert loaded["loaded_frozen_parts"] == 1
    for got, want in zip(loaded["outputs_at_step_0_of"]["reference"], trained_tp2):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not loaded["outputs_equal_at_step_0"]  # the trainable model starts from the seed, not the checkpoint


def test_plain_conv_net_at_dp2_matches_single_process_torch(tmp_path):
    """The engine's loss, gradient norm and weights after 5 AdamW steps (clipping, decoupled
    weight decay except on biases and norms) equal plain torch on the whole batch in fp64."""
    sys.path.insert(0, str(REPO))
    from fmtrain.config import load_config
    from tests.families.conv import ConvNet, batches, per_sample_loss

    result = run_worker("conv_worker.py", tmp_path / "conv.pt", 2, CONV)
    assert result["dp"] == 2
    cfg = load_config(None, ["model.family=tests.families.conv", *CONV])
    m, t = cfg.model, cfg.train
    net = ConvNet(m.channels, m.size, m.outputs).double()
    net.load_state_dict(result["initial"])
    decay = [p for n, p in net.named_parameters() if p.dim() > 1 and not n.endswith("bias")]
    no_decay = [p for n, p in net.named_parameters() if not (p.dim() > 1 and not n.endswith("bias"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
    )
    per_rank = t.global_batch_size // (t.micro_batch_size * 2)
    for step in range(len(result["losses"])):
        mbs = [mb for rank in range(2) for mb in batches(cfg, step, rank, per_rank, t.micro_batch_size)]
        images = torch.cat([mb["images"] for mb in mbs]).double()
        target = torch.cat([mb["target"] for mb in mbs]).double()
        opt.zero_grad()
        loss = per_sample_loss(net(images), target).sum() / images.shape[0]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        assert norm > t.grad_clip  # clipping is exercised
        opt.step()
        assert result["losses"][step].item() == pytest.approx(loss.item(), rel=1e-5), step
        assert result["grad_norms"][step].item() == pytest.approx(norm.item(), rel=1e-5), step
    for name, value in net.state_dict().items():
        torch.testing.assert_close(result["final"][name].double(), value, rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(result["final"]["head.weight"], result["initial"]["head.weight"])


ADVERSARIAL_RECIPE = """\
model:
  family: tests.families.adversarial
  disc_lr: 5.0e-3
objective:
  name: tests.families.adversarial
train:
  max_steps: 6
  global_batch_size: 8
  micro_batch_size: 2
  lr: 3.0e-3
  warmup_steps: 1
  log_interval: 1
  precision: fp32
checkpoint:
  interval: 4
logging:
  tensorboard: false
  peak_tflops: 1.0
"""
PAIR_METRICS = ("loss", "grad_norm", "lr", "discriminator/loss", "discriminator/grad_norm", "discriminator/lr")


def test_two_parts_two_optimizers_resume_resharded(tmp_path):
    """Generator + discriminator at DP=2, each with its own AdamW and LR schedule; the step-4
    checkpoint resumes at DP=1 (both parts' optimizer states resharded) with the uninterrupted
    run's steps 5-6. (Exact resume after SIGKILL of a two-part run: tests/test_video_vae.py.)"""
    recipe = tmp_path / "adversarial.yaml"
    recipe.write_text(ADVERSARIAL_RECIPE)
    ref_dir, dp1_dir = tmp_path / "reference", tmp_path / "dp1"
    finish_ok(Run([f"run.dir={ref_dir}"], 2, tmp_path, "reference", recipe=recipe))
    ref = read_metrics(ref_dir)
    assert sorted(ref) == list(range(1, 7))
    assert ref[1]["lr"] != ref[1]["discriminator/lr"]  # two schedules
    assert ref[6]["discriminator/loss"] != ref[5]["discriminator/loss"]

    finish_ok(
        Run(
            [f"run.dir={dp1_dir}", f"checkpoint.load={ref_dir / 'checkpoints' / 'step_0000004'}"],
            1,
            tmp_path,
            "dp1",
            recipe=recipe,
        )
    )
    dp1 = read_metrics(dp1_dir)
    for step in range(5, 7):
        for name in PAIR_METRICS:
            assert dp1[step][name] == pytest.approx(ref[step][name], rel=1e-5), (step, name)
