"""Worker for tests/test_lavin_dit.py: one LaVin-DiT J-DiT under a (TP, PP, SP, DP) layout.

``python -m torch.distributed.run --nproc_per_node N tests/lavin_worker.py OUT RECIPE LAYOUTS [overrides]``
where LAYOUTS is a JSON list of override lists, one per layout of the same world size (each
writes OUT with its index: OUT.0, OUT.1, ...; megatron's groups are rebuilt between them in the
one process group, which saves a start-up per layout). For each, it builds the engine with every
weight drawn layout-invariantly from N(0, 0.05) (the release's zero-initialised modulation and
output layers would make the first steps trivially equal), then
* runs the model forward-only on fixed inputs (two microbatches with different numbers of
  example pairs) and keeps the last stage's velocity prediction,
* runs 5 training steps on fixed microbatches (each data-parallel rank its share of the step's
  global batch) and keeps each step's loss and gradient norm,
and rank 0 of the last pipeline stage writes them to OUT (torch.save of plain tensors).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def fixed_microbatch(cfg, pairs: int, batch: int, seed: int, size: int = 8) -> dict:
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    return {
        "context": torch.randn(batch, m.in_channels, 2 * pairs + 1, size, size, generator=g),
        "target": torch.randn(batch, m.in_channels, 1, size, size, generator=g),
        "item_frames": 1,
        "pairs": pairs,
        "sample_seed": torch.arange(batch) + 1000 * seed,
    }


def dense_init_rule(cfg):
    from fmtrain.models.init import InitRule

    def rule(key: str) -> InitRule:
        if key.endswith(("norm.weight", "embedder.1.weight")):
            return InitRule("ones")
        return InitRule("normal", 0.05)

    return rule


def run_layout(cfg, out: str) -> None:
    from fmtrain import parallel
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.lavin_dit import family as lavin

    topo = parallel.initialize(cfg)
    lavin.init_rule = dense_init_rule  # what the family's parts() hands the initialiser
    engine = MegatronEngine(cfg, topo, lavin.FAMILY)
    mbs = cfg.train.micro_batch_size

    forward_inputs = [{**fixed_microbatch(cfg, pairs, mbs, seed=7 + pairs), "predict_only": True} for pairs in (1, 2)]
    predictions = [output.clone() for output in engine.forward_outputs(forward_inputs)]

    losses, norms = [], []
    per_rank = engine.num_microbatches
    for step in range(5):
        # The step's global batch, the same whatever the layout; this DP rank takes its share.
        step_batch = [fixed_microbatch(cfg, 1 + i % 2, mbs, seed=100 * step + i) for i in range(per_rank * topo.dp)]
        mine = step_batch[topo.dp_rank * per_rank : (topo.dp_rank + 1) * per_rank]
        result = engine.train_step(mine, lr=1e-3)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    if topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0:
        torch.save(
            {
                "predictions": predictions,
                "num_parameters": engine.num_parameters(),
                "losses": torch.tensor(losses, dtype=torch.float64),
                "grad_norms": torch.tensor(norms, dtype=torch.float64),
            },
            out,
        )
    dist.barrier()


def main() -> None:
    import json

    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.config import load_config

    out, recipe, layouts, *overrides = sys.argv[1:]
    for i, layout in enumerate(json.loads(layouts)):
        run_layout(load_config(recipe, [*overrides, *layout]), f"{out}.{i}")
        parallel_state.destroy_model_parallel()  # the next layout's groups, in the same process group
    parallel.destroy()


if __name__ == "__main__":
    main()
