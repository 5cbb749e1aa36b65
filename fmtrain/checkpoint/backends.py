"""Checkpoints across the two engine backends, and DeepSpeed checkpoints across data-parallel sizes.

A megatron-backend checkpoint is megatron-core's distributed format (reshardable); a deepspeed-
backend one holds DeepSpeed's own files (``step_NNNNNNN/deepspeed/``: the module states and each
rank's ZeRO partitions of the fp32 weights and Adam moments), which DeepSpeed loads only at the
data-parallel size that wrote them. Both hold the same facts about every parameter: its fp32
value, Adam's ``exp_avg`` and ``exp_avg_sq``, and the step count. :class:`FullState` is those
facts by parameter name, unsharded -- the content of DeepSpeed's universal checkpoint -- and the
bridge between formats:

- DeepSpeed files -> :class:`FullState`: :func:`read_deepspeed`, every rank's partitions joined
  with DeepSpeed's own reconstruction (``deepspeed.utils.zero_to_fp32``, stages 1-3), the files
  read with ``torch.load(weights_only=True)``;
- megatron checkpoint -> :class:`FullState`: :func:`read_megatron`, megatron-core's loader asked
  for whole tensors under the names of an unsharded module (the deepspeed backend's, TP = PP = 1);
- :class:`FullState` -> megatron engine: :func:`fill_sharded`, which fills the engine's own
  sharded state dict (any TP, PP, VPP, DP) slice by slice, as megatron's loader would;
- :class:`FullState` -> deepspeed engine: ``DeepSpeedEngine.load_full_state`` (DeepSpeed's
  ``safe_set_full_*`` API, any stage and data-parallel size).

Parameter names are the unsharded module's (``decoder.layers.3.mlp.linear_fc1.weight``); a
megatron stage's local layer number maps to the global one through the layer offset its sharded
tensors carry.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import (
    ShardedBase,
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
    apply_factory_merges,
)
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

from fmtrain.checkpoint.errors import CheckpointError
from fmtrain.engine.deepspeed import KEYS_FILE, canonical_names

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    """One part's training state, unsharded, by parameter name."""

    weights: dict[str, torch.Tensor]
    """fp32 values (the optimizer's master copies)."""
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """``{"exp_avg": {name: tensor}, "exp_avg_sq": {...}}``; empty: weights only."""
    step: int = 0
    """Adam's step count (its bias correction)."""

    @property
    def has_optimizer(self) -> bool:
        return bool(self.moments)

    def value(self, what: str, name: str, where: str) -> torch.Tensor:
        table = self.weights if what == "param" else self.moments.get(what, {})
        if name not in table:
            raise CheckpointError(f"{where} has no {what} for parameter {name}")
        return table[name]


# ----------------------------------------------------------------------------- DeepSpeed files


def read_deepspeed(tag_dir: Path, with_optimizer: bool = True) -> FullState:
    """The unsharded state in one DeepSpeed checkpoint tag directory (all ranks' files)."""
    from deepspeed.utils import zero_to_fp32 as z

    from fmtrain.engine.deepspeed import safe_load

    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no DeepSpeed checkpoint there")
    model_files = sorted(tag_dir.glob("*model_states.pt"), key=lambda p: z.natural_keys(p.name))
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: z.natural_keys(p.name))
    if not model_files or not optim_files:
        raise CheckpointError(f"{tag_dir}: DeepSpeed model or optimizer state files are missing")
    model = safe_load(model_files[0], map_location="cpu")
    model_state = z.zero_model_state(
        buffers={},
        param_shapes=model["param_shapes"],
        shared_params=list(model.get("shared_params", {}).items()),
        ds_version=model.get("ds_version"),
        frozen_param_shapes=None,
        frozen_param_fragments=None,
    )
    optim = [safe_load(f, map_location="cpu")["optimizer_state_dict"] for f in optim_files]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim_files):
        raise CheckpointError(
            f"{tag_dir}: {len(optim_files)} optimizer state files, but it was written by {world} ranks"
        )

    def join(flat_groups: list) -> dict[str, torch.Tensor]:
        # DeepSpeed prints its progress while joining.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _join(flat_groups)

    def _join(flat_groups: list) -> dict[str, torch.Tensor]:
        if stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat_groups, [model_state], True, optim[0].get("param_alignment_paddings")
            )
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, [model_state], True)
        rename = canonical_names(list(merged))
        return {rename[name]: tensor.contiguous().clone() for name, tensor in merged.items()}

    if stage <= 2:
        weights = join([o["single_partition_of_fp32_groups"] for o in optim])
        moment_groups, step = {key: [] for key in ADAM_MOMENTS}, 0
        for o in optim:
            base = o["base_optimizer_state"]
            if isinstance(base, dict):  # torch's optimizer state_dict, flat partitions with padding
                per_group = [base["state"][i] for i in sorted(base["state"])]
                paddings = o.get("group_paddings", [0] * len(per_group))
                per_group = [
                    {k: v[: v.numel() - pad] if torch.is_tensor(v) and v.dim() else v for k, v in g.items()}
                    for g, pad in zip(per_group, paddings)
                ]
            else:  # elastic checkpoints: one state dict per group, padding removed
                per_group = base
            for key in ADAM_MOMENTS:
                moment_groups[key].append([g[key] for g in per_group])
            step = per_group[0].get("step", 0)
    else:
        weights = join([o["fp32_flat_groups"] for o in optim])
        states = [o["optimizer_state_dict"]["state"] for o in optim]
        order = sorted(states[0])
        moment_groups = {key: [[s[i][key] for i in order] for s in states] for key in ADAM_MOMENTS}
        step = states[0][order[0]].get("step", 0)
    moments = {key: join(groups) for key, groups in moment_groups.items()} if with_optimizer else {}
    return FullState(weights=weights, moments=moments, step=int(step))


