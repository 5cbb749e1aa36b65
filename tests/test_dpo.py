"""DPO for the LLM (``objective.name=dpo``): the loss against TRL's formulas on transformers'
log-probs, preference data (tokenization, truncation, bad records), layout equivalence, exact
resume and learning a preference rule."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, Run, finish_ok, read_metrics, run_fmtrain

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(REPO / "tests"))

DPO_RECIPE = REPO / "recipes" / "yi" / "dpo_tiny.yaml"
SEQ = 32

# transformers' Llama with the shapes of TINY_OVERRIDES (vocabulary = the tiny tokenizer's 512).
HF_KW = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=5e6,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def _hf_llama(seed: int, **overrides):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **overrides})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two different Hugging Face Llama directories: the policy's start and the reference."""
    root = tmp_path_factory.mktemp("dpo_llamas")
    models = {"policy": _hf_llama(0), "reference": _hf_llama(1)}
    for name, model in models.items():
        model.save_pretrained(root / name, safe_serialization=True)
    return root, models


@pytest.fixture(scope="module")
def preference_shards(tmp_path_factory):
    from fmtrain.data.preference import write_synthetic_preference

    root = tmp_path_factory.mktemp("preference")
    train, valid = write_synthetic_preference(root, pairs=256, valid_pairs=64, seed=3, progress=False)
    return train, valid


def _records(n: int, seed: int = 5) -> list[dict]:
    from fmtrain.data.preference import synthetic_preference_records

    records = synthetic_preference_records(n, seed)
    records[1]["chosen"] += " and a much longer chosen answer than the rest, which must not change anything"
    return records


def _trl_reference(models, batch, beta, loss, label_smoothing, sft_weight):
    """TRL's DPOTrainer formulas on transformers' log-probs of the same token ids."""
    rows = batch["tokens"].shape[0]
    n = rows // 2
    logps, tokens = {}, batch["loss_mask"].sum(1)
    with torch.no_grad():
        for name, model in models.items():
            logits = model(input_ids=batch["tokens"]).logits.float()
            per_token = torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
            summed = (per_token * batch["loss_mask"]).sum(1)
            logps[name] = summed / tokens if loss == "ipo" else summed  # TRL: ipo averages over tokens
            if name == "policy":
                nll = -(per_token * batch["loss_mask"])[:n].sum(1) / tokens[:n]
    pc, pr, rc, rr = logps["policy"][:n], logps["policy"][n:], logps["reference"][:n], logps["reference"][n:]
    logits = (pc - pr) - (rc - rr)
    if loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (
            -torch.nn.functional.logsigmoid(beta * logits) * (1 - label_smoothing)
            - torch.nn.functional.logsigmoid(-beta * logits) * label_smoothing
        )
    losses = losses + sft_weight * nll
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "loss": losses,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": pc,
        "logps/rejected": pr,
    }


