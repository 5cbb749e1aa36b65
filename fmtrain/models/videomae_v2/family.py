"""The VideoMAE V2 family's registry entry: dual-masking masked video pretraining.

Per clip, the encoder's tube mask and the decoder's running-cell mask are drawn from the
clip's ``sample_seed`` (:mod:`.masking`), on every pipeline stage, so any layout and a resumed
run see the same masks. The last stage returns each decoder token's squared error (averaged
over its pixels); the loss sums those of the tokens that are encoder-masked and
decoder-visible over their global count (``engine_for_pretraining.py``'s mean, exactly,
whatever the layout).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from megatron.core.utils import get_attr_wrapped_model

from fmtrain.config import Config
from fmtrain.data.video import IMAGENET_MEAN, IMAGENET_STD  # the clips' normalisation (the release's)
from fmtrain.models.registry import ModelFamily, PartSpec, RunData
from fmtrain.models.videomae_v2 import convert
from fmtrain.models.videomae_v2.config import token_counts, token_grid
from fmtrain.models.videomae_v2.masking import draw_masks
from fmtrain.models.videomae_v2.model import MAEInputs, build_chunk, init_rule, transformer_config
from fmtrain.models.videomae_v2.sizes import flops_per_sample, param_count, parameter_breakdown, workload
from fmtrain.objectives import mae as objective


def masks(cfg: Config, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    o = cfg.objective
    return draw_masks(batch["sample_seed"], token_grid(cfg), o.mask_ratio, o.decoder_mask_ratio)


def full_target(cfg: Config, video: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N, D]: every token's reconstruction target; with ``tokens`` ([B, n] indices), those
    tokens' only: [B, n, D]."""
    m = cfg.model
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return objective.reconstruction_target(
        video, mean, std, m.tubelet_size, m.patch_size, cfg.objective.norm_target, tokens
    )


def make_inputs(cfg: Config, batch: dict, device, *, first: bool, last: bool) -> tuple[MAEInputs, torch.Tensor]:
    """(the model's inputs, the loss mask [B, N_decoder]: encoder-masked among the decoder's tokens)."""
    encoder, decoder = (mask.to(device) for mask in masks(cfg, batch))
    b = encoder.shape[0]
    video = batch["video"].to(device, non_blocking=True) if first or last else None
    target = None
    if last and not batch.get("predict_only", False):
        target = full_target(cfg, video, (~decoder).nonzero()[:, 1].view(b, -1))
    counted = encoder[~decoder].reshape(b, -1)
    return MAEInputs(encoder, decoder, video=video if first else None, target=target), counted


def _loss(counted: torch.Tensor, errors: torch.Tensor):
    weights = counted.to(errors.dtype)
    total = (errors * weights).sum()
    count = counted.sum()
    return total, count.to(torch.int), {"loss": torch.stack([total.detach(), count.to(errors.dtype)])}


def make_forward_step(cfg: Config, parts=None, progress=None):
    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        first = get_attr_wrapped_model(model, "pre_process")
        last = get_attr_wrapped_model(model, "post_process")
        inputs, counted = make_inputs(cfg, batch, device, first=first, last=last)
        return model(inputs=inputs), functools.partial(_loss, counted)

    return forward_step


def prepare_pipeline_step(cfg: Config, microbatches: list[dict]) -> tuple[list[dict], int]:
    """Every clip sends its visible tokens between stages: one shape for the whole run."""
    return microbatches, token_counts(cfg)[0]


# ----------------------------------------------------------------------------- data


def video_pipeline(cfg: Config):
    from fmtrain.data.video import VideoPipeline

    return VideoPipeline.from_config(cfg)  # ImageNet-normalised clips, as the release


def prepare_data(cfg: Config, topo, run_dir) -> RunData:
    """Video shards (``data.shards``, ``data.valid_shards``), or ``data.corpus=synthetic:videos``:
    moving-shape clips drawn in memory (``data.synthetic_samples`` videos; validation on others)."""
    from fmtrain.data.video import video_batches

    train, valid = video_batches(cfg, topo, run_dir, video_pipeline(cfg))
    return RunData(train=train, valid=valid)