# ----------------------------------------------------------------------------- megatron checkpoints


def read_megatron(
    path: Path, module: torch.nn.Module, *, prefix: str = "", step_of: dict | None = None, with_optimizer: bool = True
) -> FullState:
    """One part's unsharded state from megatron checkpoint ``path``, for ``module`` (a whole, TP = PP
    = 1 megatron or plain module with its full parameters): megatron-core reads every tensor whole.
    ``prefix``: the part's checkpoint-key prefix; ``step_of``: the checkpoint's common state, for
    Adam's step count."""
    model_sd = module.sharded_state_dict(prefix=prefix)
    tensors = {name: sh for name, sh in model_sd.items() if isinstance(sh, ShardedTensor | ShardedTensorFactory)}
    named = dict(module.named_parameters())
    rename = canonical_names(list(named))
    params = {rename[name]: param for name, param in named.items()}
    request: dict = {"model": dict(tensors)}
    if with_optimizer:
        for what in ("param", *ADAM_MOMENTS):
            request[what] = {
                name: make_sharded_optimizer_tensor(
                    sh, torch.empty_like(params[name], dtype=torch.float32), f"{prefix}optimizer.state.{what}"
                )
                for name, sh in tensors.items()
                if name in params
            }
    try:
        loaded = dist_checkpointing.load(request, str(path))
    except Exception as exc:  # megatron raises many types; name the checkpoint and the cause
        raise CheckpointError(f"cannot read checkpoint {path} for this module: {type(exc).__name__}: {exc}") from exc
    weights = {name: t.float() for name, t in loaded["model"].items() if name in params}
    if not with_optimizer:
        return FullState(weights=weights)
    step = 0
    for group in (step_of or {}).get("param_groups", []):
        step = int(group.get("step", step))
    return FullState(
        weights={name: loaded["param"][name] for name in weights},
        moments={what: loaded[what] for what in ADAM_MOMENTS},
        step=step,
    )


