"""Video-DPO (``objective.name=video_dpo``): Diffusion-DPO on flow-matching velocity errors.

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
Optimization", eq. 14 and its ``train.py``) with the denoising error replaced by the velocity
error of flow matching (Flow-DPO, Liu et al. 2025, "Improving Video Generation with Human
Feedback"). For a pair (x_w chosen, x_l rejected) of one prompt, the same t and noise for both,
and e = the mean squared velocity error over a latent's elements:

    inside = -beta / 2 * ((e_w - e_w_ref) - (e_l - e_l_ref))
    loss   = -log sigmoid(inside)

``implicit_acc`` is the share of pairs with ``inside > 0`` (the policy improved the chosen latent
more than the rejected one, relative to the reference), also per quarter of t
(``implicit_acc/t<0.25`` ...). ``rewards/chosen`` = ``-beta / 2 * (e_w - e_w_ref)`` and
``rewards/rejected`` likewise, so ``rewards/margins`` is ``inside``, named as TRL names them.

The model's last stage returns per-sample error sums ``[rows, 3]`` (squared, absolute, element
count: :func:`fmtrain.objectives.flow_matching.error_sums`); a microbatch of n pairs is 2n rows,
the chosen latents first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtrain.objectives.dpo import pairs_in
from fmtrain.objectives.sections import VideoDPOConfig

CONFIG = VideoDPOConfig
"""This objective's config section (declared in :mod:`fmtrain.objectives.sections`)."""

T_BUCKETS = (0.25, 0.5, 0.75, 1.0)
"""Upper edges of the t quarters the per-bucket accuracy is reported for."""


def mean_squared_errors(error_sums: torch.Tensor) -> torch.Tensor:
    """[rows, 3] error sums -> [rows] mean squared velocity error per latent."""
    return error_sums[:, 0] / error_sums[:, 2].clamp(min=1)


def bucket_name(upper: float) -> str:
    return f"implicit_acc/t<{upper:.2f}"


def video_dpo_loss(beta: float, t: torch.Tensor, reference_errors: torch.Tensor, error_sums: torch.Tensor):
    """A microbatch's (sum of its pairs' losses, its pair count, reports as ``[sum, count]``).

    ``t`` [2n] (the two halves equal), ``reference_errors`` [2n]: the reference's
    :func:`mean_squared_errors` of the same rows with the same t and noise."""
    n = pairs_in(error_sums.shape[0], reference_errors, "error")
    errors = mean_squared_errors(error_sums.float())
    reference = reference_errors.to(errors)
    chosen = -0.5 * beta * (errors[:n] - reference[:n])
    rejected = -0.5 * beta * (errors[n:] - reference[n:])
    inside = chosen - rejected
    losses = -F.logsigmoid(inside)
    loss_sum = losses.sum()
    count = torch.tensor(float(n), device=loss_sum.device)
    correct = (inside > 0).float().detach()
    reports = {
        "loss": torch.stack([loss_sum.detach().clone(), count]),
        "implicit_acc": torch.stack([correct.sum(), count]),
        "rewards/chosen": torch.stack([chosen.detach().sum(), count]),
        "rewards/rejected": torch.stack([rejected.detach().sum(), count]),
        "rewards/accuracies": torch.stack([correct.sum(), count]),
        "rewards/margins": torch.stack([inside.detach().sum(), count]),
        "mse/chosen": torch.stack([errors[:n].detach().sum(), count]),
        "mse/rejected": torch.stack([errors[n:].detach().sum(), count]),
    }
    pair_t = t[:n].to(errors)
    lower = 0.0
    for upper in T_BUCKETS:
        inside_bucket = ((pair_t >= lower) & (pair_t < upper if upper < 1.0 else pair_t <= upper)).float()
        reports[bucket_name(upper)] = torch.stack([(correct * inside_bucket).sum(), inside_bucket.sum()])
        lower = upper
    return loss_sum, count.to(torch.int), reports


__all__ = ["CONFIG", "T_BUCKETS", "VideoDPOConfig", "bucket_name", "mean_squared_errors", "video_dpo_loss"]
