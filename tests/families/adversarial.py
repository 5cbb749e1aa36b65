"""A stand-in adversarial pair: two trainable parts with two optimizers (a generator and its
discriminator, plain torch MLPs, the non-saturating logistic GAN loss), on synthetic data
drawn as a pure function of (seed, step, DP rank): what the video VAE's generator +
discriminator need from the engine, at toy size."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fmtrain.config import Config, FamilySettings, ModelConfig, ObjectiveConfig
from fmtrain.models.init import InitRule
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.models.sizes import MemoryEstimate


@dataclass
class AdversarialConfig(ModelConfig):
    dim: int = 8
    """Data dimension."""
    noise_dim: int = 4
    hidden: int = 16
    disc_lr: float = 3e-3
    """The discriminator's own learning rate (its schedule's peak)."""


@dataclass
class LogisticGAN(ObjectiveConfig):
    """Generator: softplus(-D(G(z))); discriminator: softplus(-D(x)) + softplus(D(G(z)))."""


CONFIG = LogisticGAN
SETTINGS = FamilySettings(model=AdversarialConfig, objectives=("tests.families.adversarial",))


def mlp(inputs: int, hidden: int, outputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, outputs))


def build_generator(cfg: Config, megatron_config, *, pre_process, post_process, vp_stage):
    return mlp(cfg.model.noise_dim, cfg.model.hidden, cfg.model.dim)


def build_discriminator(cfg: Config, megatron_config, *, pre_process, post_process, vp_stage):
    return mlp(cfg.model.dim, cfg.model.hidden, 1)


def init_rule(cfg: Config):
    return lambda key: InitRule("zeros") if key.endswith("bias") else InitRule("normal", 0.3)


def _report(losses: torch.Tensor):
    count = torch.tensor(losses.numel(), dtype=torch.int)
    return losses.sum(), count, {"loss": torch.stack([losses.sum().detach(), count.float()])}


def generator_step(cfg: Config, parts, progress):
    (discriminator,) = parts["discriminator"]

    def step(data_iterator, model):
        batch = next(data_iterator)
        fake = model(batch["noise"])
        return discriminator(fake).squeeze(1), lambda logits: _report(F.softplus(-logits))

    return step


def discriminator_step(cfg: Config, parts, progress):
    (generator,) = parts["generator"]

    def loss(n_real: int, logits: torch.Tensor):
        return _report(F.softplus(-logits[:n_real]) + F.softplus(logits[n_real:]))

    def step(data_iterator, model):
        batch = next(data_iterator)
        with torch.no_grad():
            fake = generator(batch["noise"])
        logits = model(torch.cat([batch["real"], fake])).squeeze(1)
        return logits, functools.partial(loss, batch["real"].shape[0])

    return step


def parts(cfg: Config) -> list[PartSpec]:
    def discriminator_train(cfg: Config):
        return replace(cfg.train, lr=cfg.model.disc_lr, min_lr=cfg.model.disc_lr / 10)

    return [
        PartSpec(name="generator", build=build_generator, init_rule=init_rule, forward_step=generator_step),
        PartSpec(
            name="discriminator",
            build=build_discriminator,
            init_rule=init_rule,
            forward_step=discriminator_step,
            optimizer=discriminator_train,
        ),
    ]


class Sampler:
    """Real samples from two Gaussian blobs, and the generator's noise; stateless, and the same
    global batch whatever the data-parallel size (microbatch ``g`` of a step is DP rank
    ``g // n``'s ``g % n``-th)."""

    def __init__(self, cfg: Config, dp: int):
        self.cfg = cfg
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)

    def microbatches(self, step: int, dp_rank: int) -> list[dict]:
        m, b = self.cfg.model, self.cfg.train.micro_batch_size
        out = []
        for i in range(self.num_microbatches):
            index = dp_rank * self.num_microbatches + i
            g = torch.Generator().manual_seed(self.cfg.run.seed * 7919 + step * 131 + index)
            centre = torch.where(torch.rand(b, 1, generator=g) < 0.5, 1.0, -1.0)
            real = centre + 0.2 * torch.randn(b, m.dim, generator=g)
            out.append({"real": real, "noise": torch.randn(b, m.noise_dim, generator=g)})
        return out


def param_count(cfg: Config) -> int:
    m = cfg.model
    return sum(
        p.numel() for net in (mlp(m.noise_dim, m.hidden, m.dim), mlp(m.dim, m.hidden, 1)) for p in net.parameters()
    )


FAMILY = ModelFamily(
    name="tests.families.adversarial",
    parts=parts,
    prepare_data=lambda cfg, topo, run_dir: RunData(train=Sampler(cfg, topo.dp)),
    param_count=param_count,
    flops_per_sample=lambda cfg: 6.0 * param_count(cfg),
    units_per_sample=lambda cfg: 1,
    memory_estimate=lambda cfg, dp, n: MemoryEstimate(
        param_count(cfg), 16.0 * param_count(cfg), 0.0, 16.0 * param_count(cfg)
    ),
    throughput_unit="samples",
)