def megatron_optimizer_common(path: Path, part: str | None) -> dict:
    """The (non-tensor) optimizer entries of a megatron checkpoint: param groups with the step."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    section = common if part is None else common.get("parts", {}).get(part, {})
    return section.get("optimizer", {}).get("optimizer", {})


# ----------------------------------------------------------------------------- checkpoint keys


class DeepSpeedCheckpointReader:
    """The weights of a deepspeed-backend checkpoint under megatron's keys, for the release
    exporters (the interface of :class:`fmtrain.checkpoint.hf.convert.DistCheckpointReader`): the
    fp32 values, read from every rank's ZeRO partitions."""

    def __init__(self, path: Path):
        import json

        from fmtrain.checkpoint import read_state
        from fmtrain.engine.deepspeed import CHECKPOINT_TAG

        tp = read_state(Path(path)).get("layout", {}).get("tp", 1)
        if tp > 1:
            raise CheckpointError(
                f"{path}: a deepspeed-backend checkpoint written at TP={tp} cannot be exported directly; load it "
                "into a deepspeed run at its own layout and save with the megatron backend, or train at TP=1"
            )
        tag_dir = Path(path) / CHECKPOINT_TAG
        keys_file = tag_dir / KEYS_FILE
        try:
            keys = json.loads(keys_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read {keys_file}: {exc}") from None
        full = read_deepspeed(tag_dir, with_optimizer=False)
        self.tensors = {}
        for name, where in keys.items():
            if name in full.weights:
                self.tensors[(where["key"], tuple(where["index"]))] = full.weights[name]
        self.keys = {key for key, _ in self.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def info(self, key: str, prepend: int) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = next(t for (k, _), t in self.tensors.items() if k == key)
        return tuple(tensor.shape), tensor.dtype

    def read(self, key: str, index: tuple[int, ...]) -> torch.Tensor:
        return self.tensors[(key, tuple(index))]


# ----------------------------------------------------------------------------- into megatron's layout

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _global_name(local_name: str, sh: ShardedTensor) -> str:
    """The unsharded module's parameter name for a stage's ``local_name`` (layer number from the offset)."""
    name = local_name
    if sh.prepend_axis_num:
        layer = sh.global_offset[0]
        name = _LAYER.sub(lambda m: f"{m.group(1)}layers.{layer}.", name, count=1)
    return name


def _sharded(obj) -> Iterator[ShardedTensor]:
    if isinstance(obj, ShardedTensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _sharded(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _sharded(value)


def _fill(sh: ShardedTensor, full: torch.Tensor, what: str, name: str) -> None:
    prepend = sh.prepend_axis_num
    if tuple(full.shape) != tuple(sh.global_shape[prepend:]):
        raise CheckpointError(
            f"{what} of {name}: the checkpoint's tensor is {tuple(full.shape)}, this model's is "
            f"{tuple(sh.global_shape[prepend:])}"
        )
    piece = full[tuple(slice(o, o + n) for o, n in zip(sh.global_offset[prepend:], sh.local_shape))]
    sh.data = piece.to(dtype=sh.data.dtype, device=sh.data.device).clone()


def fill_sharded(model_sd: dict, optimizer_sd: dict | None, state: FullState, where: str) -> tuple[dict, dict | None]:
    """One part's megatron sharded state (``model_sd``: the modules' ``sharded_state_dict``;
    ``optimizer_sd``: megatron's fully reshardable optimizer state, or None) with every tensor
    filled from ``state``; returns them as megatron's loader would (tensors, not shards)."""
    whole = {"model": model_sd, "optimizer": optimizer_sd or {}}
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values

    factories, _ = extract_matching_values(
        whole, lambda x: isinstance(x, ShardedTensorFactory), return_lists_as_dicts=True
    )
    apply_factories(whole)
    names: dict[tuple, str] = {}
    chunks = whole["model"]
    stage_dicts = (
        [chunks] if not any(k.startswith("model") and k[5:].isdigit() for k in chunks) else list(chunks.values())
    )
    for chunk in stage_dicts:
        for local_name, built in chunk.items():
            for sh in _sharded(built):
                lead = tuple(sh.global_offset[: sh.prepend_axis_num])
                name = _global_name(local_name, sh)
                names[(sh.key, lead)] = name
                _fill(sh, state.value("param", name, where), "weights", name)
    if optimizer_sd is not None:
        pattern = re.compile(r"^(?P<prefix>.*)optimizer\.state\.(?P<what>param|exp_avg|exp_avg_sq)\.(?P<key>.+)$")
        for sh in _sharded(whole["optimizer"]):
            match = pattern.match(sh.key)
            if match is None:
                raise CheckpointError(f"{where}: unexpected optimizer tensor {sh.key}")
            lead = tuple(sh.global_offset[: sh.prepend_axis_num])
            # The model key (with a part's prefix) follows the state's name; a part's optimizer
            # tensors carry its prefix once more in front.
            name = names.get((match["key"], lead))
            if name is None:
                raise CheckpointError(f"{where}: no parameter for optimizer tensor {sh.key}")
            _fill(sh, state.value(match["what"], name, where), match["what"], name)
        for group in whole["optimizer"].get("optimizer", {}).get("param_groups", []):
            group["step"] = float(state.step)
    dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedTensor | ShardedObject) else x, whole)
    apply_factory_merges(whole, factories)
    leftover = [x for x in _values(whole) if isinstance(x, ShardedBase)]
    if leftover:
        raise CheckpointError(f"{where}: {len(leftover)} entries could not be filled")
    return whole["model"], (whole["optimizer"] if optimizer_sd is not None else None)


def _values(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _values(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _values(value)
    else:
        yield obj
