"""What the diffusion transformers share (Step-Video-T2V, LaVin-DiT): latent patches, the
per-rank token split, the flow-matching draw of a microbatch, and the one tensor a pipeline
stage sends the next.

- Patches: a latent [b, C, T, H, W] becomes T * (H/p) * (W/p) tokens, frame-major, each a
  C x p x p patch flattened in the order its release uses (Step-Video ``(c, p, q)``, LaVin-DiT
  ``(p, q, c)``).
- Token split: between blocks every context-parallel rank holds a contiguous 1/cp of a
  stream's tokens, and under sequence parallelism every tensor-parallel rank a 1/tp of that.
- Flow matching: t, the noise and the classifier-free-guidance drop of each sample come from
  generators seeded by the sample's ``sample_seed``, so every layout and a resumed run draw the
  same numbers.
- Pipeline packing: megatron's schedules send one tensor [rows, b, hidden] between stages, so
  a stage stacks everything the next one needs (tokens, conditioning rows) and pads it to the
  step's longest microbatch (one shape per step); the receiving stage, which reads the same
  batch, knows the sizes and unpacks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fmtrain.objectives import flow_matching as fm

# Salts of the per-sample generators (independent draws from one sample seed).
SALT_TIME, SALT_NOISE, SALT_DROP = 1, 2, 3


# ----------------------------------------------------------------------------- patches


def patchify(latent: torch.Tensor, p: int, *, channels_last: bool = False) -> torch.Tensor:
    """[b, C, T, H, W] -> [b, T*(H/p)*(W/p), C*p*p]: tokens frame-major, features (c, p, q), or
    (p, q, c) with ``channels_last``."""
    b, c, t, h, w = latent.shape
    x = latent.reshape(b, c, t, h // p, p, w // p, p)
    order = (0, 2, 3, 5, 4, 6, 1) if channels_last else (0, 2, 3, 5, 1, 4, 6)
    return x.permute(*order).reshape(b, t * (h // p) * (w // p), c * p * p)


def unpatchify(
    tokens: torch.Tensor, grid: tuple[int, int, int], channels: int, p: int, *, channels_last: bool = False
) -> torch.Tensor:
    """Inverse of :func:`patchify`: [b, S, C*p*p] -> [b, C, T, H, W]."""
    t, hp, wp = grid
    b = tokens.shape[0]
    if channels_last:
        x = tokens.reshape(b, t, hp, wp, p, p, channels).permute(0, 6, 1, 2, 4, 3, 5)
    else:
        x = tokens.reshape(b, t, hp, wp, channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, channels, t, hp * p, wp * p)


def latent_grid(latent_shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Token grid (T, H/p, W/p) of a latent [b, C, T, H, W]."""
    _, _, t, h, w = latent_shape
    return int(t), int(h) // patch_size, int(w) // patch_size


def local_video_tokens(grid: tuple[int, int, int], *, cp: int, tp: int, what: str = "latent grid") -> int:
    """Tokens of a grid per context-parallel rank, per tensor-parallel rank when tp > 1
    (sequence parallelism); ValueError naming the grid when they do not split evenly."""
    tokens = grid[0] * grid[1] * grid[2]
    if tokens % (cp * tp):
        names = " x ".join(
            name for name, size in (("parallel.cp", cp), ("parallel.tp (sequence parallelism)", tp)) if size > 1
        )
        raise ValueError(f"{what} {tuple(grid)} has {tokens} tokens, not divisible by {names} = {cp * tp}")
    return tokens // (cp * tp)


# ----------------------------------------------------------------------------- flow matching


@dataclass
class FlowDraw:
    """One microbatch's flow-matching draw on the data latents x1 (t=0 noise, t=1 data)."""

    t: torch.Tensor
    """[b] flow time."""
    weights: torch.Tensor
    """[b] per-sample loss weights w(t)."""
    x_t: torch.Tensor | None = None
    """Noised latents (when asked for)."""
    target: torch.Tensor | None = None
    """Velocity target x1 - x0 (when asked for)."""
    drop: torch.Tensor | None = None
    """[b] bool: the condition is replaced by the null condition (training with a drop rate)."""


