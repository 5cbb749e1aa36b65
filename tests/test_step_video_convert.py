"""Step-Video-T2V DiT <-> the released checkpoint layout (``transformer/``).

A short real run of the tiny recipe at PP=2 writes the fmtrain checkpoint; ``export_step_video``
turns it into the release layout (small shards, so the index is exercised); importing that
(``fmtrain convert from-hf``, ``model.init_from_hf``, a TP=2 worker) reproduces every tensor;
the 30B names, shapes and parameter count come out of a meta-device build without
allocating; broken release files and configs are refused naming what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "step_video" / "dit_tiny.yaml"
WORKER = REPO / "tests" / "step_video_convert_worker.py"
sys.path.insert(0, str(REPO / "tests"))
ENV = {
    **os.environ,
    "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}
SMALL = [
    "train.global_batch_size=2",
    "train.micro_batch_size=1",
    "train.warmup_steps=1",
    "eval.interval=0",
    "logging.tensorboard=false",
]
TRANSFORMED = ("pos_embed.proj.weight", "proj_out.weight", "proj_out.bias")

# The released 30B transformer/config.json (StepVideoModel.__init__ defaults).
RELEASE_30B = {
    "_class_name": "StepVideoModel",
    "num_attention_heads": 48,
    "attention_head_dim": 128,
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 48,
    "dropout": 0.0,
    "patch_size": 1,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
    "caption_channels": [6144, 1024],
    "attention_type": "parallel",
}


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[2:6])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from fmtrain.checkpoint.hf.io import HFCheckpoint

    with HFCheckpoint(path) as ckpt:
        return {name: ckpt[name] for name in ckpt.names}


def _assert_bit_exact(got_dir: Path, want: dict[str, torch.Tensor]) -> None:
    got = _read_all(got_dir)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _tiny_cfg(*overrides: str):
    from fmtrain.config import load_config

    return load_config(RECIPE, SMALL + ["train.precision=fp32", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One training step of the tiny recipe at PP=2 (two ranks), saved: a real checkpoint."""
    run_dir = tmp_path_factory.mktemp("sv_convert") / "run"
    _run(
        [
            sys.executable,
            "-m",
            "fmtrain.cli",
            "train",
            "--nproc",
            "2",
            str(RECIPE),
            *SMALL,
            f"run.dir={run_dir}",
            "parallel.pp=2",
            "train.max_steps=1",
            "checkpoint.save_at_end=true",
        ]
    )
    state = json.loads((run_dir / "checkpoints" / "step_0000001" / "fmtrain_state.json").read_text())
    assert state["layout"]["pp"] == 2
    return run_dir / "checkpoints" / "step_0000001"


@pytest.fixture(scope="module")
def release(trained) -> Path:
    """The checkpoint exported to the release layout, in shards of at most 1 MB."""
    from convert_helpers import export_step_video

    out = trained.parent.parent.parent / "release"
    export_step_video(trained, out, max_shard_size="1MB")
    return out


# ---------------------------------------------------------------------- names, shapes, config