@pytest.mark.parametrize(
    "loss,label_smoothing,sft_weight,packing",
    [("sigmoid", 0.0, 0.0, False), ("sigmoid", 0.2, 0.5, False), ("ipo", 0.0, 0.0, False), ("ipo", 0.0, 0.5, True)],
    ids=["sigmoid", "cdpo-rpo", "ipo", "ipo-rpo-packed"],
)
def test_step_one_equals_trl_formulas_on_transformers_logprobs(
    llamas, tiny_tokenizer, single_rank, tmp_path, loss, label_smoothing, sft_weight, packing
):
    """Policy and reference from two different HF Llama directories: fmtrain's step-1 loss and
    rewards over 2 microbatches of 2 pairs equal TRL's formulas on transformers' log-probs (each
    sequence alone through the model). Packed (``objective.packing``): the 4 sequences of a
    microbatch share rows, each with its own positions and attention; the numbers do not move."""
    from convert_helpers import load_hf_into_engine

    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.data.preference import PreferencePipeline, pair_batch
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.yi.convert import fmtrain_model_overrides_from_hf

    root, models = llamas
    beta = 0.3
    seq = 2 * SEQ if packing else SEQ  # rows long enough to hold several sequences
    overrides = fmtrain_model_overrides_from_hf(json.loads((root / "policy" / "config.json").read_text()))
    cfg = load_config(
        None,
        ["objective.name=dpo"]
        + overrides_as_args(overrides)
        + [
            f"model.seq_length={seq}",
            f"model.init_from_hf={root / 'policy'}",
            f"data.tokenizer={tiny_tokenizer}",
            f"objective.reference={root / 'reference'}",
            f"objective.beta={beta}",
            f"objective.loss={loss}",
            f"objective.label_smoothing={label_smoothing}",
            f"objective.sft_weight={sft_weight}",
            f"objective.packing={str(packing).lower()}",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            f"run.dir={tmp_path}",
        ],
    )
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("yi"))
    load_hf_into_engine(engine, root / "policy")
    assert checkpoint.load_frozen_parts(cfg, engine, log=lambda message: None) == 1

    pipeline = PreferencePipeline(tiny_tokenizer, seq)
    records = _records(4)
    microbatches = [pair_batch(pipeline, records[:2]), pair_batch(pipeline, records[2:])]
    trained = microbatches
    if packing:
        packed = PreferencePipeline.from_config(cfg, tiny_tokenizer)
        trained = [pair_batch(packed, records[:2]), pair_batch(packed, records[2:])]
        assert [batch["tokens"].shape[0] for batch in trained] < [4, 4], "nothing was packed"
        assert int(trained[0]["sequence_index"].max()) == 3 and trained[0]["sequences"] == 4
    result = engine.train_step(trained, 1e-3, step=0)

    want = {name: [] for name in ("loss", "rewards/chosen")}
    for batch in microbatches:
        for name, value in _trl_reference(models, batch, beta, loss, label_smoothing, sft_weight).items():
            want.setdefault(name, []).append(value)
    want = {name: torch.cat(values).mean().item() for name, values in want.items()}
    print(f"\n{loss} ls={label_smoothing} sft={sft_weight}: fmtrain {result.loss:.8f}, TRL formula {want['loss']:.8f}")
    assert abs(result.loss - want["loss"]) < 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(result.extra[name] - want[name]) < 1e-5 * max(1.0, abs(want[name])), name
    assert result.extra["rewards/accuracies"] == want["rewards/accuracies"]
    # The two models really differ (else every reward would be 0 and the check vacuous).
    assert abs(want["rewards/margins"]) > 1e-3 and abs(want["rewards/chosen"]) > 1e-3


def test_pairs_tokenized_and_truncated_as_trl(tiny_tokenizer):
    from fmtrain.data.preference import PreferencePipeline, pair_batch, truncate
    from fmtrain.data.stream import BadSample
    from fmtrain.data.text import EOS_ID, load_tokenizer

    sp = load_tokenizer(tiny_tokenizer)
    record = {"prompt": "repeat: king queen ->", "chosen": " king queen", "rejected": " storm moon heaven"}
    prompt = sp.encode(record["prompt"])
    batch = pair_batch(PreferencePipeline(tiny_tokenizer, SEQ), [record, record])
    assert batch["tokens"].shape == (4, SEQ)
    for row, name in ((0, "chosen"), (1, "chosen"), (2, "rejected"), (3, "rejected")):
        completion = sp.encode(record[name]) + [EOS_ID]
        sequence = prompt + completion
        assert batch["tokens"][row, : len(sequence) - 1].tolist() == sequence[:-1]
        # The mask keeps exactly the labels that are completion tokens (EOS included).
        assert batch["labels"][row][batch["loss_mask"][row].bool()].tolist() == completion
    # keep_end keeps the last tokens, keep_start the first; the prompt share follows.
    assert truncate([1, 2, 3, 4], [5, 6, 7], 5, "keep_end")[0].tolist() == [3, 4, 5, 6, 7]
    assert truncate([1, 2, 3, 4], [5, 6, 7], 5, "keep_end")[1] == 2
    assert truncate([1, 2, 3, 4], [5, 6, 7], 5, "keep_start")[0].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(BadSample, match="objective.truncation=none"):
        truncate([1, 2, 3, 4], [5, 6, 7], 5, "none")
    short = PreferencePipeline(tiny_tokenizer, 8, truncation="keep_start")
    with pytest.raises(BadSample, match="no chosen completion token"):
        short.encode_pair("repeat: " + "king queen lord " * 8, " king", " queen")
    long_completion = PreferencePipeline(tiny_tokenizer, 8)
    chosen, chosen_prompt, _, _ = long_completion.encode_pair("repeat: king ->", " king " * 20, " queen")
    assert len(chosen) == 9 and chosen[-1] == EOS_ID and chosen_prompt == 0


