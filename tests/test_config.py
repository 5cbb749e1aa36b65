"""Configuration errors are caught before any process starts, and name what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fmtrain.config import ConfigError, load_config, validate

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_overrides_are_typed():
    cfg = load_config(
        None, ["parallel.tp=2", "train.lr=1e-3", "logging.tensorboard=false", "run.dir=runs/x", "model.head_dim=null"]
    )
    assert cfg.parallel.tp == 2 and cfg.train.lr == 1e-3 and cfg.logging.tensorboard is False
    assert cfg.run.dir == "runs/x" and cfg.model.head_dim is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=3", "did you mean 'hidden_size'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("parallel.tp=two", "parallel.tp: expected int"),
        ("train.lr_schedule=linear", "is not one of cosine, wsd, constant"),
        ("parallel.cp=3", "model.num_attention_heads=4 is not divisible by parallel.tp x parallel.cp = 1 x 3 = 3"),
        ("parallel.tp=3", "not divisible by parallel.tp=3"),
        ("parallel.vpp=2", "needs parallel.pp > 1"),
        ("parallel.sequence_parallel=true", "needs parallel.tp > 1"),
        ("tp=2", "is not a section.key name"),
        ("data.reset_attention_mask=true", "needs data.reset_position_ids=true"),
    ],
)
def test_bad_override_names_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_per_document_positions_need_fmtrain_attention():
    with pytest.raises(ConfigError, match="not model.attention_backend=local; use sdpa or auto"):
        load_config(None, ["data.reset_position_ids=true", "model.attention_backend=local"])


def test_world_size_must_match_layout():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"])
    with pytest.raises(ConfigError, match=r"world size 6 != parallel.tp x parallel.pp x parallel.dp = 2 x 2 x 2 = 8"):
        validate(cfg, 6)
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2 = 4"):
        validate(cfg, 6)
    cfg = load_config(None, ["train.global_batch_size=6", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not divisible by .* = 2 x 2 = 4"):
        validate(cfg, 2)


def test_recipe_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'model.num_layer' \(did you mean 'num_layers'\?\)"
    ):
        load_config(bad)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")
    evil = tmp_path / "evil.yaml"
    evil.write_text("run: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipes_load(recipe):
    load_config(recipe)


def test_cli_refuses_bad_config_before_starting_ranks():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmtrain.cli",
            "train",
            "--nproc",
            "3",
            str(REPO / "recipes/yi/tiny.yaml"),
            "parallel.tp=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "world size 3" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # no rank was started


# The resolved config a checkpoint written before the families owned their sections carries
# (fmtrain_state.json): one flat model section listing every family's fields, a flow section,
# comma-separated lists. `fmtrain convert to-hf` and resumes read it back.
FLAT_MODEL_BEFORE_FAMILIES = {
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 4,
    "head_dim": 32,
    "ffn_hidden_size": 512,
    "vocab_size": 64000,
    "seq_length": 128,
    "rotary_base": 10000.0,
    "norm_epsilon": 1e-05,
    "init_method_std": 0.02,
    "tie_embeddings": False,
    "attention_backend": "auto",
    "recompute": "none",
    "fused_kernels": "auto",
    "init_from_hf": "",
    "in_channels": 8,
    "patch_size": 1,
    "caption_dim": 64,
    "caption_tokens": 8,
    "clip_dim": 32,
    "clip_tokens": 4,
    "rope_axes": "16,8,8",
    "caption_norm_affine": False,
}
FLOW_BEFORE_FAMILIES = {
    "timestep_sampling": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "shift": 3.0,
    "loss_weighting": "none",
    "l1_weight": 0.0,
    "text_drop_prob": 0.1,
    "sample_steps": 30,
    "sample_shift": 3.0,
    "guidance_scale": 2.0,
}


def test_configs_saved_before_families_owned_their_sections_still_load():
    from fmtrain.config import config_from_dict

    dit = config_from_dict(
        {
            "model": {"family": "step_video", **FLAT_MODEL_BEFORE_FAMILIES},
            "flow": FLOW_BEFORE_FAMILIES,
            "data": {"synthetic_latent_shapes": "2x8x8,2x8x4"},
        }
    )
    assert dit.objective.name == "flow_matching" and dit.objective.shift == 3.0 and dit.objective.sample_steps == 30
    assert dit.model.rope_axes == [16, 8, 8] and dit.model.in_channels == 8
    assert dit.data.synthetic_latent_shapes == [[2, 8, 8], [2, 8, 4]]
    assert not hasattr(dit.model, "vocab_size")  # the LLM fields of the flat section are dropped
    yi = config_from_dict(
        {
            "model": {**FLAT_MODEL_BEFORE_FAMILIES, "family": "yi", "head_dim": None, "rope_axes": "64,32,32"},
            "flow": FLOW_BEFORE_FAMILIES,
        }
    )
    assert yi.objective.name == "lm" and yi.model.vocab_size == 64000 and not hasattr(yi.model, "in_channels")
    # A recipe is not upgraded: an old key names its new place.
    with pytest.raises(ConfigError, match=r"'flow.shift' moved.*'objective.shift'"):
        load_config(None, ["model.family=step_video", "flow.shift=3"])