def test_key_shapes_for_30b_match_a_meta_build(single_rank):
    """The 30B model built on the meta device (nothing allocated): what export would write
    for each of its checkpoint tensors is exactly key_shapes_for_config, ~29.3B parameters."""
    import resource

    from fmtrain import parallel
    from fmtrain.checkpoint.hf.convert import converter
    from fmtrain.checkpoint.hf.layout import local_shards
    from fmtrain.config import load_config
    from fmtrain.models.registry import get_family
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.step_video import convert as sv

    cfg = load_config(
        None,
        overrides_as_args(sv.fmtrain_model_overrides_from_release(RELEASE_30B, 24576))
        + ["model.seq_length=4096", "train.precision=bf16"],
    )
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, cfg.head_dim, m.ffn_hidden_size) == (
        48,
        6144,
        48,
        128,
        24576,
    )
    assert (m.in_channels, m.patch_size, m.caption_dim, m.clip_dim, m.rope_axes, m.rotary_base) == (
        64,
        1,
        6144,
        1024,
        [64, 32, 32],  # a YAML list since families own their sections
        1e4,
    )
    expected = sv.key_shapes_for_config(cfg)
    assert converter("step_video") is sv

    parallel.initialize(cfg)
    family = get_family("step_video")
    spec = family.primary(cfg)
    tconfig = spec.megatron_config(cfg, params_dtype=torch.bfloat16, use_cpu=True)
    tconfig.use_cpu_initialization, tconfig.perform_initialization = True, False  # plain factories -> meta
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        chunk = spec.build(cfg, tconfig, pre_process=True, post_process=True, vp_stage=None)
    s = sv.shapes_from_config(cfg)
    exported: dict[str, tuple[int, ...]] = {}
    for shard in local_shards([chunk]):
        assert shard.data.is_meta and shard.index == () and tuple(shard.data.shape) == shard.global_shape
        for name, t in sv.hf_tensors_from_megatron(shard.key, shard.index, shard.data, s).items():
            assert name not in exported, name
            exported[name] = tuple(t.shape)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 512 * 1024  # KiB: nothing real
    assert exported == expected  # same names and shapes (dict equality ignores order)
    total = sum(torch.Size(shape).numel() for shape in expected.values())
    assert total == family.param_count(cfg) == 29_342_478_400
    assert len(expected) == 3 + 48 * 16 + 2 + 6 + 2 + 4  # 785
    print(f"\n30B: {len(expected)} release tensors, {total / 1e9:.3f}B parameters")

    # Spot checks against the release's module definitions.
    assert expected["pos_embed.proj.weight"] == (6144, 64, 1, 1)
    assert expected["adaln_single.emb.timestep_embedder.linear_1.weight"] == (6144, 256)
    assert expected["adaln_single.linear.weight"] == (36864, 6144)
    assert expected["caption_projection.linear_1.weight"] == (6144, 6144)
    assert expected["clip_projection.weight"] == (6144, 1024)
    assert expected["transformer_blocks.47.attn1.wqkv.weight"] == (18432, 6144)
    assert expected["transformer_blocks.47.attn2.wkv.weight"] == (12288, 6144)
    assert expected["transformer_blocks.47.attn1.q_norm.weight"] == (128,)
    assert expected["transformer_blocks.0.ff.net.0.proj.weight"] == (24576, 6144)
    assert expected["transformer_blocks.0.ff.net.2.weight"] == (6144, 24576)
    assert expected["transformer_blocks.0.scale_shift_table"] == (6, 6144)
    assert expected["scale_shift_table"] == (2, 6144) and expected["proj_out.weight"] == (64, 6144)
    assert "caption_norm.weight" not in expected and "norm_out.weight" not in expected
    assert "transformer_blocks.48.norm1.weight" not in expected
    assert sv.hf_config_from_fmtrain(cfg) == RELEASE_30B


def test_config_translation_and_refusals():
    from fmtrain.config import ConfigError
    from fmtrain.models.step_video import convert as sv
    from fmtrain.models.step_video.model import OUTER_NORM_EPS

    assert sv.RELEASE_NORM_EPS == OUTER_NORM_EPS
    cfg = _tiny_cfg()
    config_json = sv.hf_config_from_fmtrain(cfg)
    assert config_json["caption_channels"] == [64, 32] and config_json["attention_head_dim"] == 32
    sv.check_model_matches_hf(cfg, config_json, "R/config.json")
    # A config made from config.json (plus the FFN width) is the recipe's architecture.
    back = sv.fmtrain_model_overrides_from_release(config_json, 512)
    for key, value in back.items():
        field = key.split(".", 1)[1]
        have = cfg.head_dim if field == "head_dim" else getattr(cfg.model, field)
        assert have == value, key
    # Missing fields take the release defaults (as diffusers does); one encoder.
    assert sv.fmtrain_model_overrides_from_release({"caption_channels": 4096})["model.clip_dim"] == 0
    assert sv.fmtrain_model_overrides_from_release({})["model.hidden_size"] == 6144
    cfg_affine = _tiny_cfg("model.caption_norm_affine=true", "model.clip_dim=0", "model.clip_tokens=0")
    shapes = sv.key_shapes_for_config(cfg_affine)
    assert shapes["caption_norm.weight"] == (64,) and shapes["norm_out.weight"] == (128,)
    assert "clip_projection.weight" not in shapes
    assert sv.hf_config_from_fmtrain(cfg_affine)["caption_channels"] == 64

    for bad, field in (
        ({"num_layers": 5}, r"model.num_layers=4 .* R/config.json has num_layers=5"),
        ({"attention_head_dim": 16}, r"model.hidden_size=128 .* num_attention_heads x attention_head_dim=64"),
        ({"caption_channels": [64, 16]}, r"model.clip_dim=32 .* caption_channels\[1\]=16"),
        ({"norm_elementwise_affine": True}, r"model.caption_norm_affine=False .* norm_elementwise_affine"),
        ({"use_additional_conditions": True}, "use_additional_conditions"),
        ({"out_channels": 16}, "out_channels=16"),
        ({"norm_type": "ada_norm"}, "norm_type"),
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"_class_name": "Other"}, "_class_name"),
    ):
        with pytest.raises(ConfigError, match=field):
            sv.check_model_matches_hf(cfg, {**config_json, **bad}, "R/config.json")


