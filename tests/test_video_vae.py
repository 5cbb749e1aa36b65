"""The Step-Video-T2V Video-VAE family: architecture against the release, causality, chunking
and tiling, the release file round trip, DP=2 against DP=1 with the discriminator, exact
resume of both optimizers after SIGKILL, learning on moving-shape videos, the loss's terms."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from conftest import REPO, Run, finish_ok, read_metrics
from safetensors.torch import load_file, save_file

from fmtrain.cli import main as fmtrain_main
from fmtrain.config import load_config
from fmtrain.models.video_vae import codec
from fmtrain.models.video_vae import convert as vae_convert
from fmtrain.models.video_vae.model import VideoVAE

TINY = REPO / "recipes" / "step_video" / "vae_tiny.yaml"
FULL = REPO / "recipes" / "step_video" / "vae.yaml"

# Shapes of tensors of the released vae_v2.safetensors (AutoencoderKL(z_channels=64, version=2) of
# stepfun-ai/Step-Video-T2V, stepvideo/vae/vae.py; decoder.conv_out as the file stores it).
RELEASED_SHAPES = {
    "encoder.conv_in.conv.weight": (32, 3, 3, 3, 3),
    "encoder.down.0.block.0.conv1.conv.weight": (128, 32, 3, 3, 3),
    "encoder.down.0.block.0.nin_shortcut.conv.weight": (128, 32, 1, 1, 1),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.downsample.conv.conv.weight": (256, 256, 3, 3, 3),
    "encoder.mid.attn_1.q.conv.weight": (512, 512, 1, 1, 1),
    "encoder.conv_patchify.conv.conv.weight": (256, 512, 3, 3, 3),
    "encoder.conv_out.conv.weight": (128, 2048, 3, 3, 3),
    "decoder.conv_in.conv.weight": (2048, 64, 3, 3, 3),
    "decoder.conv_unpatchify.conv.conv.weight": (4096, 2048, 3, 3, 3),
    "decoder.up.3.upsample.conv3d.conv1.conv.weight": (512, 512, 3, 3, 3),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1, 1),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3, 3),
}


def tiny_vae(**kw) -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(
        z_channels=8,
        encoder_ch=32,
        decoder_ch=32,
        num_res_blocks=1,
        encoder_ch_mult=[1, 1, 2, 2],
        decoder_ch_mult=[1, 1, 2, 2],
        **kw,
    ).eval()


def test_the_released_architecture(capsys):
    cfg = load_config(FULL)
    shapes = vae_convert.shapes_from_config(cfg)
    assert {name: shapes[name] for name in RELEASED_SHAPES} == RELEASED_SHAPES
    assert fmtrain_main(["info", str(FULL), "--gpus", "32"]) == 0
    assert "parameters    498,818,819" in capsys.readouterr().out  # AutoencoderKL(z_channels=64, version=2)
    with torch.device("meta"):
        v1 = VideoVAE(z_channels=16, version=1)
    assert (v1.spatial_compression, v1.temporal_compression) == (8, 4)


def test_latents_are_causal_in_time_and_chunked_as_the_release():
    vae = tiny_vae()
    x = torch.rand(1, 3, 34, 32, 32) * 2 - 1  # two 17-frame chunks
    mean, logvar = codec.encode_moments(vae, x, chunk_frames=17)
    assert mean.shape == logvar.shape == (1, 8, 6, 2, 2)
    # Latent frame j sees frames up to 8 j of its chunk: later frames (and the next chunk) change nothing.
    for first_changed, unchanged in ((9, 2), (12, 2), (17, 3), (25, 4)):
        y = x.clone()
        y[:, :, first_changed:] = torch.rand_like(y[:, :, first_changed:])
        other, _ = codec.encode_moments(vae, y, chunk_frames=17)
        assert torch.equal(other[:, :, :unchanged], mean[:, :, :unchanged]), first_changed
        assert not torch.equal(other[:, :, unchanged], mean[:, :, unchanged]), first_changed
    # Decoding: the frames of latents 0..1 (frames 0..8) do not depend on latents 2..
    z = torch.randn(1, 8, 6, 2, 2)
    frames = codec.decode(vae, z, chunk_frames=17)
    assert frames.shape == (1, 3, 34, 32, 32)
    z2 = z.clone()
    z2[:, :, 2:] = torch.randn_like(z2[:, :, 2:])
    assert torch.equal(codec.decode(vae, z2, chunk_frames=17)[:, :, :9], frames[:, :, :9])
    # The release's lengths: 17 -> 3 latent frames per chunk, 204 -> 36 and back.
    with torch.device("meta"):
        big = VideoVAE()
        assert codec.encode_moments(big, torch.empty(1, 3, 204, 32, 32), chunk_frames=17)[0].shape[2] == 36
        assert codec.decode(big, torch.empty(1, 64, 36, 2, 2), chunk_frames=17).shape[2] == 204
    with pytest.raises(ValueError, match="not 1 \\+ a multiple of the temporal compression 8"):
        codec.encode_moments(vae, x[:, :, :20], chunk_frames=17)


def test_seams_blend_as_the_release():
    x = torch.arange(34, dtype=torch.float32).view(1, 1, 34, 1, 1).repeat(1, 1, 1, 2, 2)
    y = codec.blend_seams(x, 17)
    back = 0.6 * 17 + 0.4 * 16
    assert y[0, 0, 17, 0, 0].item() == pytest.approx(back)
    assert y[0, 0, 16, 0, 0].item() == pytest.approx(0.6 * 16 + 0.4 * back)
    assert torch.equal(y[:, :, :16], x[:, :, :16]) and torch.equal(y[:, :, 18:], x[:, :, 18:])


def test_tiles_cover_and_blend_exactly_for_local_maps():
    """Tiling is exact for maps without context across tiles (what a VAE approximates away from
    its attention): a pixelwise map, a 16x average pool (encoder-shaped) and a 16x nearest upsample
    (decoder-shaped). The starts cover the frame and the last tile ends at its edge."""
    assert codec.tile_starts(100, 32, 8) == [0, 24, 48, 68] and codec.tile_starts(30, 32, 8) == [0]
    x = torch.randn(2, 3, 5, 96, 80)
    pool = lambda v: torch.nn.functional.avg_pool3d(v, (1, 16, 16))  # noqa: E731
    up = lambda v: torch.nn.functional.interpolate(v, scale_factor=(1, 16, 16))  # noqa: E731
    torch.testing.assert_close(codec.tiled(torch.tanh, x, 32, 16, 1.0), torch.tanh(x))
    torch.testing.assert_close(codec.tiled(pool, x, 32, 16, 1 / 16), pool(x))
    z = torch.randn(2, 3, 5, 6, 5)
    torch.testing.assert_close(codec.tiled(up, z, 2, 1, 16.0), up(z))


def test_release_file_round_trip_and_wrong_shapes(tmp_path, capsys):
    cfg = load_config(TINY)
    shapes = vae_convert.shapes_from_config(cfg)
    g = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    release = tmp_path / "release" / "vae"
    release.mkdir(parents=True)
    save_file(tensors, str(release / "vae_v2.safetensors"))
    ckpt = tmp_path / "ckpt"
    assert fmtrain_main(["convert", "from-hf", str(tmp_path / "release"), str(ckpt)]) == 0
    state = json.loads((ckpt / "fmtrain_state.json").read_text())
    model = state["config"]["model"]
    assert model["family"] == "video_vae" and model["z_channels"] == 8 and model["encoder_channel_mult"] == [1, 1, 2, 2]
    back = tmp_path / "back"
    assert fmtrain_main(["convert", "to-hf", str(ckpt), str(back)]) == 0
    again = load_file(str(back / "vae" / "vae_v2.safetensors"))
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    # A file of another architecture fails naming the field; a tensor of the wrong shape fails
    # before loading, naming the tensor and both shapes.
    wider = dict(tensors)
    wider["decoder.conv_out.weight"] = torch.randn(3, 64, 3, 3, 3)
    save_file(wider, str(release / "vae_v2.safetensors"))
    assert (
        fmtrain_main(["convert", "from-hf", str(tmp_path / "release"), str(tmp_path / "bad"), "--recipe", str(TINY)])
        != 0
    )
    assert "model.decoder_channels=32 does not match the checkpoint" in capsys.readouterr().err
    bad = dict(tensors)
    bad["encoder.mid.attn_1.q.conv.weight"] = torch.randn(64, 32, 1, 1, 1)
    save_file(bad, str(release / "vae_v2.safetensors"))
    assert (
        fmtrain_main(["convert", "from-hf", str(tmp_path / "release"), str(tmp_path / "bad"), "--recipe", str(TINY)])
        != 0
    )
    err = capsys.readouterr().err
    assert "encoder.mid.attn_1.q.conv.weight" in err and "(64, 32, 1, 1, 1)" in err and "(64, 64, 1, 1, 1)" in err


VAE_RUN = [
    "data.video_frames=9",
    "data.synthetic_samples=16",
    "train.max_steps=6",
    "train.lr=5e-4",
    "train.min_lr=5e-5",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "objective.gan_start_step=2",
    "objective.ssim_weight=0.2",
    "objective.image_ratio=0.5",  # microbatches of single frames among the clips
    "eval.interval=0",
    "logging.tensorboard=false",
    "checkpoint.interval=2",
]
PAIR = ("loss", "l1", "kl", "grad_norm", "discriminator/loss", "discriminator/grad_norm")


def test_dp2_equals_dp1_with_the_discriminator_and_resumes_exactly(tmp_path):
    """Steps 1-2 without the GAN, 3-6 with the discriminator and its own optimizer: DP=2 and DP=1
    (same global batch) agree for 5 steps (to rounding up to the discriminator's first update,
    within 5e-3 after it: see below); killed after step 5 and resumed
    from step 4, the run continues bit for bit."""
    dp2, dp1, run = tmp_path / "dp2", tmp_path / "dp1", tmp_path / "run"
    finish_ok(Run(VAE_RUN + [f"run.dir={dp2}"], 2, tmp_path, "dp2", recipe=TINY))
    # DP=1 also validates at step 3 (which must not change its training) and draws its pictures.
    with_eval = ["eval.interval=3", "eval.steps=1", "logging.tensorboard=true"]
    finish_ok(Run(VAE_RUN + with_eval + [f"run.dir={dp1}"], 1, tmp_path, "dp1", recipe=TINY))
    ref, one = read_metrics(dp2), read_metrics(dp1)
    assert "val_psnr" in one[3] and "val_ssim" in one[3]
    check_reconstruction_video(dp1, step=3, frames=9, size=32)
    assert "discriminator/loss" not in ref[2] and "discriminator/loss" in ref[3]
    for step in range(1, 6):
        for name in PAIR:
            if name in ref[step]:
                # Up to the discriminator's first update (step 3) the runs differ by rounding only:
                # losses ~1e-7, gradient norms (squares summed in another order over two ranks)
                # ~3e-5. After it, Adam's early steps (update ~ g / |g|) turn that rounding into
                # lr-sized differences on near-zero gradient elements and the adversarial pair
                # amplifies them: measured up to 2.4e-4 (losses) and 1.3e-3 (gradient norms) at
                # step 5 on one machine, 1.2e-5 on another. A DP bug (a gradient summed instead of
                # averaged, a rank's microbatches dropped) moves these by far more, from step 1.
                if step <= 3:
                    rel = 1e-3 if name.endswith("grad_norm") else 2e-5
                else:
                    rel = 5e-3
                assert one[step][name] == pytest.approx(ref[step][name], rel=rel, abs=1e-7), (step, name)
    killed = Run(
        VAE_RUN + [f"run.dir={run}"], 2, tmp_path, "killed", env={"FMTRAIN_TEST_HANG_AT_STEP": "5"}, recipe=TINY
    )
    killed.wait_for_step(run, 5)
    killed.signal_group(signal.SIGKILL)
    killed.finish()
    finish_ok(Run(VAE_RUN + [f"run.dir={run}"], 2, tmp_path, "resumed", recipe=TINY))
    resumed = read_metrics(run)
    for step in (5, 6):
        for name in PAIR + ("gan_weight", "psnr"):
            assert resumed[step][name] == ref[step][name], (step, name)


LEARN_STEPS = 200
LEARN_RUN = [
    "data.video_frames=9",
    "model.z_channels=16",
    "objective.gan_weight=0",
    "objective.ssim_weight=0",
    "objective.mse_weight=1.0",
    "objective.sample_posterior=false",
    "train.lr=3e-3",
    "train.min_lr=3e-4",
    f"train.max_steps={LEARN_STEPS}",
    "train.log_interval=50",
    f"eval.interval={LEARN_STEPS}",
    "eval.steps=4",
    "logging.tensorboard=false",
    "checkpoint.interval=0",
]


def test_tiny_recipe_learns_moving_shapes_beyond_each_clips_mean_colour(tmp_path):
    """200 steps of the tiny recipe on moving-shape clips (9 frames of 32 x 32, no discriminator,
    L1 + MSE, about 2.5 minutes here): on 16 held-out clips the validation PSNR is at least 1 dB
    above filling every frame with the clip's mean colour (computed here on the same clips).
    Measured: +1.3 to +1.5 dB at 120-300 steps; the decoder has the scene's background and the
    shapes as faint blobs at their places. The 3 dB the Video-VAE issue asks for takes more steps
    than a CPU test affords (README: +2.4 dB after 600 steps)."""
    from fmtrain.data.video import SyntheticClipSampler

    run_dir = tmp_path / "run"
    finish_ok(Run(LEARN_RUN + [f"run.dir={run_dir}"], 1, tmp_path, "learn", recipe=TINY))
    cfg = load_config(TINY, LEARN_RUN)
    d, t = cfg.data, cfg.train
    held_out = SyntheticClipSampler(
        samples=d.synthetic_samples,
        frames=d.video_frames,
        size=d.video_size,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_size=1,
        seed=cfg.run.seed,
        tag=1,
    )
    clips = torch.cat([mb["video"] for step in range(cfg.eval.steps) for mb in held_out.microbatches(step, 0)])
    mean_colour = clips.mean(dim=(2, 3, 4), keepdim=True).expand_as(clips)
    baseline = (10 * torch.log10(4 / (mean_colour - clips).pow(2).flatten(1).mean(1))).mean()
    assert len(clips) == 16
    val_psnr = read_metrics(run_dir)[LEARN_STEPS]["val_psnr"]
    assert val_psnr >= float(baseline) + 1.0, (val_psnr, float(baseline))


def check_reconstruction_video(run_dir, *, step: int, frames: int, size: int) -> None:
    """RUN_DIR/videos holds the first validation clip beside its reconstruction as an mp4, and
    TensorBoard the same as an animated image (what SummaryWriter.add_video writes)."""
    import av
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with av.open(str(run_dir / "videos" / f"val_reconstruction-{step:07d}.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == (size, 2 * size, 3)
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    (image,) = [event for event in events.Images("val/reconstruction") if event.step == step]
    assert (image.width, image.height) == (2 * size, size)
    assert image.encoded_image_string.startswith(b"GIF89a")


def test_image_microbatches_are_drawn_from_the_clip_seeds():
    from fmtrain.models.video_vae.family import training_pixels

    cfg = load_config(TINY, ["objective.image_ratio=0.5"])
    clips = torch.rand(2, 3, 9, 8, 8)
    shapes = []
    for first in range(40):
        batch = {"video": clips, "sample_seed": torch.tensor([first, 1000 + first])}
        x = training_pixels(cfg, batch, "cpu")
        assert torch.equal(x, training_pixels(cfg, batch, "cpu"))  # the same draws every time
        if x.shape[2] == 1:  # one frame of each clip, each its own
            picked = [next(t for t in range(9) if torch.equal(x[i, :, 0], clips[i, :, t])) for i in range(2)]
            shapes.append(tuple(picked))
        else:
            assert torch.equal(x, clips)
    assert 10 <= len(shapes) <= 30  # about half of the microbatches
    assert len(set(shapes)) > 1
    assert training_pixels(load_config(TINY), batch, "cpu").shape[2] == 9  # image_ratio 0: clips


def test_vae_loss_terms_follow_their_formulas():
    """The vae objective's per-sample loss, against the formulas written out here: mean |x - x_hat|
    and mean (x - x_hat)^2 over the sample's pixels, and KL(N(mu, sigma^2) || N(0, I)) summed over
    the latent and divided by the pixel count (LDM's weighting), each times its weight; summed
    over the microbatch (the engine divides by the global sample count)."""
    from fmtrain.models.vae_family import _vae_loss
    from fmtrain.objectives.sections import VAEConfig

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 8, 8, generator=g) * 2 - 1
    recon = x + 0.3 * torch.randn(x.shape, generator=g)
    mean, logvar = torch.randn(2, 4, 2, 1, 1, generator=g), torch.randn(2, 4, 2, 1, 1, generator=g)
    o = VAEConfig(l1_weight=1.0, mse_weight=0.5, kl_weight=1e-3, ssim_weight=0.0)
    loss, count, reports = _vae_loss(x, o, None, True, (recon, mean, logvar, None))
    expected = 0.0
    for i in range(2):
        l1 = sum(abs(float(a) - float(b)) for a, b in zip(x[i].flatten(), recon[i].flatten())) / x[i].numel()
        mse = sum((float(a) - float(b)) ** 2 for a, b in zip(x[i].flatten(), recon[i].flatten())) / x[i].numel()
        kl = 0.5 * sum(
            float(m) ** 2 + math.exp(float(v)) - 1 - float(v) for m, v in zip(mean[i].flatten(), logvar[i].flatten())
        )
        expected += l1 + 0.5 * mse + 1e-3 * kl / x[i].numel()
    assert int(count) == 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    without_mse, _, _ = _vae_loss(x, VAEConfig(kl_weight=1e-3), None, True, (recon, mean, logvar, None))
    mse_sum = float((recon - x).pow(2).flatten(1).mean(1).sum())
    assert float(loss - without_mse) == pytest.approx(0.5 * mse_sum, rel=1e-5)
