"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

Reading: ``model.safetensors`` or sharded ``model-0000K-of-0000N.safetensors`` with
``model.safetensors.index.json`` (diffusers' ``diffusion_pytorch_model*`` names likewise: any
``*.safetensors.index.json``), through ``safetensors.safe_open`` so only the tensors asked
for are read (memory-mapped). Pickled ``pytorch_model*.bin`` files are refused unless the
caller passes ``allow_pickle=True``; they are then read with ``torch.load(weights_only=True)``,
which unpickles tensors and plain containers only.

Slices: ``ckpt.read_slice(name, (rows, cols))`` reads only those rows / columns
(``safe_open(...).get_slice``), so a tensor-parallel rank never materialises a full tensor it
holds a piece of; ``ckpt.bytes_read`` counts what was read.

Writing: safetensors shards of at most ``max_shard_bytes`` each plus the index (or a single
``model.safetensors``; ``prefix`` picks another stem, e.g. diffusers'
``diffusion_pytorch_model``) and ``config.json``, into a temporary directory renamed into place
when complete, so an interrupted export never leaves a directory that looks finished.
:class:`StreamingShardWriter` writes the same files one tensor at a time (headers first, from
a plan of names, dtypes and shapes), so an export holds at most one tensor in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fmtrain.models.release import HFCheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"

# safetensors dtype names (the format's spec) <-> torch dtypes.
_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFE_NAMES = {v: k for k, v in _SAFE_DTYPES.items()}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class PickleRefusedError(HFCheckpointError):
    """Pickled weights found where the caller did not allow reading pickles."""


_WRAPPER_KEYS = ("model", "module", "state_dict")
_NAME_PREFIXES = ("_orig_mod.", "module.")


def unwrap_training_state(state: dict) -> dict:
    """The model's tensors of a training script's checkpoint: under ``'model'`` / ``'module'`` /
    ``'state_dict'`` when the file is such a wrapper (beside optimizer state, epochs...), with
    torch.compile's ``_orig_mod.`` and DDP's ``module.`` name prefixes removed."""
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    out = {}
    for name, value in state.items():
        for prefix in _NAME_PREFIXES:
            while isinstance(name, str) and name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = value
    return out


