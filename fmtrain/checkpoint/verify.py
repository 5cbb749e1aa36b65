"""Checks run on every rank before a checkpoint's tensors are read.

A checkpoint that cannot be used should fail with one line that names it and says why, not
with a traceback from deep inside torch:

* :func:`check_files`  every file the tensor index (``.metadata``) points into exists and is
  long enough: a deleted or truncated ``.distcp`` file is named with the bytes it lacks;
* :func:`check_shapes` every tensor of this model exists in the checkpoint with the same global
  shape: the first one that differs is named with both shapes (a checkpoint of another model
  size or architecture);
* the index itself is unpickled with an allow-list (:class:`_MetadataUnpickler`): torch's
  reader uses plain ``pickle`` for it, so fmtrain reads it first with only the checkpoint
  metadata types of ``torch.distributed.checkpoint`` admitted, and refuses anything else.

Both checks are deterministic functions of the files and the config, so every rank reaches the
same verdict and none is left waiting in a collective.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fmtrain.checkpoint.errors import CheckpointError

DCP_METADATA = ".metadata"

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the dataclasses and enums of torch's checkpoint metadata, torch.Size and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        elif module == "torch" and name == "Size":
            return torch.Size
        elif module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        elif (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def read_dcp_metadata(path: Path):
    """The tensor index of a checkpoint directory, read with the allow-list."""
    index = Path(path) / DCP_METADATA
    if not index.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no tensor index ({DCP_METADATA})")
    try:
        return _MetadataUnpickler(io.BytesIO(index.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path}: refusing to read {index.name}: {exc}") from None
    except Exception as exc:  # truncated / garbage index
        raise CheckpointError(f"checkpoint {path}: {index.name} is unreadable ({type(exc).__name__}: {exc})") from None


def check_files(path: Path) -> None:
    """Every data file the index points into is present and at least as long as it says."""
    metadata = read_dcp_metadata(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name in sorted(needed):
        data_file = Path(path) / name
        if not data_file.is_file():
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {name} is missing (its {DCP_METADATA} lists tensors stored there)"
            )
        size = data_file.stat().st_size
        if size < needed[name]:
            raise CheckpointError(
                f"checkpoint {path} is truncated: {name} has {size} bytes, "
                f"its {DCP_METADATA} needs at least {needed[name]}"
            )


def _sharded_tensors(sharded_state_dict: dict) -> Iterable:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor):
            yield value


def check_shapes(path: Path, model_sharded_state_dict: dict, describe_config_difference: str = "") -> None:
    """Every tensor of the model is in the checkpoint with the same global shape.

    ``model_sharded_state_dict`` is consumed (megatron's factories are applied in place).
    """
    from megatron.core import dist_checkpointing

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot read its tensor index ({type(exc).__name__}: {exc})"
        ) from None
    hint = f" ({describe_config_difference})" if describe_config_difference else ""
    for tensor in _sharded_tensors(model_sharded_state_dict):
        if tensor.key not in saved:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: it has no tensor "
                f"'{tensor.key}' (model shape {tuple(tensor.global_shape)}){hint}"
            )
        saved_shape = tuple(saved[tensor.key].global_shape)
        if saved_shape != tuple(tensor.global_shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: tensor '{tensor.key}' "
                f"has shape {saved_shape} in the checkpoint and "
                f"{tuple(tensor.global_shape)} in the model{hint}"
            )


def config_difference(saved_config: dict, model_config: dict) -> str:
    """'model.hidden_size: checkpoint 64, this run 128; ...' for the model fields that differ."""
    saved_model = (saved_config or {}).get("model", {})
    diffs = [
        f"model.{key}: checkpoint {saved_model[key]!r}, this run {value!r}"
        for key, value in model_config.items()
        if key in saved_model and saved_model[key] != value
    ]
    return "; ".join(diffs)
