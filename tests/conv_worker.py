"""Worker for tests/test_parts.py: the plain conv net of ``tests.families.conv`` through the engine.

``python -m torch.distributed.run --nproc_per_node N tests/conv_worker.py OUT [overrides]`` builds
the engine (layout-invariant weights from run.seed), trains 5 steps on the family's fixed batches
and saves, from rank 0, the initial and final weights, the losses and gradient norms (torch.save
of plain tensors)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = 5


def main() -> None:
    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family
    from tests.families.conv import Sampler

    out, *overrides = sys.argv[1:]
    cfg = load_config(None, ["model.family=tests.families.conv", *overrides])
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    (chunk,) = engine.unwrapped_chunks()
    initial = {k: v.detach().clone() for k, v in chunk.state_dict().items()}
    sampler = Sampler(cfg, topo.dp)
    losses, norms = [], []
    for step in range(STEPS):
        result = engine.train_step(sampler.microbatches(step, topo.dp_rank), cfg.train.lr)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    final = {k: v.detach().clone() for k, v in chunk.state_dict().items()}
    if topo.rank == 0:
        torch.save(
            {
                "initial": initial,
                "final": final,
                "losses": torch.tensor(losses, dtype=torch.float64),
                "grad_norms": torch.tensor(norms, dtype=torch.float64),
                "dp": topo.dp,
                "kernels": engine.kernel_summary(),
            },
            out,
        )
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
