"""Worker for tests/test_checkpoint_faults.py: one trained state saved twice, once as every data-
parallel rank's own optimizer pieces (fmtrain's save) and once through megatron-core's gathered
``fully_reshardable`` path.

``python -m torch.distributed.run --nproc_per_node N tests/optimizer_checkpoint_worker.py OUT [overrides]``
writes OUT/pieces and OUT/gathered (fmtrain checkpoints of the same step)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine, megatron
    from fmtrain.models.registry import get_family

    out, *overrides = sys.argv[1:]
    cfg = load_config(REPO / "recipes" / "yi" / "tiny.yaml", overrides)
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    m, t = cfg.model, cfg.train
    g = torch.Generator().manual_seed(100 + topo.dp_rank)
    for _ in range(2):  # Adam moments that differ from their initial zeros
        batches = []
        for _ in range(engine.num_microbatches):
            tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
            mask = torch.ones(t.micro_batch_size, m.seq_length)
            batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
        engine.train_step(batches, 1e-3)
    checkpoint.save(cfg, Path(out) / "pieces", 2, engine, topo)
    megatron.sharded_state_dict_for_saving = lambda optimizer, model, metadata: optimizer.sharded_state_dict(
        model, is_loading=False, metadata=metadata
    )  # megatron's own gathering save
    checkpoint.save(cfg, Path(out) / "gathered", 2, engine, topo)


if __name__ == "__main__":
    main()
