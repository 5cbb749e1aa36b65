"""Random-number-generator states of every rank, saved beside the sharded tensors.

Each rank writes ``rng/rank_NNNNN.pt`` into the checkpoint: a flat ``{name: tensor}`` dict
(tensors only, so it loads with ``torch.load(..., weights_only=True)``) holding

* ``python``          Python's ``random`` state (625 words) and ``python_gauss`` (0 or 1 values);
* ``numpy_keys``      NumPy's legacy MT19937 key and ``numpy_meta`` = (pos, has_gauss, gauss);
* ``torch``           the CPU default generator;
* ``cuda``            the current CUDA device's generator, when CUDA is present;
* ``tracker/NAME``    every state of megatron's model-parallel RNG tracker (dropout inside
                      tensor-parallel regions, the expert-parallel streams, ...).

The files are restored only when the checkpoint was written under the same layout (TP, PP,
VPP, DP and world size): rank ``r`` then plays the same part it played when it saved. Under
any other layout there is no meaningful owner for a saved stream, so the states are
re-derived from ``run.seed`` and the step instead (:func:`reseed`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

RNG_DIR = "rng"


def rng_file(checkpoint_dir: Path, rank: int) -> Path:
    return Path(checkpoint_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


def capture() -> dict[str, torch.Tensor]:
    """This process's generator states as a flat dict of CPU tensors."""
    version, words, gauss = random.getstate()
    if version != 3:
        raise RuntimeError(f"unexpected Python random state version {version}")
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind != "MT19937":
        raise RuntimeError(f"unexpected NumPy generator {kind}")
    states = {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    for name, state in _tracker().get_states().items():
        states[f"tracker/{name}"] = state.detach().cpu().clone()
    return states


def restore(states: dict[str, torch.Tensor]) -> None:
    """Set every generator from :func:`capture`'s dict."""
    gauss = states["python_gauss"].tolist()
    random.setstate((3, tuple(int(w) for w in states["python"].tolist()), gauss[0] if gauss else None))
    pos, has_gauss, cached = states["numpy_meta"].tolist()
    np.random.set_state(
        ("MT19937", states["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tracker_states = {
        name[len("tracker/") :]: state.clone() for name, state in states.items() if name.startswith("tracker/")
    }
    if tracker_states:
        _tracker().set_states(tracker_states)


def save(checkpoint_dir: Path, rank: int, states: dict[str, torch.Tensor]) -> None:
    path = rng_file(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, path)


def load(checkpoint_dir: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """This rank's saved states, or None when the checkpoint has none for it."""
    path = rng_file(checkpoint_dir, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def reseed(seed: int, step: int) -> None:
    """Fresh, layout-independent streams for a run continuing at ``step`` under a new layout."""
    from fmtrain.parallel import set_seeds

    set_seeds(seed + 1_000_003 * step)
