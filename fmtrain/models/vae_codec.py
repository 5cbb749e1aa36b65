"""Encoding and decoding clips of any length and size with a VAE family's autoencoder.

Works with any :class:`~fmtrain.models.vae_modules.LatentVAE` (``encoder``, ``decoder``,
``temporal_compression``, ``spatial_compression``): the Step-Video Video-VAE and LaVin-DiT's
ST-VAE.

Time: the frames are cut into causal chunks of ``chunk_frames`` (1 + a multiple of the temporal
compression), each encoded on its own, so memory is bounded by the chunk and a latent frame
never sees a later chunk. Where chunks meet is the family's choice (``seam``):

- ``"blend"`` (Step-Video-T2V, ``AutoencoderKL``): disjoint chunks (17 frames -> 3 latent
  frames, 204 -> 36); latents are decoded in the matching chunks and the frames on either side
  of a seam are blended 0.6 / 0.4, so no chunk's edge shows;
- ``"shared"`` (LaVin-DiT, ``AutoencoderKLSTVAE.tiled_encode`` / ``tiled_decode``): consecutive
  chunks share their boundary frame, and the latent (decoding: the frame) the later chunk makes
  of it is dropped, so a clip of 1 + 4 k frames always gives 1 + k latent frames, whatever the
  chunk (161 frames in chunks of 81 -> 21 + 20 latent frames, and back).

Space, for memory bounded by the tile and not the frame: with ``tile_size`` set, a clip larger
than a tile goes through overlapping tiles (``tile_overlap`` pixels shared), each encoded or
decoded alone and blended back with weights that ramp linearly across the overlaps (weight 1
away from them), the usual tiled-VAE scheme (diffusers' ``AutoencoderKL.tiled_encode`` blends
the same way). Normalisation statistics and attention see one tile at a time, so tiled and
untiled results differ slightly; tests/test_video_vae.py measures the difference.

:class:`LatentCodec` is a family's entry point for the code that uses a trained VAE (a DiT
family, ``fmtrain sample``, ``fmtrain data encode``): pixels <-> the latents a DiT trains on,
chunked and tiled as the family's model section says and normalised as the family defines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmtrain.models.vae_modules import LOGVAR_RANGE, LatentVAE

SEAM_KEEP = 0.6
"""Share a seam frame keeps of itself when blended with its neighbour across the seam (``blend``)."""
SEAMS = ("blend", "shared")
POSTERIOR_SALT = 0x5A7E
"""Separates a sample's posterior noise from the other draws made from its seed."""