class HFCheckpoint:
    """The tensors of one Hugging Face checkpoint directory, read lazily by name.

    ``ckpt[name]`` returns one tensor (raising ``KeyError`` for a name the checkpoint does
    not hold), ``name in ckpt`` tests for it, ``ckpt.names`` lists them all (from the index or
    the file headers; no tensor data is read for that).
    """

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._handles: dict[Path, object] = {}
        self._pickled: tuple[Path | None, dict] = (None, {})
        self._weight_map, self._format = self._discover()
        self.bytes_read = 0
        """Bytes of tensor data returned so far (full tensors and slices)."""

    # ------------------------------------------------------------------ discovery

    def _discover(self) -> tuple[dict[str, Path], str]:
        path = self.path
        if path.is_file():
            if path.suffix == ".safetensors":
                return self._map_from_headers([path]), "safetensors"
            if path.suffix == ".json":
                weight_map = self._map_from_index(path)
                pickled = any(f.suffix != ".safetensors" for f in weight_map.values())
                return weight_map, ("pickle" if pickled else "safetensors")
            return self._pickle_map([path]), "pickle"
        if not path.is_dir():
            raise HFCheckpointError(f"{path}: no such checkpoint file or directory")
        if (path / SAFE_INDEX).is_file():
            return self._map_from_index(path / SAFE_INDEX), "safetensors"
        if (path / SAFE_SINGLE).is_file():
            return self._map_from_headers([path / SAFE_SINGLE]), "safetensors"
        # Other stems (diffusers: diffusion_pytorch_model.safetensors.index.json).
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise HFCheckpointError(
                f"{path}: several safetensors indexes ({', '.join(i.name for i in indexes)}); keep one"
            )
        if indexes:
            return self._map_from_index(indexes[0]), "safetensors"
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return self._map_from_headers(shards), "safetensors"
        if (path / BIN_INDEX).is_file():
            self._refuse_pickle(path / BIN_INDEX)
            return self._map_from_index(path / BIN_INDEX), "pickle"
        bins = sorted(path.glob("pytorch_model*.bin"))
        if bins:
            return self._pickle_map(bins), "pickle"
        raise HFCheckpointError(
            f"{path}: no {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors(.index.json) or pytorch_model*.bin found"
        )

    def _refuse_pickle(self, where: Path) -> None:
        if not self.allow_pickle:
            raise PickleRefusedError(
                f"{where}: this checkpoint is stored as pickled PyTorch files (.bin, .pt, .pth). fmtrain reads "
                "safetensors by default; convert it to safetensors, or pass allow_pickle=True to "
                "read it with torch.load(weights_only=True) if you trust its source."
            )

    def _map_from_index(self, index_file: Path) -> dict[str, Path]:
        try:
            index = json.loads(index_file.read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HFCheckpointError(f"{index_file}: not a checkpoint index ({exc})") from None
        out = {}
        for name, fname in weight_map.items():
            file = index_file.parent / fname
            if not file.is_file():
                raise HFCheckpointError(f"{index_file}: tensor {name!r} is in {fname}, which is missing")
            out[name] = file
        if any(f.suffix != ".safetensors" for f in out.values()):
            self._refuse_pickle(index_file)
        return out

    def _map_from_headers(self, files: Iterable[Path]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for file in files:
            for name in self._handle(file).keys():
                if name in out:
                    raise HFCheckpointError(f"tensor {name!r} is in both {out[name]} and {file}")
                out[name] = file
        return out

    def _pickle_map(self, files: list[Path]) -> dict[str, Path]:
        self._refuse_pickle(files[0])
        out: dict[str, Path] = {}
        for file in files:
            for name in self._load_pickle(file):
                out[name] = file
        return out

    # ------------------------------------------------------------------ access

    def _handle(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise HFCheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
            self._handles[file] = handle
        return handle

    def _load_pickle(self, file: Path) -> dict:
        cached_file, cached = self._pickled
        if cached_file == file:
            return cached
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
                state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise HFCheckpointError(f"{file}: cannot be read with torch.load(weights_only=True) ({exc})") from None
        if not isinstance(state, dict):
            raise HFCheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
        state = unwrap_training_state(state)
        # Keep one file's tensors at a time (a layer's tensors are usually in one file).
        self._pickled = (file, state)
        return state

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._weight_map)

    def file_of(self, name: str) -> Path:
        return self._weight_map[name]

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if self._format == "safetensors":
            t = self._handle(file).get_tensor(name)
        else:
            t = self._load_pickle(file)[name]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """``ckpt[name][index]`` reading only that part of the file (safetensors ``get_slice``).

        ``index`` holds one ``slice`` (step 1) per leading dimension; the result owns its memory.
        """
        file = self._weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if self._format == "safetensors":
            t = self._handle(file).get_slice(name)[index]
        else:
            # A memory-mapped pickle: slicing touches only the pages of these rows.
            t = self._load_pickle(file)[name][index].clone()
        self.bytes_read += t.numel() * t.element_size()
        return t

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, from the file header (no tensor data is read)."""
        file = self._weight_map.get(name)
        if file is None:
            raise KeyError(name)
        if self._format == "safetensors":
            sl = self._handle(file).get_slice(name)
            return tuple(sl.get_shape()), _SAFE_DTYPES[sl.get_dtype()]
        t = self._load_pickle(file)[name]
        return tuple(t.shape), t.dtype

    def nbytes(self, name: str) -> int:
        shape, dtype = self.info(name)
        return math.prod(shape) * _element_size(dtype)

    def get(self, name: str) -> torch.Tensor:
        return self[name]

    def config(self) -> dict:
        """``config.json`` next to the weights ({} when there is none)."""
        root = self.path if self.path.is_dir() else self.path.parent
        file = root / CONFIG
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise HFCheckpointError(f"{file}: not valid JSON ({exc})") from None

    def close(self) -> None:
        self._handles.clear()
        self._pickled = (None, {})

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _owns_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def save_hf_checkpoint(
    tensors: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    config: dict,
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` as safetensors (sharded above ``max_shard_bytes``) plus ``config.json``.

    The directory is assembled as ``OUT.tmp`` and renamed to ``OUT`` once complete. An existing
    non-empty ``OUT`` is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFCheckpointError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # safetensors refuses tensors that share storage (e.g. q/k/v views of one fused tensor).
    ready = {name: (t if _owns_storage(t) else t.contiguous().clone()) for name, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ready.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SAFE_SINGLE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in ready.values())
        (tmp / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]
"""(name, dtype, shape) of one tensor in a planned export."""


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets
    a shard of its own), as transformers' ``save_pretrained`` does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * _element_size(spec[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_file_names(num_shards: int, prefix: str = "model") -> list[str]:
    """``PREFIX.safetensors``, or ``PREFIX-0000K-of-0000N.safetensors`` (1-based) for N > 1."""
    if num_shards == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.safetensors" for i in range(1, num_shards + 1)]


def index_file_name(prefix: str = "model") -> str:
    return f"{prefix}.safetensors.index.json"


class StreamingShardWriter:
    """Write planned safetensors shards into ``directory`` one tensor at a time.

    The header of each file (names, dtypes, shapes, offsets) is known from the plan, so it is
    written first and every tensor's bytes are appended as the tensor arrives: memory holds one
    tensor, never a shard. Tensors must arrive in plan order with the planned dtype and shape.
    ``close()`` checks that every planned tensor was written and writes the index (when there is
    more than one shard). ``prefix`` is the file stem (``model``; diffusers:
    ``diffusion_pytorch_model``). The files are what ``safetensors.torch.save_file`` would read back
    identically (8-byte little-endian header length, JSON header padded with spaces to a
    multiple of 8, then the raw little-endian tensor data in header order).
    """

    def __init__(
        self, directory: Path, shards: list[list[TensorSpec]], metadata: dict | None = None, prefix: str = "model"
    ):
        self.directory = Path(directory)
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self.prefix = prefix
        self.files = shard_file_names(len(shards), prefix)
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._pos = 0
        self._open: tuple[int, object] | None = None
        self.total_bytes = sum(math.prod(s[2]) * _element_size(s[1]) for _, s in self._queue)

    def _start(self, shard: int):
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape in self.shards[shard]:
            if dtype not in _SAFE_NAMES:
                raise HFCheckpointError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * _element_size(dtype)
            header[name] = {
                "dtype": _SAFE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        f = open(self.directory / self.files[shard], "wb")
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        return f

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise HFCheckpointError(f"{name}: more tensors written than planned")
        shard, (want_name, dtype, shape) = self._queue[self._pos]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise HFCheckpointError(
                f"export wrote {name} {tensor.dtype} {tuple(tensor.shape)} where the plan "
                f"has {want_name} {dtype} {tuple(shape)}"
            )
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            self._open = (shard, self._start(shard))
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            # Raw bytes, whatever the dtype (numpy has no bfloat16); x86 / ARM are little-endian.
            self._open[1].write(data.reshape(-1).view(torch.uint8).numpy())  # no copy: buffer protocol
        self._pos += 1

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None
        if self._pos != len(self._queue):
            missing = [spec[0] for _, spec in self._queue[self._pos :]]
            raise HFCheckpointError(f"export stopped before {len(missing)} tensor(s), e.g. {missing[0]}")
        if len(self.shards) > 1:
            weight_map = {spec[0]: self.files[i] for i, spec in self._queue}
            (self.directory / index_file_name(self.prefix)).write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n"
            )


__all__ = [
    "HFCheckpoint",
    "HFCheckpointError",
    "PickleRefusedError",
    "save_hf_checkpoint",
    "plan_shards",
    "shard_file_names",
    "index_file_name",
    "StreamingShardWriter",
    "TensorSpec",
]
