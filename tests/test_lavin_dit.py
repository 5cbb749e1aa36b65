"""LaVin-DiT's J-DiT on the shared engine: the release's math, layouts, sizes and interop.

The single-process reference for the forward is ``PlainJDiT`` (tools/bench_lavin_dit.py), the
J-DiT written in plain PyTorch from the paper and the official repository's block code, loading
fmtrain's weights as they are. Layouts run as real torchrun processes on gloo
(tests/lavin_worker.py), the single-rank run being the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port

RECIPE = REPO / "recipes" / "lavin_dit" / "tiny.yaml"
WORKER_ARGS = ["train.global_batch_size=8", "train.micro_batch_size=2"]


def _workers(tmp_path, nproc: int, layouts: list[list[str]]) -> list[dict]:
    """One torchrun of ``nproc`` ranks running each layout (override list) in turn."""
    out = tmp_path / f"lavin_{nproc}.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "lavin_worker.py"),
        str(out),
        str(RECIPE),
        json.dumps(layouts),
        f"run.dir={tmp_path / 'run'}",
        *WORKER_ARGS,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(f"{out}.{i}", weights_only=True) for i in range(len(layouts))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    (single,) = _workers(tmp_path_factory.mktemp("lavin_reference"), 1, [[]])
    return single


def test_parameter_count_formula_matches_the_module(reference):
    from fmtrain.config import load_config
    from fmtrain.models.lavin_dit.sizes import param_count

    assert reference["num_parameters"] == param_count(load_config(RECIPE))


LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "dp2": [],
    "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
}


def test_layouts_match_single_rank(reference, tmp_path):
    """TP2, PP2, DP2 and TP2 with sequence parallelism (world 2, one torchrun): five training
    steps (and a forward of two microbatches with 1 and 2 example pairs, which the pipeline pads
    to one shape) give the single rank's numbers within 1e-5."""
    for name, other in zip(LAYOUTS, _workers(tmp_path, 2, list(LAYOUTS.values())), strict=True):
        for got, ref in zip(other["predictions"], reference["predictions"], strict=True):
            assert got.shape == ref.shape, name
            assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name
        assert torch.allclose(other["losses"], reference["losses"], rtol=1e-5, atol=0), name
        assert torch.allclose(other["grad_norms"], reference["grad_norms"], rtol=1e-5, atol=0), name


