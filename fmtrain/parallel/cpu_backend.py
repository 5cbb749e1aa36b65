"""Let megatron-core's own layers, schedules, DDP and optimizers run on CPU over gloo.

megatron-core has no CPU path. What stops it (measured, megatron-core 0.16.1):

* buffers are allocated on ``torch.cuda.current_device()``;
* the model-parallel RNG tracker saves, seeds and restores the CUDA generator;
* schedules, optimizers and gradient clipping create tensors with a literal ``device="cuda"``;
* the optimizers check ``param.type()`` against ``'torch.cuda.FloatTensor'`` strings;
* ``torch.cuda.synchronize`` / ``Tensor.cuda()`` are called on the way;
* pipeline exchanges are untagged, and gloo matches them in posting order (see
  :func:`_tagged_batched_p2p_ops`).

Instead of patching torch for the whole process, each megatron module that does one of these
gets its module-global ``torch`` name replaced by :class:`_TorchOnCpu`, a thin proxy that
forwards everything to the real torch except that ``torch.cuda.*`` answers for the CPU (the
CPU default generator plays the device generator) and factory functions map ``"cuda"`` to
``"cpu"``. Type-string checks run inside :func:`_cuda_type_strings`. Nothing changes unless
:func:`install` is called, and :func:`install` refuses to run where CUDA is present.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

_REAL_TORCH = torch
_INSTALLED = False

# Factory functions megatron calls with a device argument.
_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "as_tensor",
    "eye",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    text = str(device)
    return torch.device("cpu") if text.startswith("cuda") else device


def _factory_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        # pin_memory needs an accelerator; on CPU it means nothing.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CudaOnCpu(types.SimpleNamespace):
    """The parts of ``torch.cuda`` megatron uses, answered for the CPU."""

    def __getattr__(self, name):
        return getattr(_REAL_TORCH.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return _REAL_TORCH.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        _REAL_TORCH.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        _REAL_TORCH.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed):
        _REAL_TORCH.manual_seed(seed)

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def max_memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    @contextlib.contextmanager
    def nvtx_range(*args, **kwargs):
        yield

    FloatTensor = _REAL_TORCH.FloatTensor
    HalfTensor = _REAL_TORCH.HalfTensor
    BFloat16Tensor = _REAL_TORCH.BFloat16Tensor


class _TorchOnCpu(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron module."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(_REAL_TORCH, name)))

    def __getattr__(self, name):
        return getattr(_REAL_TORCH, name)


# Every megatron module on the training path that touches CUDA by name.
_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
)


@contextlib.contextmanager
def _cuda_type_strings():
    """Make ``tensor.type()`` name CPU tensors as their CUDA twins, for megatron's type checks."""
    real_type = _REAL_TORCH.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    _REAL_TORCH.Tensor.type = type_
    try:
        yield
    finally:
        _REAL_TORCH.Tensor.type = real_type


def _with_cuda_type_strings(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_strings():
            return fn(*args, **kwargs)

    return wrapper


def _tensor_cuda_on_cpu(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


# Tags for the two directions of pipeline traffic.
_TAG_FORWARD, _TAG_BACKWARD = 1, 2


def _tagged_batched_p2p_ops(
    *,
    tensor_send_prev,
    tensor_recv_prev,
    tensor_send_next,
    tensor_recv_next,
    group,
    prev_pipeline_rank,
    next_pipeline_rank,
):
    """megatron's batched pipeline exchange with one tag per direction.

    With two stages (or interleaving) the previous and the next stage are the same peer, and
    gloo matches untagged messages between two peers in posting order: an activation going
    forward and a gradient coming back, of the same shape, can trade places. Activations
    (send_next / recv_prev) and gradients (send_prev / recv_next) get different tags, so each
    receive matches the message it was posted for.
    """
    dist = _REAL_TORCH.distributed
    ops = []
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_prev, prev_pipeline_rank, group, _TAG_BACKWARD))
    if tensor_recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_prev, prev_pipeline_rank, group, _TAG_FORWARD))
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_next, next_pipeline_rank, group, _TAG_FORWARD))
    if tensor_recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_next, next_pipeline_rank, group, _TAG_BACKWARD))
    return dist.batch_isend_irecv(ops) if ops else []


def _skip_on_one_rank(collective):
    """megatron DDP's gradient reduce-scatter / parameter all-gather, a no-op on a one-rank group.

    With data-parallel size 1 the distributed optimizer's shard of a bucket *is* the bucket
    (the same storage), so the collective has nothing to move; gloo's coalesced reduce-scatter
    still clones the whole buffer (~0.3 s per step for 32M fp32 parameters on this machine's
    CPUs, 7% of a single-rank step). Asynchronous calls go through unchanged, since their
    caller waits on the handle they return.
    """
    dist = _REAL_TORCH.distributed

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        if not async_op and dist.get_world_size(group) == 1:
            if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
                output.copy_(input.view_as(output))
            return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    return wrapper


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's fallback for apex's ``multi_tensor_l2norm`` (the norm of the tensors' norms),
    with torch's foreach norm: the same per-tensor reductions in one call, without a Python
    loop and a host sync per tensor."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return _REAL_TORCH.zeros(1, dtype=_REAL_TORCH.float32), None
    norms = _REAL_TORCH._foreach_norm(tensors, 2, dtype=_REAL_TORCH.float32)
    return _REAL_TORCH.linalg.vector_norm(_REAL_TORCH.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """megatron's fallback for apex's ``multi_tensor_scale``: in place where source and
    destination are the same tensors (gradient clipping), instead of a scaled temporary per
    tensor copied back."""
    sources, destinations = tensor_lists
    if all(src is dst for src, dst in zip(sources, destinations)):
        _REAL_TORCH._foreach_mul_(destinations, scale)
        return
    for src, dst in zip(sources, destinations):
        dst.copy_(src * scale)


def install() -> None:
    """Activate the CPU stand-ins (idempotent). Only for processes without CUDA."""
    global _INSTALLED
    if _INSTALLED:
        return
    if _REAL_TORCH.cuda.is_available():
        raise RuntimeError("fmtrain's CPU backend must not be installed where CUDA is available")
    proxy = _TorchOnCpu()
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is _REAL_TORCH:
            module.torch = proxy

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as tp_random

    # The CPU default generator is the "device" generator.
    tp_random._get_cuda_rng_state = lambda *a, **k: _REAL_TORCH.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: _REAL_TORCH.set_rng_state(state)

    # The tracker warns when the CPU generator moves inside a fork; here the CPU generator *is*
    # the forked device generator, so it always moves.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    distrib_optimizer.DistributedOptimizer.__init__ = _with_cuda_type_strings(
        distrib_optimizer.DistributedOptimizer.__init__
    )
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_strings(
        optimizer.Float16OptimizerWithFloat16Params.__init__
    )
    # Only megatron's own fallbacks are replaced (apex / Transformer Engine kernels are kept).
    from megatron.core import utils as mcore_utils

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale
    wrapped_clip = _with_cuda_type_strings(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    optimizer.clip_grad_by_total_norm_fp32 = wrapped_clip

    p2p_communication._batched_p2p_ops = _tagged_batched_p2p_ops

    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.dist_reduce_scatter_func = _skip_on_one_rank(param_and_grad_buffer.dist_reduce_scatter_func)
    param_and_grad_buffer.dist_all_gather_func = _skip_on_one_rank(param_and_grad_buffer.dist_all_gather_func)

    # Tensor.cuda() cannot succeed on a CPU-only build; megatron calls it to "move" tensors
    # that are already where they belong.
    _REAL_TORCH.Tensor.cuda = _tensor_cuda_on_cpu
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
