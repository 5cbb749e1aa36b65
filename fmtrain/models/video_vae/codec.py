"""Encoding and decoding clips of any length and size with a :class:`~.model.VideoVAE`.

Time, as the release does (official repository stepfun-ai/Step-Video-T2V, ``AutoencoderKL``):
the frames are cut into chunks of ``chunk_frames`` (17) encoded on their own, each causal from
its first frame (17 -> 3 latent frames, 204 -> 36); latents are decoded in the matching chunks
(3 -> 17 frames) and the frames on either side of a seam are blended 0.6 / 0.4, so no chunk's
edge shows.

Space, for memory bounded by the tile and not the frame: with ``tile_size`` set, a clip larger
than a tile goes through overlapping tiles (``tile_overlap`` pixels shared), each encoded or
decoded alone and blended back with weights that ramp linearly across the overlaps (weight 1
away from them), the usual tiled-VAE scheme (diffusers' ``AutoencoderKL.tiled_encode`` blends
the same way). The mid-block attention sees one tile at a time, so tiled and untiled results
differ slightly; tests/test_video_vae.py measures the difference.
"""

from __future__ import annotations

import torch

from fmtrain.models.video_vae.model import LOGVAR_RANGE, VideoVAE

SEAM_KEEP = 0.6
"""Share a seam frame keeps of itself when blended with its neighbour across the seam."""


def options(model_cfg) -> dict:
    """``chunk_frames``, ``tile_size`` and ``tile_overlap`` of a ``video_vae`` model section, as
    :func:`encode` and :func:`decode` take them."""
    return dict(chunk_frames=model_cfg.chunk_frames, tile_size=model_cfg.tile_size, tile_overlap=model_cfg.tile_overlap)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` covering ``size`` with at least ``overlap`` shared (the last tile
    ends at ``size``)."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def _ramp(length: int, start: int, total: int, overlap: int, device) -> torch.Tensor:
    """Weights along one axis of a tile: rising over ``overlap`` at an inner start edge, falling at
    an inner end edge, 1 elsewhere (edges at the border of the whole frame stay at 1)."""
    w = torch.ones(length, device=device)
    if overlap <= 0:
        return w
    ramp = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
    n = min(overlap, length)
    if start > 0:
        w[:n] = torch.minimum(w[:n], ramp[:n])
    if start + length < total:
        w[-n:] = torch.minimum(w[-n:], ramp[:n].flip(0))
    return w


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """``fn`` over overlapping spatial tiles of ``x`` [B, C, T, H, W], blended. ``scale`` is
    output pixels per input pixel (1/16 for an encoder, 16 for a decoder); ``tile`` and
    ``overlap`` are in input pixels."""
    b, _, _, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return fn(x)
    out = weight = None
    ov_out = int(round(overlap * scale))
    for top in tile_starts(h, tile, overlap):
        for left in tile_starts(w, tile, overlap):
            piece = fn(x[:, :, :, top : top + tile, left : left + tile])
            if out is None:
                c, t = piece.shape[1], piece.shape[2]
                out = piece.new_zeros(b, c, t, int(h * scale), int(w * scale))
                weight = piece.new_zeros(1, 1, 1, int(h * scale), int(w * scale))
            ph, pw = piece.shape[-2:]
            y0, x0 = int(top * scale), int(left * scale)
            wy = _ramp(ph, y0, out.shape[-2], ov_out, piece.device)
            wx = _ramp(pw, x0, out.shape[-1], ov_out, piece.device)
            wmap = (wy[:, None] * wx[None, :]).to(piece.dtype)
            out[..., y0 : y0 + ph, x0 : x0 + pw] += piece * wmap
            weight[..., y0 : y0 + ph, x0 : x0 + pw] += wmap
    return out / weight


def _chunks(frames: int, chunk: int, compression: int, what: str) -> list[tuple[int, int]]:
    """(start, length) of the causal chunks of ``frames``; each must be 1 + a multiple of the
    temporal compression (the frames one latent frame covers after the first)."""
    chunk = chunk or frames
    spans = [(s, min(chunk, frames - s)) for s in range(0, frames, chunk)]
    for start, length in spans:
        if (length - 1) % compression:
            raise ValueError(
                f"{what}: a chunk of {length} frames (from frame {start} of {frames}) is not 1 + a "
                f"multiple of the temporal compression {compression}; use clips of k x "
                f"{chunk} frames (or one chunk of 1 + {compression} k)"
            )
    return spans


@torch.no_grad()
def encode_moments(
    vae: VideoVAE, x: torch.Tensor, *, chunk_frames: int = 17, tile_size: int = 0, tile_overlap: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) [B, z, T', H', W'] of pixels [B, 3, T, H, W] in [-1, 1], chunk by chunk."""
    spans = _chunks(x.shape[2], chunk_frames, vae.temporal_compression, "encode")
    scale = 1.0 / vae.spatial_compression
    parts = [tiled(vae.encoder, x[:, :, s : s + n], tile_size, tile_overlap, scale) for s, n in spans]
    mean, logvar = torch.cat(parts, dim=2).chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


@torch.no_grad()
def encode(
    vae: VideoVAE,
    x: torch.Tensor,
    *,
    chunk_frames: int = 17,
    tile_size: int = 0,
    tile_overlap: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents [B, z, T', H', W'] of pixels: the posterior mean, or a sample drawn with ``generator``
    (the release samples)."""
    mean, logvar = encode_moments(vae, x, chunk_frames=chunk_frames, tile_size=tile_size, tile_overlap=tile_overlap)
    if generator is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


@torch.no_grad()
def decode(
    vae: VideoVAE, z: torch.Tensor, *, chunk_frames: int = 17, tile_size: int = 0, tile_overlap: int = 64
) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] of latents [B, z, T', H', W'], chunk by chunk, seams blended."""
    c = vae.temporal_compression
    latent_chunk = 1 + (chunk_frames - 1) // c if chunk_frames else z.shape[2]
    scale = float(vae.spatial_compression)
    pieces = [
        tiled(
            vae.decoder,
            z[:, :, s : s + latent_chunk],
            tile_size // vae.spatial_compression,
            tile_overlap // vae.spatial_compression,
            scale,
        )
        for s in range(0, z.shape[2], latent_chunk)
    ]
    x = torch.cat(pieces, dim=2)
    return blend_seams(x, 1 + (latent_chunk - 1) * c)


def blend_seams(x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Mix the last frame of every chunk with the first of the next: the first takes 0.4 of the
    last, then the last 0.4 of the (new) first (the release's ``AutoencoderKL.mix``)."""
    front = slice(chunk_frames - 1, x.shape[2] - 1, chunk_frames)
    back = slice(chunk_frames, x.shape[2], chunk_frames)
    x = x.clone()
    x[:, :, back] = x[:, :, back] * SEAM_KEEP + x[:, :, front] * (1 - SEAM_KEEP)
    x[:, :, front] = x[:, :, front] * SEAM_KEEP + x[:, :, back] * (1 - SEAM_KEEP)
    return x


__all__ = ["blend_seams", "decode", "encode", "encode_moments", "options", "tile_starts", "tiled"]
