"""The LaVin-DiT family's registry entry: the J-DiT trained with flow matching on in-context
task samples.

A microbatch (:mod:`fmtrain.data.tasks`) holds, per sample, the latents of K example
(input, output) pairs and the query concatenated along time (``context`` [b, C, T_cond, H, W]),
and the latent of the query's output (``target``). Flow matching noises the target only; the
context stays clean (the release's ``training_losses`` noises ``x1``, the target, and passes the
condition through). t, the noise and the classifier-free-guidance drop come from generators
seeded by each sample's ``sample_seed`` (:func:`fmtrain.models.dit.flow_draw`), so any layout
and a resumed run draw the same numbers. A dropped sample's condition is the null condition:
the example pairs zeroed, the query kept (the release samples its unconditional branch from zero
latents plus the query). The loss is MSE + ``objective.l1_weight`` x L1 of the velocity (the
release: 0.1), summed per sample and divided by the global element count.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from fmtrain.config import Config
from fmtrain.models import dit
from fmtrain.models.lavin_dit import convert
from fmtrain.models.lavin_dit.model import CONDITIONING_ROWS, JointInputs, build_chunk, init_rule, transformer_config
from fmtrain.models.lavin_dit.sizes import param_count, target_tokens, training_flops, workload
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.objectives import flow_matching as fm


def null_condition(condition: torch.Tensor, query_frames: int, drop: torch.Tensor) -> torch.Tensor:
    """``condition`` [b, C, T_cond, H, W] with the example pairs (every frame before the query's
    last ``query_frames``) zeroed where ``drop`` [b]: the unconditional input of classifier-free
    guidance, the same length as the conditional one."""
    keep = torch.ones_like(condition[:1, :1, :, :1, :1])
    keep[:, :, : condition.shape[2] - query_frames] = 0
    mask = torch.where(drop.view(-1, 1, 1, 1, 1), keep, torch.ones_like(keep))
    return condition * mask


def make_inputs(
    cfg: Config, batch: dict, device, *, training: bool, first: bool, need_target: bool
) -> tuple[JointInputs, torch.Tensor]:
    """The flow-matching draw of one microbatch on its target latents: (inputs, loss weights)."""
    p = cfg.model.patch_size
    target = batch["target"].to(device, non_blocking=True)
    draw = dit.flow_draw(
        cfg.objective, target, batch["sample_seed"], training=training, need_x_t=first, need_target=need_target
    )
    condition = None
    if first:
        condition = batch["context"].to(device, non_blocking=True)
        if draw.drop is not None and bool(draw.drop.any()):
            condition = null_condition(condition, int(batch["item_frames"]), draw.drop)
    inputs = JointInputs(
        cond_grid=dit.latent_grid(batch["context"].shape, p),
        target_grid=dit.latent_grid(target.shape, p),
        t=draw.t,
        condition=condition,
        x_t=draw.x_t,
        target=draw.target,
        pipeline_rows=batch.get("pipeline_rows"),
    )
    return inputs, draw.weights


def stage_rows(cfg: Config, batch: dict) -> int:
    """Rows per TP rank of the tensor a pipeline stage sends for ``batch``: both streams' tokens
    (this rank's share under sequence parallelism) and the two conditioning rows."""
    m, p = cfg.model, cfg.parallel
    tp = p.tp if p.sequence_parallel else 1
    rows = CONDITIONING_ROWS
    for name in ("context", "target"):
        grid = dit.latent_grid(batch[name].shape, m.patch_size)
        rows += dit.local_video_tokens(grid, cp=1, tp=tp, what=f"{name} latent grid")
    return rows


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_latents(
    model,
    cfg: Config,
    context: torch.Tensor,
    *,
    query_frames: int,
    target_frames: int,
    num: int,
    seed: int,
    steps: int,
    shift: float,
    guidance_scale: float,
    device,
) -> torch.Tensor:
    """Generate ``num`` target latents [num, C, target_frames, H, W] for one condition ``context``
    [C, T_cond, H, W] (example pairs + query latents) by Euler integration of the predicted
    velocity from noise (t=0) to data (t=1), with classifier-free guidance against
    :func:`null_condition`. The noise comes from one generator seeded by ``seed``."""
    m = cfg.model
    _, _, height, width = context.shape
    if height % m.patch_size or width % m.patch_size:
        raise ValueError(f"latent size {height}x{width} is not divisible by model.patch_size={m.patch_size}")
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((num, m.in_channels, target_frames, height, width), generator=generator, device=device)
    condition = context.to(device).unsqueeze(0).expand(num, *context.shape)
    unconditional = null_condition(condition, query_frames, torch.ones(num, dtype=torch.bool, device=device))
    grids = dict(
        cond_grid=dit.latent_grid(condition.shape, m.patch_size),
        target_grid=dit.latent_grid(x0.shape, m.patch_size),
    )

    def velocity(x, t):
        return model(inputs=JointInputs(t=t, condition=condition, x_t=x, **grids))

    def uncond_velocity(x, t):
        return model(inputs=JointInputs(t=t, condition=unconditional, x_t=x, **grids))

    return fm.euler_sample(
        velocity, x0, steps=steps, shift=shift, uncond_velocity=uncond_velocity, guidance_scale=guidance_scale
    )


def load_context(path: str, cfg: Config) -> tuple[torch.Tensor, int]:
    """A sampling condition from an ``.npz`` (what ``fmtrain sample --task-dir`` writes):
    ``context`` [C, T_cond, H, W] latents of the example pairs and the query, and ``item_frames``
    (latent frames per item; default 1). Read without pickle."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"context file {file} does not exist")
    try:
        data = dict(np.load(file, allow_pickle=False))
    except (ValueError, OSError) as exc:
        raise ValueError(f"context file {file}: not a readable .npz ({exc})") from None
    if "context" not in data:
        raise ValueError(f"context file {file}: no 'context' array (has: {', '.join(sorted(data)) or 'none'})")
    context = torch.from_numpy(np.asarray(data["context"], dtype=np.float32))
    frames = int(data.get("item_frames", 1))
    m = cfg.model
    if context.dim() != 4 or context.shape[0] != m.in_channels or context.shape[1] % frames:
        raise ValueError(
            f"context file {file}: 'context' has shape {tuple(context.shape)}, expected [{m.in_channels}, T, H, W] "
            f"with T a multiple of item_frames={frames}"
        )
    return context, frames


def sample(
    cfg: Config, model, *, prompt_file: str, shape: tuple[int, int, int] | None, num: int, seed: int, device
) -> torch.Tensor:
    """``fmtrain sample``: target latents for one condition file with a built, loaded J-DiT and
    the objective.* sampler settings (the release's: 20 Euler steps, CFG 1.5). ``shape`` (T, H, W)
    defaults to the query's (the context's last ``item_frames`` frames); H and W must be the
    context's, as the joint grid shares them."""
    context, frames = load_context(prompt_file, cfg)
    target = shape or (frames, *context.shape[2:])
    if tuple(target[1:]) != tuple(context.shape[2:]):
        raise ValueError(f"--shape {target}: the target's H x W must be the context's {tuple(context.shape[2:])}")
    f = cfg.objective
    return sample_latents(
        model,
        cfg,
        context,
        query_frames=frames,
        target_frames=target[0],
        num=num,
        seed=seed,
        steps=f.sample_steps,
        shift=f.sample_shift,
        guidance_scale=f.guidance_scale,
        device=device,
    )


# ----------------------------------------------------------------------------- registry


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """In-context task samples: streamed task shards (latents, or pixels encoded on the fly), or
    the in-memory synthetic latent tasks."""
    from fmtrain.config import ConfigError
    from fmtrain.data.tasks import PIXEL_TASK_KIND, latents_from_pixel_tasks, prepare_task_data, shards_kind

    d = cfg.data
    if d.shards and not d.vae and shards_kind(d.shards) == PIXEL_TASK_KIND:
        raise ConfigError(
            f"data.shards={d.shards!r} hold pixel tasks: set data.vae to the ST-VAE (an st_vae checkpoint or the "
            "release) that encodes them on the fly, or encode them once with fmtrain data encode"
        )
    train, valid = prepare_task_data(cfg, topo, run_dir)
    return RunData(train=train, valid=valid, pixels_to_latents=latents_from_pixel_tasks)


def parts(cfg: Config) -> list[PartSpec]:
    return [
        PartSpec(
            name="model",
            build=build_chunk,
            init_rule=init_rule,
            megatron_config=transformer_config,
            forward_step=dit.flow_forward_step(make_inputs),
        )
    ]


FAMILY = ModelFamily(
    name="lavin_dit",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=lambda cfg: training_flops(cfg, cfg.model.seq_length, target_tokens(cfg)),
    units_per_sample=lambda cfg: cfg.model.seq_length,
    throughput_unit="tokens",
    prepare_step=functools.partial(dit.prepare_pipeline_step, rows_of=stage_rows),
    converter=convert,
    latent_vae="st_vae",
    sample=sample,
    workload=workload,
)