def test_affine_norms_map_to_the_release(tmp_path):
    """model.caption_norm_affine <-> norm_elementwise_affine, which in the release also gives
    norm_out an affine: export writes the identity (ones / zeros), import requires it."""
    from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError
    from fmtrain.models.step_video import convert as sv

    cfg = _tiny_cfg("model.caption_norm_affine=true")
    s = sv.shapes_from_config(cfg)
    table = torch.randn(2, 128)
    out = sv.hf_tensors_from_megatron("scale_shift_table", (), table, s)
    assert torch.equal(out["scale_shift_table"], table)
    assert torch.equal(out["norm_out.weight"], torch.ones(128)) and torch.equal(out["norm_out.bias"], torch.zeros(128))
    tensors = {name: torch.randn(shape) for name, shape in sv.key_shapes_for_config(cfg).items()}
    tensors.update({"norm_out.weight": torch.ones(128), "norm_out.bias": torch.zeros(128)})
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with HFCheckpoint(tmp_path) as ckpt:
        sv.check_hf_names(ckpt, s)
    tensors["norm_out.weight"] = torch.full((128,), 2.0)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with HFCheckpoint(tmp_path) as ckpt, pytest.raises(HFCheckpointError, match="norm_out.weight in .* not all 1"):
        sv.check_hf_names(ckpt, s)


def test_patch_layouts_match_the_release_math():
    """pos_embed: fmtrain's Linear on (c, p, q) features == the release's Conv2d with the
    reshaped weight; proj_out: after the row permutation, the release's unpatchify
    (``n h w p q c -> n c h p w q``) of its output equals fmtrain's. Patch 2, so both matter."""
    from fmtrain.models.dit import patchify, unpatchify
    from fmtrain.models.step_video import convert as sv

    cfg = _tiny_cfg("model.patch_size=2", "data.synthetic_latent_shapes=[[2,8,8]]")
    s = sv.shapes_from_config(cfg)
    c, p, h = s.in_channels, s.patch, s.hidden
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, c, 1, 8, 6, generator=g, dtype=torch.float64)
    w = torch.randn(h, c * p * p, generator=g, dtype=torch.float64)
    conv_w = sv.hf_tensors_from_megatron("pos_embed.proj.weight", (), w, s)["pos_embed.proj.weight"]
    ours = patchify(latent, p) @ w.T  # [b, tokens, h]
    theirs = torch.nn.functional.conv2d(latent[:, :, 0], conv_w, stride=p).flatten(2).transpose(1, 2)
    assert torch.allclose(ours, theirs)
    assert torch.equal(sv.fmtrain_tensor_from_release("pos_embed.proj.weight", conv_w, s), w)

    wo = torch.randn(c * p * p, h, generator=g, dtype=torch.float64)
    bo = torch.randn(c * p * p, generator=g, dtype=torch.float64)
    x = torch.randn(1, 4 * 3, h, generator=g, dtype=torch.float64)  # one frame of 4 x 3 tokens
    ours = unpatchify(x @ wo.T + bo, (1, 4, 3), c, p)[:, :, 0]
    rel_w = sv.hf_tensors_from_megatron("proj_out.weight", (), wo, s)["proj_out.weight"]
    rel_b = sv.hf_tensors_from_megatron("proj_out.bias", (), bo, s)["proj_out.bias"]
    y = (x @ rel_w.T + rel_b).reshape(1, 4, 3, p, p, c)  # the release's unpatchify
    theirs = y.permute(0, 5, 1, 3, 2, 4).reshape(1, c, 4 * p, 3 * p)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    y = (x @ wo.T + bo).reshape(1, 4, 3, p, p, c)  # without the permutation: wrong pixels
    assert not torch.allclose(ours, y.permute(0, 5, 1, 3, 2, 4).reshape(1, c, 4 * p, 3 * p))
    assert torch.equal(sv.fmtrain_tensor_from_release("proj_out.weight", rel_w, s), wo)
    assert torch.equal(sv.fmtrain_tensor_from_release("proj_out.bias", rel_b, s), bo)


