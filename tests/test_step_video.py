"""The Step-Video-T2V DiT on the shared engine: layout equivalence, training, sampling, sizes.

Layouts run as real torchrun processes on gloo (tests/dit_worker.py); the single-rank run is
the reference. The training test uses the tiny recipe's synthetic, class-structured latents
(fmtrain.data.latents): each sample is its class's smooth prototype field times an amplitude
in [0.8, 1.2] plus 0.1 noise, and its text embedding identifies the class. The sampler's
statistic is the cosine similarity between a generated latent and the prototype of the class
its prompt names: about 0 for noise (and for an untrained model), about 1 for the data.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, read_metrics, run_fmtrain

from fmtrain.cli import main as fmtrain_main

RECIPE = REPO / "recipes" / "step_video" / "dit_tiny.yaml"
RTOL = 1e-4
WORKER_ARGS = ["train.global_batch_size=8", "train.micro_batch_size=2"]


def _worker(tmp_path, tp: int, pp: int, sp: bool = False, cp: int = 1) -> dict:
    out = tmp_path / f"dit_tp{tp}_pp{pp}_sp{int(sp)}_cp{cp}.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(tp * pp * cp),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "dit_worker.py"),
        str(out),
        str(RECIPE),
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.cp={cp}",
        f"run.dir={tmp_path / 'run'}",
        *WORKER_ARGS,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("dit_reference"), 1, 1)


def test_parameter_count_formula_matches_the_module(reference):
    from fmtrain.config import load_config
    from fmtrain.models.step_video.sizes import param_count

    assert reference["num_parameters"] == param_count(load_config(RECIPE))


def _assert_same_as_reference(other: dict, reference: dict, rtol: float) -> None:
    # Forward: two microbatches of different latent shapes (the pipeline pads to the longer).
    assert len(other["predictions"]) == len(reference["predictions"]) == 2
    for got, ref in zip(other["predictions"], reference["predictions"]):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max())), (
            f"prediction differs by {float((got - ref).abs().max())}"
        )
    # Ten training steps: losses and gradient norms.
    assert torch.allclose(other["losses"], reference["losses"], rtol=rtol)
    assert torch.allclose(other["grad_norms"], reference["grad_norms"], rtol=rtol)


@pytest.mark.parametrize(
    "tp,pp,sp", [(2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True)], ids=["tp2", "pp2", "tp2-pp2", "tp2-sp"]
)
def test_layout_matches_single_rank(reference, tmp_path, tp, pp, sp):
    _assert_same_as_reference(_worker(tmp_path, tp, pp, sp), reference, RTOL)


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, True), (1, 2, False)], ids=["tp2-sp-cp2", "pp2-cp2"])
def test_context_parallel_matches_single_rank(reference, tmp_path, tp, pp, sp):
    """Ulysses over the self-attention heads (3D RoPE at each rank's true positions), each rank's
    query slice against the whole text in the cross-attention, the loss summed over the CP
    group, the pipeline tensor carrying each rank's slice: the same numbers as one rank."""
    _assert_same_as_reference(_worker(tmp_path, tp, pp, sp, cp=2), reference, 1e-5)


def test_tiny_recipe_learns_and_samples_move_toward_the_data(tmp_path):
    from fmtrain.config import load_config
    from fmtrain.data.latents import class_prototypes, class_text_embeddings

    run_dir = tmp_path / "run"
    run_fmtrain(
        [
            f"run.dir={run_dir}",
            "train.max_steps=200",
            "train.log_interval=50",
            "eval.interval=0",
            "logging.tensorboard=false",
            "logging.peak_tflops=1.0",
        ],
        nproc=1,
        recipe=RECIPE,
        timeout=900,
    )
    metrics = read_metrics(run_dir)
    first = metrics[1]["loss"]
    last = np.mean([metrics[s]["loss"] for s in range(191, 201)])
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"

    cfg = load_config(RECIPE)
    m, classes = cfg.model, cfg.data.synthetic_classes
    shape = (2, 8, 8)
    prototypes = class_prototypes(shape, classes, m.in_channels, cfg.run.seed).reshape(classes, -1)
    text = class_text_embeddings(classes, m.caption_tokens, m.caption_dim, cfg.run.seed, tag=0)
    clip = class_text_embeddings(classes, m.clip_tokens, m.clip_dim, cfg.run.seed, tag=1)
    similarity, correct = [], 0
    for k in range(classes):
        prompt, out = tmp_path / f"prompt{k}.npz", tmp_path / f"sample{k}.npy"
        np.savez(prompt, text_emb=text[k], clip_emb=clip[k])
        args = ["sample", str(RECIPE), "--ckpt", str(run_dir), "--prompt-emb", str(prompt), "--out", str(out)]
        assert fmtrain_main([*args, "--num", "4", "--seed", "5", "--shape", "2x8x8"]) == 0  # in this process
        x = np.load(out, allow_pickle=False)
        assert x.shape == (4, m.in_channels, *shape)
        x = x.reshape(4, -1)
        cos = (x @ prototypes.T) / (np.linalg.norm(x, axis=1, keepdims=True) * np.linalg.norm(prototypes, axis=1))
        similarity.append(cos[:, k].mean())
        correct += int((cos.argmax(1) == k).sum())
    # Gaussian noise of this size has |cos| ~ 1/sqrt(512) = 0.04 with any prototype; data ~ 0.99.
    assert np.mean(similarity) > 0.3, f"cosine to the prompt's class prototype {np.mean(similarity):.3f}"
    assert correct / (4 * classes) >= 0.5, f"nearest prototype = prompt class for {correct}/{4 * classes}"


def test_sampler_is_reproducible_and_validates_its_prompt(tmp_path):
    prompt = tmp_path / "prompt.npz"
    np.savez(prompt, text_emb=np.ones((3, 64), np.float32), clip_emb=np.ones((2, 32), np.float32))
    outs = []
    for i in range(2):  # in this process: the sampler builds and tears down its one-rank group each time
        out = tmp_path / f"s{i}.npy"
        args = ["sample", str(RECIPE), "--prompt-emb", str(prompt), "--out", str(out), "--steps", "3", "--seed", "9"]
        assert fmtrain_main(args) == 0
        outs.append(np.load(out))
    assert np.array_equal(outs[0], outs[1])
    bad = tmp_path / "bad.npz"
    np.savez(bad, text_emb=np.ones((3, 50), np.float32), clip_emb=np.ones((2, 32), np.float32))
    with pytest.raises(ValueError, match=re.escape("'text_emb' has shape (3, 50), expected [tokens, 64]")):
        fmtrain_main(["sample", str(RECIPE), "--prompt-emb", str(bad), "--out", str(tmp_path / "x.npy")])


def test_30b_recipe_size_and_memory(capsys):
    assert fmtrain_main(["info", str(REPO / "recipes/step_video/dit_30b.yaml"), "--gpus", "256"]) == 0
    stdout = capsys.readouterr().out
    line = next(text for text in stdout.splitlines() if text.startswith("parameters"))
    params = int(line.split()[1].replace(",", ""))
    # 48 blocks x (8 h^2 attention + 2 h x 4h FFN) = 29.0B, plus AdaLN-single (6 h^2) and embedders.
    assert 29.0e9 < params < 30.5e9
    assert "TP=8 PP=4 VPP=1 CP=2 DP=4 on 256 GPUs" in stdout and "memory/GPU" in stdout
