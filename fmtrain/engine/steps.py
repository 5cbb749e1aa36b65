"""What every engine does the same way around a training step, whatever runs the model.

The family's forward steps follow megatron's convention (``forward_step(data_iterator, model)
-> (output, loss_fn)``, ``loss_fn(output) -> (loss_sum, count, reports)`` with
``calculate_per_token_loss``: the step's gradient is the sum of the losses divided by the
global batch's count), and report ``{name: tensor([sum, count])}`` pairs; this module reduces
those reports over the job, keeps one part's gradients to itself, and injects faults.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from fmtrain.config import Config
from fmtrain.models.registry import PartSpec


def primary_spec(cfg: Config, specs: list[PartSpec]) -> PartSpec:
    """The run's primary part (the first trainable one), after checking the family's parts."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or not any(spec.trainable for spec in specs):
        raise ValueError(f"model.family={cfg.model.family}: parts {names} need unique names and a trainable one")
    primary = next(spec for spec in specs if spec.trainable)
    if primary.active_from_step:
        raise ValueError(f"model.family={cfg.model.family}: the primary part {primary.name!r} must train from step 0")
    return primary


def reduce_reports(
    names_cache: dict[bool, list[str]],
    reports: list[dict],
    *,
    forward_only: bool,
    holds_reports: bool,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """Sum each reported [sum, count] pair over microbatches and over the whole job; a name
    whose count is 0 everywhere (a term not computed this step) is left out.

    ``holds_reports``: whether this rank's reports are counted (one rank per copy: the last
    pipeline stage's tensor-parallel rank 0). The set of names is the part's loss function's and
    never changes (a term it does not compute is reported with count 0): every rank learns it
    from the last rank once per mode (``names_cache``), not with an object broadcast (a host
    sync) every step.
    """
    if forward_only not in names_cache:
        holder = [sorted(reports[0]) if reports else []]
        dist.broadcast_object_list(holder, src=dist.get_world_size() - 1)
        names_cache[forward_only] = holder[0]
    names = names_cache[forward_only]
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    if holds_reports:
        for report in reports:
            for i, name in enumerate(names):
                totals[i] += report[name].to(totals)
    dist.all_reduce(totals)
    return {
        name: (float(totals[i, 0]), float(totals[i, 1]))
        for i, name in enumerate(names)
        if name == "loss" or totals[i, 1] != 0
    }


@contextlib.contextmanager
def gradients_only_for(others: Iterable[torch.nn.Parameter]):
    """While one part steps, no other part's parameter takes a gradient (``others``: theirs)."""
    others = [param for param in others if param.requires_grad]
    for param in others:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in others:
            param.requires_grad_(True)


def nan_loss(forward_step):
    """``forward_step`` whose loss (and reported loss) is multiplied by NaN: fault injection."""

    def poisoned_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def poisoned_loss_func(*args, **kwargs):
            loss, *rest = loss_func(*args, **kwargs)
            if rest and isinstance(rest[-1], dict) and "loss" in rest[-1]:
                report = rest[-1]["loss"].clone()
                report[0] = report[0] * math.nan
                rest[-1] = {**rest[-1], "loss": report}
            return (loss * math.nan, *rest)

        return output, poisoned_loss_func

    return poisoned_forward_step


class StorageBytes:
    """Bytes of distinct tensor storages (views of one buffer count once)."""

    def __init__(self):
        self._seen: set[int] = set()
        self.total = 0

    def add(self, tensor) -> None:
        if not torch.is_tensor(tensor) or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._seen:
            return
        self._seen.add(storage.data_ptr())
        self.total += storage.nbytes()
