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
from fmtrain.models.sizes import (
    MemoryEstimate,
    activation_bytes_per_layer,
    in_flight_layer_microbatches,
    state_bytes_per_param,
)
from fmtrain.models.videomae_v2 import convert
from fmtrain.models.videomae_v2.config import token_counts, token_grid
from fmtrain.models.videomae_v2.masking import draw_masks
from fmtrain.models.videomae_v2.model import MAEInputs, build_chunk, init_rule, transformer_config
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


# ----------------------------------------------------------------------------- sizes


def _block_params(h: int, ffn: int, qv_bias: bool) -> int:
    """Linear weights 4h^2 + 2 h ffn; biases (q, v, proj, fc1, fc2) and two LayerNorms."""
    return 4 * h * h + 2 * h * ffn + (2 * h if qv_bias else 0) + h + ffn + h + 4 * h


def parameter_breakdown(cfg: Config) -> dict[str, int]:
    """Exact parameter counts of the encoder and the decoder (with ``encoder_to_decoder`` and the
    mask token); checked against the built module in tests."""
    m = cfg.model
    h, dh = m.hidden_size, m.decoder_hidden_size
    pixels = m.in_channels * m.tubelet_size * m.patch_size**2
    encoder = pixels * h + h + m.num_layers * _block_params(h, m.ffn_hidden_size, m.qv_bias) + 2 * h
    decoder = h * dh + dh + m.decoder_num_layers * _block_params(dh, m.decoder_ffn_hidden_size, m.qv_bias)
    decoder += 2 * dh + dh * pixels + pixels
    return {"encoder": encoder, "decoder": decoder}


def param_count(cfg: Config) -> int:
    return sum(parameter_breakdown(cfg).values())


def flops_per_sample(cfg: Config) -> float:
    """Model FLOPs (forward + backward = 3x forward) of one clip: per block and token 2 x (4h^2 +
    2 h ffn) for the linears and 2 x 2 S h for the (non-causal) attention over the S tokens the
    tower sees; the patch embedding of every token, ``encoder_to_decoder`` and the head."""
    m = cfg.model
    t, hp, wp = token_grid(cfg)
    encoder_tokens, decoder_tokens = token_counts(cfg)
    pixels = m.in_channels * m.tubelet_size * m.patch_size**2

    def tower(layers: int, h: int, ffn: int, s: int) -> float:
        return layers * s * (2 * (4 * h * h + 2 * h * ffn) + 2 * 2 * s * h)

    h, dh = m.hidden_size, m.decoder_hidden_size
    forward = tower(m.num_layers, h, m.ffn_hidden_size, encoder_tokens)
    forward += tower(m.decoder_num_layers, dh, m.decoder_ffn_hidden_size, decoder_tokens)
    forward += 2 * t * hp * wp * pixels * h + 2 * encoder_tokens * h * dh
    forward += 2 * (decoder_tokens - encoder_tokens) * dh * pixels
    return 3.0 * forward


def memory_estimate(cfg: Config, dp: int, num_microbatches: int | None = None) -> MemoryEstimate:
    """Peak memory of the busier of the first pipeline stage (most encoder microbatches in
    flight under 1F1B) and the last (its encoder layers plus the whole decoder). Activations per
    block: Korthikanti's count with flash attention (SDPA stores no score matrix), the tokens a
    tower sees playing the sequence."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    bf16 = t.precision != "fp32"
    encoder_tokens, decoder_tokens = token_counts(cfg)
    breakdown = parameter_breakdown(cfg)

    def layer_bytes(tokens: int, hidden: int, heads: int) -> float:
        return activation_bytes_per_layer(
            tokens, t.micro_batch_size, hidden, heads, p.tp, p.sequence_parallel, m.recompute, flash_attention=True
        )

    per_encoder_layer = layer_bytes(encoder_tokens, m.hidden_size, m.num_attention_heads)
    decoder_act = m.decoder_num_layers * layer_bytes(
        decoder_tokens, m.decoder_hidden_size, m.decoder_num_attention_heads
    )
    first = per_encoder_layer * in_flight_layer_microbatches(0, m.num_layers, p.pp, 1, num_microbatches)
    last = per_encoder_layer * m.num_layers / p.pp + decoder_act
    act = max(first, last) * (1 if bf16 else 2)
    h = m.hidden_size
    block = _block_params(h, m.ffn_hidden_size, m.qv_bias)
    replicated = 6 * h  # the two LayerNorms and the row-parallel proj / fc2 biases
    # An upper bound for PP > 1: a stage's share of encoder blocks (TP-split) plus the decoder (on
    # the last stage) and the patch embedding and final norm (first / last stage).
    params = m.num_layers // p.pp * ((block - replicated) // p.tp + replicated)
    params += breakdown["decoder"] // p.tp + breakdown["encoder"] - m.num_layers * block
    state = params * state_bytes_per_param(bf16, p.distributed_optimizer, dp)
    return MemoryEstimate(params, state, act, state + act)


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
    memory_estimate=memory_estimate,
    throughput_unit="clips",
    prepare_step=prepare_pipeline_step,
    converter=convert.CONVERTER,
    eval_videos=eval_videos,
    parameter_breakdown=parameter_breakdown,
)

__all__ = ["FAMILY", "full_target", "make_inputs", "masks", "parameter_breakdown", "reconstruct"]
