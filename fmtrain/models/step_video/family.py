"""The Step-Video-T2V family's registry entry: the DiT trained with flow matching, or with
Video-DPO beside a frozen reference DiT in the same layout.

Per sample, the flow-matching draws (t, the noise, the classifier-free-guidance drop) come
from generators seeded by the sample's ``sample_seed`` (:mod:`fmtrain.objectives.flow_matching`),
so any layout, and a resumed run, draws the same numbers. The last stage returns per-sample
error sums; the loss is their weighted sum over the global element count (the exact batch mean).
Under pipeline parallelism every microbatch of a step is padded to the step's longest
(``fmtrain.models.dit.prepare_pipeline_step``), since megatron's schedules send one tensor shape per step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core.utils import get_attr_wrapped_model

from fmtrain.config import Config
from fmtrain.models import dit
from fmtrain.models.registry import ModelFamily, PartSpec, RunData, with_frozen_reference
from fmtrain.models.step_video import convert
from fmtrain.models.step_video.model import (
    MODULATION_ROWS,
    DiTInputs,
    StepVideoDiT,
    build_chunk,
    init_rule,
    transformer_config,
)
from fmtrain.models.step_video.sizes import param_count, training_flops, workload
from fmtrain.objectives import dpo, video_dpo
from fmtrain.objectives import flow_matching as fm


def make_inputs(
    cfg: Config, batch: dict, device, *, training: bool, first: bool, need_target: bool
) -> tuple[DiTInputs, torch.Tensor]:
    """The flow-matching draw of one microbatch (the noised latents for the ``first`` stage, the
    velocity target when ``need_target``): (inputs, per-sample loss weights)."""
    latent = batch["latent"].to(device, non_blocking=True)
    draw = dit.flow_draw(
        cfg.objective, latent, batch["sample_seed"], training=training, need_x_t=first, need_target=need_target
    )
    clip = batch.get("clip_emb")
    inputs = DiTInputs(
        grid=dit.latent_grid(latent.shape, cfg.model.patch_size),
        t=draw.t,
        text_emb=batch["text_emb"].to(device),
        text_mask=batch["text_mask"].to(device).bool(),
        clip_emb=clip.to(device) if clip is not None else None,
        clip_mask=batch["clip_mask"].to(device).bool() if clip is not None else None,
        x_t=draw.x_t,
        target=draw.target,
        drop_text=draw.drop,
        pipeline_rows=batch.get("pipeline_rows"),
    )
    return inputs, draw.weights


make_forward_step = dit.flow_forward_step(make_inputs)
"""The DiT's flow-matching training forward step (``PartSpec.forward_step``)."""


def stage_rows(cfg: Config, batch: dict) -> int:
    """Rows per TP and CP rank of the tensor a pipeline stage sends for ``batch``: its video
    tokens, the text context and the conditioning rows."""
    m, p = cfg.model, cfg.parallel
    grid = dit.latent_grid(batch["latent"].shape, m.patch_size)
    tokens = dit.local_video_tokens(grid, cp=p.cp, tp=p.tp if p.sequence_parallel else 1)
    return tokens + m.caption_tokens + m.clip_tokens + MODULATION_ROWS


# ----------------------------------------------------------------------------- sampling


