"""Worker for tests/test_videomae.py: VideoMAE V2 under one (TP, PP, DP) layout.

``python -m torch.distributed.run --nproc_per_node N tests/videomae_worker.py OUT RECIPE [HF_DIR] -- [overrides]``
builds the engine (layout-invariant weights from run.seed, or the weights of HF_DIR through
``model.init_from_hf``), then
* computes the loss of one fixed microbatch forward-only with V1 masking (``eval_loss``),
* runs 5 training steps on fixed microbatches, the global batch split over the DP ranks, and
  records each step's loss and gradient norm,
and rank 0 of the last pipeline stage writes them to OUT (torch.save of plain tensors).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def fixed_batch(cfg, batch: int, seed: int) -> dict:
    d = cfg.data
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(batch, 3, d.video_frames, d.video_size, d.video_size, generator=g),
        "sample_seed": torch.arange(batch) + 1000 * seed,
    }


def main() -> None:
    from fmtrain import parallel
    from fmtrain.checkpoint.hf.convert import init_from_hf
    from fmtrain.config import load_config
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family
    from fmtrain.models.videomae_v2.family import make_forward_step

    args = sys.argv[1:]
    split = args.index("--")
    out, recipe, *hf = args[:split]
    overrides = args[split + 1 :]
    if hf:
        overrides.append(f"model.init_from_hf={hf[0]}")
    cfg = load_config(recipe, overrides)
    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
    if hf:
        init_from_hf(cfg, Path(cfg.run.dir), engine, topo, log=lambda m: None)

    def sum_and_count(output, loss_fn):
        total, count, _ = loss_fn(output)
        return torch.stack([total.detach().double(), count.double()])

    # The forward-only loss with VideoMAE V1 masking (what transformers' VideoMAEForPreTraining computes).
    v1 = load_config(recipe, overrides + ["objective.decoder_mask_ratio=0"])
    eval_batch = fixed_batch(cfg, cfg.train.micro_batch_size, seed=7)
    outputs = engine.forward_outputs([eval_batch], forward_step=make_forward_step(v1), collect=sum_and_count)
    evaluated = outputs[0] if outputs else None
    per_step = cfg.train.global_batch_size // cfg.train.micro_batch_size
    losses, norms = [], []
    for step in range(5):
        microbatches = [fixed_batch(cfg, cfg.train.micro_batch_size, seed=100 + 10 * step + i) for i in range(per_step)]
        mine = microbatches[topo.dp_rank * engine.num_microbatches : (topo.dp_rank + 1) * engine.num_microbatches]
        result = engine.train_step(mine, lr=1e-3)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    if topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0:
        torch.save(
            {
                "eval_loss": float(evaluated[0] / evaluated[1]),
                "num_parameters": engine.num_parameters(),
                "losses": torch.tensor(losses, dtype=torch.float64),
                "grad_norms": torch.tensor(norms, dtype=torch.float64),
            },
            out,
        )
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