def flow_draw(
    objective, data: torch.Tensor, seeds: torch.Tensor, *, training: bool, need_x_t: bool, need_target: bool
) -> FlowDraw:
    """The flow-matching draw of a microbatch of data latents ``data`` [b, ...] with the
    ``objective.*`` settings (:class:`fmtrain.objectives.sections.FlowMatchingConfig`), each
    sample's numbers from its own seed."""
    device = data.device
    t = fm.sample_timesteps(
        fm.seeded_generators(seeds, device, SALT_TIME),
        mode=objective.timestep_sampling,
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
        shift=objective.shift,
        device=device,
    )
    draw = FlowDraw(t=t, weights=fm.get_weighting(objective.loss_weighting)(t))
    if need_x_t or need_target:
        noise = fm.per_sample_noise(
            fm.seeded_generators(seeds, device, SALT_NOISE), tuple(data.shape[1:]), device=device
        )
        draw.x_t = fm.interpolate(noise, data, t) if need_x_t else None
        draw.target = fm.velocity_target(noise, data) if need_target else None
    if training and objective.text_drop_prob > 0:
        draw.drop = fm.drop_condition(
            fm.seeded_generators(seeds, device, SALT_DROP), objective.text_drop_prob, device=device
        )
    return draw


def flow_loss(weights: torch.Tensor, l1_weight: float, output: torch.Tensor):
    """The last stage's loss function over per-sample error sums (:func:`fm.error_sums`)."""
    loss_sum, count, reports = fm.loss_from_error_sums(output, weights, l1_weight)
    return loss_sum, count.to(torch.int), reports


def flow_forward_step(make_inputs: Callable):
    """A family's ``forward_step`` builder (:class:`fmtrain.models.registry.MakeForwardStep`) for
    training a flow-matching DiT, in megatron's ``(output, loss_fn)`` contract.
    ``make_inputs(cfg, batch, device, training=, first=, need_target=)`` gives the model's inputs
    and per-sample loss weights; the last stage returns per-sample error sums, or the velocity
    prediction for a ``predict_only`` microbatch."""
    import functools

    from megatron.core.utils import get_attr_wrapped_model

    def make(cfg, parts=None, progress=None):
        def forward_step(data_iterator, model: torch.nn.Module):
            batch = next(data_iterator)
            device = next(model.parameters()).device
            first = get_attr_wrapped_model(model, "pre_process")
            last = get_attr_wrapped_model(model, "post_process")
            inputs, weights = make_inputs(
                cfg,
                batch,
                device,
                training=model.training,
                first=first,
                need_target=last and not batch.get("predict_only", False),
            )
            return model(inputs=inputs), functools.partial(flow_loss, weights, cfg.objective.l1_weight)

        return forward_step

    return make


# ----------------------------------------------------------------------------- pipeline packing


def pack_stage_output(segments: Sequence[torch.Tensor], pipeline_rows: int | None) -> torch.Tensor:
    """[rows_i, b, h] segments -> one [rows, b, h] tensor for the next stage, zero-padded to
    ``pipeline_rows`` (the step's longest microbatch) when given."""
    packed = torch.cat(list(segments), dim=0)
    if pipeline_rows is not None and packed.shape[0] < pipeline_rows:
        pad = packed.new_zeros(pipeline_rows - packed.shape[0], *packed.shape[1:])
        packed = torch.cat([packed, pad], dim=0)
    return packed


def unpack_stage_input(packed: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The segments :func:`pack_stage_output` stacked, by their row counts (padding dropped)."""
    out, start = [], 0
    for size in sizes:
        out.append(packed[start : start + size])
        start += size
    return out


def prepare_pipeline_step(cfg, microbatches: list[dict], rows_of: Callable[[dict], int]) -> tuple[list[dict], int]:
    """(microbatches annotated with ``pipeline_rows``, the seq_length megatron's schedules expect).

    ``rows_of(cfg, batch)`` is the rows one TP and CP rank sends for a microbatch; every microbatch is
    padded to the step's longest. megatron's schedules divide the seq_length by CP, and by TP
    under sequence parallelism, so those factors are put back."""
    p = cfg.parallel
    rows = max(rows_of(cfg, batch) for batch in microbatches)
    annotated = [{**batch, "pipeline_rows": rows} for batch in microbatches]
    return annotated, rows * p.cp * (p.tp if p.sequence_parallel else 1)


__all__ = [
    "FlowDraw",
    "SALT_DROP",
    "SALT_NOISE",
    "SALT_TIME",
    "flow_draw",
    "flow_forward_step",
    "flow_loss",
    "latent_grid",
    "local_video_tokens",
    "pack_stage_output",
    "patchify",
    "prepare_pipeline_step",
    "unpack_stage_input",
    "unpatchify",
]
