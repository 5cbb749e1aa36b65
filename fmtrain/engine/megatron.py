"""The megatron-core engine: TP x PP (1F1B, interleaved) x DP with the distributed optimizer.

Order of construction matters and mirrors megatron's own ``get_model`` / ``setup_model_and_optimizer``:

1. build one chunk per virtual pipeline stage (the family decides what a chunk is);
2. draw the weights layout-invariantly (before DDP, which moves params into its buffers);
3. wrap in ``Float16Module`` for bf16 (fp32 master weights live in the optimizer);
4. wrap in megatron DDP (bucketed, fp32 gradient reduction), broadcast from DP rank 0;
5. build the optimizer over the DDP chunks (distributed optimizer = ZeRO-1);
6. hand the DDP hooks (no_sync, grad/param sync, finalize) to the schedules via the config.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from fmtrain.config import Config, num_microbatches
from fmtrain.engine import StepResult
from fmtrain.models.init import initialize_layout_invariant
from fmtrain.models.registry import ModelFamily
from fmtrain.parallel import Topology


def resolve_params_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


class MegatronEngine:
    def __init__(self, cfg: Config, topo: Topology, family: ModelFamily):
        self.cfg = cfg
        self.topo = topo
        self.family = family
        self.params_dtype = resolve_params_dtype(cfg, topo.device)
        self.tconfig = family.transformer_config(cfg, params_dtype=self.params_dtype, use_cpu=topo.device.type == "cpu")
        p = cfg.parallel

        chunks = []
        for vp in range(p.vpp):
            vp_stage = vp if p.vpp > 1 else None
            chunk = family.build_chunk(
                cfg,
                self.tconfig,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
            chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
            for param in chunk.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            chunks.append(chunk.to(topo.device))
        initialize_layout_invariant(chunks, cfg.run.seed, family.init_rule(cfg))

        if self.params_dtype == torch.bfloat16:
            chunks = [Float16Module(self.tconfig, chunk) for chunk in chunks]

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
            use_distributed_optimizer=p.distributed_optimizer,
            bucket_size=max(1, int(p.bucket_size_mb * 2**20 / 4)),
            check_for_nan_in_grad=False,
        )
        self.chunks = [
            DistributedDataParallel(
                config=self.tconfig,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets overlap with the backward of later chunks.
                disable_bucketing=i > 0,
            )
            for i, chunk in enumerate(chunks)
        ]
        for chunk in self.chunks:
            chunk.broadcast_params()

        t = cfg.train
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                min_lr=t.min_lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                adam_eps=t.adam_eps,
                clip_grad=t.grad_clip,
                bf16=self.params_dtype == torch.bfloat16,
                params_dtype=self.params_dtype,
                use_distributed_optimizer=p.distributed_optimizer,
            ),
            self.chunks,
        )
        self.adam_kernel = _select_adam_kernel(self.optimizer, t.fused_adam)
        self._install_schedule_hooks(ddp_config)
        self.forward_backward = get_forward_backward_func()
        self.forward_step = family.make_forward_step(cfg)
        self._report_names: list[str] | None = None
        self.num_microbatches = num_microbatches(cfg, topo.dp)

    def _install_schedule_hooks(self, ddp_config: DistributedDataParallelConfig) -> None:
        """What megatron's training.py hands to the schedules through the model config."""
        c = self.tconfig
        many = len(self.chunks) > 1
        no_sync = [chunk.no_sync for chunk in self.chunks]
        c.no_sync_func = no_sync if many else no_sync[0]
        if ddp_config.overlap_grad_reduce:
            sync = [chunk.start_grad_sync for chunk in self.chunks]
            c.grad_sync_func = sync if many else sync[0]
        if ddp_config.overlap_param_gather and ddp_config.use_distributed_optimizer:
            sync = [chunk.start_param_sync for chunk in self.chunks]
            c.param_sync_func = sync if many else sync[0]
        c.finalize_model_grads_func = finalize_model_grads

    # ------------------------------------------------------------------ steps

    def _run(self, microbatches: list[dict], forward_only: bool, poison_loss: bool = False) -> list[dict]:
        if len(microbatches) != self.num_microbatches and not forward_only:
            raise ValueError(f"expected {self.num_microbatches} microbatches, got {len(microbatches)}")
        seq_length = self.cfg.model.seq_length
        if self.family.prepare_step is not None and self.topo.pp > 1:
            microbatches, seq_length = self.family.prepare_step(self.cfg, microbatches)
        # Interleaved schedules read one iterator per chunk.
        iterators = [iter(microbatches) for _ in self.chunks]
        return self.forward_backward(
            forward_step_func=_nan_loss(self.forward_step) if poison_loss else self.forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce_reports(self, reports: list[dict]) -> dict[str, tuple[float, float]]:
        """Sum each reported [sum, count] pair over microbatches and over the whole job.

        Reports exist on the last pipeline stage only, once per tensor-parallel rank; the
        tensor-parallel rank 0 copies are summed over all ranks so every rank gets the result.
        """
        # The set of names is the family's loss function's and never changes: every rank learns
        # it from the last stage once, not with an object broadcast (a host sync) every step.
        if self._report_names is None:
            holder = [sorted(reports[0]) if reports else []]
            dist.broadcast_object_list(holder, src=dist.get_world_size() - 1)
            self._report_names = holder[0]
        names = self._report_names
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=self.topo.device)
        if self.topo.is_last_stage and self.topo.tp_rank == 0:
            for report in reports:
                for i, name in enumerate(names):
                    totals[i] += report[name].to(totals)
        dist.all_reduce(totals)
        return {name: (float(totals[i, 0]), float(totals[i, 1])) for i, name in enumerate(names)}

    def train_step(self, microbatches: list[dict], lr: float, *, poison_loss: bool = False) -> StepResult:
        """One optimizer step. A non-finite loss or gradient norm skips the update.

        ``poison_loss`` multiplies the loss by NaN (fault injection for tests,
        ``FMTRAIN_TEST_NAN_AT_STEP``)."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # What megatron's OptimizerParamScheduler does: per-group multipliers, so norms and
        # biases (wd_mult 0) are not decayed.
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = self.cfg.train.weight_decay * group.get("wd_mult", 1.0)
        reports = self._run(microbatches, forward_only=False, poison_loss=poison_loss)
        sums = self._reduce_reports(reports)
        loss_sum, tokens = sums.pop("loss")
        loss = loss_sum / max(tokens, 1.0)
        # Skip the update on a non-finite loss or gradient: the optimizer is not stepped, so the
        # weights and Adam's moments and step count stay exactly as they were. (bf16 and fp32
        # have no grad scaler whose found-inf check would skip it, and megatron's clipping
        # applies a NaN norm's update.) Every rank takes the same branch: both tests are global.
        if math.isfinite(loss) and self._grads_finite():
            update_applied, grad_norm, _ = self.optimizer.step()
        else:
            update_applied, grad_norm = False, math.nan
        return StepResult(
            loss=loss,
            tokens=int(tokens),
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            update_applied=bool(update_applied),
            extra={name: s / max(n, 1.0) for name, (s, n) in sums.items()},
        )

    def _grads_finite(self) -> bool:
        """Whether the gradient norm of the whole job is finite (one norm per buffer, one all-reduce).

        Each rank checks its full gradient buffers (after the data-parallel reduction): a
        non-finite gradient on any rank makes the reduced gradient, and so the global norm,
        non-finite, and a norm that overflows fp32 is non-finite too.
        """
        norms = [
            buffer.grad_data.norm(p=2)
            for chunk in self.chunks
            for buffer in chunk.buffers + chunk.expert_parallel_buffers
        ]
        bad = torch.zeros(1, dtype=torch.float32, device=self.topo.device)
        if norms:
            bad += (~torch.isfinite(torch.stack(norms).float().sum())).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.eval()
        reports = self._run(microbatches, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return {name: s / max(n, 1.0) for name, (s, n) in self._reduce_reports(reports).items()}

    # ------------------------------------------------------------------ state

    def model_sharded_state_dict(self) -> dict[str, Any]:
        chunks = self.unwrapped_chunks()
        if len(chunks) == 1:
            return chunks[0].sharded_state_dict()
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}

    def state_dict(self, for_loading: bool = False) -> dict[str, Any]:
        """Model and optimizer in distributed-checkpoint form (resharding across layouts)."""
        model_sd = self.model_sharded_state_dict()
        # "fully_reshardable": optimizer state in model-parameter space, so it loads under any
        # other (TP, PP, VPP, DP); the flattened "model space" default is refused by the
        # checkpoint layer of megatron-core 0.16.
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        # Loading fills these state tensors; saving before the first applied update needs them too.
        self._materialize_optimizer_state()
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=for_loading, metadata=metadata),
        }

    def _materialize_optimizer_state(self) -> None:
        """Give a fresh optimizer the state tensors a checkpoint is loaded into.

        megatron's distributed optimizer reads Adam's ``step`` from torch's per-parameter state,
        which torch only creates on the first step. One step with zero gradients and lr=0 creates
        it without moving any weight (decoupled weight decay is scaled by lr too); the loaded
        checkpoint then overwrites every value.
        """
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None or len(inner.state) > 0 or not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                continue
            saved_lrs = [group["lr"] for group in inner.param_groups]
            for group in inner.param_groups:
                group["lr"] = 0.0
            opt._init_optimizer_states_with_dummy_values()
            for group, lr in zip(inner.param_groups, saved_lrs):
                group["lr"] = lr
            # Moments are zero after the zero-gradient step; a zero step count makes the state
            # equal to a fresh optimizer's, so the next real update is the same as without it.
            for param_state in inner.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = torch.zeros_like(param_state["step"])
            _keep_step_out_of_tensor_state(opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        chunks = self.unwrapped_chunks()
        model_sd = state["model"]
        if len(chunks) == 1:
            chunks[0].load_state_dict(model_sd, strict=True)
        else:
            for i, chunk in enumerate(chunks):
                chunk.load_state_dict(model_sd[f"model{i}"], strict=True)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self._restore_adam_steps()
        else:  # weights only: the optimizer's main (fp32) copies were made from the old weights
            self.optimizer.reload_model_params()

    def _restore_adam_steps(self) -> None:
        """Give every parameter its own Adam ``step`` tensor after a load, where torch wants it.

        megatron's distributed optimizer restores ``step`` as *one* tensor shared by all
        parameters' states; torch's foreach and fused Adam increment each state's step in place,
        so a shared tensor would advance once per parameter and skew the bias correction of
        every later update. The fused kernel also wants the step as fp32 on the parameter's
        device (the checkpoint's is on the host).
        """
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            for group in getattr(inner, "param_groups", []):
                for param in group["params"]:
                    param_state = inner.state.get(param, {})
                    step = param_state.get("step")
                    if not torch.is_tensor(step):
                        continue
                    if group.get("fused"):
                        param_state["step"] = step.to(device=param.device, dtype=torch.float32, copy=True)
                    else:
                        param_state["step"] = step.clone()

    def kernel_summary(self) -> str:
        """Which optional fused kernels this engine runs (printed at start-up)."""
        c = self.tconfig
        # RoPE is fused by Transformer Engine, or compiled inside fmtrain's SDPA core attention.
        compiled_rope = any(
            getattr(m, "compile_rope", False) for chunk in self.unwrapped_chunks() for m in chunk.modules()
        )
        fused = [
            name
            for name, on in (
                ("activation", c.bias_activation_fusion),
                ("cross entropy", c.cross_entropy_loss_fusion),
                ("RoPE", c.apply_rope_fusion or compiled_rope),
            )
            if on
        ]
        return f"optimizer {self.adam_kernel}; fused kernels: {', '.join(fused) or 'none'}"

    def num_parameters(self) -> int:
        return sum(p.numel() for chunk in self.chunks for p in chunk.parameters())

    def unwrapped_chunks(self) -> list[torch.nn.Module]:
        """The family's modules without DDP / Float16Module wrappers."""
        out = []
        for chunk in self.chunks:
            module = chunk.module
            if isinstance(module, Float16Module):
                module = module.module
            out.append(module)
        return out


def _select_adam_kernel(optimizer, choice: str) -> str:
    """Switch megatron's torch AdamW fallback to torch's fused kernel (``train.fused_adam``).

    Without apex / Transformer Engine, megatron-core builds ``torch.optim.AdamW`` with torch's
    default, the multi-tensor ``foreach`` implementation (several kernels per tensor list per
    step); ``fused=True`` is one kernel per tensor list with the same update math. torch only
    reads ``fused`` from the param groups at step time, so setting it on the fresh optimizer
    (no state yet) is the same as constructing it with ``fused=True``. Returns the kernel used.
    """
    from megatron.core import optimizer as mcore_optimizer
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if not mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return "FusedAdam (apex / Transformer Engine)"
    inners = [
        opt.optimizer
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(getattr(opt, "optimizer", None), torch.optim.Adam | torch.optim.AdamW)
    ]
    if choice == "off" or not inners:
        return "torch AdamW (foreach)"
    supported = set(_get_fused_kernels_supported_devices())
    unsupported = sorted(
        {
            f"{p.dtype} on {p.device.type}"
            for inner in inners
            for group in inner.param_groups
            for p in group["params"]
            if p.device.type not in supported or not p.is_floating_point()
        }
    )
    if unsupported:
        if choice == "on":
            raise ValueError(f"train.fused_adam=on but torch has no fused AdamW for {', '.join(unsupported)}")
        return "torch AdamW (foreach)"
    for inner in inners:
        if inner.state:
            raise RuntimeError("the fused AdamW kernel must be selected before the first step")
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
    return "torch AdamW (fused)"


def _keep_step_out_of_tensor_state(opt) -> None:
    """Load per-parameter state without a ``step`` tensor into torch's Adam (megatron-core 0.16).

    With torch's own Adam (no Apex / Transformer Engine) each parameter's state carries a
    ``step`` tensor, but the reshardable checkpoint format stores ``step`` once in the param
    groups (restored by ``load_state_dict``) and not per tensor; megatron's loader then looks
    for a ``step`` tensor that is not there. Copy the tensors the checkpoint has and leave
    ``step`` to ``load_state_dict``.
    """

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **opt.optimizer.state[main_param]}
        for key, tensor in tensors.items():
            destination[key].copy_(tensor)

    if not opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        opt._set_main_param_and_optimizer_states = set_states


def _nan_loss(forward_step):
    """``forward_step`` whose loss (and reported loss) is multiplied by NaN: fault injection."""

    def poisoned_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def poisoned_loss_func(*args, **kwargs):
            loss, *rest = loss_func(*args, **kwargs)
            if rest and isinstance(rest[-1], dict) and "loss" in rest[-1]:
                report = rest[-1]["loss"].clone()
                report[0] = report[0] * math.nan
                rest[-1] = {**rest[-1], "loss": report}
            return (loss * math.nan, *rest)

        return output, poisoned_loss_func

    return poisoned_forward_step


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder
