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


@dataclass
class VAEConfig(ObjectiveConfig):
    """``objective.name=vae``: per sample, ``l1_weight * mean |x - x_hat| + mse_weight *
    mean (x - x_hat)^2 + kl_weight * KL + ssim_weight * (1 - SSIM)`` and, with ``gan_weight``,
    an adaptive-weighted PatchGAN generator term (Esser et al. 2021, "Taming Transformers",
    eq. 7; the discriminator is a part of its own, trained with the hinge loss). Pixels are in [-1, 1]."""

    l1_weight: float = 1.0
    mse_weight: float = 0.0
    """Adds the mean squared error (the loss PSNR measures; diffusers' VAE fine-tuning trains on it
    alone): L1 keeps edges sharp, the squared error pulls hardest on large errors, such as
    objects the decoder does not place yet."""
    kl_weight: float = 1e-6
    """Multiplies the KL divergence to N(0, I) summed over a sample's latent elements and divided by
    its pixel values (the reconstruction's normalisation): 1e-6 weighs it as LDM and Open-Sora do."""
    ssim_weight: float = 0.0
    """Multiplies 1 - SSIM (per frame, pytorch-msssim; needs no downloaded weights)."""
    lpips_weight: float = 0.0
    """LPIPS needs VGG weights downloaded by the ``lpips`` package; refused where they are absent."""
    gan_weight: float = 0.0
    """0: no discriminator. Otherwise the generator term's weight (Open-Sora: 0.05), times the
    adaptive ratio ||grad nll|| / ||grad g|| at the decoder's last layer."""
    gan_start_step: int = 0
    """Optimizer steps before the discriminator and the generator term start."""
    adaptive_weight_max: float = 1e4
    """Clamp of the adaptive ratio."""
    disc_lr: float = 0.0
    """The discriminator's peak learning rate; 0: train.lr. Its schedule is train.*'s."""
    sample_posterior: bool = True
    """Train on a posterior sample (the mean is always used for validation and encoding)."""
    image_ratio: float = 0.0
    """Share of training microbatches taken as images, joint image-video training as the
    Step-Video-T2V report describes: such a microbatch keeps one frame of each clip (drawn from the
    clip's seed; decided from its first clip's seed, so every layout and a resumed run agree), which
    the causal encoder sees as a single image."""

    def check(self, cfg: Config) -> None:
        if not 0.0 <= self.image_ratio <= 1.0:
            raise ConfigError(f"objective.image_ratio={self.image_ratio} must be in [0, 1]")
        for name in ("l1_weight", "mse_weight", "kl_weight", "ssim_weight", "lpips_weight", "gan_weight", "disc_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name}={getattr(self, name)} must be >= 0")
        if self.gan_start_step < 0 or self.adaptive_weight_max <= 0:
            raise ConfigError("objective.gan_start_step must be >= 0 and objective.adaptive_weight_max > 0")
        if self.lpips_weight > 0:
            raise ConfigError(
                f"objective.lpips_weight={self.lpips_weight}: LPIPS needs pretrained VGG weights that the lpips "
                "package downloads, which this installation cannot; use objective.ssim_weight (weight-free)"
            )


@dataclass
class MAEConfig(ObjectiveConfig):
    """``objective.name=mae``: masked video reconstruction (VideoMAE / VideoMAE V2). The encoder
    sees the clip with ``mask_ratio`` of each frame's tokens tube-masked; the decoder predicts the
    pixels of the tokens it is given mask tokens for; the loss is the MSE on the tokens both
    encoder-masked and decoder-visible."""

    mask_ratio: float = 0.9
    """Encoder tube-masking ratio (per time slice)."""
    decoder_mask_ratio: float = 0.5
    """Decoder running-cell masking ratio (0.25, 0.5 or 0.75 of each 2x2 cell); 0: VideoMAE V1
    (the decoder reconstructs exactly the encoder-masked tokens)."""
    norm_target: bool = True
    """Predict each patch's pixels normalised by the patch's own mean and std (per channel), as
    the release; false: the raw [0, 1] pixels."""

    def check(self, cfg: Config) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio={self.mask_ratio} must be in (0, 1)")
        if self.decoder_mask_ratio and self.decoder_mask_ratio not in (0.25, 0.5, 0.75):
            raise ConfigError(
                f"objective.decoder_mask_ratio={self.decoder_mask_ratio}: running-cell masking masks 1, 2 "
                "or 3 of a 2x2 cell: use 0.25, 0.5 or 0.75 (or 0 for VideoMAE V1)"
            )