def test_bad_preference_records(tmp_path, tiny_tokenizer):
    from fmtrain.data.preference import PreferencePipeline, write_preference_shards
    from fmtrain.data.shards import BadDataError
    from fmtrain.data.stream import BadSample, SampleContext

    source = tmp_path / "pairs.jsonl"
    source.write_text(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "chosen": "b"})
    )
    with pytest.raises(BadDataError, match=r"pairs.jsonl:2: record has no 'rejected'"):
        write_preference_shards(source, tmp_path / "out", progress=False)
    source.write_text(json.dumps({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}))
    with pytest.raises(BadDataError, match="'prompt' is a list.*need --chat-template"):
        write_preference_shards(source, tmp_path / "out", progress=False)
    ctx = SampleContext(seed=0, epoch=0, stream=0, index=0, shard="shard-000000.tar", key="k")
    with pytest.raises(BadSample, match="missing field: rejected.txt"):
        PreferencePipeline(tiny_tokenizer, SEQ).units({"prompt.txt": b"a", "chosen.txt": b"b"}, ctx)


def test_reference_of_another_shape_is_refused(llamas, tmp_path_factory, tiny_tokenizer, single_rank, tmp_path):
    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.yi.convert import fmtrain_model_overrides_from_hf

    root, _ = llamas
    wider = tmp_path_factory.mktemp("wider") / "reference"
    _hf_llama(2, intermediate_size=192).save_pretrained(wider, safe_serialization=True)
    overrides = fmtrain_model_overrides_from_hf(json.loads((root / "policy" / "config.json").read_text()))
    cfg = load_config(
        None,
        ["objective.name=dpo"]
        + overrides_as_args(overrides)
        + [f"model.seq_length={SEQ}", f"objective.reference={wider}", "train.global_batch_size=2"]
        + [f"run.dir={tmp_path}"],
    )
    engine = build_engine(cfg, parallel.initialize(cfg), get_family("yi"))
    with pytest.raises(Exception, match=r"gate_proj.weight has shape \(192, 64\).*expects \(128, 64\)") as info:
        checkpoint.load_frozen_parts(cfg, engine, log=lambda message: None)
    print(f"\nrefused: {info.value}")


# ---------------------------------------------------------------------- whole runs


def _dpo_args(tiny_tokenizer, train: Path, run_dir: Path, steps: int) -> list[str]:
    shapes = [a for a in TINY_OVERRIDES if not a.startswith(("model.seq_length", "train."))]
    return shapes + [
        'model.init_from_hf=""',
        f"model.seq_length={SEQ}",
        f"data.tokenizer={tiny_tokenizer}",
        f"data.shards={train}",
        'data.valid_shards=""',
        "eval.interval=0",
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.lr=2e-3",
        "train.warmup_steps=2",
        "train.precision=fp32",
        "model.attention_backend=sdpa",
        "checkpoint.interval=3",
    ]


def _series(run_dir: Path, names=("loss", "rewards/margins", "logps/chosen")) -> dict[str, list[float]]:
    records = read_metrics(run_dir)
    return {name: [records[s][name] for s in sorted(records)] for name in names}