# ---------------------------------------------------------------------- export and import


def test_export_writes_the_release_layout(trained, release):
    from fmtrain.checkpoint.hf.convert import DistCheckpointReader
    from fmtrain.models.step_video import convert as sv

    cfg = _tiny_cfg()
    weights = release / "transformer"
    index = json.loads((weights / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in weights.iterdir()) == sorted(
        files + ["config.json", "diffusion_pytorch_model.safetensors.index.json"]
    )
    assert json.loads((weights / "config.json").read_text()) == sv.hf_config_from_fmtrain(cfg)

    exported = _read_all(weights)
    expected = sv.key_shapes_for_config(cfg)
    assert {name: tuple(t.shape) for name, t in exported.items()} == expected
    assert list(index["weight_map"]) == list(expected)  # written in release state-dict order
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    assert all(t.dtype == torch.float32 for t in exported.values())

    # Values: the identity on every tensor but the reshaped / permuted ones (patch 1: pure reshape).
    reader = DistCheckpointReader(trained)
    for name, t in exported.items():
        stored = reader.read(name, ())
        if name in TRANSFORMED:
            stored = stored.reshape(t.shape)
        assert torch.equal(t, stored), name


def test_release_round_trip_is_bit_exact(trained, release, tmp_path, capsys, single_rank):
    """Release -> fmtrain checkpoint (convert from-hf, no recipe: the config comes from
    config.json and the FFN width from the weights) -> release reproduces every tensor."""
    from fmtrain.checkpoint import read_state
    from fmtrain.cli import main

    original = _read_all(release / "transformer")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "from-hf", str(release), str(ckpt)]) == 0
    assert "each rank read at most 100.0%" in capsys.readouterr().out
    state = read_state(ckpt)
    model = state["config"]["model"]
    assert state["contents"] == ["model"] and state["step"] == 0
    assert (model["family"], model["ffn_hidden_size"], model["rope_axes"], model["rotary_base"]) == (
        "step_video",
        512,
        [16, 8, 8],
        1e4,
    )
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "back"), "--max-shard-size", "2MB"]) == 0
    _assert_bit_exact(tmp_path / "back" / "transformer", original)

    # bf16 export: every tensor rounded once, nothing else.
    from convert_helpers import export_step_video

    export_step_video(trained, tmp_path / "bf16", dtype="bf16")
    assert (tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()  # one shard
    low = _read_all(tmp_path / "bf16" / "transformer")
    assert all(low[n].dtype == torch.bfloat16 and torch.equal(low[n], t.bfloat16()) for n, t in original.items())


def test_import_at_tp2_gives_the_same_tensors(release, tmp_path):
    """Two ranks at TP=2 read their slices of the release: every local tensor equals its region
    of the release tensor, and each rank reads about half of the file. Then the release is
    written as a TP=2 fmtrain checkpoint and exported back, bit for bit."""
    out = tmp_path / "tp2.json"
    ckpt = tmp_path / "tp2_ckpt"
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(release),
            str(out),
            str(ckpt),
            str(RECIPE),
            *SMALL,
            "parallel.tp=2",
        ]
    )
    result = json.loads(out.read_text())
    print(f"\nTP=2 import: {result}")
    assert result["pieces"] == 2 * 81 and result["sliced"] == 2 * 4 * 7  # 7 split weights per block
    assert result["read_share"] < 0.6
    assert result["saved"], f"TP=2 checkpoint not written: {result.get('duplicate_main_replicas')}"
    from convert_helpers import export_step_video

    export_step_video(ckpt, tmp_path / "back")
    _assert_bit_exact(tmp_path / "back" / "transformer", _read_all(release / "transformer"))


