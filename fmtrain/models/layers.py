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


class HeadRMSNorm(torch.nn.Module):
    """Per-head RMSNorm of queries or keys ([..., heads, head_dim], one weight of head_dim).

    Under tensor parallelism each rank normalises only its own heads, so the gradient of the
    shared weight is a partial sum; the weight goes through megatron's
    ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the gradient
    backward) to make every rank's gradient the full one. Normalises in fp32.
    """

    def __init__(self, head_dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        weight = copy_to_tensor_model_parallel_region(self.weight)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * weight
