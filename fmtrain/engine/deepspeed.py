"""The DeepSpeed engine: ZeRO stages 1-3 over the data-parallel ranks, optional CPU offload.

Every part of a run is built as on the megatron backend (the family's megatron-core or plain
modules, weights drawn layout-invariantly from the run seed), then each trainable part gets its
own ``deepspeed.initialize`` with a torch AdamW over megatron's parameter groups (norms and
biases not decayed), so the two backends run the same optimizer on the same weights; frozen
parts stay plain modules on the device. At ZeRO-3 a trainable part is constructed under
``deepspeed.zero.Init`` (each submodule's parameters partitioned over the data-parallel ranks as
the submodule is constructed) and its weights are drawn one gathered parameter at a time
(:class:`ZeroPartitioned`): no rank holds the whole part, from its construction on.

One optimizer step of a part, as megatron's no-pipelining schedule does it: for each
microbatch, the family's forward step and ``loss_fn`` give a loss *sum* and its count; DeepSpeed
back-propagates the sum (``scale_wrt_gas=False``) and averages the gradients over the
data-parallel ranks. megatron's convention (``calculate_per_token_loss``) divides the gradient
by the global batch's count instead: the engine sets ZeRO's static loss scale to
``count / dp`` before the boundary ``step()``, so ZeRO's unscaling turns DeepSpeed's average into
that division, and its gradient norm and clipping see the true gradient. A non-finite gradient
makes ZeRO skip the update (its overflow check; weights and Adam state unchanged), and the
engine reports it as megatron's does.

The DeepSpeed config is generated from fmtrain's (:func:`deepspeed_config`) and written to the
run directory; ``engine.deepspeed_config=FILE`` merges a user's JSON over it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from fmtrain.config import Config, ConfigError, TrainConfig, num_microbatches
from fmtrain.engine import StepResult
from fmtrain.engine.parts import build_part_chunks, family_module, initialize_part, megatron_config_of
from fmtrain.engine.steps import StorageBytes, gradients_only_for, nan_loss, primary_spec, reduce_reports
from fmtrain.models.registry import ForwardStep, ModelFamily, PartSpec, Progress
from fmtrain.models.workload import ZERO3_LIVE_PARAMETERS
from fmtrain.parallel import Topology

CHECKPOINT_TAG = "deepspeed"
"""DeepSpeed's checkpoint of the primary part lives in ``step_NNNNNNN/deepspeed/``, another
trainable part's in ``step_NNNNNNN/deepspeed.NAME/``."""


def checkpoint_tag(part_name: str, primary: bool) -> str:
    return CHECKPOINT_TAG if primary else f"{CHECKPOINT_TAG}.{part_name}"


# ----------------------------------------------------------------------------- configuration


def deepspeed_config(cfg: Config, train: TrainConfig, dp: int, bf16: bool) -> dict:
    """The DeepSpeed JSON of one trainable part, from fmtrain's settings."""
    e = cfg.engine
    zero: dict[str, Any] = {
        "stage": e.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": int(cfg.parallel.bucket_size_mb * 2**20 / 4),
    }
    if e.zero_stage == 3:
        # Gather every parameter on use and release it after (no prefetch cache): what ZeRO-3
        # promises, "no rank holds the whole model", holds between uses too.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=ZERO3_LIVE_PARAMETERS)
    if e.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if e.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    gas = num_microbatches(cfg, dp)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.train.micro_batch_size * gas * dp,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        # fmtrain's torch AdamW (the megatron backend's optimizer), also when offloaded: DeepSpeed's
        # CPUAdam is a C++ extension built on first use.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict, path: str) -> dict:
    """``generated`` with the user's DeepSpeed JSON merged over it (nested sections merged key by
    key). A key the user sets that fmtrain also sets must agree; a key DeepSpeed does not know is
    refused (DeepSpeed itself ignores unknown top-level keys silently)."""
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"engine.deepspeed_config={path}: cannot read it as JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.deepspeed_config={path}: expected a JSON object at the top level")
    known = _known_deepspeed_keys()
    unknown = sorted(set(user) - known - set(generated))
    if unknown:
        raise ConfigError(f"engine.deepspeed_config={path}: unknown DeepSpeed key(s) {', '.join(unknown)}")

    def merge(base: dict, extra: dict, where: str) -> dict:
        out = dict(base)
        for key, value in extra.items():
            name = f"{where}{key}"
            if key in base and isinstance(base[key], dict) and isinstance(value, dict):
                out[key] = merge(base[key], value, f"{name}.")
            elif key in base and base[key] != value:
                raise ConfigError(
                    f"engine.deepspeed_config={path}: {name}={value!r} conflicts with {base[key]!r}, which "
                    f"fmtrain derives from its own config (set the fmtrain setting instead)"
                )
            else:
                out[key] = value
        return out

    return merge(generated, user, "")


