"""Worker for tests/test_step_video.py: one Step-Video DiT under a (TP, PP, SP, CP) layout.

``python -m torch.distributed.run --nproc_per_node N tests/dit_worker.py OUT RECIPE [overrides]``
builds the engine (layout-invariant weights from run.seed), then
* runs the model forward-only on fixed inputs (two microbatches of different latent shapes,
  fixed t, noise and text) and saves the last stage's prediction,
* runs 10 training steps on fixed microbatches and saves each step's loss and gradient norm,
to OUT (rank 0 of the last pipeline stage writes it), via torch.save of plain tensors.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def fixed_microbatches(cfg, shapes, batch, seed):
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (t, h, w) in enumerate(shapes):
        text_mask = torch.ones(batch, m.caption_tokens, dtype=torch.bool)
        text_mask[0, m.caption_tokens // 2 :] = False  # a padded caption
        out.append(
            {
                "latent": torch.randn(batch, m.in_channels, t, h, w, generator=g),
                "text_emb": torch.randn(batch, m.caption_tokens, m.caption_dim, generator=g),
                "text_mask": text_mask,
                "clip_emb": torch.randn(batch, m.clip_tokens, m.clip_dim, generator=g),
                "clip_mask": torch.ones(batch, m.clip_tokens, dtype=torch.bool),
                "sample_seed": torch.arange(batch) + 1000 * i + seed,
            }
        )
    return out


def main() -> None:
    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family

    out, recipe, *overrides = sys.argv[1:]
    cfg = load_config(recipe, overrides)
    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
    shapes = [(2, 8, 8), (2, 8, 4)]

    # Forward only: the prediction itself (target None), no dropout of the condition.
    forward_inputs = [
        {**batch, "predict_only": True} for batch in fixed_microbatches(cfg, shapes, cfg.train.micro_batch_size, seed=7)
    ]
    predictions = [output.clone() for output in engine.forward_outputs(forward_inputs)]

    losses, norms = [], []
    for step in range(10):
        microbatches = fixed_microbatches(
            cfg, shapes * (engine.num_microbatches // 2), cfg.train.micro_batch_size, seed=100 + step
        )
        result = engine.train_step(microbatches, lr=1e-3)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    if topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0 and topo.cp_rank == 0:
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
    parallel.destroy()


if __name__ == "__main__":
    main()