def fit_tokens(emb: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, D] embedding (+ [L] mask) truncated or zero-padded to ``length`` tokens, with its mask."""
    if mask is None:
        mask = torch.ones(emb.shape[0], dtype=torch.bool)
    mask = mask.bool()
    if emb.shape[0] >= length:
        return emb[:length], mask[:length]
    pad = length - emb.shape[0]
    return (torch.cat([emb, emb.new_zeros(pad, emb.shape[1])]), torch.cat([mask, torch.zeros(pad, dtype=torch.bool)]))


@torch.no_grad()
def sample_latents(
    model: StepVideoDiT,
    cfg: Config,
    condition: dict,
    *,
    grid_shape: tuple[int, int, int],
    num: int,
    seed: int,
    steps: int,
    shift: float,
    guidance_scale: float,
    device,
) -> torch.Tensor:
    """Generate ``num`` latents [num, C, T, H, W] for one prompt by Euler integration of the
    predicted velocity from noise (t=0) to data (t=1), with classifier-free guidance against
    :func:`null_condition`. ``condition``: ``text_emb`` [caption_tokens, caption_dim],
    ``text_mask`` and, with a CLIP encoder, ``clip_emb`` / ``clip_mask`` (already fitted).
    The noise comes from one generator seeded by ``seed``: the same call gives the same latents."""
    m = cfg.model
    t_frames, height, width = grid_shape
    if height % m.patch_size or width % m.patch_size:
        raise ValueError(f"latent shape {grid_shape} is not divisible by model.patch_size={m.patch_size}")
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((num, m.in_channels, t_frames, height, width), generator=generator, device=device)

    def expand(name):
        value = condition.get(name)
        return None if value is None else value.to(device).unsqueeze(0).expand(num, *value.shape)

    base = dict(
        grid=(t_frames, height // m.patch_size, width // m.patch_size),
        text_emb=expand("text_emb"),
        text_mask=expand("text_mask"),
        clip_emb=expand("clip_emb"),
        clip_mask=expand("clip_mask"),
    )
    drop_all = torch.ones(num, dtype=torch.bool, device=device)

    def velocity(x, t):
        return model(inputs=DiTInputs(t=t, x_t=x, **base))

    def uncond_velocity(x, t):
        return model(inputs=DiTInputs(t=t, x_t=x, drop_text=drop_all, **base))

    return fm.euler_sample(
        velocity, x0, steps=steps, shift=shift, uncond_velocity=uncond_velocity, guidance_scale=guidance_scale
    )


def load_prompt_embedding(path: str, cfg: Config) -> dict:
    """A prompt's precomputed text embeddings from an ``.npz`` file: ``text_emb`` [L, caption_dim],
    optional ``text_mask`` [L], and with a CLIP encoder ``clip_emb`` [L2, clip_dim] (+ ``clip_mask``);
    fitted to the model's token counts. Read without pickle."""
    import numpy as np

    m = cfg.model
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt embedding {file} does not exist")
    try:
        data = dict(np.load(file, allow_pickle=False))
    except (ValueError, OSError) as exc:
        raise ValueError(f"prompt embedding {file}: not a readable .npz ({exc})") from None

    def get(key: str, dim: int, length: int, required: bool):
        if key not in data:
            if required:
                raise ValueError(
                    f"prompt embedding {file}: no '{key}' array (has: {', '.join(sorted(data)) or 'none'})"
                )
            return None, None
        emb = torch.from_numpy(np.asarray(data[key], dtype=np.float32))
        if emb.dim() == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.dim() != 2 or emb.shape[1] != dim:
            raise ValueError(f"prompt embedding {file}: '{key}' has shape {tuple(emb.shape)}, expected [tokens, {dim}]")
        mask_key = key.replace("_emb", "_mask")
        mask = torch.from_numpy(np.asarray(data[mask_key]).astype(bool)).reshape(-1) if mask_key in data else None
        return fit_tokens(emb, mask, length)

    text_emb, text_mask = get("text_emb", m.caption_dim, m.caption_tokens, True)
    condition = {"text_emb": text_emb, "text_mask": text_mask}
    if m.clip_dim:
        clip_emb, clip_mask = get("clip_emb", m.clip_dim, m.clip_tokens, True)
        condition.update(clip_emb=clip_emb, clip_mask=clip_mask)
    return condition


def sample(
    cfg: Config,
    model: StepVideoDiT,
    *,
    prompt_file: str,
    shape: tuple[int, int, int] | None,
    num: int,
    seed: int,
    device,
) -> torch.Tensor:
    """``fmtrain sample``: latents for one prompt embedding file with a built, loaded DiT, with
    the objective.* sampler settings (Euler steps, time shift, guidance); ``shape`` (T, H, W)
    defaults to the first ``data.synthetic_latent_shapes``."""
    from fmtrain.config import latent_shapes

    f = cfg.objective
    return sample_latents(
        model,
        cfg,
        load_prompt_embedding(prompt_file, cfg),
        grid_shape=shape or latent_shapes(cfg)[0],
        num=num,
        seed=seed,
        steps=f.sample_steps,
        shift=f.sample_shift,
        guidance_scale=f.guidance_scale,
        device=device,
    )


