"""Layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm for megatron layer specs, on ``torch.nn.functional.rms_norm``.

    megatron's fallback norm (``WrappedTorchNorm``) refuses sequence parallelism; the only
    thing sequence parallelism needs from a norm is that its weight is marked
    ``sequence_parallel`` so ``finalize_model_grads`` sums its gradient over the
    tensor-parallel group (each rank saw a different slice of the sequence). This does that.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
