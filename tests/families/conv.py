"""A plain torch conv net (no megatron layers) regressing a fixed linear map of random images:
the engine's path for any ``torch.nn.Module`` (DDP + the distributed optimizer, DP only)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fmtrain.config import Config, FamilySettings, ModelConfig, ObjectiveConfig
from fmtrain.models.init import InitRule
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.models.sizes import MemoryEstimate


@dataclass
class ConvModelConfig(ModelConfig):
    channels: int = 8
    size: int = 8
    outputs: int = 4


@dataclass
class RegressionObjective(ObjectiveConfig):
    """Squared error summed over outputs, averaged over samples."""


CONFIG = RegressionObjective
SETTINGS = FamilySettings(model=ConvModelConfig, objectives=("tests.families.conv",))


class ConvNet(torch.nn.Module):
    def __init__(self, channels: int, size: int, outputs: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, stride=2)
        self.head = torch.nn.Linear(channels * (size // 2) ** 2, outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.norm(self.conv1(images)))
        x = torch.nn.functional.silu(self.conv2(x))
        return self.head(x.flatten(1))


def build(cfg: Config, megatron_config, *, pre_process, post_process, vp_stage) -> torch.nn.Module:
    m = cfg.model
    return ConvNet(m.channels, m.size, m.outputs)


def init_rule(cfg: Config):
    def rule(key: str) -> InitRule:
        if key.endswith("bias"):
            return InitRule("zeros")
        if key.startswith("norm."):
            return InitRule("ones")
        return InitRule("normal", 0.2)

    return rule


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).sum(dim=1)


def _loss(target: torch.Tensor, output: torch.Tensor):
    losses = per_sample_loss(output, target)
    count = torch.tensor(losses.numel(), dtype=torch.int)
    return losses.sum(), count, {"loss": torch.stack([losses.sum().detach(), count.float()])}


def forward_step(cfg: Config, parts, progress):
    def step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["images"]), functools.partial(_loss, batch["target"])

    return step


def batches(cfg: Config, step: int, dp_rank: int, num_microbatches: int, micro_batch_size: int) -> list[dict]:
    """Images and targets of one step for one DP rank (a pure function of the seed and step)."""
    m = cfg.model
    weight = torch.randn(m.outputs, 3 * m.size * m.size, generator=torch.Generator().manual_seed(cfg.run.seed))
    out = []
    for i in range(num_microbatches):
        g = torch.Generator().manual_seed(cfg.run.seed * 100_003 + step * 1009 + dp_rank * 101 + i)
        images = torch.randn(micro_batch_size, 3, m.size, m.size, generator=g)
        out.append({"images": images, "target": images.flatten(1) @ weight.T / 10})
    return out


class Sampler:
    def __init__(self, cfg: Config, dp: int):
        self.cfg, self.dp = cfg, dp
        t = cfg.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)

    def microbatches(self, step: int, dp_rank: int) -> list[dict]:
        return batches(self.cfg, step, dp_rank, self.num_microbatches, self.cfg.train.micro_batch_size)


def param_count(cfg: Config) -> int:
    m = cfg.model
    return sum(p.numel() for p in ConvNet(m.channels, m.size, m.outputs).parameters())


FAMILY = ModelFamily(
    name="tests.families.conv",
    parts=lambda cfg: [PartSpec(name="model", build=build, init_rule=init_rule, forward_step=forward_step)],
    prepare_data=lambda cfg, topo, run_dir: RunData(train=Sampler(cfg, topo.dp)),
    param_count=param_count,
    flops_per_sample=lambda cfg: 6.0 * param_count(cfg),
    units_per_sample=lambda cfg: 1,
    memory_estimate=lambda cfg, dp, n: MemoryEstimate(
        param_count(cfg), 16.0 * param_count(cfg), 0.0, 16.0 * param_count(cfg)
    ),
    throughput_unit="images",
)
