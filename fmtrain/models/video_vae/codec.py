"""Encoding and decoding with the Video-VAE: the shared chunked and tiled codec
(:mod:`fmtrain.models.vae_codec`) with the release's seams.

Time, as the release does (official repository stepfun-ai/Step-Video-T2V, ``AutoencoderKL``):
the frames are cut into disjoint chunks of ``chunk_frames`` (17) encoded on their own, each
causal from its first frame (17 -> 3 latent frames, 204 -> 36); latents are decoded in the
matching chunks (3 -> 17 frames) and the frames on either side of a seam are blended 0.6 / 0.4.
Space: ``tile_size`` / ``tile_overlap`` tiles, blended linearly. The latents are the raw
posterior (the release's scale factor is 1.0).
"""

from __future__ import annotations

from fmtrain.models.vae_codec import (
    LatentCodec,
    blend_seams,
    decode,
    encode,
    encode_moments,
    options,
    tile_starts,
    tiled,
)

LATENT_CODEC = LatentCodec(seam="blend")
"""pixels <-> the latents a DiT trains on (the family's ``latent_codec``)."""

__all__ = ["LATENT_CODEC", "blend_seams", "decode", "encode", "encode_moments", "options", "tile_starts", "tiled"]