def test_forward_and_gradients_match_the_plain_pytorch_j_dit(single_rank):
    """fmtrain's megatron J-DiT against the plain-PyTorch one on the same weights: velocity on a
    non-square grid with 5 condition frames and 2 target frames, and the weight gradients of a
    loss through it (names and layouts of every tensor included)."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_lavin_dit import PlainJDiT

    from fmtrain import parallel
    from fmtrain.config import WHOLE_MODEL_LAYOUT, load_config
    from fmtrain.engine.parts import build_for_inference
    from fmtrain.models.init import InitRule, initialize_layout_invariant
    from fmtrain.models.lavin_dit.model import JointInputs
    from fmtrain.models.registry import get_family

    cfg = load_config(RECIPE, WHOLE_MODEL_LAYOUT)
    parallel.initialize(cfg)
    ours = build_for_inference(cfg, get_family("lavin_dit").primary(cfg), torch.device("cpu"))
    initialize_layout_invariant(
        [ours], 3, lambda key: InitRule("ones") if key.endswith("embedder.1.weight") else InitRule("normal", 0.08)
    )
    m = cfg.model
    plain = PlainJDiT(
        layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_attention_heads,
        kv_heads=m.num_query_groups,
        ffn=m.ffn_hidden_size,
        in_channels=m.in_channels,
        patch=m.patch_size,
    )
    plain.load_fmtrain_state(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    condition = torch.randn(2, m.in_channels, 5, 8, 12, generator=g)
    x_t = torch.randn(2, m.in_channels, 2, 8, 12, generator=g)
    t = torch.rand(2, generator=g)
    mine = ours(inputs=JointInputs(cond_grid=(5, 4, 6), target_grid=(2, 4, 6), t=t, condition=condition, x_t=x_t))
    theirs = plain(condition, x_t, t)
    assert mine.shape == theirs.shape == (2, m.in_channels, 2, 8, 12)
    assert float(theirs.std()) > 0.1  # dense weights: the prediction is not the zero-initialised one
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5)

    weights = torch.randn(theirs.shape, generator=g)
    (mine * weights).sum().backward()
    (theirs * weights).sum().backward()
    plain_grads = {name.replace("norm_weight", "norm.weight"): p.grad for name, p in plain.named_parameters()}
    for name, param in ours.named_parameters():
        # The last block's condition-stream output feeds nothing: no gradient (or a zero one).
        theirs_grad = plain_grads[name] if plain_grads[name] is not None else torch.zeros_like(param)
        mine_grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if not theirs_grad.any():
            assert name.startswith(f"blocks.{m.num_layers - 1}.") and ".cond_" in name, name
        assert torch.allclose(mine_grad, theirs_grad, atol=1e-5, rtol=1e-4), name


def _release_state(cfg, seed: int = 0) -> dict:
    from fmtrain.models.lavin_dit.sizes import tensor_shapes

    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(torch.bfloat16) for name, shape in tensor_shapes(cfg).items()}


def test_release_weights_round_trip_at_tp2(tmp_path, capsys):
    """A lavin_dit.safetensors with the release's names and shapes (built here, bf16 as released,
    with the config.json export writes) -> a TP=2 fmtrain checkpoint -> the release layout
    again: bit-exact. A tensor of the wrong shape is refused naming it and both shapes."""
    from safetensors.torch import load_file, save_file

    from fmtrain.cli import main as fmtrain_main
    from fmtrain.config import load_config
    from fmtrain.models.lavin_dit import convert

    cfg = load_config(RECIPE)
    release = tmp_path / "release"
    release.mkdir()
    state = _release_state(cfg)
    save_file(state, release / "lavin_dit.safetensors")
    (release / "config.json").write_text(json.dumps(convert.hf_config_from_fmtrain(cfg)))
    ckpt = tmp_path / "ckpt"
    args = [
        "convert",
        "from-hf",
        str(release),
        str(ckpt),
        "--nproc",
        "2",
        "parallel.tp=2",
        "data.corpus=synthetic:tasks",
    ]
    assert subprocess.run([sys.executable, "-m", "fmtrain.cli", *args], cwd=REPO).returncode == 0
    exported = tmp_path / "exported"
    assert fmtrain_main(["convert", "to-hf", str(ckpt), str(exported)]) == 0
    back = load_file(exported / "lavin_dit.safetensors")
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((exported / "config.json").read_text())["num_heads"] == cfg.model.num_attention_heads

    bad = dict(state)
    bad["blocks.1.joint_attn.x_k.weight"] = torch.zeros(8, cfg.model.hidden_size, dtype=torch.bfloat16)
    save_file(bad, release / "lavin_dit.safetensors")
    assert fmtrain_main(["convert", "from-hf", str(release), str(tmp_path / "bad"), "data.corpus=synthetic:tasks"]) != 0
    assert (
        "tensor blocks.1.joint_attn.x_k.weight has shape (8, 96), the model expects (48, 96)" in capsys.readouterr().err
    )
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_release_without_config_json_reads_as_the_3_4b_model(tmp_path):
    """The release ships lavin_dit.safetensors alone: its architecture comes from the tensor
    shapes and the released head count (a meta-tensor header is enough to check)."""
    from fmtrain.config import load_config
    from fmtrain.models.lavin_dit import convert

    cfg = load_config(None, ["model.family=lavin_dit", "model.size=3.4B"])
    config, source = convert.release_config(_HeaderOnly(tmp_path, convert.shapes_from_config(cfg)))
    assert "tensor shapes" in source
    made = load_config(None, convert.model_overrides(config, None))
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        assert getattr(made.model, field) == getattr(cfg.model, field), field


class _HeaderOnly:
    """What the converter reads of a release file: names and shapes (no data)."""

    def __init__(self, path, shapes):
        self.path, self._shapes = path, shapes

    @property
    def names(self):
        return frozenset(self._shapes)

    def info(self, name):
        return self._shapes[name], torch.bfloat16


def test_3_4b_recipe_prints_the_released_size(capsys):
    from fmtrain.cli import main as fmtrain_main

    assert fmtrain_main(["info", str(REPO / "recipes" / "lavin_dit" / "3b.yaml"), "--gpus", "64"]) == 0
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("parameters"))
    # Counted from the official LaVinDiT_3B_2 module (lib/model/dit.py): 3,398,976,064.
    assert int(line.split()[1].replace(",", "")) == 3_398_976_064


def test_images_to_tasks_to_latents_to_training_to_a_sampled_picture(tmp_path):
    """The whole path on CPU: image files -> synthetic task shards (`data shard tasks`) -> ST-VAE
    latents (`data encode`, an ST-VAE release of the tiny architecture) -> J-DiT training on the
    latent shards and, on the fly through `data.vae`, on the pixel shards -> `fmtrain sample` from a
    task folder and a query image -> a PNG of the query's size. A task folder with an unpaired
    example is refused naming it."""
    import numpy as np
    from conftest import read_metrics, run_fmtrain
    from PIL import Image
    from safetensors.torch import save_file

    from fmtrain.cli import main as fmtrain_main
    from fmtrain.config import load_config
    from fmtrain.data.video import moving_shapes
    from fmtrain.models.st_vae import convert as st_convert

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        frames, _ = moving_shapes(i, frames=1, width=40, height=32)
        Image.fromarray(frames[0]).save(images / f"img{i}.png")
    tasks = tmp_path / "tasks"
    args = ["data", "shard", "tasks", "--from", str(images), "--synthetic", "colorize,flip_h", "--pairs", "2"]
    assert fmtrain_main([*args, "--size", "32", "--samples", "8", "--out", str(tasks)]) == 0

    vae_recipe = REPO / "recipes" / "lavin_dit" / "st_vae_tiny.yaml"
    release = tmp_path / "st_vae"
    release.mkdir()
    g = torch.Generator().manual_seed(4)
    shapes = st_convert.shapes_from_config(load_config(vae_recipe))
    save_file(
        {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}, release / "stvae.safetensors"
    )

    latents = tmp_path / "latents"
    assert (
        fmtrain_main(["data", "encode", str(tasks), "--vae", str(release), "--size", "32", "--out", str(latents)]) == 0
    )
    index = json.loads((latents / "index.json").read_text())
    assert index["kind"] == "task_latents" and index["samples"] == 8 and not index["skipped"]
    assert set(index["shapes"]) == {"16x5x4x4"}  # (2 pairs x 2 + query) images of 32x32 -> 4x4 latents

    common = [
        "model.in_channels=16",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "eval.interval=0",
        "logging.tensorboard=false",
        "logging.peak_tflops=1.0",
    ]
    run = tmp_path / "run"
    run_fmtrain([*common, f"data.shards={latents}", f"run.dir={run}"], recipe=RECIPE)
    pixels_run = tmp_path / "pixels_run"
    run_fmtrain([*common, f"data.shards={tasks}", f"data.vae={release}", f"run.dir={pixels_run}"], recipe=RECIPE)
    for directory in (run, pixels_run):
        losses = [m["loss"] for m in read_metrics(directory).values()]
        assert len(losses) == 2 and all(np.isfinite(losses))

    task_dir = tmp_path / "task_dir"
    task_dir.mkdir()
    for i in range(2):
        image = Image.open(images / f"img{i}.png")
        image.save(task_dir / f"ex{i}_input.png")
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(task_dir / f"ex{i}_target.png")
    out = tmp_path / "sample.png"
    sample = ["sample", str(RECIPE), "model.in_channels=16", "data.task_size=32", "--ckpt", str(run)]
    sample += ["--task-dir", str(task_dir), "--query", str(images / "img5.png"), "--vae", str(release)]
    assert fmtrain_main([*sample, "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (32, 32)
    assert np.load(out.with_suffix(".npy")).shape == (1, 16, 1, 4, 4)

    (task_dir / "ex9_input.png").write_bytes((images / "img0.png").read_bytes())
    with pytest.raises(ValueError, match="'ex9' has an _input without a _target"):
        fmtrain_main([*sample, "--out", str(out)])


def test_sigkill_resume_is_exact(tmp_path):
    """One rank on the synthetic tasks, a checkpoint every 3 steps: the run is SIGKILLed after step 5
    and resumed from step 3; steps 4 and 5 repeat the killed run's numbers bit for bit."""
    import signal

    from conftest import Run, finish_ok, read_metrics

    run_dir = tmp_path / "run"
    args = [
        f"run.dir={run_dir}",
        "train.max_steps=6",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "checkpoint.interval=3",
        "train.log_interval=1",
        "eval.interval=0",
        "logging.tensorboard=false",
        "logging.peak_tflops=1.0",
    ]
    killed = Run(args, 1, tmp_path, "killed", env={"FMTRAIN_TEST_HANG_AT_STEP": "5"}, recipe=RECIPE)
    killed.wait_for_step(run_dir, 5)
    before = read_metrics(run_dir)
    killed.signal_group(signal.SIGKILL)
    killed.finish()
    out = finish_ok(Run(args, 1, tmp_path, "resumed", recipe=RECIPE))
    assert "resumed from" in out and "at step 3" in out
    after = read_metrics(run_dir)
    for step in (4, 5):
        assert after[step]["loss"] == before[step]["loss"], step
        assert after[step]["grad_norm"] == before[step]["grad_norm"], step


