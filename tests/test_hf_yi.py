"""Yi <-> Hugging Face Llama: import at (TP, PP) in {1, 2}^2 reproduces transformers' logits,
old Yi norm names import the same, and HF -> fmtrain -> HF is bit-exact.

A small random ``LlamaForCausalLM`` (GQA 8 heads / 2 KV heads, head_dim 8, 4 layers, SwiGLU
160, vocab 128, rope_theta 5e6, untied, fp32) is the reference. Its weights are drawn wider
than transformers' default (std 0.02 gives near-uniform attention, which would hide RoPE or
head-order mistakes) and its norm weights are random, so swapped norms would show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError, save_hf_checkpoint  # noqa: E402
from fmtrain.models.yi.convert import (  # noqa: E402
    YiShapes,
    fmtrain_model_overrides_from_hf,
    hf_config_from_fmtrain,
    pack_qkv,
    unpack_qkv,
)

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "hf_yi_worker.py"
sys.path.insert(0, str(REPO / "tests"))

TOL = 1e-5
BATCH, SEQ = 2, 16
HF_KW = dict(
    vocab_size=128,
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


def _hf_model(**overrides):
    cfg = transformers.LlamaConfig(**{**HF_KW, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def _hf_logits(model, tokens):
    return model(input_ids=tokens).logits.float()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The reference: a single-file and a sharded (index.json) save, tokens and logits."""
    root = tmp_path_factory.mktemp("hf_yi")
    model = _hf_model()
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="200KB")
    assert (single / "model.safetensors").is_file()
    assert (sharded / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, HF_KW["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    save_file({"tokens": tokens}, str(root / "tokens.safetensors"))
    return dict(root=root, model=model, single=single, sharded=sharded, tokens=tokens, logits=_hf_logits(model, tokens))


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with HFCheckpoint(path) as ckpt:
        return {name: ckpt[name] for name in ckpt.names}


def _assert_bit_exact(exported: Path, original: Path) -> None:
    got, want = _read_all(exported), _read_all(original)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


# ---------------------------------------------------------------------- pure mapping


def test_qkv_pack_is_megatron_grouping():
    s = YiShapes(num_layers=1, hidden=4, heads=4, groups=2, head_dim=1, ffn=8, vocab=8, tied=False)
    q = torch.arange(4.0).unsqueeze(1).expand(4, 4)  # rows q0 q1 q2 q3
    k = 10 + torch.arange(2.0).unsqueeze(1).expand(2, 4)  # rows k0 k1
    v = 20 + torch.arange(2.0).unsqueeze(1).expand(2, 4)  # rows v0 v1
    qkv = pack_qkv(q, k, v, s)
    # megatron: [q heads of group 0, k0, v0 | q heads of group 1, k1, v1]
    assert qkv[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(qkv, s), (q, k, v)))


def test_config_round_trip(hf):
    from fmtrain.config import load_config
    from fmtrain.models.release import overrides_as_args

    original = json.loads((hf["single"] / "config.json").read_text())
    overrides = fmtrain_model_overrides_from_hf(original)
    assert overrides["model.num_query_groups"] == 2 and overrides["model.head_dim"] == 8
    assert overrides["model.rotary_base"] == 5e6 and overrides["model.tie_embeddings"] is False
    cfg = load_config(None, overrides_as_args(overrides) + ["train.precision=fp32"])
    out = hf_config_from_fmtrain(cfg)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert out[key] == original[key], key
    assert out["torch_dtype"] == "float32" and out["rope_theta"] == 5e6
    back = transformers.LlamaConfig(**out)
    assert back.rope_parameters["rope_theta"] == 5e6 and back.num_key_value_heads == 2
    # Old Yi config (model_type "Yi", top-level rope_theta) and refusals.
    old = {**original, "model_type": "Yi", "architectures": ["YiForCausalLM"]}
    old.pop("rope_parameters", None)
    old["rope_theta"] = 5e6
    assert fmtrain_model_overrides_from_hf(old) == overrides
    from fmtrain.config import ConfigError

    for bad in (
        {"attention_bias": True},
        {"hidden_act": "gelu"},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            fmtrain_model_overrides_from_hf({**original, **bad})


def test_reader_refuses_pickles_unless_allowed(hf, tmp_path):
    state = load_file(str(hf["single"] / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="allow_pickle=True"):
        HFCheckpoint(tmp_path)
    with HFCheckpoint(tmp_path, allow_pickle=True) as ckpt:
        assert ckpt.names == frozenset(state)
        assert torch.equal(ckpt["lm_head.weight"], state["lm_head.weight"])
    # Sharded safetensors written by fmtrain read back the same, tensor by tensor.
    save_hf_checkpoint(state, tmp_path / "resharded", {"model_type": "llama"}, max_shard_bytes=100_000)
    assert len(list((tmp_path / "resharded").glob("model-*.safetensors"))) > 1
    assert _read_all(tmp_path / "resharded").keys() == state.keys()
    _assert_bit_exact(tmp_path / "resharded", hf["single"])
    with pytest.raises(HFCheckpointError, match="not empty"):
        save_hf_checkpoint(state, tmp_path / "resharded", {})


# ---------------------------------------------------------------------- fmtrain vs transformers


def test_import_tp1_pp1_logits_and_round_trip(hf, single_rank, tmp_path):
    from convert_helpers import load_hf_into_engine, save_hf
    from hf_yi_worker import build_config, forward_logits

    from fmtrain import parallel
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    # The comparison is sensitive to attention: RoPE theta alone moves transformers' logits.
    other_theta = _hf_logits(_hf_model(rope_theta=1e4), hf["tokens"])
    assert (other_theta - hf["logits"]).abs().max() > 1e-2

    cfg = build_config(hf["single"], 1, 1, BATCH, SEQ, world_size=1)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("yi"))
    load_hf_into_engine(engine, hf["single"])
    logits = forward_logits(engine, hf["tokens"])
    diff = (logits - hf["logits"]).abs().max().item()
    print(f"\nTP=1 PP=1: max |logits diff| = {diff:.3e} (max |logit| {hf['logits'].abs().max():.2f})")
    assert diff < TOL

    # HF -> fmtrain -> HF reproduces every tensor bit for bit, and transformers loads it.
    save_hf(engine.unwrapped_chunks(), cfg, tmp_path / "export")
    _assert_bit_exact(tmp_path / "export", hf["single"])
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(_hf_logits(again, hf["tokens"]), hf["logits"])

    # The first public Yi release named the per-layer norms ln1 / ln2.
    old = tmp_path / "old_names"
    old.mkdir()
    state = load_file(str(hf["single"] / "model.safetensors"))
    renamed = {
        k.replace(".input_layernorm.", ".ln1.").replace(".post_attention_layernorm.", ".ln2."): v
        for k, v in state.items()
    }
    assert any(".ln1." in k for k in renamed) and any(".ln2." in k for k in renamed)
    save_file(renamed, str(old / "model.safetensors"))
    (old / "config.json").write_text((hf["single"] / "config.json").read_text())
    for chunk in engine.unwrapped_chunks():  # forget the weights loaded above
        for p in chunk.parameters():
            p.data.zero_()
    load_hf_into_engine(engine, old)
    diff_old = (forward_logits(engine, hf["tokens"]) - hf["logits"]).abs().max().item()
    print(f"TP=1 PP=1, ln1/ln2 names: max |logits diff| = {diff_old:.3e}")
    assert diff_old < TOL

    # A checkpoint with the wrong tensors is refused before anything is copied.
    del renamed["model.layers.3.ln2.weight"]
    save_file(renamed, str(old / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match="model.layers.3.post_attention_layernorm.weight"):
        load_hf_into_engine(engine, old)


def test_packed_documents_match_transformers_per_document(hf, single_rank):
    """Two documents packed into one row (split after an EOS). With data.reset_position_ids and
    data.reset_attention_mask each document's logits are transformers' for that document alone;
    with reset_position_ids only, the row's logits are transformers' for the row with the same
    restarting position ids (attention crossing the boundary), and the second document's differ
    from its logits alone: the mask is what separates them."""
    from convert_helpers import load_hf_into_engine
    from hf_yi_worker import build_config

    from fmtrain import parallel
    from fmtrain.data.text import document_position_ids
    from fmtrain.engine import build_engine
    from fmtrain.models.attention import DocumentLayout
    from fmtrain.models.registry import get_family

    g = torch.Generator().manual_seed(3)
    eos = HF_KW["eos_token_id"]
    first = torch.cat([torch.randint(3, HF_KW["vocab_size"], (14,), generator=g), torch.tensor([eos])])
    second = torch.randint(3, HF_KW["vocab_size"], (25,), generator=g)
    row = torch.cat([first, second]).unsqueeze(0)
    positions = document_position_ids(row, eos)
    assert positions[0, 15] == 0 and positions[0, -1] == 24

    cfg = build_config(hf["single"], 1, 1, 1, row.shape[1], world_size=1, extra=["data.reset_position_ids=true"])
    engine = build_engine(cfg, parallel.initialize(cfg), get_family("yi"))
    load_hf_into_engine(engine, hf["single"])

    def logits(mask_documents: bool) -> torch.Tensor:
        def step(data_iterator, model):
            toks = next(data_iterator)["tokens"]
            documents = DocumentLayout.from_position_ids(positions, mask_documents)
            return model(toks, positions, None, packed_seq_params=documents), None

        return engine.forward_outputs([{"tokens": row}], forward_step=step)[0]

    masked, crossing = logits(True), logits(False)
    model = hf["model"]
    alone = [_hf_logits(model, first[None]), _hf_logits(model, second[None])]
    with torch.no_grad():
        whole_row = model(input_ids=row, position_ids=positions).logits.float()
    diffs = [(masked[:, :15] - alone[0]).abs().max().item(), (masked[:, 15:] - alone[1]).abs().max().item()]
    print(f"\npacked documents vs each alone: max |logits diff| = {max(diffs):.3e}")
    assert max(diffs) < TOL
    assert (crossing - whole_row).abs().max().item() < TOL
    assert (crossing[:, 15:] - alone[1]).abs().max().item() > 1e-2


def test_import_tp_pp_layouts_match_transformers(hf, tmp_path):
    """(TP, PP) = (2,1), (1,2), (2,2) and PP=2 x VPP=2 on 4 gloo ranks (DP = 2, 2, 1, 2), from a
    sharded (index.json) checkpoint. Exports from (2,2) (TP copies of the norms) and from
    (1,2) (DP copies of everything) must reproduce the checkpoint bit for bit."""
    out = tmp_path / "out"
    out.mkdir()
    layouts = ["2x1", "1x2", "2x2", "1x2x2"]
    exports = ["2x2", "1x2"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        str(WORKER),
        "--hf-dir",
        str(hf["sharded"]),
        "--tokens",
        str(hf["root"] / "tokens.safetensors"),
        "--out",
        str(out),
        "--layouts",
        ",".join(layouts),
        "--export",
        ",".join(exports),
    ]
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for layout in layouts:
        logits = load_file(str(out / f"logits_{layout}.safetensors"))["logits"]
        assert logits.shape == hf["logits"].shape
        diff = (logits - hf["logits"]).abs().max().item()
        print(f"\nTP x PP[x VPP] = {layout}: max |logits diff| = {diff:.3e}")
        assert diff < TOL, layout
    for layout in exports:
        _assert_bit_exact(out / f"export_{layout}", hf["single"])
    exported = json.loads((out / "export_2x2" / "config.json").read_text())
    assert exported["num_key_value_heads"] == 2 and exported["torch_dtype"] == "float32"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_import_survives_optimizer_step(hf, single_rank, precision):
    """With bf16 parameters the optimizer holds fp32 copies made at build time: an import must
    refresh them, or the first step (even at lr=0) restores the random initialisation."""
    from convert_helpers import load_hf_into_engine
    from hf_yi_worker import build_config

    from fmtrain import parallel
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = build_config(hf["single"], 1, 1, BATCH, SEQ, world_size=1)
    cfg.train.precision = precision
    engine = build_engine(cfg, parallel.initialize(cfg), get_family("yi"))
    load_hf_into_engine(engine, hf["single"])
    tokens = hf["tokens"]
    batch = [
        {"tokens": tokens[i : i + 1], "labels": tokens[i : i + 1], "loss_mask": torch.ones(1, SEQ)}
        for i in range(BATCH)
    ]
    result = engine.train_step(batch, lr=0.0)
    assert result.update_applied
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with HFCheckpoint(hf["single"]) as ckpt:
        model = engine.unwrapped_chunks()[0]
        assert torch.equal(model.output_layer.weight, ckpt["lm_head.weight"].to(dtype))
        assert torch.equal(model.embedding.word_embeddings.weight, ckpt["model.embed_tokens.weight"].to(dtype))
