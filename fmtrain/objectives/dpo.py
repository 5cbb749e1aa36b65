"""Direct Preference Optimization (``objective.name=dpo``) as pure functions of tensors.

For a pair (prompt x, chosen y_w, rejected y_l), policy pi and frozen reference pi_ref
(Rafailov et al. 2023, eq. 7), with log-probabilities summed over the completion's tokens
(its EOS included):

    margin = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid (DPO):        -log sigmoid(beta * margin)
    sigmoid with eps (cDPO): -(1 - eps) log sigmoid(beta * margin) - eps log sigmoid(-beta * margin)
    ipo:                  (margin - 1 / (2 beta))^2, on log-probs averaged over each completion's tokens

which are TRL's ``DPOTrainer`` formulas (``loss_type`` sigmoid / ipo, ``label_smoothing``), as are
the reported ``rewards/*`` (``beta * (log pi - log pi_ref)`` per completion) and ``logps/*``.

A microbatch holds n pairs as 2n sequences: the chosen ones, then the rejected ones in the same
order, one per row, or packed several to a row (``objective.packing``, with a ``sequence_index``
naming each token's sequence). The model's last pipeline stage returns the per-token cross
entropy ([rows, s], computed vocab-parallel: no rank holds full logits), so a sequence's
log-probability is minus its masked sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmtrain.objectives.sections import DPOConfig, reference_flops_factor

CONFIG = DPOConfig
"""This objective's config section (declared in :mod:`fmtrain.objectives.sections`)."""

REPORTS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
"""What every DPO step reports besides ``loss`` (TRL's metric names), each a mean over pairs."""


def sequence_logps(
    per_token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_index: torch.Tensor | None = None,
    sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each sequence's masked tokens, their count): one sequence per row,
    ``[rows, s] -> ([rows], [rows])``, or packed rows with ``sequence_index`` [rows, s] (-1 on
    padding) -> ([sequences], [sequences])."""
    mask = loss_mask.float()
    if sequence_index is None:
        return -(per_token_loss.float() * mask).sum(dim=1), mask.sum(dim=1)
    index = sequence_index.reshape(-1).clamp(min=0)  # padding carries no mask
    sums = mask.new_zeros(sequences).scatter_add(0, index, (per_token_loss.float() * mask).reshape(-1))
    return -sums, mask.new_zeros(sequences).scatter_add(0, index, mask.reshape(-1))


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from per-completion log-probs [n]."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"objective.loss={loss!r}: one of sigmoid, ipo")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def _as_used(settings: DPOConfig, logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.clamp(min=1) if settings.loss == "ipo" else logps


def completion_logps(
    settings: DPOConfig,
    per_token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_index: torch.Tensor | None = None,
    sequences: int | None = None,
) -> torch.Tensor:
    """Each sequence's log-probability as the loss uses it: summed, or (IPO) averaged over its tokens."""
    return _as_used(settings, *sequence_logps(per_token_loss, loss_mask, sequence_index, sequences))


def pairs_in(rows: int, reference: torch.Tensor, what: str) -> int:
    """The pair count of a microbatch of ``rows`` rows (chosen rows, then rejected ones) with one
    reference value per row; raises ValueError naming ``what`` otherwise."""
    if rows % 2 or reference.shape != (rows,):
        raise ValueError(
            f"a preference microbatch holds chosen rows then rejected rows with one reference {what} each; got "
            f"{rows} rows and reference {what}s of shape {tuple(reference.shape)}"
        )
    return rows // 2


def missing_reference(key: str):
    """The loss function of a preference microbatch that reached the last stage without ``key``
    (the reference's outputs, which the policy's ``prepare_microbatches`` adds there)."""

    def loss_fn(output):
        raise RuntimeError(f"a preference microbatch reached the loss without the reference's {key}")

    return loss_fn


def dpo_loss(
    settings: DPOConfig,
    loss_mask: torch.Tensor,
    reference_logps: torch.Tensor,
    per_token_loss: torch.Tensor,
    sequence_index: torch.Tensor | None = None,
):
    """A microbatch's (sum of its pairs' losses, its pair count, reports as ``[sum, count]``).

    ``reference_logps`` [2n]: the reference's :func:`completion_logps` of the same sequences;
    ``sequence_index``: packed rows' token-to-sequence map (None: one sequence per row)."""
    sequences = per_token_loss.shape[0] if sequence_index is None else reference_logps.shape[0]
    n = pairs_in(sequences, reference_logps, "log-prob")
    logps, tokens = sequence_logps(per_token_loss, loss_mask, sequence_index, sequences)
    policy = _as_used(settings, logps, tokens)
    reference = reference_logps.to(policy)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        policy[:n],
        policy[n:],
        reference[:n],
        reference[n:],
        beta=settings.beta,
        loss=settings.loss,
        label_smoothing=settings.label_smoothing,
    )
    reports = {}
    if settings.sft_weight:
        nll = -logps[:n] / tokens[:n].clamp(min=1)
        reports["dpo/preference_loss"] = losses.detach().sum()
        reports["dpo/sft_nll"] = nll.detach().sum()
        losses = losses + settings.sft_weight * nll
    reports.update(
        {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy[:n].detach().sum(),
            "logps/rejected": policy[n:].detach().sum(),
        }
    )
    loss_sum = losses.sum()
    count = torch.tensor(float(n), device=loss_sum.device)
    report = {"loss": torch.stack([loss_sum.detach().clone(), count])}
    report.update({name: torch.stack([value.float(), count]) for name, value in reports.items()})
    return loss_sum, count.to(torch.int), report


def reference_source(cfg) -> str:
    """Where a DPO reference's weights come from (``dpo`` and ``video_dpo``):
    ``objective.reference``, else the policy's starting weights (``checkpoint.load``, else
    ``model.init_from_hf``, else the run seed: "")."""
    return cfg.objective.reference or cfg.checkpoint.load or cfg.model.init_from_hf


def first_step_check(cfg, loss: float, reports: dict[str, float]) -> str | None:
    """The log line after a fresh DPO run's first step. With the reference equal to the policy
    every margin is 0: the loss is ln 2 (sigmoid, cDPO, Video-DPO) or 1 / (2 beta)^2 (IPO); any
    other value means the reference is not the weights the user thinks."""
    o = cfg.objective
    if o.name not in ("dpo", "video_dpo"):
        return None
    source = reference_source(cfg)
    preference = reports.get("dpo/preference_loss", loss)
    if o.reference and o.reference not in (cfg.checkpoint.load, cfg.model.init_from_hf):
        return f"DPO step 1: preference loss {preference:.6f} against the reference {source}"
    ipo = getattr(o, "loss", "sigmoid") == "ipo"
    expected, name = ((1 / (2 * o.beta)) ** 2, "1/(2 beta)^2") if ipo else (math.log(2), "ln 2")
    if abs(preference - expected) <= 1e-3 * expected:
        return f"DPO step 1: preference loss {preference:.6f} = {name}, as it must be with the reference = the policy"
    return (
        f"warning: DPO step 1: preference loss {preference:.6f}, not {name} = {expected:.6f}, although the reference "
        f"is the policy's starting weights ({source or 'the run seed'}): the two models differ (a different "
        "checkpoint, dropout, or weights loaded into one of them only)"
    )


__all__ = [
    "first_step_check",
    "missing_reference",
    "pairs_in",
    "reference_flops_factor",
    "reference_source",
    "CONFIG",
    "DPOConfig",
    "REPORTS",
    "completion_logps",
    "dpo_loss",
    "preference_losses",
    "sequence_logps",
]