def _known_deepspeed_keys() -> set[str]:
    """Every top-level key DeepSpeed's config reads (its constants module names them all)."""
    from deepspeed.runtime import constants

    keys = {value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)}
    keys.update(
        {
            "zero_optimization",
            "bf16",
            "bfloat16",
            "fp16",
            "optimizer",
            "scheduler",
            "activation_checkpointing",
            "flops_profiler",
            "comms_logger",
            "monitor_config",
            "tensorboard",
            "wandb",
            "csv_monitor",
            "checkpoint",
            "data_efficiency",
            "compression_training",
            "aio",
            "autotuning",
            "elasticity",
            "nebula",
            "weight_quantization",
            "compile",
            "timers",
            "zero_force_ds_cpu_optimizer",
            "zero_allow_untested_optimizer",
            "amp",
            "torch_autocast",
            "pipeline",
            "sequence_parallel_size",
        }
    )
    return keys


# ----------------------------------------------------------------------------- parameter names

KEYS_FILE = "fmtrain_keys.json"
"""In a DeepSpeed tag directory: each parameter's megatron checkpoint key and layer index, so the
release exporters read a deepspeed-backend checkpoint as they read megatron's."""


def tensor_keys(module: torch.nn.Module) -> dict[str, dict]:
    """``{parameter name: {"key": megatron checkpoint key, "index": [layer index...]}}`` of a whole
    (TP = PP = 1) module with its full parameters, or their shapes (:meth:`ZeroPartitioned.shapes`)."""
    out = {}
    for name, obj in module.sharded_state_dict().items():
        if isinstance(obj, ShardedTensorFactory):
            built = obj.build()
            obj = next(iter(built if isinstance(built, list) else built.values()), None)
        if isinstance(obj, ShardedTensor):
            out[name] = {"key": obj.key, "index": list(obj.global_offset[: obj.prepend_axis_num])}
    return out


def canonical_names(names: list[str]) -> dict[str, str]:
    """Parameter name -> the name in the part's checkpoints: without the wrappers' prefixes
    (``module.`` of megatron's Float16Module under bf16, ``inner.`` of fmtrain's PlainModule)."""
    out = {name: name for name in names}
    for wrapper in ("module.", "inner."):
        if out and all(value.startswith(wrapper) for value in out.values()):
            out = {name: value.removeprefix(wrapper) for name, value in out.items()}
    return out


# ----------------------------------------------------------------------------- loading safely

