"""LaVin-DiT's ST-VAE family: the released architecture (tensor names and shapes, parameter count),
compression shapes, causality across chunks, the codec's normalisation and the release's chunk
spans, the release file round trip with its refusals, continued training from released weights,
a few training steps of the tiny recipe, and the codec a DiT loads through
fmtrain.checkpoint.pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, free_port, read_metrics
from safetensors.torch import load_file, save_file

from fmtrain.cli import main as fmtrain_main
from fmtrain.config import ConfigError, load_config, validate
from fmtrain.models import vae_codec
from fmtrain.models.st_vae import codec
from fmtrain.models.st_vae import convert as st_convert
from fmtrain.models.st_vae.family import build_vae

TINY = REPO / "recipes" / "lavin_dit" / "st_vae_tiny.yaml"
FULL = REPO / "recipes" / "lavin_dit" / "st_vae.yaml"

RELEASED_PARAMETERS = 215_583_907
"""AutoencoderKLSTVAE() of DerrickWang005/LaVin-DiT (lib/model/vae3d.py), counted once from the
official module built on the meta device: 436 tensors, encoder 92,215,456, decoder 123,368,451."""

# Tensors of the released stvae.pt's state dict, from the official module's structure
# (lib/model/vae3d.py: STVAEEncoder3D / STVAEDecoder3D with block_out_channels (128, 256, 256, 512),
# layers_per_block 3, latent_channels 16): causal convs keep their weight under `.conv`, the
# width-changing shortcuts are plain 1x1x1 Conv3d, the samplers 2D convs, the decoder's norms
# SpatialNorm3D (norm_layer, conv_y, conv_b) conditioned on the 16-channel latent.
RELEASED_SHAPES = {
    "encoder.conv_in.conv.weight": (128, 3, 3, 3, 3),
    "encoder.down_blocks.0.resnets.2.conv2.conv.weight": (128, 128, 3, 3, 3),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1, 1),
    "encoder.down_blocks.2.resnets.0.norm1.weight": (256,),
    "encoder.down_blocks.3.resnets.0.conv_shortcut.weight": (512, 256, 1, 1, 1),
    "encoder.mid_block.resnets.1.norm2.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.conv.weight": (32, 512, 3, 3, 3),
    "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
    "decoder.mid_block.resnets.0.norm1.conv_y.conv.weight": (512, 16, 1, 1, 1),
    "decoder.up_blocks.0.resnets.3.norm2.norm_layer.weight": (512,),
    "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": (256, 512, 1, 1, 1),
    "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1, 1),
    "decoder.up_blocks.3.resnets.3.conv1.conv.bias": (128,),
    "decoder.norm_out.conv_b.conv.weight": (128, 16, 1, 1, 1),
    "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
}


def tiny_vae():
    cfg = load_config(TINY)
    torch.manual_seed(0)
    return cfg, build_vae(cfg).eval()


def test_the_released_architecture(capsys):
    cfg = load_config(FULL)
    shapes = st_convert.shapes_from_config(cfg)
    assert {name: shapes[name] for name in RELEASED_SHAPES} == RELEASED_SHAPES
    assert len(shapes) == 436 and sum(math.prod(s) for s in shapes.values()) == RELEASED_PARAMETERS
    # The last level neither downsamples nor upsamples; there is no quant_conv.
    assert not any(
        k.startswith(("encoder.down_blocks.3.downsamplers", "decoder.up_blocks.3.upsamplers")) for k in shapes
    )
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in shapes)
    assert fmtrain_main(["info", str(FULL), "--gpus", "32"]) == 0
    out = capsys.readouterr().out
    assert (
        f"parameters    {RELEASED_PARAMETERS:,}" in out and "encoder 92,215,456" in out and "decoder 123,368,451" in out
    )


def test_compression_shapes():
    cfg, vae = tiny_vae()
    for frames, latent_frames in ((1, 1), (5, 2), (17, 5)):
        x = torch.rand(1, 3, frames, 32, 32) * 2 - 1
        mean, logvar = vae_codec.encode_moments(vae, x, chunk_frames=0, seam="shared")
        assert mean.shape == logvar.shape == (1, 16, latent_frames, 4, 4)
        assert codec.decode(cfg, vae, codec.encode(cfg, vae, x)).shape == x.shape
    # The module itself takes even frame counts too, averaging every pair (8 -> 4 -> 2), as the
    # release's downsampler does; the codec wants 1 + 4 k frames, naming the chunk otherwise.
    assert vae.moments(torch.zeros(1, 3, 8, 16, 24))[0].shape == (1, 16, 2, 2, 3)
    with pytest.raises(ValueError, match="a chunk of 8 frames .* not 1 \\+ a multiple of the temporal compression 4"):
        codec.encode(cfg, vae, torch.zeros(1, 3, 8, 16, 16))


def test_latents_are_causal_across_chunks():
    """Chunks of 5 frames share their boundary frame (chunk k: frames 4k..4k+4): changing the frames
    from 4m+1 on leaves latent frames 0..m bit-identical and changes m + 1; decoding likewise.
    Inside one chunk GroupNorm normalises over all its frames (the release does too), so there a
    later frame moves the first latent."""
    cfg, vae = tiny_vae()
    chunked = load_config(TINY, ["model.chunk_frames=5"])
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    z = codec.encode(chunked, vae, x)
    assert z.shape == (1, 16, 5, 2, 2)
    for first_changed in (5, 9, 13):
        y = x.clone()
        y[:, :, first_changed:] = torch.rand_like(y[:, :, first_changed:])
        other = codec.encode(chunked, vae, y)
        kept = 1 + (first_changed - 1) // 4
        assert torch.equal(other[:, :, :kept], z[:, :, :kept]), first_changed
        assert not torch.equal(other[:, :, kept], z[:, :, kept]), first_changed
    one_pass = codec.encode(cfg, vae, x)
    y = x.clone()
    y[:, :, -1] = 0
    assert not torch.equal(codec.encode(cfg, vae, y)[:, :, 0], one_pass[:, :, 0])
    # Decoding in latent chunks of 2 (sharing one latent frame): frames 0..8 come from latents 0..2.
    frames = codec.decode(chunked, vae, z)
    assert frames.shape == (1, 3, 17, 16, 16)
    z2 = z.clone()
    z2[:, :, 3:] = torch.randn_like(z2[:, :, 3:])
    assert torch.equal(codec.decode(chunked, vae, z2)[:, :, :9], frames[:, :, :9])


def test_codec_normalises_as_the_release_and_chunks_as_its_tiled_encode():
    cfg, vae = tiny_vae()
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    mean, logvar = vae.moments(x)
    z = codec.encode(cfg, vae, x)
    shift, scale = 0.032470703125, 1.08936170213  # LaVin-DiT's inference.py
    assert (cfg.model.latent_shift, cfg.model.latent_scale) == (shift, scale)
    torch.testing.assert_close(z, (mean - shift) * scale, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.decode(cfg, vae, z), vae.decoder(mean), rtol=0, atol=1e-5)
    sample = codec.encode(cfg, vae, x, generator=torch.Generator().manual_seed(5))
    again = codec.encode(cfg, vae, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample, again) and not torch.allclose(sample, z)
    noise = (sample / scale + shift - mean) / torch.exp(0.5 * logvar)
    assert 0.8 < noise.std().item() < 1.2
    # The release's tiled_encode spans: chunks of 81 frames, each starting on the last one's end frame.
    spans = vae_codec._chunks
    assert spans(161, 81, 4, "encode", "shared") == [(0, 81), (80, 81)]
    assert spans(165, 81, 4, "encode", "shared") == [(0, 81), (80, 81), (160, 5)]
    assert spans(41, 21, 1, "decode", "shared") == [(0, 21), (20, 21)]
    assert spans(17, 0, 4, "encode", "shared") == [(0, 17)]
    # Chunks of 1 + 4 m frames fit every clip of 1 + 4 k frames: latents 1 + k whatever the chunk.
    with torch.device("meta"):
        big = build_vae(load_config(FULL))
        clip, latents = torch.empty(1, 3, 33, 16, 16), torch.empty(1, 16, 9, 2, 2)
    for chunk in (9, 17, 21, 129):
        mean, _ = vae_codec.encode_moments(big, clip, chunk_frames=chunk, seam="shared")
        assert mean.shape[2] == 9
        assert vae_codec.decode(big, latents, chunk_frames=chunk, seam="shared").shape[2] == 33


def test_config_rules():
    for override, field in (
        ("model.block_channels=[32,48,64,64]", "model.block_channels"),
        ("model.temporal_compression=3", "model.temporal_compression"),
        ("model.temporal_compression=16", "model.temporal_compression"),
        ("model.chunk_frames=6", "model.chunk_frames"),
        ("model.tile_size=36", "model.tile_size"),
        ("model.latent_scale=0", "model.latent_scale"),
        ("data.video_frames=8", "data.video_frames"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate(load_config(TINY, [override]), 1)


def _release(cfg, dtype=torch.float32, seed=3):
    """A release-layout state dict (the converter's names and shapes for ``cfg``), random values."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g).to(dtype) for name, shape in st_convert.shapes_from_config(cfg).items()
    }