@dataclass
class DPOConfig(ObjectiveConfig):
    """``objective.name=dpo``: Direct Preference Optimization (Rafailov et al. 2023, "Direct
    Preference Optimization: Your Language Model is Secretly a Reward Model") on (prompt,
    chosen, rejected) pairs, with TRL's ``DPOTrainer`` loss variants. ``train.global_batch_size``
    and ``train.micro_batch_size`` count pairs; a microbatch holds its pairs' chosen sequences
    followed by their rejected ones, so every pair is scored on one pipeline stage."""

    beta: float = 0.1
    """Temperature of the implicit reward ``beta * (log pi - log pi_ref)``."""
    loss: str = "sigmoid"
    """sigmoid: DPO's ``-log sigmoid(beta * margin)``; with ``label_smoothing`` > 0 it is cDPO.
    ipo: IPO's ``(margin - 1 / (2 beta))^2`` (Azar et al. 2023) on length-averaged log-probs, as TRL."""
    label_smoothing: float = 0.0
    """cDPO's assumed share of flipped preference labels (sigmoid loss only), in [0, 0.5)."""
    reference: str = ""
    """The frozen reference model: an fmtrain checkpoint (or run directory) or a Hugging Face /
    release directory; empty: the policy's starting weights (``model.init_from_hf`` when set,
    else the run seed's initialisation)."""
    reference_offload: bool = False
    """Keep the reference's weights in host memory between its forward passes."""
    precompute_reference: bool = False
    """Before the first step, one forward-only pass of the reference over every pair of
    ``data.shards`` and ``data.valid_shards`` writes their log-probs to
    RUN_DIR/data/reference_logps.json (keyed by sample key; reused by a resumed run; an
    interrupted pass continues from each data-parallel replica's partial table); the reference
    is then freed and training reads the table (no reference forward per step)."""
    truncation: str = "keep_end"
    """A prompt + completion longer than ``model.seq_length + 1`` tokens: keep_end keeps its last
    tokens (TRL's default), keep_start its first; none skips the pair (counted, naming it)."""
    sft_weight: float = 0.0
    """RPO (Pang et al. 2024): adds ``sft_weight`` times the chosen completion's mean per-token
    negative log-likelihood to each pair's loss (TRL's ``rpo_alpha``)."""
    add_bos: bool = False
    """Put BOS before each prompt (TRL adds it only when the tokenizer's template does)."""
    packing: bool = False
    """Pack a microbatch's sequences (each pair's chosen and rejected) into as few rows of
    ``model.seq_length`` tokens as they fit (first fit), each with its own positions and
    attention that stays inside it: the same losses as one row per sequence, without the
    padding. Under pipeline parallelism the rows are padded back to 2 x micro_batch_size (the
    schedule sends one tensor shape)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss": ("sigmoid", "ipo"),
        "truncation": ("keep_end", "keep_start", "none"),
    }
    ROWS_PER_SAMPLE: ClassVar[int] = 2
    """Sequences per sample (a pair): what the pipeline's microbatch tensors hold."""
    CONTEXT_PARALLEL: ClassVar[bool] = False

    def check(self, cfg: Config) -> None:
        if self.beta <= 0:
            raise ConfigError(f"objective.beta={self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"objective.label_smoothing is cDPO's, for objective.loss=sigmoid (not {self.loss})")
        if self.sft_weight < 0:
            raise ConfigError(f"objective.sft_weight={self.sft_weight} must be >= 0")


@dataclass
class VideoDPOConfig(FlowMatchingConfig):
    """``objective.name=video_dpo``: Diffusion-DPO (Wallace et al. 2023) on flow-matching velocity
    errors (as Flow-DPO, Liu et al. 2025). A pair is two latents of one prompt; both get the same
    t and noise (drawn from the pair's sample seed), and with e the mean squared velocity error of
    a latent: ``-log sigmoid(-beta / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref)))``. The timestep and
    sampler settings are flow matching's."""

    beta: float = 5000.0
    """Scales the error differences, which are means over a latent's elements (so beta is tied to
    that normalisation: a sum over elements would need beta / elements). 5000 is Diffusion-DPO's
    setting for Stable Diffusion latents."""
    text_drop_prob: float = 0.0
    """Must stay 0: both completions of a pair are judged under the prompt."""
    reference: str = ""
    """The frozen reference DiT: an fmtrain checkpoint or the release directory; empty: the
    policy's starting weights (``checkpoint.load``, else ``model.init_from_hf``, else the run seed)."""
    reference_offload: bool = False
    """Keep the reference's weights in host memory between its forward passes."""

    ROWS_PER_SAMPLE: ClassVar[int] = 2
    CONTEXT_PARALLEL: ClassVar[bool] = False

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if self.beta <= 0:
            raise ConfigError(f"objective.beta={self.beta} must be positive")
        if self.text_drop_prob:
            raise ConfigError(
                f"objective.text_drop_prob={self.text_drop_prob}: Video-DPO compares a pair under its prompt; "
                "set it to 0"
            )
        if self.l1_weight:
            raise ConfigError("objective.l1_weight is flow matching's; Video-DPO's errors are squared errors")


SECTIONS: dict[str, type[ObjectiveConfig]] = {
    "lm": LMConfig,
    "flow_matching": FlowMatchingConfig,
    "vae": VAEConfig,
    "mae": MAEConfig,
    "dpo": DPOConfig,
    "video_dpo": VideoDPOConfig,
}
"""Built-in objective name -> its section."""


def reference_flops_factor(cfg) -> float:
    """Training FLOPs of a preference step over the policy's alone: 4/3 while a co-located
    reference runs a forward (a third of forward + backward) every step, else 1."""
    o = cfg.objective
    if o.name not in ("dpo", "video_dpo") or getattr(o, "precompute_reference", False):
        return 1.0
    return 4 / 3
