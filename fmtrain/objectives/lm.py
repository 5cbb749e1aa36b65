"""Next-token prediction (``objective.name=lm``) as a pure function of tensors.

The model's last pipeline stage returns the per-token cross entropy ([b, s], megatron's
``GPTModel`` with labels); the loss of a microbatch is the sum over the tokens its mask keeps,
and the engine divides the step's sum by the step's token count (``calculate_per_token_loss``),
so any split into microbatches and data-parallel ranks gives the same mean.
"""

from __future__ import annotations

import torch

from fmtrain.objectives.sections import LMConfig

CONFIG = LMConfig
"""This objective's config section (declared in :mod:`fmtrain.objectives.sections`)."""


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum of the masked token losses, the token count, ``{"loss": [sum, count]}``)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    return loss_sum, num_tokens, {"loss": report}


__all__ = ["CONFIG", "LMConfig", "masked_token_loss"]
