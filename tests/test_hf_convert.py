"""``fmtrain convert from-hf / to-hf`` and ``model.init_from_hf`` against transformers, through the CLI.

The flow of issue 5 with real processes: a random ``LlamaForCausalLM`` (GQA, untied, rope theta
5e6, fp32; wide weights so that mistakes in RoPE or head order show) saved by transformers ->
``fmtrain convert from-hf --nproc 2 parallel.tp=2`` -> ``fmtrain train --nproc 2`` at PP=2 from
that checkpoint -> ``fmtrain convert to-hf`` -> transformers loads the export and its logits
match fmtrain's; the exported tokenizer encodes like SentencePiece; HF -> fmtrain -> HF without
training is bit-exact; pickles are refused without --allow-pickle; a recipe that does not
match the checkpoint is refused naming the field.
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

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY_OVERRIDES, read_metrics, run_fmtrain  # noqa: E402

from fmtrain.cli import main as fmtrain_main  # noqa: E402

TOL = 1e-5
BATCH, SEQ = 2, 16
HF_KW = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=5e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
TEXTS = [
    "To be, or not to be: that is the question.",
    "  two leading spaces",
    "a  b   c ",
    "ROMEO:\nBut, soft! what light\n\n",
    "digits 12345 and 3.14",
    "héllo wörld ☃ 你好",
    "\ttab",
    " ",
    "",
    "literal <|endoftext|> and <unk> stay text",
    "<|startoftext|>x",
]


def _fmtrain(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "fmtrain.cli", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fmtrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _hf_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)
    return model.to(dtype)


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    from fmtrain.checkpoint.hf.io import HFCheckpoint

    with HFCheckpoint(path) as ckpt:
        return {name: ckpt[name] for name in ckpt.names}


def _assert_bit_exact(exported: Path, original: Path) -> None:
    got, want = _read_all(exported), _read_all(original)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _arch_overrides(hf_dir: Path) -> list[str]:
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.yi.convert import fmtrain_model_overrides_from_hf

    return overrides_as_args(fmtrain_model_overrides_from_hf(json.loads((hf_dir / "config.json").read_text())))


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tiny_tokenizer):
    """The reference checkpoint (sharded, with the run's tokenizer), tokens and its logits."""
    root = tmp_path_factory.mktemp("hf_convert")
    model = _hf_model()
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir, max_shard_size="200KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    shutil.copy2(tiny_tokenizer, hf_dir / "tokenizer.model")
    tokens = torch.randint(0, HF_KW["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    return dict(root=root, dir=hf_dir, tokens=tokens, logits=logits, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def converted(hf):
    """``fmtrain convert from-hf`` at (TP, PP) = (2, 1) on two ranks."""
    out = hf["root"] / "converted"
    proc = _fmtrain("convert", "from-hf", str(hf["dir"]), str(out), "--nproc", "2", "parallel.tp=2")
    state = json.loads((out / "fmtrain_state.json").read_text())
    assert state["step"] == 0 and state["contents"] == ["model"]
    assert state["layout"]["tp"] == 2 and (out / "tokenizer.model").is_file()
    return dict(dir=out, stdout=proc.stdout)


@pytest.fixture(scope="module")
def trained(hf, converted):
    """Three steps of ``fmtrain train`` at PP=2 (a layout other than the conversion's) from it."""
    run_dir = hf["root"] / "run"
    run_fmtrain(
        TINY_OVERRIDES
        + _arch_overrides(hf["dir"])
        + [
            f"data.tokenizer={hf['tokenizer']}",
            f"run.dir={run_dir}",
            "parallel.pp=2",
            "train.max_steps=3",
            "train.warmup_steps=1",
            "checkpoint.save_at_end=true",
            f"checkpoint.load={converted['dir']}",
        ],
        nproc=2,
    )
    return run_dir


# ---------------------------------------------------------------------- tokenizer


def test_exported_tokenizer_encodes_like_sentencepiece(tiny_tokenizer, tmp_path):
    """Both SentencePiece flavours: with a dummy prefix (fmtrain's, Llama's) and without (Yi's)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from fmtrain.data.hf_tokenizer import write_hf_tokenizer
    from fmtrain.data.text import read_documents

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tiny_tokenizer).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    no_prefix = tmp_path / "no_prefix.model"
    no_prefix.write_bytes(proto.SerializeToString())
    texts = TEXTS + read_documents("builtin:shakespeare")[:20]
    for model_file, expected_class in (
        (Path(tiny_tokenizer), "PreTrainedTokenizerFast"),
        (no_prefix, "LlamaTokenizer"),
    ):
        out = tmp_path / model_file.stem
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        write_hf_tokenizer(model_file, out, model_max_length=64)
        config = json.loads((out / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == expected_class
        assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
            "<|startoftext|>",
            "<|endoftext|>",
            "<unk>",
        )
        assert config["add_bos_token"] is False and config["add_eos_token"] is False
        tok = transformers.AutoTokenizer.from_pretrained(out)
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        for text in texts:
            assert tok.encode(text) == sp.encode(text), (expected_class, text[:60])
            assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), (expected_class, text[:60])


# ---------------------------------------------------------------------- refusals


def test_refuses_pickles_and_mismatched_recipes(hf, tmp_path, capsys, single_rank):
    from fmtrain.cli import main

    # .bin is refused with a message naming the flag; with the flag it converts (one rank here).
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(hf["dir"] / "config.json", pickled / "config.json")
    torch.save(_read_all(hf["dir"]), pickled / "pytorch_model.bin")
    assert main(["convert", "from-hf", str(pickled), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "--allow-pickle" in err and "pickled" in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", "from-hf", str(pickled), str(tmp_path / "out"), "--allow-pickle"]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    _assert_bit_exact(tmp_path / "back", hf["dir"])

    # A recipe (or an override) that disagrees with config.json names the field and both values.
    tiny = str(REPO / "recipes" / "yi" / "tiny.yaml")
    assert main(["convert", "from-hf", str(hf["dir"]), str(tmp_path / "x"), "--recipe", tiny]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_size=256" in err and "hidden_size=64" in err and "tiny.yaml" in err
    assert main(["convert", "from-hf", str(hf["dir"]), str(tmp_path / "x"), "model.num_query_groups=4"]) == 2
    assert "model.num_query_groups=4" in capsys.readouterr().err
    assert main(["convert", "from-hf", str(hf["dir"]), str(tmp_path / "out")]) == 2  # exists, not empty
    assert "--overwrite" in capsys.readouterr().err

    # The continued-pretraining recipe matches Yi-6B's config.json (as released), not Yi-34B's.
    from fmtrain.config import ConfigError, load_config
    from fmtrain.models.yi.convert import check_model_matches_hf

    yi_6b = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 5000000.0,
        "vocab_size": 64000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    continue_6b = load_config(REPO / "recipes" / "yi" / "continue_6b.yaml")
    check_model_matches_hf(continue_6b, yi_6b, "Yi-6B/config.json")
    yi_34b = {
        **yi_6b,
        "hidden_size": 7168,
        "intermediate_size": 20480,
        "num_hidden_layers": 60,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
    }
    with pytest.raises(ConfigError, match=r"model.num_layers=32 .* num_hidden_layers=60"):
        check_model_matches_hf(continue_6b, yi_34b, "Yi-34B/config.json")


# ---------------------------------------------------------------------- round trips


def test_hf_fmtrain_hf_is_bit_exact(hf, converted, tmp_path):
    """The TP=2 checkpoint back to HF (one process, small shards) reproduces every tensor."""
    import re

    share = float(re.search(r"each rank read at most ([\d.]+)%", converted["stdout"]).group(1))
    assert share < 60.0, converted["stdout"]  # TP=2: each rank read about half of the checkpoint
    from fmtrain.cli import main

    out = tmp_path / "export"
    assert main(["convert", "to-hf", str(converted["dir"]), str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_bit_exact(out, hf["dir"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=hf["tokens"]).logits, hf["logits"])


def test_bf16_round_trip(tmp_path, single_rank):
    """bf16 stays bf16 by default (bit-exact); --dtype fp32 widens it exactly."""
    from fmtrain.cli import main

    src = tmp_path / "bf16"
    _hf_model(torch.bfloat16).save_pretrained(src)
    assert main(["convert", "from-hf", str(src), str(tmp_path / "ckpt"), "parallel.tp=1"]) == 0
    assert json.loads((tmp_path / "ckpt" / "fmtrain_state.json").read_text())["source"]["dtype"] == "bf16"
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    _assert_bit_exact(tmp_path / "back", src)
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), str(tmp_path / "wide"), "--dtype", "fp32"]) == 0
    wide, original = _read_all(tmp_path / "wide"), _read_all(src)
    assert all(wide[n].dtype == torch.float32 and torch.equal(wide[n], t.float()) for n, t in original.items())


def test_bf16_run_exports_its_fp32_main_weights(hf, tmp_path, capsys, single_rank):
    """A bf16 run (model.init_from_hf, one step, saved): --dtype bf16 exports the bf16 weights,
    --dtype fp32 the optimizer's fp32 main weights, which round to exactly those."""
    from fmtrain.cli import main
    from fmtrain.config import load_config
    from fmtrain.train.loop import train

    run_dir = tmp_path / "run"
    train(
        load_config(
            REPO / "recipes" / "yi" / "tiny.yaml",
            TINY_OVERRIDES
            + _arch_overrides(hf["dir"])
            + [
                f"data.tokenizer={hf['tokenizer']}",
                f"run.dir={run_dir}",
                "train.max_steps=1",
                "train.warmup_steps=0",
                "train.precision=bf16",
                "checkpoint.save_at_end=true",
                f"model.init_from_hf={hf['dir']}",
            ],
        )
    )
    assert main(["convert", "to-hf", str(run_dir), str(tmp_path / "bf16")]) == 0  # default: as stored
    assert main(["convert", "to-hf", str(run_dir), str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert "from the optimizer's fp32 main weights" in capsys.readouterr().out
    low, high = _read_all(tmp_path / "bf16"), _read_all(tmp_path / "fp32")
    assert all(t.dtype == torch.bfloat16 for t in low.values()) and all(t.dtype == torch.float32 for t in high.values())
    assert all(torch.equal(high[name].bfloat16(), t) for name, t in low.items())
    assert any(not torch.equal(high[name], t.float()) for name, t in low.items())


# ---------------------------------------------------------------------- train, export, compare


def test_train_from_hf_then_export_matches_transformers(hf, converted, trained, tmp_path, single_rank):
    from hf_yi_worker import build_config, forward_logits

    from fmtrain import checkpoint, parallel
    from fmtrain.checkpoint.hf.convert import init_from_hf
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.train.loop import train

    def max_diff(a, b) -> float:
        return (a - b).abs().max().item()

    cfg = build_config(hf["dir"], 1, 1, BATCH, SEQ, world_size=1)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("yi"))
    logs: list[str] = []

    # The model-only checkpoint written at TP=2 loads at TP=1 with a fresh optimizer.
    cfg.checkpoint.load = str(converted["dir"])
    assert checkpoint.resume(cfg, tmp_path / "fresh", engine, topo, log=logs.append) == 0
    assert "fresh optimizer" in logs[-1]
    diff = max_diff(forward_logits(engine, hf["tokens"]), hf["logits"])
    print(f"\nconverted (TP=2) loaded at TP=1: max |logits diff| = {diff:.3e}")
    assert diff < TOL

    # model.init_from_hf loads the same weights straight from the HF directory ...
    for chunk in engine.unwrapped_chunks():
        for p in chunk.parameters():
            p.data.zero_()
    cfg.checkpoint.load, cfg.model.init_from_hf = "", str(hf["dir"])
    assert init_from_hf(cfg, tmp_path / "fresh", engine, topo, log=logs.append)
    assert max_diff(forward_logits(engine, hf["tokens"]), hf["logits"]) < TOL
    # ... but not for a run that has its own checkpoint.
    assert not init_from_hf(cfg, trained, engine, topo, log=logs.append)

    # The trained run (PP=2): checkpoint.load names the initial weights, the run continues its own.
    cfg.model.init_from_hf, cfg.checkpoint.load = "", str(converted["dir"])
    assert checkpoint.resume(cfg, trained, engine, topo, log=logs.append) == 3
    assert any("continues from its own" in line for line in logs)
    fmtrain_logits = forward_logits(engine, hf["tokens"])

    out = tmp_path / "export"
    to_hf = ["convert", "to-hf", str(trained / "checkpoints" / "step_0000003"), str(out), "--dtype", "fp32"]
    assert fmtrain_main(to_hf) == 0  # one process, no process group: in this one
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        exported_logits = model(input_ids=hf["tokens"]).logits.float()
    diff = max_diff(exported_logits, fmtrain_logits)
    print(f"after 3 steps at PP=2, export vs fmtrain at TP=1: max |logits diff| = {diff:.3e}")
    assert diff < TOL
    assert max_diff(exported_logits, hf["logits"]) > 1e-3  # training moved the model ...
    exported, original = _read_all(out), _read_all(hf["dir"])
    moved = max(max_diff(exported[name], t) for name, t in original.items())
    assert moved < 0.1  # ... from the imported weights, not from a random initialisation

    import sentencepiece as spm

    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(hf["tokenizer"]))
    assert all(tok.encode(text) == sp.encode(text) for text in TEXTS)

    # One step of `train` in this process with model.init_from_hf at TP=1 sees the loss the
    # two-rank PP=2 run from the converted checkpoint saw at its first step.
    run_cfg = load_config(
        REPO / "recipes" / "yi" / "tiny.yaml",
        TINY_OVERRIDES
        + _arch_overrides(hf["dir"])
        + [
            f"data.tokenizer={hf['tokenizer']}",
            f"run.dir={tmp_path / 'run'}",
            "train.max_steps=1",
            "train.warmup_steps=1",
            f"model.init_from_hf={hf['dir']}",
        ],
    )
    metrics = train(run_cfg)
    first = read_metrics(trained)[1]["loss"]
    print(f"step-1 loss: init_from_hf at TP=1 {metrics['loss']:.6f}, converted checkpoint at PP=2 {first:.6f}")
    assert abs(metrics["loss"] - first) < 1e-4


def test_an_fmtrain_yi_checkpoint_encodes_captions_as_its_hf_export(hf, converted, tmp_path):
    """``data encode --llm-encoder CKPT``: an fmtrain Yi checkpoint (here TP=2) is exported once
    under OUT/.encode and its last hidden states are those of transformers' LlamaModel of the
    original weights, for the caption's tokens (no BOS added beyond the tokenizer's own)."""
    from fmtrain.encode import TextEncoder, llm_encoder_dir

    folder = llm_encoder_dir(converted["dir"], tmp_path, rank=0)
    assert folder == tmp_path / ".encode" / "llm-hf" and (folder / "config.json").is_file()
    encoder = TextEncoder(folder, tokens=8, device=torch.device("cpu"), what="--llm-encoder")
    caption = "ROMEO: But, soft! what light through yonder window breaks?"
    got = encoder(caption)
    ids = encoder.tokenizer(caption, truncation=True, max_length=8, return_tensors="pt")["input_ids"]
    assert got.shape == (min(ids.shape[1], 8), HF_KW["hidden_size"])
    reference = transformers.LlamaModel.from_pretrained(hf["dir"]).eval()
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state[0].numpy()
    assert abs(got - want).max() < 1e-5