def options(model_cfg) -> dict:
    """``chunk_frames``, ``tile_size`` and ``tile_overlap`` of a VAE family's model section, as
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


def _check_seam(seam: str) -> None:
    if seam not in SEAMS:
        raise ValueError(f"seam={seam!r}: one of {', '.join(SEAMS)}")


def _chunks(frames: int, chunk: int, compression: int, what: str, seam: str) -> list[tuple[int, int]]:
    """(start, length) of the causal chunks of ``frames``; each must be 1 + a multiple of the
    temporal compression (the frames one latent frame covers after the first). ``shared`` chunks
    start on the previous chunk's last frame; a last chunk of that frame alone is not made."""
    _check_seam(seam)
    chunk = chunk or frames
    if seam == "shared" and chunk < 2 and frames > 1:
        raise ValueError(f"{what}: chunks that share their boundary frame need 2 frames or more, not {chunk}")
    step = chunk - 1 if seam == "shared" and chunk > 1 else chunk
    starts = range(0, frames, step)
    if seam == "shared":
        starts = [s for s in starts if s == 0 or s + 1 < frames]
    spans = [(s, min(chunk, frames - s)) for s in starts]
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
    vae: LatentVAE,
    x: torch.Tensor,
    *,
    chunk_frames: int = 17,
    tile_size: int = 0,
    tile_overlap: int = 64,
    seam: str = "blend",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) [B, z, T', H', W'] of pixels [B, C, T, H, W] in [-1, 1], chunk by chunk."""
    spans = _chunks(x.shape[2], chunk_frames, vae.temporal_compression, "encode", seam)
    scale = 1.0 / vae.spatial_compression
    parts = []
    for i, (s, n) in enumerate(spans):
        moments = tiled(vae.encoder, x[:, :, s : s + n], tile_size, tile_overlap, scale)
        # A later shared chunk's first latent frame is its first frame encoded again, as an image.
        parts.append(moments[:, :, 1:] if seam == "shared" and i > 0 else moments)
    mean, logvar = torch.cat(parts, dim=2).chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


@torch.no_grad()
def encode(
    vae: LatentVAE,
    x: torch.Tensor,
    *,
    chunk_frames: int = 17,
    tile_size: int = 0,
    tile_overlap: int = 64,
    seam: str = "blend",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents [B, z, T', H', W'] of pixels: the posterior mean, or a sample drawn with ``generator``
    (both releases sample)."""
    mean, logvar = encode_moments(
        vae, x, chunk_frames=chunk_frames, tile_size=tile_size, tile_overlap=tile_overlap, seam=seam
    )
    if generator is None:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


@torch.no_grad()
def decode(
    vae: LatentVAE,
    z: torch.Tensor,
    *,
    chunk_frames: int = 17,
    tile_size: int = 0,
    tile_overlap: int = 64,
    seam: str = "blend",
) -> torch.Tensor:
    """Pixels [B, C, T, H, W] of latents [B, z, T', H', W'], chunk by chunk (the chunks of
    :func:`encode_moments`, in latent frames)."""
    c = vae.temporal_compression
    latent_chunk = 1 + (chunk_frames - 1) // c if chunk_frames else z.shape[2]
    spans = _chunks(z.shape[2], latent_chunk, 1, "decode", seam)
    scale = float(vae.spatial_compression)
    tile, overlap = tile_size // vae.spatial_compression, tile_overlap // vae.spatial_compression
    pieces = []
    for i, (s, n) in enumerate(spans):
        frames = tiled(vae.decoder, z[:, :, s : s + n], tile, overlap, scale)
        pieces.append(frames[:, :, 1:] if seam == "shared" and i > 0 else frames)
    x = torch.cat(pieces, dim=2)
    return blend_seams(x, 1 + (latent_chunk - 1) * c) if seam == "blend" else x


def blend_seams(x: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Mix the last frame of every chunk with the first of the next: the first takes 0.4 of the
    last, then the last 0.4 of the (new) first (Step-Video-T2V's ``AutoencoderKL.mix``)."""
    front = slice(chunk_frames - 1, x.shape[2] - 1, chunk_frames)
    back = slice(chunk_frames, x.shape[2], chunk_frames)
    x = x.clone()
    x[:, :, back] = x[:, :, back] * SEAM_KEEP + x[:, :, front] * (1 - SEAM_KEEP)
    x[:, :, front] = x[:, :, front] * SEAM_KEEP + x[:, :, back] * (1 - SEAM_KEEP)
    return x


@dataclass(frozen=True)
class LatentCodec:
    """A VAE family's pixels <-> DiT latents (:class:`fmtrain.models.registry.LatentCodec`).

    ``encode(cfg, vae, pixels, generator=None)``: pixels [B, C, T, H, W] in [-1, 1] -> latents
    [B, z, T', H', W'], the posterior mean or, with ``generator``, a sample; then, for a
    ``normalised`` family, ``(z - model.latent_shift) * model.latent_scale``, the scale the DiT
    sees. ``decode(cfg, vae, latents)`` undoes the normalisation and decodes. ``cfg`` is the
    VAE's config (its chunk and tile options apply); ``vae`` the loaded module.
    """

    seam: str
    normalised: bool = False

    def __post_init__(self):
        _check_seam(self.seam)

    def normalise(self, cfg, z: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents -> the DiT's."""
        m = cfg.model
        return (z - m.latent_shift) * m.latent_scale if self.normalised else z

    def denormalise(self, cfg, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> the VAE's raw ones."""
        m = cfg.model
        return latents / m.latent_scale + m.latent_shift if self.normalised else latents

    def encode(
        self, cfg, vae: LatentVAE, pixels: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = encode(vae, pixels, generator=generator, seam=self.seam, **options(cfg.model))
        return self.normalise(cfg, z)

    def decode(self, cfg, vae: LatentVAE, latents: torch.Tensor) -> torch.Tensor:
        return decode(vae, self.denormalise(cfg, latents), seam=self.seam, **options(cfg.model))


def posterior_generator(seed: int, device) -> torch.Generator:
    """The generator of the posterior noise when a sample's latents are drawn (``fmtrain data
    encode`` and encoding on the fly use it alike, so both give a sample the same latents)."""
    return torch.Generator(device=device).manual_seed((int(seed) ^ POSTERIOR_SALT) % 2**63)


__all__ = [
    "LatentCodec",
    "posterior_generator",
    "SEAMS",
    "blend_seams",
    "decode",
    "encode",
    "encode_moments",
    "options",
    "tile_starts",
    "tiled",
]
