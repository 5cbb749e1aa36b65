"""The config sections of the built-in objectives (``objective.*``), in one light module: the
launcher reads them before anything imports torch. Each objective module (``fmtrain.objectives.NAME``)
exposes its section as ``CONFIG``; an objective of your own (``objective.name=my_pkg.my_objective``)
declares ``CONFIG`` in its module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fmtrain.config import Config, ConfigError, ObjectiveConfig

BUILTIN_WEIGHTINGS = ("none", "cosmap")
"""Flow-matching loss weightings shipped with fmtrain (more: ``flow_matching.register_weighting``)."""


@dataclass
class LMConfig(ObjectiveConfig):
    """``objective.name=lm``: next-token prediction; no settings of its own (the data's loss
    mask decides which tokens count)."""


@dataclass
class FlowMatchingConfig(ObjectiveConfig):
    """``objective.name=flow_matching``: x_t = t*x1 + (1-t)*x0, t=0 noise, t=1 data; the model
    predicts the velocity x1 - x0. The sampler settings are the Euler sampler's."""

    timestep_sampling: str = "logit_normal"
    """uniform | logit_normal (t = sigmoid(u), u ~ N(logit_mean, logit_std))."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    """Training time shift: SD3's s*sigma/(1+(s-1)*sigma) on the noise level sigma = 1-t
    (s > 1 trains more at high noise); 1 leaves t as sampled."""
    loss_weighting: str = "none"
    """Per-sample loss weight w(t): none | cosmap (SD3), or a name registered with
    ``fmtrain.objectives.flow_matching.register_weighting``."""
    l1_weight: float = 0.0
    """Adds l1_weight * mean |v_pred - v| to the MSE (LaVin-DiT uses 0.1)."""
    text_drop_prob: float = 0.1
    """Classifier-free guidance training: the share of samples whose text condition is
    replaced by the null condition."""
    sample_steps: int = 50
    """Sampler: Euler steps."""
    sample_shift: float = 13.0
    """Sampler: SD3 time shift of the Euler grid (Step-Video recommends 13; Turbo 17)."""
    guidance_scale: float = 9.0
    """Sampler: classifier-free guidance scale (1 disables the unconditional pass)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"timestep_sampling": ("uniform", "logit_normal")}

    def check(self, cfg: Config) -> None:
        if self.sample_steps < 1:
            raise ConfigError(f"objective.sample_steps={self.sample_steps} must be at least 1")
        if self.logit_std <= 0 or self.shift <= 0 or self.sample_shift <= 0:
            raise ConfigError("objective.logit_std, objective.shift and objective.sample_shift must be positive")
        if not 0.0 <= self.text_drop_prob <= 1.0:
            raise ConfigError(f"objective.text_drop_prob={self.text_drop_prob} must be in [0, 1]")
        if self.l1_weight < 0:
            raise ConfigError(f"objective.l1_weight={self.l1_weight} must be >= 0")
        if self.loss_weighting not in BUILTIN_WEIGHTINGS:  # one registered with register_weighting?
            from fmtrain.objectives.flow_matching import get_weighting

            try:
                get_weighting(self.loss_weighting)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


SECTIONS: dict[str, type[ObjectiveConfig]] = {"lm": LMConfig, "flow_matching": FlowMatchingConfig}
"""Built-in objective name -> its section."""
