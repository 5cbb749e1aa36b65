"""A linear layer whose weight gradient goes straight into megatron DDP's gradient buffer.

megatron-core's DDP gives every trainable parameter a ``main_grad`` view into one contiguous
buffer and, after autograd has produced ``param.grad``, adds it there in a backward hook
(``param.main_grad.add_(param.grad)``): one more pass over every weight gradient, on top of
allocating it. megatron's ``gradient_accumulation_fusion`` removes that pass by letting the
weight-gradient GEMM accumulate into ``main_grad`` itself (apex's
``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``, CUDA only). :func:`linear` does the
same with torch's ``addmm_`` (``main_grad += grad_out^T @ input``), so it runs on any device,
and keeps the bias in the forward GEMM as ``torch.nn.functional.linear`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        # The parameter itself, not a saved copy of it: saved-tensor hooks (activation offload,
        # memory accounting) may unpack a saved weight as another tensor, without main_grad.
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_2d = grad.reshape(-1, grad.shape[-1])
        weight.main_grad.addmm_(grad_2d.t(), x.reshape(-1, x.shape[-1]))
        # megatron DDP's hook runs when the weight's AccumulateGrad does; a placeholder gradient
        # keeps it running (it skips the add for a weight marked as already accumulated), as
        # megatron's own fused path does.
        weight.grad_added_to_main_grad = True
        grad_weight = torch.empty_like(weight)
        grad_bias = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s gradient can go straight into its ``main_grad``: a trainable
    parameter under megatron DDP whose gradient buffer has its dtype (fp32 training; a bf16
    weight's fp32 buffer takes megatron's own add)."""
    main_grad = getattr(weight, "main_grad", None)
    return weight.requires_grad and main_grad is not None and main_grad.dtype == weight.dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``; while gradients are recorded for a weight
    under megatron DDP (:func:`accumulates_into_main_grad`), its gradient is accumulated into
    ``weight.main_grad`` by the GEMM (megatron's ``gradient_accumulation_fusion``)."""
    if torch.is_grad_enabled() and accumulates_into_main_grad(weight):
        return _LinearIntoMainGrad.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def runs_unsharded(layer) -> bool:
    """Whether a megatron Column/RowParallelLinear can run as one plain GEMM: no tensor or
    sequence parallelism, and not under DeepSpeed ZeRO-3 (a ``ds_id`` on the weight), which
    gathers a module's parameters for that module's own forward only."""
    return layer.tp_group.size() == 1 and not layer.sequence_parallel and not hasattr(layer.weight, "ds_id")


def parallel_linear(layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A megatron Column/RowParallelLinear applied to ``x``. Where it :func:`runs_unsharded` it
    is :func:`linear`: one addmm with the bias fused in, as torch's own ``nn.Linear`` (megatron's
    path adds the bias in a separate pass), the weight gradient accumulated by the GEMM into
    megatron DDP's buffer; otherwise the megatron layer runs and does the communication.
    ``bias`` replaces the layer's own on the unsharded path only."""
    if runs_unsharded(layer):
        return linear(x, layer.weight, layer.bias if bias is None else bias)
    return layer(x)[0]


__all__ = ["accumulates_into_main_grad", "linear", "parallel_linear", "runs_unsharded"]
