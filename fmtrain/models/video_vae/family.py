"""The Video-VAE family's registry entry: the autoencoder (primary part) and, with
``objective.gan_weight``, a 3D PatchGAN discriminator trained beside it with its own optimizer.

A training step: the VAE's forward step encodes each clip, decodes a posterior sample (its
noise drawn from the clip's ``sample_seed``, so every layout and a resumed run draw the same),
and sums ``objective.l1_weight * L1 + kl_weight * KL + ssim_weight * (1 - SSIM)`` and, once the
GAN has started, ``gan_weight * adaptive * g`` with the discriminator frozen for this part; then
the discriminator's forward step scores the clips against their reconstructions by the updated
VAE (hinge loss). Both are plain torch modules: data parallel (megatron DDP + the distributed
optimizer), with activation checkpointing (``model.recompute=full``).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from fmtrain.config import Config
from fmtrain.models.init import InitRule
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.models.sizes import MemoryEstimate, state_bytes_per_param
from fmtrain.models.video_vae import convert
from fmtrain.models.video_vae.model import PatchDiscriminator3D, VideoVAE
from fmtrain.objectives import vae as objective
from fmtrain.objectives.flow_matching import seeded_generators

_SALT_POSTERIOR = 11
"""Salt of the per-sample generator of the posterior noise."""


def vae_kwargs(cfg: Config) -> dict:
    m = cfg.model
    return dict(
        in_channels=m.in_channels,
        z_channels=m.z_channels,
        version=m.version,
        encoder_ch=m.encoder_channels,
        encoder_ch_mult=m.encoder_channel_mult,
        decoder_ch=m.decoder_channels,
        decoder_ch_mult=m.decoder_channel_mult,
        num_res_blocks=m.num_res_blocks,
        temporal_down_levels=m.temporal_down_levels,
        temporal_up_levels=m.temporal_up_levels,
    )


def build_vae(cfg: Config, megatron_config=None, *, pre_process=True, post_process=True, vp_stage=None) -> VideoVAE:
    vae = VideoVAE(**vae_kwargs(cfg))
    vae.set_recompute(cfg.model.recompute == "full")
    return vae


def build_discriminator(cfg: Config, megatron_config=None, *, pre_process=True, post_process=True, vp_stage=None):
    m = cfg.model
    return PatchDiscriminator3D(m.in_channels, m.discriminator_channels, m.discriminator_layers)


def init_rule(cfg: Config):
    """Conv weights N(0, (gain / sqrt(fan_in))^2), biases 0, GroupNorm weights 1 (every norm module's
    name starts with ``norm``)."""
    gain = cfg.model.init_gain

    def rule(key: str) -> InitRule:
        if key.endswith("bias"):
            return InitRule("zeros")
        if key.split(".")[-2].startswith("norm"):
            return InitRule("ones")
        return InitRule("fan_in", gain)

    return rule


def discriminator_init_rule(cfg: Config):
    """Weights N(0, 1/fan_in); the GroupNorms (``main.N`` modules with a 1-D weight) 1, biases 0."""
    norms = {
        f"main.{i}.weight" for i, mod in enumerate(build_discriminator(cfg).main) if isinstance(mod, torch.nn.GroupNorm)
    }

    def rule(key: str) -> InitRule:
        if key.endswith("bias"):
            return InitRule("zeros")
        return InitRule("ones") if key in norms else InitRule("fan_in", 1.0)

    return rule


def latent_shape(cfg: Config, video_shape) -> tuple[int, ...]:
    """[z, T', H', W'] of a clip [3, T, H, W]."""
    m = cfg.model
    _, t, h, w = video_shape
    return (m.z_channels, 1 + (t - 1) // m.temporal_compression, h // m.spatial_compression, w // m.spatial_compression)


_SALT_IMAGE = 12
"""Salt of the draws that make a microbatch one of images."""


def training_pixels(cfg: Config, batch: dict, device) -> torch.Tensor:
    """The microbatch's clips [B, 3, T, H, W], or with probability ``objective.image_ratio`` one
    frame of each [B, 3, 1, H, W] (the draws from the clips' seeds)."""
    x = batch["video"].to(device, non_blocking=True)
    ratio = cfg.objective.image_ratio
    if ratio <= 0:
        return x
    seeds = batch["sample_seed"].tolist()
    decide = torch.Generator().manual_seed((int(seeds[0]) * 1_000_003 + _SALT_IMAGE) % 2**63)
    if torch.rand((), generator=decide).item() >= ratio:
        return x
    frames = [
        int(torch.randint(x.shape[2], (), generator=torch.Generator().manual_seed((int(s) + _SALT_IMAGE) % 2**63)))
        for s in seeds
    ]
    return torch.stack([clip[:, t : t + 1] for clip, t in zip(x, frames)])


def posterior_noise(cfg: Config, batch: dict, video: torch.Tensor) -> torch.Tensor:
    gens = seeded_generators(batch["sample_seed"], video.device, _SALT_POSTERIOR)
    shape = latent_shape(cfg, video.shape[1:])
    return torch.stack([torch.randn(shape, generator=g, device=video.device) for g in gens])


def _vae_loss(x, o, last_layer, training: bool, output):
    recon, mean, logvar, logits_fake = output
    b = x.shape[0]
    l1 = objective.l1_per_sample(x, recon)
    kl = objective.kl_per_sample(mean, logvar, x[0].numel())
    nll = o.l1_weight * l1
    ssim = None
    if o.ssim_weight > 0 or not training:
        ssim = objective.ssim_per_sample(x, recon)
        nll = nll + o.ssim_weight * (1.0 - ssim)
    loss = nll + o.kl_weight * kl
    count = torch.tensor(b, dtype=torch.int)
    n = torch.tensor(float(b), device=x.device)
    zero = torch.zeros((), device=x.device)
    gan_g, gan_w = zero, zero
    if logits_fake is not None:
        g = objective.generator_adversarial(logits_fake)
        adaptive = objective.adaptive_weight(nll.sum(), g.sum(), last_layer, o.adaptive_weight_max)
        gan_w = o.gan_weight * adaptive
        loss = loss + gan_w * g
        gan_g = g.sum().detach()
    psnr = objective.psnr_per_sample(x, recon.detach())
    with_gan = n if logits_fake is not None else zero
    reports = {
        "loss": torch.stack([loss.sum().detach(), n]),
        "l1": torch.stack([l1.sum().detach(), n]),
        "kl": torch.stack([kl.sum().detach(), n]),
        "psnr": torch.stack([psnr.sum(), n]),
        "ssim": torch.stack([ssim.sum().detach(), n]) if ssim is not None else torch.stack([zero, zero]),
        "gan_g": torch.stack([gan_g, with_gan]),
        "gan_weight": torch.stack([gan_w * b, with_gan]),
    }
    return loss.sum(), count, reports


def vae_step(cfg: Config, parts, progress):
    o = cfg.objective
    (vae,) = parts["vae"]
    discriminator = parts["discriminator"][0] if "discriminator" in parts else None

    def step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        x = training_pixels(cfg, batch, device) if model.training else batch["video"].to(device, non_blocking=True)
        noise = posterior_noise(cfg, batch, x) if o.sample_posterior and model.training else None
        recon, mean, logvar = model(x, noise)
        gan = discriminator is not None and model.training and progress.step >= o.gan_start_step
        logits_fake = discriminator(recon) if gan else None
        last_layer = vae.decoder.conv_out.weight
        return (recon, mean, logvar, logits_fake), functools.partial(_vae_loss, x, o, last_layer, model.training)

    return step


def _hinge_loss(n_real: int, logits: torch.Tensor):
    losses = objective.hinge_discriminator(logits[:n_real], logits[n_real:])
    n = torch.tensor(float(n_real), device=logits.device)
    return losses.sum(), torch.tensor(n_real, dtype=torch.int), {"loss": torch.stack([losses.sum().detach(), n])}


def discriminator_step(cfg: Config, parts, progress):
    o = cfg.objective
    (vae,) = parts["vae"]

    def step(data_iterator, model):
        batch = next(data_iterator)
        x = training_pixels(cfg, batch, next(model.parameters()).device)
        with torch.no_grad():
            noise = posterior_noise(cfg, batch, x) if o.sample_posterior else None
            recon = vae(x, noise)[0]
        logits = model(torch.cat([x, recon.to(x.dtype)]))
        return logits, functools.partial(_hinge_loss, x.shape[0])

    return step


def parts(cfg: Config) -> list[PartSpec]:
    o = cfg.objective
    out = [PartSpec(name="vae", build=build_vae, init_rule=init_rule, forward_step=vae_step)]
    if o.gan_weight > 0:

        def discriminator_train(cfg: Config):
            lr = cfg.objective.disc_lr or cfg.train.lr
            return replace(cfg.train, lr=lr, min_lr=min(cfg.train.min_lr * lr / cfg.train.lr, lr))

        out.append(
            PartSpec(
                name="discriminator",
                build=build_discriminator,
                init_rule=discriminator_init_rule,
                forward_step=discriminator_step,
                optimizer=discriminator_train,
                active_from_step=o.gan_start_step,
            )
        )
    return out


# ----------------------------------------------------------------------------- sizes


def param_count(cfg: Config, with_discriminator: bool = False) -> int:
    """Parameters of the autoencoder (the released model: 498,818,819 for v2), and with
    ``with_discriminator`` those of the GAN's discriminator too."""
    with torch.device("meta"):
        modules = [build_vae(cfg)] + ([build_discriminator(cfg)] if with_discriminator else [])
    return sum(p.numel() for module in modules for p in module.parameters())


def _forward_cost(cfg: Config) -> tuple[float, float]:
    """(forward FLOPs, activation values the leaf modules output) of one clip, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    d = cfg.data
    stored = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor) and not list(module.children()):
            stored[0] += output.numel()

    with torch.device("meta"):
        vae = build_vae(cfg)
        hooks = [m.register_forward_hook(count) for m in vae.modules()]
        with FlopCounterMode(display=False) as counter:
            recon = vae(torch.empty(1, cfg.model.in_channels, d.video_frames, d.video_size, d.video_size))[0]
            if cfg.objective.gan_weight > 0:
                build_discriminator(cfg)(recon)
        for hook in hooks:
            hook.remove()
    return float(counter.get_total_flops()), float(stored[0])


_COSTS: dict[tuple, tuple[float, float]] = {}


def _cost(cfg: Config) -> tuple[float, float]:
    key = (repr(cfg.model), cfg.data.video_frames, cfg.data.video_size, cfg.objective.gan_weight > 0)
    if key not in _COSTS:
        _COSTS[key] = _forward_cost(cfg)
    return _COSTS[key]


def flops_per_sample(cfg: Config) -> float:
    """Training FLOPs of one clip: 3 x the forward (autoencoder, plus the discriminator's pass
    with the GAN on), counted by torch's FlopCounterMode on meta tensors."""
    return 3.0 * _cost(cfg)[0]


def memory_estimate(cfg: Config, dp: int, num_microbatches: int | None = None) -> MemoryEstimate:
    """Weights, gradients and Adam state exactly; activations as the leaf modules' outputs of one
    microbatch (a lower bound: the GroupNorm and activation intermediates come on top)."""
    bf16 = cfg.train.precision != "fp32"
    params = param_count(cfg, with_discriminator=cfg.objective.gan_weight > 0)
    state = params * state_bytes_per_param(bf16, cfg.parallel.distributed_optimizer, dp)
    stored = _cost(cfg)[1] * cfg.train.micro_batch_size * (2 if bf16 else 4)
    if cfg.model.recompute == "full":
        stored = stored / max(1, cfg.model.num_res_blocks * 2 * len(cfg.model.encoder_channel_mult))
    return MemoryEstimate(params, state, stored, state + stored)


# ----------------------------------------------------------------------------- data


def video_pipeline(cfg: Config):
    """Clips of the video shards with pixels in [-1, 1]."""
    from fmtrain.data.video import VideoPipeline

    d = cfg.data
    return VideoPipeline(
        frames=d.video_frames,
        stride=d.video_stride,
        size=d.video_size,
        crop=d.video_crop,
        clips=d.video_clips,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """Video shards (``data.shards``, ``data.valid_shards``), or ``data.corpus=synthetic:videos``:
    moving-shape clips drawn in memory (``data.synthetic_samples`` videos; validation on others)."""
    from fmtrain.data.video import video_batches

    train, valid = video_batches(cfg, topo, run_dir, video_pipeline(cfg))
    return RunData(train=train, valid=valid)


def eval_videos(cfg: Config, vae: VideoVAE, batch: dict, decode=None) -> dict[str, torch.Tensor]:
    """The first validation clip beside its reconstruction (the posterior mean), side by side."""
    x = batch["video"][:1].to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    recon = vae(x)[0]
    return {"reconstruction": torch.cat([x[0], recon[0].clamp(-1, 1)], dim=-1)}


FAMILY = ModelFamily(
    name="video_vae",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=flops_per_sample,
    units_per_sample=lambda cfg: 1,
    memory_estimate=memory_estimate,
    throughput_unit="clips",
    converter=convert,
    eval_videos=eval_videos,
)

__all__ = ["FAMILY", "build_discriminator", "build_vae", "latent_shape", "parts", "vae_kwargs"]