def test_init_from_release_then_train(release, tmp_path, single_rank):
    """model.init_from_hf with a step_video engine (per-rank slices, generic hook), and the
    optimizer's fp32 main weights follow: a step at lr=0 keeps the release's weights."""
    from convert_helpers import load_step_video_into_engine
    from dit_worker import fixed_microbatches

    from fmtrain import parallel
    from fmtrain.checkpoint.hf.convert import init_from_hf
    from fmtrain.checkpoint.hf.io import HFCheckpoint
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = _tiny_cfg("train.precision=bf16")
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("step_video"))
    cfg.model.init_from_hf = str(release)
    logs: list[str] = []
    assert init_from_hf(cfg, tmp_path / "run", engine, topo, log=logs.append)
    assert "Step-Video" in logs[-1]
    model = engine.unwrapped_chunks()[0]
    with HFCheckpoint(release / "transformer") as ckpt:

        def check():
            params = dict(model.named_parameters())
            assert torch.equal(
                params["transformer_blocks.2.attn1.wqkv.weight"],
                ckpt["transformer_blocks.2.attn1.wqkv.weight"].bfloat16(),
            )
            assert torch.equal(
                params["pos_embed.proj.weight"], ckpt["pos_embed.proj.weight"].reshape(128, 8).bfloat16()
            )
            assert torch.equal(params["scale_shift_table"], ckpt["scale_shift_table"].bfloat16())

        check()
        shapes = [(2, 8, 8), (2, 8, 4)]
        result = engine.train_step(fixed_microbatches(cfg, shapes, 1, seed=3), lr=0.0)
        assert result.update_applied and torch.isfinite(torch.tensor(result.loss))
        check()
        for p in model.parameters():
            p.data.zero_()
        assert load_step_video_into_engine(engine, release) > 0
        check()


def test_broken_release_files_are_refused(release, tmp_path, capsys):
    """Missing, unexpected and wrong-shape tensors, a different FFN width and a config.json
    that disagrees with the recipe: each names what is wrong, before any rank starts."""
    from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError
    from fmtrain.cli import main
    from fmtrain.models.step_video import convert as sv

    original = _read_all(release / "transformer")
    config_text = (release / "transformer" / "config.json").read_text()
    s = sv.shapes_from_config(_tiny_cfg())

    def broken(name: str, tensors: dict, config: str = config_text) -> Path:
        root = tmp_path / name
        (root / "transformer").mkdir(parents=True)
        save_file(tensors, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
        (root / "transformer" / "config.json").write_text(config)
        return root

    def refused(root: Path, *needles: str, recipe: bool = True, extra: tuple = ()) -> str:
        args = ["convert", "from-hf", str(root), str(tmp_path / "never")]
        assert main(args + (["--recipe", str(RECIPE)] if recipe else []) + list(extra)) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)
        assert not (tmp_path / "never").exists()
        return err

    # The diffusers single-file layout reads (index-less); a good copy passes the checks.
    good = broken("good", original)
    with HFCheckpoint(good / "transformer") as ckpt:
        sv.check_hf_names(ckpt, s)

    wrong = dict(original)
    wrong["transformer_blocks.1.attn2.wkv.weight"] = torch.zeros(128, 128)
    root = broken("wrong_shape", wrong)
    with HFCheckpoint(root / "transformer") as ckpt, pytest.raises(HFCheckpointError) as exc:
        sv.check_hf_names(ckpt, s)
    assert (
        "transformer_blocks.1.attn2.wkv.weight in diffusion_pytorch_model.safetensors has shape (128, 128)"
        in str(exc.value)
    ) and "expects (256, 128)" in str(exc.value)
    refused(
        root, "transformer_blocks.1.attn2.wkv.weight", "(128, 128)", "(256, 128)", "diffusion_pytorch_model.safetensors"
    )

    missing = {k: v for k, v in original.items() if k != "transformer_blocks.3.attn1.k_norm.weight"}
    refused(
        broken("missing", missing),
        "missing 1 tensor(s): transformer_blocks.3.attn1.k_norm.weight (expected shape (32,))",
    )

    extra = {**original, "transformer_blocks.4.norm1.weight": torch.ones(128)}
    refused(
        broken("unexpected", extra),
        "1 unexpected tensor(s): transformer_blocks.4.norm1.weight "
        "(in diffusion_pytorch_model.safetensors, shape (128,))",
    )

    # The recipe's FFN width is not the checkpoint's (config.json cannot say; the weights do).
    refused(
        good,
        "model.ffn_hidden_size=256 does not match the checkpoint",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "(512, 128)",
        "(256, 128)",
        extra=("model.ffn_hidden_size=256",),
    )

    # config.json disagrees with the recipe: the field and both values.
    other = json.loads(config_text)
    other["num_layers"] = 6
    refused(
        broken("config", original, json.dumps(other)),
        "model.num_layers=4 does not match the checkpoint",
        "config.json has num_layers=6",
        "dit_tiny.yaml",
    )
    # Without a recipe the same files convert as a 6-layer model, whose blocks 4-5 are missing.
    refused(tmp_path / "config", "missing 32 tensor(s)", "transformer_blocks.4.", recipe=False)
    shutil.rmtree(tmp_path / "config")
