"""The megatron-core engine: TP x PP (1F1B, interleaved) x DP with the distributed optimizer,
for every part of a run (:class:`fmtrain.models.registry.PartSpec`).

Order of construction matters and mirrors megatron's own ``get_model`` / ``setup_model_and_optimizer``,
part by part:

1. build the part's chunk(s) (one per virtual pipeline stage; a plain module is one chunk);
2. draw the weights layout-invariantly (before DDP, which moves params into its buffers);
3. wrap in ``Float16Module`` for bf16 (fp32 master weights live in the optimizer);
4. trainable parts: wrap in megatron DDP (bucketed, fp32 gradient reduction), broadcast from
   DP rank 0, build the part's optimizer (distributed optimizer = ZeRO-1) and hand the DDP
   hooks (no_sync, grad/param sync, finalize) to the schedules via the part's own config;
   frozen parts: no DDP, no optimizer, no gradient buffers, ``requires_grad`` off, eval mode.

A training step steps every trainable part in order, each on the same microbatches with its
own forward step, learning rate, clipping and non-finite check; while one part steps, the
other parts' parameters take no gradient (a generator's loss may run the discriminator).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads as mcore_clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

from fmtrain.config import Config, TrainConfig, num_microbatches
from fmtrain.engine import StepResult
from fmtrain.engine.optimizer_checkpoint import sharded_state_dict_for_saving
from fmtrain.engine.parts import (
    build_part_chunks,
    family_module,
    initialize_part,
    load_chunks,
    megatron_config_of,
    sharded_state_dict,
)
from fmtrain.engine.steps import StorageBytes, gradients_only_for, nan_loss, primary_spec, reduce_reports
from fmtrain.models.registry import ForwardStep, ModelFamily, PartSpec, Progress
from fmtrain.parallel import Topology


def resolve_params_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class Part:
    """One part on this rank: what the schedules run, what the family built, its optimizer."""

    spec: PartSpec
    config: TransformerConfig
    chunks: list[torch.nn.Module]
    """What megatron's schedules run: DDP-wrapped (trainable) or Float16Module / bare (frozen)."""
    modules: list[torch.nn.Module]
    """The chunks without DDP / Float16Module wrappers (sharded state dicts, loading)."""
    train: TrainConfig
    """The part's optimizer, LR schedule and clipping settings."""
    prefix: str = ""
    """Checkpoint-key prefix: "" for the primary part, ``NAME.`` for the others."""
    optimizer: Any = None
    adam_kernel: str = ""
    forward_step: ForwardStep | None = None
    report_names: dict[bool, list[str]] = field(default_factory=dict, repr=False)
    """The reported names of the part's loss function, for training (False) and forward-only (True)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trainable(self) -> bool:
        return self.spec.trainable

    @property
    def megatron(self) -> bool:
        """A megatron-core part (pipelined by megatron's schedules); False for a plain module."""
        return self.spec.megatron_config is not None

    def family_modules(self) -> list[torch.nn.Module]:
        """The family's own modules (what its forward steps and converters see)."""
        return [family_module(m) for m in self.modules]


class MegatronEngine:
    def __init__(self, cfg: Config, topo: Topology, family: ModelFamily):
        self.cfg = cfg
        self.topo = topo
        self.family = family
        self.params_dtype = resolve_params_dtype(cfg, topo.device)
        self.num_microbatches = num_microbatches(cfg, topo.dp)
        self.forward_backward = get_forward_backward_func()
        specs = family.parts(cfg)
        primary = primary_spec(cfg, specs).name
        self.parts: dict[str, Part] = {
            spec.name: self._build_part(spec, prefix="" if spec.name == primary else f"{spec.name}.") for spec in specs
        }
        self.primary = self.parts[primary]
        self.progress = Progress()
        modules = {name: part.family_modules() for name, part in self.parts.items()}
        for part in self.parts.values():
            if part.spec.forward_step is not None:
                part.forward_step = part.spec.forward_step(cfg, modules, self.progress)

    # ------------------------------------------------------------------ construction

    def _build_part(self, spec: PartSpec, prefix: str) -> Part:
        cfg, p = self.cfg, self.cfg.parallel
        if spec.megatron_config is None and spec.trainable and p.pp > 1:
            raise ValueError(
                f"part {spec.name!r} of model.family={cfg.model.family} is a plain torch module, "
                f"which is not pipelined; parallel.pp={p.pp} needs megatron modules"
            )
        config = megatron_config_of(cfg, spec, params_dtype=self.params_dtype, use_cpu=self.topo.device.type == "cpu")
        modules = build_part_chunks(cfg, spec, config, self.topo.device)
        initialize_part(cfg, spec, modules)
        chunks = [Float16Module(config, m) for m in modules] if self.params_dtype == torch.bfloat16 else list(modules)
        train = spec.optimizer(cfg) if spec.optimizer is not None else cfg.train
        part = Part(spec=spec, config=config, chunks=chunks, modules=modules, train=train, prefix=prefix)
        if not spec.trainable:
            for chunk in chunks:
                chunk.requires_grad_(False)
                chunk.eval()
            if spec.offload:
                self._offload(part)
            return part

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
            use_distributed_optimizer=p.distributed_optimizer,
            bucket_size=max(1, int(p.bucket_size_mb * 2**20 / 4)),
            check_for_nan_in_grad=False,
        )
        part.chunks = [
            # Only the first chunk's buckets overlap with the backward of later chunks.
            DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        for chunk in part.chunks:
            chunk.broadcast_params()
        part.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=train.lr,
                min_lr=train.min_lr,
                weight_decay=train.weight_decay,
                adam_beta1=train.adam_beta1,
                adam_beta2=train.adam_beta2,
                adam_eps=train.adam_eps,
                clip_grad=train.grad_clip,
                bf16=self.params_dtype == torch.bfloat16,
                params_dtype=self.params_dtype,
                use_distributed_optimizer=p.distributed_optimizer,
            ),
            part.chunks,
        )
        part.adam_kernel = _select_adam_kernel(part.optimizer, train.fused_adam)
        _install_schedule_hooks(config, part.chunks, ddp_config)
        return part

    # ------------------------------------------------------------------ parts

    @property
    def trainable_parts(self) -> list[Part]:
        return [part for part in self.parts.values() if part.trainable]

    @property
    def optimizer(self):
        """The primary part's optimizer."""
        return self.primary.optimizer

    def unwrapped_chunks(self, part: str | None = None) -> list[torch.nn.Module]:
        """This rank's chunks of ``part`` (default: the primary part) without DDP / Float16Module
        wrappers: what checkpoints and converters read and write (``sharded_state_dict``)."""
        return self.parts[part or self.primary.name].modules

    def release_part(self, name: str) -> None:
        """Drop frozen part ``name`` for the rest of the run, freeing its memory (DPO's reference
        once its log-probs are precomputed)."""
        if self.parts[name].trainable:
            raise ValueError(f"part {name!r} is trainable: only a frozen part can be released")
        del self.parts[name]

    def _offload(self, part: Part) -> None:
        for module in part.modules:
            module.to("cpu")

    @contextlib.contextmanager
    def _on_device(self, part: Part):
        """A frozen, offloaded part's weights on the device for the duration of one use."""
        if not part.spec.offload:
            yield
            return
        for module in part.modules:
            module.to(self.topo.device)
        try:
            yield
        finally:
            self._offload(part)

    def _gradients_only_for(self, stepping: Part):
        """While ``stepping`` steps, no other part's parameter takes a gradient."""
        return gradients_only_for(
            param
            for part in self.trainable_parts
            if part is not stepping
            for chunk in part.chunks
            for param in chunk.parameters()
        )

    # ------------------------------------------------------------------ steps

    def _run(
        self,
        part: Part,
        microbatches: list[dict],
        forward_step: ForwardStep,
        *,
        forward_only: bool,
        collect_non_loss_data: bool = False,
    ) -> list:
        if len(microbatches) != self.num_microbatches and not forward_only:
            raise ValueError(f"expected {self.num_microbatches} microbatches, got {len(microbatches)}")
        seq_length = getattr(self.cfg.model, "seq_length", 1)
        if part.megatron and self.family.prepare_step is not None and self.topo.pp > 1:
            microbatches, seq_length = self.family.prepare_step(self.cfg, microbatches)
        # Interleaved schedules read one iterator per chunk; a plain module is never pipelined.
        iterators = [iter(microbatches) for _ in part.chunks]
        schedule = self.forward_backward if part.megatron else forward_backward_no_pipelining
        return schedule(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=part.chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size * self.cfg.objective.ROWS_PER_SAMPLE,
            forward_only=forward_only,
            collect_non_loss_data=collect_non_loss_data,
        )

    def _reduce_reports(self, part: Part, reports: list[dict], forward_only: bool) -> dict[str, tuple[float, float]]:
        """Reports exist on the last pipeline stage only, once per tensor-parallel rank (a plain
        module runs unpipelined on every rank): each TP group's rank 0 copy on the last stage
        is summed over all ranks, so every rank gets the result."""
        return reduce_reports(
            part.report_names,
            reports,
            forward_only=forward_only,
            holds_reports=(self.topo.is_last_stage or not part.megatron) and self.topo.tp_rank == 0,
            device=self.topo.device,
        )

    def train_step(
        self,
        microbatches: list[dict],
        lr: float | Mapping[str, float],
        *,
        step: int | None = None,
        poison_loss: bool = False,
    ) -> StepResult:
        """One optimizer step of every trainable part, in order; ``lr`` is one rate for all
        parts or one per part name. The primary part's numbers are the result's; another
        part's appear in ``extra`` as ``NAME/loss``, ``NAME/grad_norm`` and ``NAME/REPORT``.
        A non-finite loss or gradient norm skips that part's update (its weights and optimizer
        state stay exactly as they were); ``update_applied`` is False if any part skipped.

        ``step`` (completed optimizer steps before this one) is what forward steps see as
        ``progress.step``; a part with ``active_from_step`` above it is not stepped.
        ``poison_loss`` multiplies the loss by NaN (fault injection for tests,
        ``FMTRAIN_TEST_NAN_AT_STEP``)."""
        if step is not None:
            self.progress.step = step
        results = {}
        for part in self.trainable_parts:
            if self.progress.step < part.spec.active_from_step:
                continue
            rate = lr if isinstance(lr, (int, float)) else lr[part.name]
            with self._gradients_only_for(part):
                results[part.name] = self._step_part(part, microbatches, rate, poison_loss)
        result = results[self.primary.name]
        for name, other in results.items():
            if name == self.primary.name:
                continue
            result.extra.update({f"{name}/loss": other.loss, f"{name}/grad_norm": other.grad_norm})
            result.extra.update({f"{name}/{key}": value for key, value in other.extra.items()})
            result.update_applied = result.update_applied and other.update_applied
        return result

    def _step_part(self, part: Part, microbatches: list[dict], lr: float, poison_loss: bool) -> StepResult:
        for chunk in part.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        part.optimizer.zero_grad()
        # What megatron's OptimizerParamScheduler does: per-group multipliers, so norms and
        # biases (wd_mult 0) are not decayed.
        for group in part.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = part.train.weight_decay * group.get("wd_mult", 1.0)
        if part.spec.prepare_microbatches is not None:
            microbatches = part.spec.prepare_microbatches(self, microbatches)
        forward_step = nan_loss(part.forward_step) if poison_loss else part.forward_step
        reports = self._run(part, microbatches, forward_step, forward_only=False)
        sums = self._reduce_reports(part, reports, forward_only=False)
        loss_sum, tokens = sums.pop("loss")
        loss = loss_sum / max(tokens, 1.0)
        # Skip the update on a non-finite loss or gradient: the optimizer is not stepped, so the
        # weights and Adam's moments and step count stay exactly as they were. Every rank takes
        # the same branch: the loss is summed over the job and the norm is megatron's global one.
        if math.isfinite(loss):
            update_applied, grad_norm = _step_if_finite(part.optimizer)
        else:
            update_applied, grad_norm = False, math.nan
        return StepResult(
            loss=loss,
            tokens=int(tokens),
            grad_norm=grad_norm,
            update_applied=update_applied,
            extra={name: s / max(n, 1.0) for name, (s, n) in sums.items()},
        )

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> dict[str, float]:
        """The primary part's reported means over ``microbatches`` (forward only)."""
        part = self.primary
        if part.spec.prepare_microbatches is not None:
            microbatches = part.spec.prepare_microbatches(self, microbatches)
        for chunk in part.chunks:
            chunk.eval()
        reports = self._run(part, microbatches, part.forward_step, forward_only=True)
        for chunk in part.chunks:
            chunk.train()
        return {
            name: s / max(n, 1.0) for name, (s, n) in self._reduce_reports(part, reports, forward_only=True).items()
        }

    @torch.no_grad()
    def forward_outputs(
        self,
        microbatches: list[dict],
        *,
        part: str | None = None,
        forward_step: ForwardStep | None = None,
        collect: Callable[[torch.Tensor, Callable], Any] | None = None,
    ) -> list:
        """What ``part``'s forward step returns for each microbatch, through the pipeline
        (megatron's ``collect_non_loss_data``): on the last pipeline stage a list with one entry
        per microbatch, ``collect(output, loss_fn)`` (default: the output, detached); [] on other
        stages. For reference log-probs, sampling, encoding. ``forward_step`` replaces the
        part's own (default: the part's, or the primary part's for a frozen part without one)."""
        target = self.parts[part or self.primary.name]
        step = forward_step or target.forward_step or self.primary.forward_step
        collect = collect or (lambda output, loss_fn: output.detach())

        def collecting_step(data_iterator, model):
            output, loss_fn = step(data_iterator, model)
            return output, lambda out, non_loss_data=False: collect(out, loss_fn)

        was_training = [chunk.training for chunk in target.chunks]
        for chunk in target.chunks:
            chunk.eval()
        try:
            with self._on_device(target):
                return self._run(target, microbatches, collecting_step, forward_only=True, collect_non_loss_data=True)
        finally:
            for chunk, training in zip(target.chunks, was_training):
                chunk.train(training)

    # ------------------------------------------------------------------ state

    def model_sharded_state_dict(self, primary_only: bool = False) -> dict[str, Any]:
        """The trainable parts' weights in distributed-checkpoint form: the primary part's at
        the top (the layout every fmtrain checkpoint has), the others under ``parts``."""
        state = sharded_state_dict(self.primary.modules)
        others = (
            {}
            if primary_only
            else {
                p.name: sharded_state_dict(p.modules, p.prefix) for p in self.trainable_parts if p is not self.primary
            }
        )
        return {**state, "parts": others} if others else state

    def state_dict(self, for_loading: bool = False) -> dict[str, Any]:
        """Weights and optimizer state of every trainable part (resharding across layouts)."""
        state = self._part_state(self.primary, for_loading)
        others = {p.name: self._part_state(p, for_loading) for p in self.trainable_parts if p is not self.primary}
        return {**state, "parts": others} if others else state

    def _part_state(self, part: Part, for_loading: bool) -> dict[str, Any]:
        model_sd = sharded_state_dict(part.modules, part.prefix)
        # "fully_reshardable": optimizer state in model-parameter space, so it loads under any
        # other (TP, PP, VPP, DP); the flattened "model space" default is refused by the
        # checkpoint layer of megatron-core 0.16. Saving writes those tensors as every data-
        # parallel rank's own pieces, without megatron's gather (fmtrain.engine.optimizer_checkpoint).
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        # Loading fills these state tensors; saving before the first applied update needs them too.
        _materialize_optimizer_state(part.optimizer)
        if for_loading:
            optimizer_sd = part.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
        else:
            optimizer_sd = sharded_state_dict_for_saving(part.optimizer, model_sd, metadata)
        if part.prefix:  # the optimizer's own entries (param groups, step) are named the same for every part
            add_prefix_for_sharding(optimizer_sd, part.prefix)
        return {"model": model_sd, "optimizer": optimizer_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` (or, weights only, ``{"model": model_sharded_state_dict()}``)
        described, after ``dist_checkpointing.load``."""
        model_state = dict(state["model"])
        part_models = model_state.pop("parts", {})
        self._load_part(self.primary, model_state, state.get("optimizer"))
        for name, part_state in state.get("parts", {}).items():
            self._load_part(self.parts[name], part_state["model"], part_state.get("optimizer"))
        for name, weights in part_models.items():  # weights-only loading
            self._load_part(self.parts[name], weights, None)

    def _load_part(self, part: Part, model_state: dict, optimizer_state: dict | None) -> None:
        load_chunks(part.modules, model_state, part.prefix)
        if optimizer_state is not None:
            part.optimizer.load_state_dict(optimizer_state)
            _restore_adam_steps(part.optimizer)
        else:  # weights only: the optimizer's main (fp32) copies were made from the old weights
            part.optimizer.reload_model_params()

    def weights_changed(self, part: str | None = None) -> None:
        """After weights were loaded into a trainable part's modules from outside (released
        weights): refresh its optimizer's main (fp32) copies."""
        target = self.parts[part or self.primary.name]
        if target.optimizer is not None:
            target.optimizer.reload_model_params()

    def kernel_summary(self) -> str:
        """Which optional fused kernels this engine runs (printed at start-up)."""
        c = self.primary.config
        # RoPE is fused by Transformer Engine, or compiled inside fmtrain's SDPA core attention.
        compiled_rope = any(
            getattr(m, "compile_rope", False) for chunk in self.primary.modules for m in chunk.modules()
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
        kernels = sorted({part.adam_kernel for part in self.trainable_parts})
        return f"optimizer {', '.join(kernels)}; fused kernels: {', '.join(fused) or 'none'}"

    def model_state_bytes(self) -> int:
        """Bytes of weights, gradient buffers and optimizer state (main weights, Adam moments) this
        rank holds for its trainable parts, summed over the tensors themselves."""
        held = StorageBytes()
        for part in self.trainable_parts:
            for chunk in part.chunks:
                for param in chunk.parameters():
                    held.add(param.data)
                for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                    held.add(buffer.param_data)
                    held.add(buffer.grad_data)
            for opt in _inner_optimizers(part.optimizer):
                inner = getattr(opt, "optimizer", None)
                for group in getattr(inner, "param_groups", []):
                    for param in group["params"]:
                        held.add(param.data)
                for state in getattr(inner, "state", {}).values():
                    for value in state.values():
                        held.add(value)
        return held.total

    def num_parameters(self) -> int:
        """Parameters of the trainable parts held by this rank."""
        return sum(p.numel() for part in self.trainable_parts for chunk in part.chunks for p in chunk.parameters())


def _install_schedule_hooks(c: TransformerConfig, chunks: list, ddp_config: DistributedDataParallelConfig) -> None:
    """What megatron's training.py hands to the schedules through the model config."""
    many = len(chunks) > 1
    no_sync = [chunk.no_sync for chunk in chunks]
    c.no_sync_func = no_sync if many else no_sync[0]
    if ddp_config.overlap_grad_reduce:
        sync = [chunk.start_grad_sync for chunk in chunks]
        c.grad_sync_func = sync if many else sync[0]
    if ddp_config.overlap_param_gather and ddp_config.use_distributed_optimizer:
        sync = [chunk.start_param_sync for chunk in chunks]
        c.param_sync_func = sync if many else sync[0]
    c.finalize_model_grads_func = finalize_model_grads


def _step_if_finite(optimizer) -> tuple[bool, float]:
    """megatron-core's ``ChainedOptimizer.step`` (prepare the main gradients, one global norm,
    clip every inner optimizer by it, update) with the update skipped when that norm is not
    finite. Returns (update applied, norm; NaN where skipped).

    megatron's own step applies an update whatever the norm (bf16 and fp32 have no grad scaler
    whose found-inf check would skip it; clipping by a NaN norm leaves the gradients as they
    are). The norm is all-reduced over the optimizer's gradient-statistics group after the
    data-parallel reduction, so a non-finite gradient on any rank, or a norm that overflows,
    reaches every rank, and no second pass over the gradients is needed to find it.
    """
    if optimizer.prepare_grads():  # a grad scaler's found-inf (fp16)
        return False, math.nan
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, math.nan
    for opt in _inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            # Looked up at call time: the CPU backend wraps it (fmtrain.parallel.cpu_backend).
            mcore_clip_grads.clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state tensors a checkpoint is loaded into.

    megatron's distributed optimizer reads Adam's ``step`` from torch's per-parameter state,
    which torch only creates on the first step. One step with zero gradients and lr=0 creates
    it without moving any weight (decoupled weight decay is scaled by lr too); the loaded
    checkpoint then overwrites every value.
    """
    for opt in _inner_optimizers(optimizer):
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


def _restore_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load, where torch wants it.

    megatron's distributed optimizer restores ``step`` as *one* tensor shared by all
    parameters' states; torch's foreach and fused Adam increment each state's step in place,
    so a shared tensor would advance once per parameter and skew the bias correction of
    every later update. The fused kernel also wants the step as fp32 on the parameter's
    device (the checkpoint's is on the host).
    """
    for opt in _inner_optimizers(optimizer):
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
        for opt in _inner_optimizers(optimizer)
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


__all__ = ["MegatronEngine", "Part", "resolve_params_dtype"]
