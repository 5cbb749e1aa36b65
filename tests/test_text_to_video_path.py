"""The whole text-to-video path on CPU at tiny sizes: videos + captions -> ``data shard video``
-> ``data encode`` (2 ranks, a Video-VAE release file, Hugging Face text encoders built here)
-> DiT training on the latent shards -> ``sample --vae`` -> an mp4 PyAV decodes; with a corrupt
video and an unreadable caption skipped and counted, and a restarted encode skipping its work."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import av
import numpy as np
import torch
from conftest import REPO
from safetensors.torch import save_file

from fmtrain.cli import main as fmtrain_main
from fmtrain.data.latents import LatentPipeline
from fmtrain.data.shards import resolve_shards, write_index
from fmtrain.data.video import synthetic_video
from fmtrain.models.video_vae.model import VideoVAE

DIT = REPO / "recipes" / "step_video" / "dit_tiny.yaml"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def fmtrain(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "fmtrain.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV
    )
    assert proc.returncode == 0, f"fmtrain {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def word_tokenizer(words: set[str], out, **special):
    """A word-level tokenizer (Hugging Face ``tokenizers``) over ``words``, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", **special)
    fast.save_pretrained(out)
    return len(vocab)


def text_encoders(tmp_path, captions: list[str]):
    """A tiny Llama (the LLM slot, 48 wide) and a tiny BERT (the CLIP slot, 24 wide)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    words = {w for c in captions for w in c.split()}
    llm, clip = tmp_path / "llm", tmp_path / "clip"
    vocab = word_tokenizer(words, llm)
    torch.manual_seed(0)
    LlamaModel(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(llm)
    vocab = word_tokenizer(words, clip)
    BertModel(
        BertConfig(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(clip)
    return llm, clip


def test_videos_to_latents_to_a_trained_dit_to_an_mp4(tmp_path, capsys):
    videos, captions = tmp_path / "videos", {}
    videos.mkdir()
    for i in range(6):
        data, caption = synthetic_video(i, frames=12, width=40, height=32)
        (videos / f"clip{i}.mp4").write_bytes(data)
        captions[f"clip{i}.mp4"] = caption
    (tmp_path / "captions.jsonl").write_text(
        "".join(json.dumps({"video": k, "caption": v}) + "\n" for k, v in captions.items())
    )
    fmtrain(
        "data", "shard", "video", str(videos), "--captions", str(tmp_path / "captions.jsonl"),
        "--out", str(tmp_path / "shards"), "--max-count", "3",
    )  # fmt: skip
    # A shard with what a crawl brings: a corrupt mp4 and a caption that is not UTF-8.
    good = synthetic_video(9, frames=12, width=40, height=32)[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "bad-000000.tar", "w") as tar:
        for key, ext, payload in (
            ("broken", "mp4", b"\x00\x00\x00\x18ftypmp42" + os.urandom(600)),
            ("broken", "txt", b"a red disc"),
            ("latin1", "mp4", good),
            ("latin1", "txt", "a caf\xe9 disc".encode("latin-1")),
        ):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    write_index(str(bad / "bad-000000.tar"), bad / "index.json")

    # The Video-VAE as the release ships it (tiny widths; its architecture read off the tensors).
    torch.manual_seed(0)
    widths = dict(encoder_ch=32, decoder_ch=32, encoder_ch_mult=[1, 1, 2, 2], decoder_ch_mult=[1, 1, 2, 2])
    vae = VideoVAE(z_channels=8, num_res_blocks=1, **widths)
    (tmp_path / "release" / "vae").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "release/vae/vae_v2.safetensors")
    )
    llm, clip = text_encoders(tmp_path, [*captions.values(), "a red disc moving left and up"])

    shards = f"{tmp_path}/shards/shard-{{000000..000001}}.tar::{bad}/bad-000000.tar"
    out = tmp_path / "latents"
    encode = [
        "data", "encode", shards, "--vae", str(tmp_path / "release"), "--llm-encoder", str(llm),
        "--clip-encoder", str(clip), "--frames", "9", "--size", "32", "--llm-tokens", "8", "--clip-tokens", "6",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    proc = fmtrain(*encode, "--nproc", "2")
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "latent" and index["samples"] == 6 and len(index["shards"]) == 2
    assert index["shapes"] == {"2x2x2": 6}  # 9 frames -> 2 latent frames, 32 -> 2 (16x16 spatial)
    skipped = {item["key"]: item["reason"] for item in index["skipped"]}
    assert set(skipped) == {"broken", "latin1"}, index["skipped"]
    assert "undecodable video" in skipped["broken"] and "not UTF-8" in skipped["latin1"]
    assert "skipped" in proc.stdout and f"{bad}/bad-000000.tar key broken" in proc.stdout

    # What the DiT's stream reads: latents from the VAE, embeddings by the encoders, masks.
    pipeline = LatentPipeline(in_channels=8, caption_dim=48, caption_tokens=8, clip_dim=24, clip_tokens=6)
    sample = next(iter_raw(resolve_shards(str(out))))
    item = pipeline.units(sample, ctx_for(sample))[0]
    assert item["latent"].shape == (8, 2, 2, 2) and item["text_emb"].shape == (8, 48)
    assert item["clip_emb"].shape == (6, 24)
    words = len(sample["txt"].decode().split())
    assert item["text_mask"].sum() == min(words, 8)

    # A restarted job finds every shard done and writes the same index.
    assert fmtrain_main(encode) == 0  # in this process, one rank
    assert "3 shards already done" in capsys.readouterr().out
    assert json.loads((out / "index.json").read_text())["shards"] == index["shards"]

    # Train the DiT on the latent shards, then sample a video from a prompt.
    dit = [
        "model.in_channels=8", "model.caption_dim=48", "model.caption_tokens=8", "model.clip_dim=24",
        "model.clip_tokens=6", "model.num_layers=2", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=3", "train.warmup_steps=1", "eval.interval=0", "logging.tensorboard=false",
    ]  # fmt: skip
    # Validation on the same shards draws a sample for a validation prompt, decoded by the VAE.
    validation = [f"data.valid_shards={out}", "eval.interval=3", "eval.steps=1", "objective.sample_steps=3"]
    validation += [f"eval.sample_vae={tmp_path / 'release'}"]
    fmtrain("train", str(DIT), f"run.dir={tmp_path / 'dit'}", f"data.shards={out}", *dit, *validation)
    with av.open(str(tmp_path / "dit" / "videos" / "val_sample-0000003.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)  # the sample beside the clip's own latent
    mp4 = tmp_path / "sample.mp4"
    assert fmtrain_main([
        "sample", str(DIT), *dit, "--ckpt", str(tmp_path / "dit"), "--vae", str(tmp_path / "release"),
        "--prompt", "a red disc moving left and up", "--llm-encoder", str(llm), "--clip-encoder", str(clip),
        "--shape", "3x2x2", "--steps", "3", "--out", str(mp4),
    ]) == 0  # fmt: skip
    with av.open(str(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (32, 32, 3)  # 3 latent frames -> 17, 2 -> 32 pixels
    assert np.load(mp4.with_suffix(".npy")).shape == (1, 8, 3, 2, 2)


def iter_raw(shards):
    from fmtrain.data.shards import iter_samples

    return iter_samples(shards)


def ctx_for(sample):
    from fmtrain.data.stream import SampleContext

    return SampleContext(seed=0, epoch=0, stream=0, index=0, shard=sample["__url__"], key=sample["__key__"])