def test_dpo_layouts_agree(tiny_tokenizer, single_rank, tmp_path):
    """5 DPO steps at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1), (1,1,2) on the same pairs give the
    same losses, gradient norms, rewards and log-probs within 1e-5 (2 real ranks on gloo); so do
    TP=2 and PP=2 with the pairs packed into shared rows (PP pads them back to 2 rows per pair)."""
    from dpo_worker import dpo_steps

    want = dpo_steps(tiny_tokenizer, 1, 1)
    assert want[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = policy at step 1
    assert all(abs(s["loss"] - math.log(2)) > 1e-3 for s in want[1:])  # the policy moved off it
    layouts = ["tp2", "pp2", "dp2", "tp2-packed", "pp2-packed"]
    _assert_same_steps(_layouts(str(tiny_tokenizer), ",".join(layouts), tmp_path), want, layouts)


def _layouts(tokenizer_or_video: str, layouts: str, tmp_path: Path) -> dict:
    out = tmp_path / "layouts.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests" / "dpo_worker.py"), str(out), tokenizer_or_video, layouts]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


def _assert_same_steps(results: dict, want: list[dict], layouts: list[str]) -> None:
    assert sorted(results) == sorted(layouts) and all(len(got) == len(want) for got in results.values())
    for layout, got in results.items():
        for step, (a, b) in enumerate(zip(got, want)):
            assert a.keys() == b.keys(), (layout, step + 1)
            for key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (layout, step + 1, key)


def test_video_dpo_pairs_share_t_and_noise_and_the_loss_is_diffusion_dpos(single_rank):
    """Chosen and rejected rows of a pair get the same t and the same noise; the loss and the
    implicit accuracy are Diffusion-DPO's formula on per-latent mean squared errors."""
    from dpo_worker import VIDEO_DIT, video_pairs

    from fmtrain.config import load_config
    from fmtrain.data.latents import LatentPreferencePipeline
    from fmtrain.models.step_video.family import make_inputs
    from fmtrain.objectives.video_dpo import video_dpo_loss

    cfg = load_config(None, VIDEO_DIT + ["train.global_batch_size=4", "train.micro_batch_size=4"])
    batch = LatentPreferencePipeline.from_config(cfg).collate(video_pairs(0)[:4])
    assert batch["latent"].shape[0] == 8 and torch.equal(batch["sample_seed"][:4], batch["sample_seed"][4:])
    inputs, _ = make_inputs(cfg, batch, torch.device("cpu"), training=False, first=True, need_target=True)
    t = inputs.t.view(-1, 1, 1, 1, 1)
    noise = (inputs.x_t - t * batch["latent"]) / (1 - t)
    assert torch.equal(inputs.t[:4], inputs.t[4:])
    torch.testing.assert_close(noise[:4], noise[4:], atol=1e-5, rtol=1e-5)
    assert not torch.equal(batch["latent"][:4], batch["latent"][4:])

    g = torch.Generator().manual_seed(0)
    elements = 4 * 2 * 4 * 4
    policy, reference = torch.rand(8, generator=g), torch.rand(8, generator=g)
    sums = torch.stack([policy * elements, policy, torch.full((8,), float(elements))], dim=1)
    beta = 50.0
    loss_sum, count, reports = video_dpo_loss(beta, inputs.t, reference, sums)
    inside = -beta / 2 * ((policy[:4] - reference[:4]) - (policy[4:] - reference[4:]))
    assert int(count) == 4
    torch.testing.assert_close(loss_sum, -torch.nn.functional.logsigmoid(inside).sum())
    assert reports["implicit_acc"][0] == (inside > 0).sum() and reports["implicit_acc"][1] == 4
    buckets = [reports[name][1] for name in reports if name.startswith("implicit_acc/t<")]
    assert sum(buckets) == 4  # every pair in exactly one t quarter