def test_release_round_trip_and_refusals(tmp_path, capsys, single_rank):
    """The released architecture's stvae.pt (random bf16 values, the names and shapes above; a
    training checkpoint's extra entry beside them) -> fmtrain -> stvae.safetensors and stvae.pt, bit
    for bit; the pickle is refused without --allow-pickle; a wrong shape or another architecture is
    refused before loading, naming the tensor and both shapes, or the field."""
    full = load_config(FULL)
    tensors = _release(full, torch.bfloat16)
    release = tmp_path / "release"
    release.mkdir()
    torch.save({"state_dict": {**tensors, "loss.logvar": torch.zeros(())}, "epoch": 7}, release / "stvae.pt")
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert fmtrain_main(["convert", "from-hf", str(release), str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "stvae.pt" in err and "--allow-pickle" in err and "pickled" in err
    assert fmtrain_main(["convert", "from-hf", str(release / "stvae.pt"), str(ckpt), "--allow-pickle"]) == 0
    model = json.loads((ckpt / "fmtrain_state.json").read_text())["config"]["model"]
    assert model["family"] == "st_vae" and model["block_channels"] == [128, 256, 256, 512]
    assert (model["z_channels"], model["layers_per_block"], model["temporal_compression"]) == (16, 3, 4)
    assert fmtrain_main(["convert", "to-hf", str(ckpt), str(back)]) == 0
    exported = load_file(str(back / "stvae.safetensors"))
    pickled = torch.load(back / "stvae.pt", weights_only=True)["state_dict"]
    for again in (exported, pickled):
        assert list(again) == list(tensors)
        assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], tensors[k]) for k in tensors)
    config = json.loads((back / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLSTVAE" and config["block_out_channels"] == [128, 256, 256, 512]
    del exported, pickled, tensors

    # The tiny architecture as a safetensors directory: a wrong shape and another width are refused.
    tiny = load_config(TINY)
    small = _release(tiny)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = dict(small)
    bad["decoder.mid_block.resnets.0.conv1.conv.weight"] = torch.randn(64, 32, 3, 3, 3)
    save_file(bad, str(bad_dir / "stvae.safetensors"))
    capsys.readouterr()
    args = ["convert", "from-hf", str(bad_dir), str(tmp_path / "x"), "--recipe", str(TINY)]
    assert fmtrain_main(args) == 2
    err = capsys.readouterr().err
    assert "decoder.mid_block.resnets.0.conv1.conv.weight" in err
    assert "(64, 32, 3, 3, 3)" in err and "(64, 64, 3, 3, 3)" in err
    wider = {k: v for k, v in small.items()}
    wider["encoder.down_blocks.0.resnets.0.conv1.conv.weight"] = torch.randn(64, 32, 3, 3, 3)
    save_file(wider, str(bad_dir / "stvae.safetensors"))
    assert fmtrain_main(args) != 0
    assert "model.block_channels=[32, 32, 64, 64] does not match the checkpoint" in capsys.readouterr().err


def test_continued_training_from_released_weights_and_the_tiny_recipe_learns(tmp_path, monkeypatch):
    """model.init_from_hf=DIR (stvae.safetensors): one step at learning rate 0 and an export give back
    the released tensors bit for bit; the tiny recipe's loss falls over 8 steps (the GAN starts at
    step 60)."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    tiny = load_config(TINY)
    release = tmp_path / "release"
    release.mkdir()
    tensors = _release(tiny, seed=4)
    # Values a trained VAE could hold: GroupNorm scales near 1, small weights.
    tensors = {k: (1 + 0.1 * v if "norm" in k and k.endswith("weight") else 0.02 * v) for k, v in tensors.items()}
    save_file(tensors, str(release / "stvae.safetensors"))
    # One microbatch of two 5-frame clips per step keeps this quick on two shared cores.
    quiet = ["eval.interval=0", "logging.tensorboard=false", "train.log_interval=1", "objective.image_ratio=0"]
    quiet += ["train.global_batch_size=2", "data.video_frames=5", "train.warmup_steps=2"]
    run = tmp_path / "continued"
    args = [f"run.dir={run}", f"model.init_from_hf={release}", "train.max_steps=1", "train.lr=0", "train.min_lr=0"]
    assert fmtrain_main(["train", str(TINY), *quiet, *args]) == 0
    assert fmtrain_main(["convert", "to-hf", str(run), str(tmp_path / "out")]) == 0
    again = load_file(str(tmp_path / "out" / "stvae.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)

    learn = tmp_path / "learn"
    assert fmtrain_main(["train", str(TINY), *quiet, f"run.dir={learn}", "train.max_steps=8"]) == 0
    losses = [read_metrics(learn)[step]["loss"] for step in range(1, 9)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_a_dit_gets_the_st_vae_codec_of_a_release(tmp_path, single_rank):
    """fmtrain.checkpoint.pretrained loads an ST-VAE release (stvae.safetensors) for a DiT: its
    encode / decode are the codec's with those weights; wrong latent channels, the wrong family and
    a pickle-only release are refused, naming why."""
    from fmtrain import parallel
    from fmtrain.checkpoint.pretrained import latent_decoder, latent_encoder, latent_vae_config

    tiny = load_config(TINY)
    tensors = _release(tiny, seed=6)
    release = tmp_path / "release"
    release.mkdir()
    save_file(tensors, str(release / "stvae.safetensors"))
    vae_cfg = latent_vae_config(release, 16, "--vae", family="st_vae")
    assert vae_cfg.model.block_channels == [32, 32, 64, 64] and vae_cfg.model.latent_scale == 1.08936170213
    device = parallel.initialize(vae_cfg).device
    encode, decode = latent_encoder(vae_cfg, release, device), latent_decoder(vae_cfg, release, device)
    vae = build_vae(tiny).eval()
    vae.load_state_dict(tensors)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    z = encode(x)
    assert torch.equal(z, codec.encode(vae_cfg, vae, x)) and torch.equal(decode(z), codec.decode(vae_cfg, vae, z))
    with pytest.raises(ConfigError, match="has 16 latent channels, the DiT's model.in_channels=8"):
        latent_vae_config(release, 8, "--vae", family="st_vae")
    with pytest.raises(ConfigError, match="not a video_vae release"):
        latent_vae_config(release, 16, "--vae")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"state_dict": tensors}, pickled / "stvae.pt")
    with pytest.raises(ConfigError, match="not a st_vae release: .*stvae.pt: this checkpoint is stored as pickled"):
        latent_vae_config(pickled, 16, "--vae", family="st_vae")