# ----------------------------------------------------------------------------- pictures


def _channel_stats(device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as [3, 1, 1, 1], broadcasting over [..., 3, T, H, W]."""
    return (torch.tensor(v, device=device).view(3, 1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def _to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [3, T, H, W] -> [-1, 1]."""
    mean, std = _channel_stats(video.device)
    return (video.float() * std + mean) * 2 - 1


@torch.no_grad()
def reconstruct(cfg: Config, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the masked input, the reconstruction) of a microbatch's clips, [B, 3, T, H, W] in the
    input's normalisation: the reconstruction keeps the visible tokens and fills the decoder's
    predictions in (a normalised target is mapped back with each token's own pixel mean and std,
    as the MAE papers draw it); tokens neither visible nor reconstructed stay grey in both."""
    m = cfg.model
    device = next(model.parameters()).device
    video = batch["video"].to(device)
    inputs, _ = make_inputs(cfg, {**batch, "predict_only": True}, device, first=True, last=True)
    prediction = model(inputs=inputs)  # [B, N_decoder, D]
    mean, std = _channel_stats(device)
    pixels = objective.patchify(video.float() * std + mean, m.tubelet_size, m.patch_size)
    b, n, k, c = pixels.shape
    predicted = prediction.view(b, -1, k, c)
    chosen = pixels[~inputs.decoder_mask]  # [B * N_decoder, k, c]
    if cfg.objective.norm_target:
        mu, sigma = chosen.mean(dim=1, keepdim=True), chosen.var(dim=1, unbiased=True, keepdim=True).sqrt() + 1e-6
        predicted = (predicted.reshape(-1, k, c) * sigma + mu).view(b, -1, k, c)
    grey = torch.full_like(pixels, 0.5)
    masked = torch.where(inputs.encoder_mask[..., None, None], grey, pixels)
    recon = masked.clone()
    recon[~inputs.decoder_mask] = torch.where(
        inputs.encoder_mask[~inputs.decoder_mask][..., None, None], predicted.reshape(-1, k, c), chosen
    )
    grid = token_grid(cfg)

    def back(tokens: torch.Tensor) -> torch.Tensor:
        frames = objective.unpatchify(tokens.clamp(0, 1), grid, m.tubelet_size, m.patch_size)
        return (frames - mean) / std

    return back(masked), back(recon)


def eval_videos(cfg: Config, model: torch.nn.Module, batch: dict, decode=None) -> dict[str, torch.Tensor]:
    """The first validation clips (up to 2): input | masked input | reconstruction, side by side,
    clips stacked vertically."""
    few = {**batch, "video": batch["video"][:2], "sample_seed": batch["sample_seed"][:2]}
    masked, recon = reconstruct(cfg, model, few)
    rows = [
        torch.cat([_to_unit_range(x), _to_unit_range(mk), _to_unit_range(r)], dim=-1)
        for x, mk, r in zip(few["video"].to(masked.device), masked, recon)
    ]
    return {"reconstruction": torch.cat(rows, dim=-2).clamp(-1, 1)}


def parts(cfg: Config) -> list[PartSpec]:
    return [
        PartSpec(
            name="videomae",
            build=build_chunk,
            init_rule=init_rule,
            megatron_config=transformer_config,
            forward_step=make_forward_step,
        )
    ]


FAMILY = ModelFamily(
    name="videomae_v2",
    parts=parts,
    prepare_data=prepare_data,
    param_count=param_count,
    flops_per_sample=flops_per_sample,
    units_per_sample=lambda cfg: 1,
    workload=workload,
    throughput_unit="clips",
    prepare_step=prepare_pipeline_step,
    converter=convert.CONVERTER,
    eval_videos=eval_videos,
    parameter_breakdown=parameter_breakdown,
)

__all__ = ["FAMILY", "full_target", "make_inputs", "masks", "parameter_breakdown", "reconstruct"]