def test_video_dpo_layouts_agree(single_rank, tmp_path):
    """5 Video-DPO steps at (TP, PP, DP) = (1,1,1), (2,1,1), (1,1,2) on the same pairs agree within
    1e-5 (losses, gradient norms, rewards, implicit accuracy per t quarter); step 1 is ln 2."""
    from dpo_worker import video_dpo_steps

    want = video_dpo_steps(1, 1)
    assert want[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(abs(s["loss"] - math.log(2)) > 1e-4 for s in want[1:])
    _assert_same_steps(_layouts("video", "tp2,dp2", tmp_path), want, ["tp2", "dp2"])


def test_dpo_run_resumes_exactly(preference_shards, tiny_tokenizer, tmp_path):
    """`fmtrain train` on preference shards: step 1 is ln 2 (logged); a run killed (SIGKILL to
    every process) after step 4 and started again resumes from its step-3 checkpoint and repeats
    step 4 bit for bit; precomputed reference log-probs give the co-located reference's losses
    within 1e-6."""
    train, _ = preference_shards
    killed = tmp_path / "killed"
    args = _dpo_args(tiny_tokenizer, train, killed, 5)
    first = Run(args, 1, tmp_path, "killed", env={"FMTRAIN_TEST_HANG_AT_STEP": "4"}, recipe=DPO_RECIPE)
    first.wait_for_step(killed, 4)
    first.signal_group(signal.SIGKILL)
    _, out, err = first.finish()
    assert "preference loss 0.693147 = ln 2" in out + err
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    out = finish_ok(Run(args, 1, tmp_path, "resumed", recipe=DPO_RECIPE))
    assert f"resumed from {killed / 'checkpoints' / 'step_0000003'} at step 3" in out
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines() if line.strip()]
    before, after = [record for record in lines if record["step"] == 4]  # logged by both runs
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert after[key] == before[key], key
    want = _series(killed)
    assert len(want["loss"]) == 5 and want["loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    # Precomputed reference log-probs (one pass over the shards, then no reference) give the
    # co-located reference's numbers.
    precomputed = tmp_path / "precomputed"
    run_fmtrain(
        _dpo_args(tiny_tokenizer, train, precomputed, 5) + ["objective.precompute_reference=true"], recipe=DPO_RECIPE
    )
    table = json.loads((precomputed / "data" / "reference_logps.json").read_text())
    assert len(table["logps"]) == 256  # every pair of the shards
    assert not list((precomputed / "data").glob("reference_logps.part-*")), "the partial tables outlived the pass"
    got = _series(precomputed)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=1e-6), key


def test_precompute_pass_resumes_from_its_partial_table(preference_shards, tiny_tokenizer, single_rank, tmp_path):
    """A precompute pass started again reads what the interrupted one wrote (values it finds are
    kept, not recomputed: planted ones survive) and scores only the pairs it lacks; a partial
    table of other settings (here: another truncation) is ignored."""
    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from fmtrain.models.yi.family import (
        _partial_meta,
        compute_reference_table,
        partial_table_path,
        reference_logps_step,
    )

    train, _ = preference_shards
    args = _dpo_args(tiny_tokenizer, train, tmp_path / "run", 1) + ["objective.precompute_reference=true"]
    cfg = load_config(DPO_RECIPE, args)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family("yi"))
    step = reference_logps_step(cfg)
    full = compute_reference_table(cfg, engine, step)
    partial = partial_table_path(cfg, topo)
    assert json.loads(partial.read_text())["logps"] == full  # what an interruption would leave, complete

    planted = dict(list(full.items())[:100])
    planted.update({key: [123.0, -123.0] for key in list(planted)[:3]})
    meta = _partial_meta(cfg, topo, tiny_tokenizer)
    partial.write_text(json.dumps({"meta": meta, "logps": planted}))
    again = compute_reference_table(cfg, engine, step)
    assert len(again) == len(full) == 256
    assert [again[key] for key in list(planted)[:3]] == [[123.0, -123.0]] * 3
    assert all(again[key] == pytest.approx(value, abs=1e-6) for key, value in list(full.items())[3:])

    partial.write_text(json.dumps({"meta": {**meta, "truncation": "keep_start"}, "logps": planted}))
    assert compute_reference_table(cfg, engine, step)[list(planted)[0]] == pytest.approx(full[list(planted)[0]])


