"""VideoMAE V2's dual masking, drawn per sample from its seed.

- Encoder *tube* masking (VideoMAE, Tong et al. 2022): one random 2D mask of
  ``int(ratio * H * W)`` tokens per frame, the same for every time slice, so a masked cube
  cannot be copied from its neighbour in time.
- Decoder *running-cell* masking (VideoMAE V2, Wang et al. 2023, sec. 3.2; the official
  ``RunningCellMaskingGenerator``): the token grid is tiled with 2x2 cells; each cell keeps
  ``4 - int(4 * ratio)`` of its four positions for the decoder, and the kept positions rotate by
  one place (in the cell's raster order, cyclically) from one time slice to the next, starting
  from a per-sample phase. ``ratio = 0`` gives VideoMAE V1: the decoder reconstructs exactly the
  encoder-masked tokens.

Masks are bool tensors over the token order (t, h, w), True = masked. The draws come from a
``torch.Generator`` seeded by the sample's ``sample_seed`` and a salt, so every layout, rank and
resumed run draws the same masks for the same clip.
"""

from __future__ import annotations

import torch

# the visible counts live with the config (arithmetic, no torch: the planner reads them)
from fmtrain.models.videomae_v2.config import encoder_visible_per_frame

_SALT_TUBE, _SALT_CELL = 21, 22


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + salt) % 2**63)


def tube_mask(seed: int, grid: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """[T*H*W] bool: the same ``int(ratio * H * W)`` positions masked in every time slice."""
    t, h, w = grid
    per_frame = h * w
    masked = per_frame - encoder_visible_per_frame(per_frame, ratio)
    order = torch.randperm(per_frame, generator=_generator(seed, _SALT_TUBE))
    frame = torch.zeros(per_frame, dtype=torch.bool)
    frame[order[:masked]] = True
    return frame.repeat(t)


def running_cell_pattern(phase: int, grid: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """[T*H*W] bool, True = not reconstructed: the cell queue ``[masked..., kept...]`` read from
    position ``phase + 1 + t`` (cyclically) at time slice t, as a 2x2 cell tiled over the grid."""
    t, h, w = grid
    n_mask = int(4 * ratio)
    if not 0 < n_mask < 4:
        raise ValueError(f"decoder mask ratio {ratio}: a 2x2 cell must mask 1, 2 or 3 of its 4 positions")
    queue = torch.tensor([True] * n_mask + [False] * (4 - n_mask))
    frames = []
    for step in range(t):
        cell = queue[(torch.arange(4) + phase + 1 + step) % 4].view(2, 2)
        frames.append(cell.repeat(h // 2, w // 2).flatten())
    return torch.cat(frames)


def decoder_mask(seed: int, grid: tuple[int, int, int], ratio: float, encoder: torch.Tensor) -> torch.Tensor:
    """[T*H*W] bool, True = the decoder does not reconstruct it: a running-cell pattern at a
    per-sample phase, or (``ratio`` 0) every encoder-visible token."""
    if ratio <= 0:
        return ~encoder
    phase = int(torch.randint(4, (), generator=_generator(seed, _SALT_CELL)))
    return running_cell_pattern(phase, grid, ratio)


def draw_masks(
    seeds: torch.Tensor, grid: tuple[int, int, int], ratio: float, decoder_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder masks, decoder masks), each [B, T*H*W] bool, for the samples' seeds."""
    encoder = torch.stack([tube_mask(int(s), grid, ratio) for s in seeds.tolist()])
    decoder = torch.stack([decoder_mask(int(s), grid, decoder_ratio, e) for s, e in zip(seeds.tolist(), encoder)])
    return encoder, decoder