_SAFE_GLOBALS: list | None = None


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoint files hold, for ``torch.load(weights_only=True)``."""
    global _SAFE_GLOBALS
    if _SAFE_GLOBALS is None:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        _SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
    return _SAFE_GLOBALS


def safe_load(path, map_location=None):
    """``torch.load`` of a DeepSpeed checkpoint file with ``weights_only=True``: tensors, containers
    and the few DeepSpeed types named in :func:`_safe_globals`, never arbitrary pickled objects
    (DeepSpeed's own loader unpickles anything)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read DeepSpeed checkpoint file {path}: {type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- the engine


class MegatronGroups:
    """megatron-core's process groups in the shape DeepSpeed's ``mpu`` argument expects: ZeRO
    partitions over the data-parallel group, and the gradient norm counts a tensor-parallel shard
    on every tensor-parallel rank and a replicated parameter once (Megatron-DeepSpeed passes its
    ``mpu`` the same way)."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron's default groups: biases and one-dimensional tensors (norms) are not decayed."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        # A ZeRO-3 parameter's data is an empty 1-d placeholder: its shape is ds_shape.
        dims = len(getattr(param, "ds_shape", param.shape))
        (no_decay if dims == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def _materialize_optimizer_state(zero_optimizer) -> None:
    """Give a fresh ZeRO optimizer the Adam state a checkpoint is loaded into.

    torch's AdamW creates its state on the first step, and ZeRO links each parameter's fragment
    of it only then. The state a fresh AdamW would create (zero moments, step 0) is created here
    for every flat fp32 partition, and ZeRO is asked to link it; the loaded values then overwrite
    it, and an unloaded optimizer steps exactly as it would have.
    """
    from torch.optim.optimizer import _get_scalar_dtype

    inner = zero_optimizer.optimizer
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3's sub-groups
    if flats is None:
        flats = [flat for group in inner.param_groups for flat in group["params"]]
    for flat in flats:
        if True:
            if not inner.state.get(flat):
                inner.state[flat] = {
                    "step": torch.tensor(0.0, dtype=_get_scalar_dtype()),
                    "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
                }
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2
    if link is not None:
        link()


class ZeroPartitioned:
    """ZeRO-3 parameters, built under ``deepspeed.zero.Init``, as the layout-invariant initialiser
    and :func:`tensor_keys` need them (:class:`fmtrain.models.init.PartitionedParameters`).

    Outside a forward such a parameter's ``data`` is an empty placeholder (its 1/dp slice is
    ``ds_tensor``), so megatron's ``sharded_state_dict()`` cannot describe it: :meth:`shapes` gives
    each parameter a stand-in of its full shape backed by a single element. :meth:`gathered` is
    DeepSpeed's ``GatheredParameters`` with a modifier rank (DeepSpeed docs: "Gathering
    Parameters"): what is written into the whole parameter goes back into every rank's partition.
    """

    def __init__(self):
        # By storage address: a tensor that still shares a stand-in's storage after shapes() is a
        # view a state dict took of the stand-in, not the parameter, and writing it would be lost.
        # Kept alive so that no other tensor reuses an address.
        self._stand_ins: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def shapes(self, module: torch.nn.Module):
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        placeholders = [p.data for p in params]
        try:
            for param in params:
                one = torch.empty(1, dtype=param.dtype, device=param.device)
                self._stand_ins[one.untyped_storage().data_ptr()] = one
                param.data = one.expand(param.ds_shape)
            yield
        finally:
            for param, placeholder in zip(params, placeholders):
                param.data = placeholder

    def gathered(self, tensor: torch.Tensor):
        import deepspeed

        if hasattr(tensor, "ds_id"):
            # Every rank draws the same values; rank 0's are the ones re-partitioned.
            return deepspeed.zero.GatheredParameters([tensor], modifier_rank=0)
        if tensor.untyped_storage().data_ptr() in self._stand_ins:
            raise ValueError(
                "a sharded state dict entry is a view of a ZeRO-3 parameter rather than the parameter: "
                "it cannot be gathered to be initialised"
            )
        return contextlib.nullcontext()


@dataclass
class DeepSpeedPart:
    """One part on this rank: the family's module, and for a trainable part its DeepSpeed engine."""

    spec: PartSpec
    module: torch.nn.Module
    """The family's module in fmtrain's wrapper (a megatron module, or :class:`PlainModule`)."""
    train: TrainConfig
    ds: Any = None
    """The part's ``deepspeed.DeepSpeedEngine`` (trainable parts)."""
    forward_step: ForwardStep | None = None
    report_names: dict[bool, list[str]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trainable(self) -> bool:
        return self.spec.trainable

    @property
    def runner(self) -> torch.nn.Module:
        """What the forward steps call: the module DeepSpeed wraps (megatron's Float16Module under
        bf16), not the DeepSpeed engine. ZeRO's own hooks on the module gather ZeRO-3 parameters and
        reduce gradients either way; the engine's forward also hooks its outputs so that *any*
        backward through them runs ZeRO's gradient reduction, which a loss taking its own
        ``torch.autograd.grad`` (the VAE's adaptive GAN weight) must not trigger."""
        return self.ds.module if self.ds is not None else self.module

    def family_modules(self) -> list[torch.nn.Module]:
        return [family_module(self.module)]


class DeepSpeedEngine:
    backend = "deepspeed"

    def __init__(self, cfg: Config, topo: Topology, family: ModelFamily):
        import deepspeed
        from megatron.core.transformer.module import Float16Module

        from fmtrain.engine.megatron import resolve_params_dtype
        from fmtrain.parallel import context

        self.cfg = cfg
        self.topo = topo
        self.family = family
        self.zero_stage = cfg.engine.zero_stage
        self.params_dtype = resolve_params_dtype(cfg, topo.device)
        self.num_microbatches = num_microbatches(cfg, topo.dp)
        context.init_deepspeed_comm("nccl" if topo.device.type == "cuda" else "gloo")
        specs = family.parts(cfg)
        primary = primary_spec(cfg, specs)
        self.ds_configs: dict[str, dict] = {}
        self.tensor_keys: dict[str, dict] = {}
        self.parts: dict[str, DeepSpeedPart] = {}
        for spec in specs:
            self.parts[spec.name] = self._build_part(deepspeed, Float16Module, spec)
        self.primary = self.parts[primary.name]
        if topo.is_writer:  # what DeepSpeed ran with, beside the run's config.yaml
            run_dir = Path(cfg.run.dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_configs, indent=1) + "\n")
        self.progress = Progress()
        modules = {name: part.family_modules() for name, part in self.parts.items()}
        for part in self.parts.values():
            if part.spec.forward_step is not None:
                part.forward_step = part.spec.forward_step(self.cfg, modules, self.progress)

    def _build_part(self, deepspeed, Float16Module, spec: PartSpec) -> DeepSpeedPart:  # noqa: N803
        cfg = self.cfg
        bf16 = self.params_dtype == torch.bfloat16
        config = megatron_config_of(cfg, spec, params_dtype=self.params_dtype, use_cpu=self.topo.device.type == "cpu")
        train = spec.optimizer(cfg) if spec.optimizer is not None else cfg.train
        if not spec.trainable:
            (module,) = build_part_chunks(cfg, spec, config, self.topo.device)
            initialize_part(cfg, spec, [module])
            module.requires_grad_(False)
            module.eval()
            if spec.offload:
                module.to("cpu")
            return DeepSpeedPart(spec=spec, module=module, train=train)
        ds_config = deepspeed_config(cfg, train, self.topo.dp, bf16)
        if cfg.engine.deepspeed_config:
            ds_config = merge_user_config(ds_config, cfg.engine.deepspeed_config)
        self.ds_configs[spec.name] = ds_config
        partitioned = ZeroPartitioned() if self.zero_stage == 3 else None
        with self._zero_init(deepspeed, ds_config) if partitioned else contextlib.nullcontext():
            (module,) = build_part_chunks(cfg, spec, config, self.topo.device)
        initialize_part(cfg, spec, [module], partitioned)
        part = DeepSpeedPart(spec=spec, module=module, train=train)
        # The parameters' megatron checkpoint keys, for exporters.
        with partitioned.shapes(module) if partitioned else contextlib.nullcontext():
            self.tensor_keys[spec.name] = tensor_keys(module)
        groups = _param_groups(module, train.weight_decay)
        optimizer = torch.optim.AdamW(
            groups,
            lr=train.lr,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            foreach=False,
        )
        # bf16: megatron's wrapper casts float inputs to bf16 and the last stage's output back.
        model = Float16Module(config, module) if bf16 else module
        part.ds, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=ds_config,
            dist_init_required=False,
            mpu=MegatronGroups() if self.topo.tp > 1 else None,
        )
        part.ds.checkpoint_engine.load = safe_load
        return part

    @contextlib.contextmanager
    def _zero_init(self, deepspeed, ds_config: dict):
        """Construct a trainable part's modules under ``deepspeed.zero.Init`` (DeepSpeed docs:
        "Constructing Massive Models"): each submodule's parameters are partitioned over
        megatron's data-parallel group as soon as that submodule is constructed, into the
        part's ZeRO-3 configuration (offloaded parameters straight to the host)."""
        from megatron.core import parallel_state

        zero_init = deepspeed.zero.Init(
            data_parallel_group=parallel_state.get_data_parallel_group(),
            config_dict_or_path=copy.deepcopy(ds_config),
            mpu=MegatronGroups() if self.topo.tp > 1 else None,
            # DeepSpeed's default overrides create every floating-point tensor of the constructors
            # in the ZeRO dtype, buffers and intermediates included (megatron computes rotary
            # frequencies in fp32; DeepSpeed issue #4932): none here, as on the megatron backend.
            tensor_overrides=[],
        )
        cast = None
        if self.params_dtype != torch.float32:
            # What megatron's Float16Module would do to a plain module's fp32 parameters once they
            # are whole, done before they are partitioned (a partition keeps its dtype). The
            # constructors' values are overwritten by the initialiser.
            def cast_parameter(module, name, param):
                if param is not None and param.is_floating_point() and param.dtype != self.params_dtype:
                    param.data = param.data.to(self.params_dtype)

            cast = torch.nn.modules.module.register_module_parameter_registration_hook(cast_parameter)
        try:
            with zero_init:
                yield
        finally:
            if cast is not None:
                cast.remove()

    # ------------------------------------------------------------------ parts

    @property
    def trainable_parts(self) -> list[DeepSpeedPart]:
        return [part for part in self.parts.values() if part.trainable]

    @property
    def params_partitioned(self) -> bool:
        """ZeRO-3: no rank holds a whole trainable module outside a forward or backward."""
        return self.zero_stage == 3

    def unwrapped_chunks(self, part: str | None = None) -> list[torch.nn.Module]:
        return [self.parts[part or self.primary.name].module]

    def release_part(self, name: str) -> None:
        if self.parts[name].trainable:
            raise ValueError(f"part {name!r} is trainable: only a frozen part can be released")
        del self.parts[name]

    @contextlib.contextmanager
    def full_weights(self, part: str | None = None, modify: bool = False):
        """A part's whole parameters on every rank for the duration (ZeRO-3 gathers them, so the
        whole part is materialised meanwhile; ``modify``: what rank 0 writes into them is kept --
        then call :meth:`weights_changed` or set the fp32 copies)."""
        target = self.parts[part or self.primary.name]
        if target.ds is None or self.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(target.module.parameters()), modifier_rank=0 if modify else None):
            yield

    def named_parameters(self, part: str) -> dict[str, torch.nn.Parameter]:
        """A part's parameters under their checkpoint names."""
        named = dict(self.parts[part].module.named_parameters())
        rename = canonical_names(list(named))
        return {rename[name]: param for name, param in named.items()}

    def load_full_state(self, states: dict) -> None:
        """Load unsharded per-parameter states (:class:`fmtrain.checkpoint.backends.FullState`, by
        part name) into the parts' modules and ZeRO partitions, at any stage and data-parallel size:
        the weights, and where a state has them Adam's moments and step count (collective)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for name, state in states.items():
            part = self.parts[name]
            params = self.named_parameters(name)
            if state.has_optimizer:
                _materialize_optimizer_state(part.ds.optimizer)
            missing = sorted(set(params) - set(state.weights))
            if missing:
                raise ValueError(f"part {name!r}: the checkpoint has no weights for {', '.join(missing[:5])}")
            with torch.no_grad(), self.full_weights(name, modify=True):
                for key, param in params.items():
                    if tuple(param.shape) != tuple(state.weights[key].shape):
                        raise ValueError(
                            f"part {name!r}: {key} is {tuple(state.weights[key].shape)} in the checkpoint, "
                            f"{tuple(param.shape)} in this model"
                        )
                    param.copy_(state.weights[key].to(param.dtype))
            for key, param in params.items():
                # The fp32 copies from the fp32 values, not from the (possibly bf16) module weights.
                safe_set_full_fp32_param(param, state.weights[key].to(self.topo.device))
                for moment, table in state.moments.items():
                    safe_set_full_optimizer_state(param, table[key].to(self.topo.device), moment)
            if state.has_optimizer:
                for param_state in part.ds.optimizer.optimizer.state.values():
                    if "step" in param_state:
                        old = param_state["step"]
                        param_state["step"] = (
                            torch.full_like(old, float(state.step)) if torch.is_tensor(old) else state.step
                        )

    def weights_changed(self, part: str | None = None) -> None:
        """Weights were written into a trainable part's module: refresh ZeRO's fp32 copies."""
        target = self.parts[part or self.primary.name]
        if target.ds is not None:
            target.ds.optimizer._restore_from_bit16_weights()

    # ------------------------------------------------------------------ steps

    def _data_parallel_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def _others(self, stepping: DeepSpeedPart):
        return (p for part in self.trainable_parts if part is not stepping for p in part.module.parameters())

    def train_step(
        self,
        microbatches: list[dict],
        lr: float | Mapping[str, float],
        *,
        step: int | None = None,
        poison_loss: bool = False,
    ) -> StepResult:
        """As :meth:`fmtrain.engine.megatron.MegatronEngine.train_step`."""
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"expected {self.num_microbatches} microbatches, got {len(microbatches)}")
        if step is not None:
            self.progress.step = step
        results = {}
        for part in self.trainable_parts:
            if self.progress.step < part.spec.active_from_step:
                continue
            rate = lr if isinstance(lr, (int, float)) else lr[part.name]
            with gradients_only_for(self._others(part)):
                results[part.name] = self._step_part(part, microbatches, rate, poison_loss)
        result = results[self.primary.name]
        for name, other in results.items():
            if name == self.primary.name:
                continue
            result.extra.update({f"{name}/loss": other.loss, f"{name}/grad_norm": other.grad_norm})
            result.extra.update({f"{name}/{key}": value for key, value in other.extra.items()})
            result.update_applied = result.update_applied and other.update_applied
        return result

    def _step_part(self, part: DeepSpeedPart, microbatches: list[dict], lr: float, poison_loss: bool) -> StepResult:
        ds = part.ds
        ds.train()
        for group in ds.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = part.train.weight_decay * group.get("wd_mult", 1.0)
        if part.spec.prepare_microbatches is not None:
            microbatches = part.spec.prepare_microbatches(self, microbatches)
        forward_step = nan_loss(part.forward_step) if poison_loss else part.forward_step
        iterator = iter(microbatches)
        reports, count = [], torch.zeros((), dtype=torch.float64, device=self.topo.device)
        for i in range(len(microbatches)):
            # The forward runs the wrapped module (see DeepSpeedPart.runner); what DeepSpeed's
            # engine forward does besides -- ZeRO's micro-step bookkeeping -- and what its output
            # hooks do as the backward begins (the accumulation boundary, ZeRO's backward state)
            # are called here.
            ds.optimizer.clear_backward_seen_flag()
            output, loss_fn = forward_step(iterator, part.runner)
            loss_sum, num, report = loss_fn(output)
            count += num.to(count) if torch.is_tensor(num) else float(num)
            reports.append(report)
            ds._backward_prologue()
            ds.backward(loss_sum, scale_wrt_gas=False)
            if i == len(microbatches) - 1:
                # megatron's per-token convention: gradient = sum over the global batch / its count.
                total = count.clone()
                dist.all_reduce(total, group=self._data_parallel_group())
                ds.optimizer.loss_scale = max(float(total), 1.0) / self.topo.dp
            ds.step()
        ds.optimizer.loss_scale = 1.0
        sums = reduce_reports(
            part.report_names,
            reports,
            forward_only=False,
            holds_reports=self.topo.tp_rank == 0,
            device=self.topo.device,
        )
        loss_sum, tokens = sums.pop("loss")
        loss = loss_sum / max(tokens, 1.0)
        applied = bool(ds.was_step_applied()) and math.isfinite(loss)
        norm = ds.get_global_grad_norm()
        grad_norm = float(norm) if applied and norm is not None else math.nan
        return StepResult(
            loss=loss,
            tokens=int(tokens),
            grad_norm=grad_norm,
            update_applied=applied,
            extra={name: s / max(n, 1.0) for name, (s, n) in sums.items()},
        )

    @torch.no_grad()
    def eval_step(self, microbatches: list[dict]) -> dict[str, float]:
        part = self.primary
        if part.spec.prepare_microbatches is not None:
            microbatches = part.spec.prepare_microbatches(self, microbatches)
        part.runner.eval()
        iterator = iter(microbatches)
        reports = []
        for _ in microbatches:
            output, loss_fn = part.forward_step(iterator, part.runner)
            reports.append(loss_fn(output)[-1])
        part.runner.train()
        sums = reduce_reports(
            part.report_names, reports, forward_only=True, holds_reports=self.topo.tp_rank == 0, device=self.topo.device
        )
        return {name: s / max(n, 1.0) for name, (s, n) in sums.items()}

    @torch.no_grad()
    def forward_outputs(
        self,
        microbatches: list[dict],
        *,
        part: str | None = None,
        forward_step: ForwardStep | None = None,
        collect: Callable[[torch.Tensor, Callable], Any] | None = None,
    ) -> list:
        """As :meth:`fmtrain.engine.megatron.MegatronEngine.forward_outputs` (no pipeline: every rank
        returns its microbatches' outputs)."""
        target = self.parts[part or self.primary.name]
        step = forward_step or target.forward_step or self.primary.forward_step
        collect = collect or (lambda output, loss_fn: output.detach())
        runner = target.runner
        was_training = runner.training
        runner.eval()
        moved = target.spec.offload and not target.trainable
        if moved:
            target.module.to(self.topo.device)
        try:
            iterator = iter(microbatches)
            outputs = []
            for _ in microbatches:
                output, loss_fn = step(iterator, runner)
                outputs.append(collect(output, loss_fn))
            return outputs
        finally:
            if moved:
                target.module.to("cpu")
            runner.train(was_training)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: Path) -> None:
        """Every trainable part's DeepSpeed checkpoint (weights, ZeRO partitions of the optimizer
        state) into ``directory`` (collective)."""
        for part in self.trainable_parts:
            tag = checkpoint_tag(part.name, part is self.primary)
            part.ds.save_checkpoint(str(directory), tag=tag, client_state={}, save_latest=False)
            if self.topo.is_writer:
                (Path(directory) / tag / KEYS_FILE).write_text(json.dumps(self.tensor_keys[part.name]) + "\n")

    @property
    def checkpoint_tags(self) -> dict[str, str]:
        """Part name -> the directory of its DeepSpeed checkpoint inside a checkpoint directory."""
        return {p.name: checkpoint_tag(p.name, p is self.primary) for p in self.trainable_parts}

    def load_checkpoint(self, directory: Path) -> None:
        """What :meth:`save_checkpoint` wrote, at the same data-parallel size (collective)."""
        for part in self.trainable_parts:
            tag = checkpoint_tag(part.name, part is self.primary)
            path, _ = part.ds.load_checkpoint(
                str(directory), tag=tag, load_module_strict=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")

    # ------------------------------------------------------------------ reporting

    def kernel_summary(self) -> str:
        offload = {
            "none": "",
            "optimizer": ", optimizer state offloaded to CPU",
            "optimizer+params": ", optimizer state and parameters offloaded to CPU",
        }[self.cfg.engine.offload]
        return f"DeepSpeed ZeRO-{self.zero_stage}{offload}; optimizer torch AdamW"

    def model_state_bytes(self) -> int:
        """Bytes of weights, gradients and optimizer state (ZeRO's fp32 partitions, Adam moments)
        this rank holds for its trainable parts, summed over the tensors themselves (host-resident
        offloaded state included)."""
        held = StorageBytes()
        for part in self.trainable_parts:
            opt = part.ds.optimizer
            for param in part.module.parameters():
                held.add(param.data)
                held.add(getattr(param, "ds_tensor", None))
                held.add(param.grad)
            # ZeRO-3 accumulates each rank's gradient partition in one flat buffer it allocates at
            # start and keeps
            held.add(getattr(opt, "grad_partitions_flat_buffer", None))
            for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "averaged_gradients"):
                value = getattr(opt, name, None)
                for tensor in value.values() if isinstance(value, dict) else value or []:
                    held.add(tensor)
                    held.add(getattr(tensor, "grad", None))
            for state in opt.optimizer.state.values():
                for value in state.values():
                    held.add(value)
        return held.total

    def num_parameters(self) -> int:
        """Parameters of the trainable parts (the whole model's: ZeRO-3 partitions them)."""
        return sum(getattr(p, "ds_numel", p.numel()) for part in self.trainable_parts for p in part.module.parameters())


__all__ = ["DeepSpeedEngine", "deepspeed_config", "merge_user_config", "safe_load"]
