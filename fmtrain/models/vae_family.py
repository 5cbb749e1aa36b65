"""What the VAE families' registry entries share (``video_vae``, ``st_vae``): the autoencoder
(primary part) trained with the ``vae`` objective and, with ``objective.gan_weight``, a 3D
PatchGAN discriminator trained beside it with its own optimizer; sizes; video data. A family
gives its module builder and converter to :func:`vae_family`.

A training step: the VAE's forward step encodes each clip, decodes a posterior sample (its
noise drawn from the clip's ``sample_seed``, so every layout and a resumed run draw the same),
and sums ``objective.l1_weight * L1 + mse_weight * MSE + kl_weight * KL + ssim_weight *
(1 - SSIM)`` and, once the GAN has started, ``gan_weight * adaptive * g`` with the
discriminator frozen for this part; then the discriminator's forward step scores the clips
against their reconstructions by the updated VAE (hinge loss). Both are plain torch modules:
data parallel (megatron DDP + the distributed optimizer), with activation checkpointing (``model.recompute=full``).

The model section of a VAE family has ``in_channels``, ``z_channels``, ``spatial_compression``,
``temporal_compression``, ``recompute``, ``init_gain``, ``discriminator_channels``,
``discriminator_layers`` and the codec's ``chunk_frames``, ``tile_size``, ``tile_overlap``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import torch

from fmtrain.config import Config
from fmtrain.models.init import InitRule
from fmtrain.models.registry import Converter, LatentCodec, ModelFamily, PartSpec, RunData
from fmtrain.models.saved_tensors import SavedStorageBytes
from fmtrain.models.vae_modules import LatentVAE, PatchDiscriminator3D
from fmtrain.models.workload import TracedWorkload
from fmtrain.objectives import vae as objective
from fmtrain.objectives.flow_matching import seeded_generators

_SALT_POSTERIOR = 11
"""Salt of the per-sample generator of the posterior noise."""
_SALT_IMAGE = 12
"""Salt of the draws that make a microbatch one of images."""

BuildVAE = Callable[..., LatentVAE]


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
    """[z, T', H', W'] of a clip [C, T, H, W]."""
    m = cfg.model
    _, t, h, w = video_shape
    return (m.z_channels, 1 + (t - 1) // m.temporal_compression, h // m.spatial_compression, w // m.spatial_compression)


def training_pixels(cfg: Config, batch: dict, device) -> torch.Tensor:
    """The microbatch's clips [B, C, T, H, W], or with probability ``objective.image_ratio`` one
    frame of each [B, C, 1, H, W] (the draws from the clips' seeds)."""
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
    if o.mse_weight > 0:
        nll = nll + o.mse_weight * objective.mse_per_sample(x, recon)
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
        return (recon, mean, logvar, logits_fake), functools.partial(_vae_loss, x, o, vae.last_layer(), model.training)

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


def _discriminator_train(cfg: Config):
    """``cfg.train`` at ``objective.disc_lr``, its floor scaled alike."""
    lr = cfg.objective.disc_lr or cfg.train.lr
    ratio = cfg.train.min_lr / cfg.train.lr if cfg.train.lr else 0.0
    return replace(cfg.train, lr=lr, min_lr=min(ratio * lr, lr))


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


def eval_videos(cfg: Config, vae: LatentVAE, batch: dict, decode=None) -> dict[str, torch.Tensor]:
    """The first validation clip beside its reconstruction (the posterior mean), side by side."""
    x = batch["video"][:1].to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    recon = vae(x)[0]
    return {"reconstruction": torch.cat([x[0], recon[0].clamp(-1, 1)], dim=-1)}


def vae_family(
    name: str,
    *,
    build_vae: BuildVAE,
    converter: Converter,
    latent_codec: LatentCodec,
    init: Callable[[Config], Callable[[str], InitRule]] = init_rule,
    parameter_breakdown: Callable[[Config], dict[str, int]] | None = None,
) -> ModelFamily:
    """The registry entry of a VAE family whose autoencoder ``build_vae(cfg)`` builds (a
    :class:`~fmtrain.models.vae_modules.LatentVAE`); ``init``: the autoencoder's init rule. Its
    memory and FLOPs come from tracing its training step on the meta device
    (``traced_workload``: ``fmtrain info`` and ``fmtrain plan``)."""

    def parts(cfg: Config) -> list[PartSpec]:
        o = cfg.objective
        out = [PartSpec(name="vae", build=build_vae, init_rule=init, forward_step=vae_step)]
        if o.gan_weight > 0:
            out.append(
                PartSpec(
                    name="discriminator",
                    build=build_discriminator,
                    init_rule=discriminator_init_rule,
                    forward_step=discriminator_step,
                    optimizer=_discriminator_train,
                    active_from_step=o.gan_start_step,
                )
            )
        return out

    def param_count(cfg: Config, with_discriminator: bool = False) -> int:
        """Parameters of the autoencoder, and with ``with_discriminator`` those of the GAN's
        discriminator too."""
        with torch.device("meta"):
            modules = [build_vae(cfg)] + ([build_discriminator(cfg)] if with_discriminator else [])
        return sum(p.numel() for module in modules for p in module.parameters())

    forward_flops: dict[tuple, float] = {}

    def flops_per_sample(cfg: Config) -> float:
        """Training FLOPs of one clip: 3 x the forward (autoencoder, plus the discriminator's pass
        with the GAN on), counted by torch's FlopCounterMode on meta tensors (once per model
        section and clip shape)."""
        from torch.utils.flop_counter import FlopCounterMode

        d = cfg.data
        key = (repr(cfg.model), d.video_frames, d.video_size, cfg.objective.gan_weight > 0)
        if key not in forward_flops:
            with torch.device("meta"), FlopCounterMode(display=False) as counter:
                vae = build_vae(cfg)
                recon = vae(torch.empty(1, cfg.model.in_channels, d.video_frames, d.video_size, d.video_size))[0]
                if cfg.objective.gan_weight > 0:
                    build_discriminator(cfg)(recon)
            forward_flops[key] = float(counter.get_total_flops())
        return 3.0 * forward_flops[key]

    traces: dict[tuple, TracedWorkload] = {}

    def traced_workload(cfg: Config, bf16: bool) -> TracedWorkload:
        """One clip's training step, the autoencoder's forward and loss (``_vae_loss``, as the
        engine runs it: the posterior sample, L1 / MSE / KL / SSIM and, with the GAN, the
        discriminator's generator term with its adaptive weight) and its backward, on meta
        tensors (16-bit weights and pixels with ``bf16``, as the engine casts the part)."""
        from torch.utils.flop_counter import FlopCounterMode

        d, o = cfg.data, cfg.objective
        key = (repr(cfg.model), repr(o), d.video_frames, d.video_size, bf16)
        if key in traces:
            return traces[key]
        dtype = torch.bfloat16 if bf16 else torch.float32
        with torch.device("meta"):
            vae = build_vae(cfg).to(dtype)
            discriminator = build_discriminator(cfg).to(dtype) if o.gan_weight > 0 else None
        parts = [vae] + ([discriminator] if discriminator is not None else [])
        saved, flops, largest = {}, {}, 0.0
        for recompute in ("none", "full"):
            vae.set_recompute(recompute == "full")
            counter = SavedStorageBytes()
            shape = (1, cfg.model.in_channels, d.video_frames, d.video_size, d.video_size)
            x = torch.empty(shape, device="meta", dtype=dtype)
            with (
                FlopCounterMode(display=False) as flop_counter,
                torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack),
            ):
                noise = torch.zeros(1, *latent_shape(cfg, x.shape[1:]), device="meta", dtype=dtype)
                recon, mean, logvar = vae(x, noise if o.sample_posterior else None)
                logits = discriminator(recon) if discriminator is not None else None
                loss, _, _ = _vae_loss(x, o, vae.last_layer(), True, (recon, mean, logvar, logits))
                loss.backward()
            saved[recompute], flops[recompute] = counter.peak, float(flop_counter.get_total_flops())
            largest = max(largest, counter.largest)
        params = sum(p.numel() for part in parts for p in part.parameters())
        traces[key] = TracedWorkload(params, saved, flops, flops_per_sample(cfg), largest)
        return traces[key]

    return ModelFamily(
        name=name,
        parts=parts,
        prepare_data=prepare_data,
        param_count=param_count,
        flops_per_sample=flops_per_sample,
        units_per_sample=lambda cfg: 1,
        traced_workload=traced_workload,
        throughput_unit="clips",
        converter=converter,
        eval_videos=eval_videos,
        parameter_breakdown=parameter_breakdown,
        latent_codec=latent_codec,
    )


__all__ = [
    "build_discriminator",
    "discriminator_init_rule",
    "eval_videos",
    "init_rule",
    "latent_shape",
    "posterior_noise",
    "prepare_data",
    "training_pixels",
    "vae_family",
    "video_pipeline",
]