def test_the_tiny_recipe_learns_tasks_in_context(tmp_path, single_rank):
    """The tiny recipe (two tasks on the same inputs, raise and lower, so only the example pairs
    say which is meant) trained for its 400 steps; each held-out query is then sampled once with
    examples of either task (the release's sampler: 20 Euler steps, CFG 1.5 against the null
    condition), and the output must be closer in latent space to the right task's target than
    to the other's for at least 80% of the samples."""
    import numpy as np
    from conftest import read_metrics, run_fmtrain

    from fmtrain import parallel
    from fmtrain.checkpoint import load_model_weights
    from fmtrain.cli import main as fmtrain_main
    from fmtrain.config import WHOLE_MODEL_LAYOUT, load_config
    from fmtrain.data.tasks import SyntheticTasks, apply_latent_task
    from fmtrain.engine.parts import build_for_inference, family_module
    from fmtrain.models.lavin_dit.family import sample_latents
    from fmtrain.models.registry import get_family

    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", "eval.interval=100", "logging.tensorboard=false", "logging.peak_tflops=1.0"]
    run_fmtrain(args, recipe=RECIPE, timeout=900)
    metrics = read_metrics(run_dir)
    assert metrics[400]["val_loss"] < 0.5 * metrics[100]["val_loss"]

    cfg = load_config(RECIPE, WHOLE_MODEL_LAYOUT)
    tasks = SyntheticTasks.from_config(cfg)
    first, second = cfg.data.synthetic_tasks
    parallel.initialize(cfg)
    model = build_for_inference(cfg, get_family("lavin_dit").primary(cfg), torch.device("cpu"))
    load_model_weights(run_dir, model, cfg)
    model = family_module(model)
    rng = np.random.default_rng(0)
    correct, samples = 0, 0
    for i, query in enumerate(tasks.valid_queries[:16]):
        examples = [
            tasks.train_items[j] for j in rng.choice(len(tasks.train_items), cfg.data.task_pairs, replace=False)
        ]
        for task, other in ((first, second), (second, first)):
            sample = tasks.sample(query, task, examples)
            f = cfg.objective
            out = sample_latents(
                model,
                cfg,
                torch.from_numpy(sample["context"]),
                query_frames=1,
                target_frames=1,
                num=1,
                seed=i,
                steps=f.sample_steps,
                shift=f.sample_shift,
                guidance_scale=f.guidance_scale,
                device=torch.device("cpu"),
            )[0].numpy()
            right = np.mean((out - sample["target"]) ** 2)
            wrong = np.mean((out - apply_latent_task(other, tasks.items[query])) ** 2)
            correct += int(right < wrong)
            samples += 1
    parallel.destroy()
    assert correct >= 0.8 * samples, f"{correct}/{samples} closer to the task their examples show"

    # The same through the command line, from a context file: the sampler reads it and the CFG
    # settings as recipes give them.
    context = tmp_path / "context.npz"
    np.savez(context, context=tasks.sample(tasks.valid_queries[0], first, examples)["context"], item_frames=1)
    out = tmp_path / "prediction.npy"
    assert (
        fmtrain_main(["sample", str(RECIPE), "--ckpt", str(run_dir), "--prompt-emb", str(context), "--out", str(out)])
        == 0
    )
    assert np.load(out).shape == (1, cfg.model.in_channels, 1, cfg.data.task_latent_size, cfg.data.task_latent_size)
