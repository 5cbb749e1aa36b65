"""Worker for tests/test_dpo.py: DPO steps of a tiny Yi, or Video-DPO steps of a tiny Step-Video
DiT, on fixed preference pairs at some layouts.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dpo_worker.py OUT TOKENIZER tp2,pp2,dp2``
runs :func:`dpo_steps` (TOKENIZER ``video``: :func:`video_dpo_steps`) at each layout (data
parallelism takes the ranks TP x PP leaves) and writes ``{layout: [per-step metrics]}`` to OUT
(torch.save, from rank 0). Every layout sees the same global batch per step: data-parallel rank
r takes the r-th slice of its pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from conftest import TINY_OVERRIDES  # noqa: E402

# 48 tokens hold every synthetic pair's sequences (at most 41 predictions) untruncated.
SHAPES = [a for a in TINY_OVERRIDES if a.startswith("model.") and "seq_length" not in a] + ["model.seq_length=48"]
PAIRS, MICRO = 8, 2


def train_steps(overrides: list[str], tp: int, pp: int, steps: int, lr: float, microbatch) -> list[dict]:
    """``steps`` training steps at (tp, pp) of the config of ``overrides``, every layout on the
    same global batch: ``microbatch(cfg, step, pairs)`` collates pairs ``pairs`` (a range) of
    step ``step``'s PAIRS pairs; data-parallel rank r takes the r-th slice of them."""
    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"train.global_batch_size={PAIRS}"]
    cfg = load_config(None, overrides + layout + [f"train.micro_batch_size={MICRO}", "train.precision=fp32"])
    topo = parallel.initialize(cfg)
    try:
        engine = build_engine(cfg, topo, get_family(cfg.model.family))
        per_rank = PAIRS // topo.dp
        first = topo.dp_rank * per_rank
        out = []
        for step in range(steps):
            starts = range(first, first + per_rank, MICRO)
            microbatches = [microbatch(cfg, step, range(start, start + MICRO)) for start in starts]
            result = engine.train_step(microbatches, lr, step=step)
            out.append({"loss": result.loss, "grad_norm": result.grad_norm, **result.extra})
        return out
    finally:
        parallel_state.destroy_model_parallel()


def dpo_steps(tokenizer: Path, tp: int, pp: int, steps: int = 5, packing: bool = False) -> list[dict]:
    """``steps`` DPO steps (reference = the policy's seed initialisation) on pairs drawn per step;
    ``packing``: the microbatches' sequences packed into shared rows (``objective.packing``)."""
    from fmtrain.data.preference import PreferencePipeline, pair_batch, synthetic_preference_records

    def microbatch(cfg, step, pairs):
        records = synthetic_preference_records(PAIRS, seed=100 + step)
        batch = pair_batch(PreferencePipeline.from_config(cfg, tokenizer), [records[i] for i in pairs])
        assert not packing or batch["tokens"].shape[0] < 2 * len(pairs) or cfg.parallel.pp > 1
        return batch

    overrides = ["objective.name=dpo", *SHAPES, "model.attention_backend=sdpa", f"data.tokenizer={tokenizer}"]
    if packing:  # rows of 96 tokens hold two of these sequences
        overrides += ["objective.packing=true", "model.seq_length=96"]
    return train_steps(overrides, tp, pp, steps, 2e-3, microbatch)


VIDEO_DIT = [
    "model.family=step_video",
    "objective.name=video_dpo",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=4",
    "model.head_dim=16",
    "model.ffn_hidden_size=128",
    "model.in_channels=4",
    "model.caption_dim=16",
    "model.caption_tokens=4",
    "model.clip_dim=0",
    "model.clip_tokens=0",
    "model.rope_axes=[8,4,4]",
    "model.seq_length=32",
    "objective.beta=50",
]


def video_pairs(step: int) -> list[dict]:
    """PAIRS preference items of one step: each synthetic sample's own latent chosen, another
    class's rejected (the items :class:`LatentPreferencePipeline` makes from shards)."""
    from fmtrain.data.latents import synthetic_latent_dataset, synthetic_preference_pairs

    samples = synthetic_latent_dataset([(2, 4, 4)], PAIRS, 2, 4, 4, 16, seed=step)
    return [
        {**pair, "rejected_latent": pair["rejected_latent"], "sample_seed": 1000 * step + i}
        for i, pair in enumerate(synthetic_preference_pairs(samples))
    ]


def video_dpo_steps(tp: int, pp: int, steps: int = 5) -> list[dict]:
    """``steps`` Video-DPO steps of a tiny DiT (reference = the policy's seed initialisation)."""
    from fmtrain.data.latents import LatentPreferencePipeline

    def microbatch(cfg, step, pairs):
        items = video_pairs(step)
        return LatentPreferencePipeline.from_config(cfg).collate([items[i] for i in pairs])

    return train_steps(VIDEO_DIT, tp, pp, steps, 1e-3, microbatch)


def main() -> None:
    out, tokenizer, layouts = sys.argv[1:]
    results = {}
    for layout in layouts.split(","):
        tp = 2 if layout.startswith("tp2") else 1
        pp = 2 if layout.startswith("pp2") else 1
        if tokenizer == "video":
            results[layout] = video_dpo_steps(tp, pp)
        else:
            results[layout] = dpo_steps(Path(tokenizer), tp, pp, packing=layout.endswith("-packed"))
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
