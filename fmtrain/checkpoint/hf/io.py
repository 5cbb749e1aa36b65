"""Reading and writing Hugging Face checkpoint directories, one tensor at a time.

Reading: ``model.safetensors`` or sharded ``model-0000K-of-0000N.safetensors`` with
``model.safetensors.index.json``, through ``safetensors.safe_open`` so only the tensors asked
for are read (memory-mapped). Pickled ``pytorch_model*.bin`` files are refused unless the
caller passes ``allow_pickle=True``; they are then read with ``torch.load(weights_only=True)``,
which unpickles tensors and plain containers only.

Writing: safetensors shards of at most ``max_shard_bytes`` each plus the index (or a single
``model.safetensors``) and ``config.json``, into a temporary directory renamed into place
when complete, so an interrupted export never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"


class HFCheckpointError(RuntimeError):
    """A Hugging Face checkpoint that cannot be read or written, naming the file and the reason."""


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
        self._pickled: tuple[Optional[Path], dict] = (None, {})
        self._weight_map, self._format = self._discover()

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
            f"{path}: no {SAFE_INDEX}, {SAFE_SINGLE}, *.safetensors or pytorch_model*.bin found")

    def _refuse_pickle(self, where: Path) -> None:
        if not self.allow_pickle:
            raise HFCheckpointError(
                f"{where}: this checkpoint is stored as pickled PyTorch files (.bin). fmtrain reads "
                "safetensors by default; convert it to safetensors, or pass allow_pickle=True to "
                "read it with torch.load(weights_only=True) if you trust its source.")

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
            return self._handle(file).get_tensor(name)
        return self._load_pickle(file)[name]

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

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.storage_offset() == 0 and \
        t.untyped_storage().nbytes() == t.numel() * t.element_size()


def save_hf_checkpoint(tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike, config: dict, *,
                       max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
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
        (tmp / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


__all__ = ["HFCheckpoint", "HFCheckpointError", "save_hf_checkpoint"]