def eval_videos(cfg: Config, model: StepVideoDiT, batch: dict, decode=None) -> dict[str, torch.Tensor]:
    """With a Video-VAE (``eval.sample_vae``): a sample for the first validation prompt at its
    latent's shape (``objective.sample_*`` settings, seed ``run.seed``) beside that clip's own
    latent, both decoded."""
    if decode is None:
        return {}
    f = cfg.objective
    device = next(model.parameters()).device
    condition = {name: batch[name][0] for name in ("text_emb", "text_mask", "clip_emb", "clip_mask") if name in batch}
    target = batch["latent"][:1].to(device)
    latents = sample_latents(
        model,
        cfg,
        condition,
        grid_shape=tuple(target.shape[2:]),
        num=1,
        seed=cfg.run.seed,
        steps=f.sample_steps,
        shift=f.sample_shift,
        guidance_scale=f.guidance_scale,
        device=device,
    )
    pixels = decode(torch.cat([latents.to(target.dtype), target]))
    return {"sample": torch.cat([pixels[0], pixels[1]], dim=-1).clamp(-1, 1)}


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """Latents and text embeddings: streamed latent shards, or the in-memory synthetic set."""
    from fmtrain.data.latents import prepare_latent_data

    _, train, valid = prepare_latent_data(cfg, topo, run_dir)
    return RunData(train=train, valid=valid)


# ----------------------------------------------------------------------------- Video-DPO


def make_video_dpo_forward_step(cfg: Config, parts=None, progress=None):
    """The policy's Video-DPO forward step: chosen and rejected rows with the same t and noise
    (their shared sample seeds), error sums on the last stage paired into the Video-DPO loss with
    the reference errors the batch carries."""
    beta = cfg.objective.beta

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        first = get_attr_wrapped_model(model, "pre_process")
        last = get_attr_wrapped_model(model, "post_process")
        inputs, _ = make_inputs(cfg, batch, device, training=False, first=first, need_target=last)
        output = model(inputs=inputs)
        reference = batch.get("reference_errors")
        if reference is None:  # other stages never call the loss function
            return output, dpo.missing_reference("reference_errors")
        return output, functools.partial(video_dpo.video_dpo_loss, beta, inputs.t, reference.to(device))

    return forward_step


def parts(cfg: Config) -> list[PartSpec]:
    model = PartSpec(
        name="model",
        build=build_chunk,
        init_rule=init_rule,
        megatron_config=transformer_config,
        forward_step=make_forward_step,
    )
    if cfg.objective.name != "video_dpo":
        return [model]
    # The reference's errors with the same t and noise: the rows' sample seeds draw them.
    return with_frozen_reference(
        model,
        cfg,
        forward_step=make_video_dpo_forward_step,
        reference_step=make_forward_step(cfg),
        collect=lambda output, loss_fn: video_dpo.mean_squared_errors(output),
        key="reference_errors",
    )


FAMILY = ModelFamily(
    name="step_video",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=lambda cfg: (  # a pair, plus the co-located reference's forward
        training_flops(cfg, cfg.model.seq_length) * cfg.objective.ROWS_PER_SAMPLE * dpo.reference_flops_factor(cfg)
    ),
    units_per_sample=lambda cfg: cfg.model.seq_length * cfg.objective.ROWS_PER_SAMPLE,
    throughput_unit="tokens",
    prepare_step=functools.partial(dit.prepare_pipeline_step, rows_of=stage_rows),
    converter=convert,
    latent_vae="video_vae",
    sample=sample,
    eval_videos=eval_videos,
    first_step_check=dpo.first_step_check,
    workload=workload,
)