def test_dpo_learns_a_preference_rule(preference_shards, tiny_tokenizer, tmp_path):
    """Chosen completions repeat the prompt's words, rejected ones say other words: after 60
    steps the implicit reward ranks held-out pairs right at least 90% of the time."""
    train, valid = preference_shards
    run_dir = tmp_path / "run"
    args = _dpo_args(tiny_tokenizer, train, run_dir, 60)
    skip = ("data.valid_shards", "eval.interval", "checkpoint.interval", "train.global_batch_size", "train.micro")
    args = [a for a in args if not a.startswith(skip)]
    run_fmtrain(
        args
        + [
            f"data.valid_shards={valid}",
            "eval.interval=30",
            "eval.steps=4",
            "train.global_batch_size=16",
            "train.micro_batch_size=4",
            "model.num_layers=2",
            "checkpoint.interval=0",
        ],
        recipe=DPO_RECIPE,
    )
    last = read_metrics(run_dir)[60]
    print(f"\nheld-out: accuracy {last['val_rewards/accuracies']:.3f}, loss {last['val_loss']:.3f}")
    assert last["val_rewards/accuracies"] >= 0.9
    assert last["val_loss"] < 0.5 * math.log(2)


def test_video_dpo_trains_on_preference_latent_shards(tmp_path):
    """`fmtrain data synth-latents --preference` shards -> `fmtrain train` with objective
    video_dpo: step 1 is ln 2 (logged), and held-out pairs (chosen = the caption's own class)
    are ranked right by the end; a sample without its rejected latent is a named bad sample."""
    from fmtrain.data.latents import LatentPreferencePipeline, write_synthetic_latent_shards
    from fmtrain.data.stream import BadSample, SampleContext

    write_synthetic_latent_shards(
        tmp_path / "pairs",
        shapes=[(2, 8, 8), (2, 8, 4)],
        samples=64,
        classes=4,
        channels=8,
        caption_tokens=8,
        caption_dim=64,
        clip_tokens=4,
        clip_dim=32,
        valid_fraction=0.125,
        preference=True,
        progress=False,
    )
    run_dir = tmp_path / "run"
    args = [
        'model.init_from_hf=""',
        f"data.shards={tmp_path / 'pairs' / 'train'}",
        f"data.valid_shards={tmp_path / 'pairs' / 'valid'}",
        f"run.dir={run_dir}",
        "objective.beta=50",
        "train.max_steps=30",
        "train.lr=1e-3",
        "train.precision=fp32",
        "eval.interval=30",
        "eval.steps=1",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "logging.tensorboard=false",
    ]
    proc = run_fmtrain(args, recipe=REPO / "recipes" / "step_video" / "dpo_tiny.yaml")
    assert "preference loss 0.693147 = ln 2" in proc.stdout + proc.stderr
    last = read_metrics(run_dir)[30]
    print(f"\nVideo-DPO held-out: implicit accuracy {last['val_implicit_acc']:.3f}, loss {last['val_loss']:.4f}")
    assert last["val_implicit_acc"] >= 0.9 and last["val_loss"] < 0.5 * math.log(2)
    assert {"implicit_acc", "rewards/margins", "mse/chosen"} <= last.keys()
    ctx = SampleContext(seed=0, epoch=0, stream=0, index=0, shard="shard-000000.tar", key="k")
    from fmtrain.config import load_config

    cfg = load_config(REPO / "recipes" / "step_video" / "dpo_tiny.yaml", [])
    with pytest.raises(BadSample, match="missing field: .rejected.latent.npy"):
        LatentPreferencePipeline.from_config(cfg).units({"chosen.latent.npy": b""}, ctx)
