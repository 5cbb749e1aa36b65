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

SHAPES = [a for a in TINY_OVERRIDES if a.startswith("model.") and "seq_length" not in a] + ["model.seq_length=32"]
PAIRS, MICRO = 8, 2


def dpo_steps(tokenizer: Path, tp: int, pp: int, steps: int = 5) -> list[dict]:
    """``steps`` DPO steps (reference = the policy's seed initialisation) on pairs drawn per step."""
    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.data.preference import PreferencePipeline, pair_batch, synthetic_preference_records
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = load_config(
        None,
        ["objective.name=dpo", *SHAPES]
        + [
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"train.global_batch_size={PAIRS}",
            f"train.micro_batch_size={MICRO}",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            f"data.tokenizer={tokenizer}",
        ],
    )
    topo = parallel.initialize(cfg)
    try:
        engine = build_engine(cfg, topo, get_family("yi"))
        pipeline = PreferencePipeline(tokenizer, cfg.model.seq_length)
        per_rank = PAIRS // topo.dp
        out = []
        for step in range(steps):
            records = synthetic_preference_records(PAIRS, seed=100 + step)[topo.dp_rank * per_rank :][:per_rank]
            microbatches = [pair_batch(pipeline, records[i : i + MICRO]) for i in range(0, per_rank, MICRO)]
            result = engine.train_step(microbatches, 2e-3, step=step)
            out.append({"loss": result.loss, "grad_norm": result.grad_norm, **result.extra})
        return out
    finally:
        parallel_state.destroy_model_parallel()


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
    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.data.latents import LatentPreferencePipeline
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    cfg = load_config(
        None,
        VIDEO_DIT
        + [
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"train.global_batch_size={PAIRS}",
            f"train.micro_batch_size={MICRO}",
            "train.precision=fp32",
        ],
    )
    topo = parallel.initialize(cfg)
    try:
        engine = build_engine(cfg, topo, get_family("step_video"))
        pipeline = LatentPreferencePipeline.from_config(cfg)
        per_rank = PAIRS // topo.dp
        out = []
        for step in range(steps):
            items = video_pairs(step)[topo.dp_rank * per_rank :][:per_rank]
            microbatches = [pipeline.collate(items[i : i + MICRO]) for i in range(0, per_rank, MICRO)]
            result = engine.train_step(microbatches, 1e-3, step=step)
            out.append({"loss": result.loss, "grad_norm": result.grad_norm, **result.extra})
        return out
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    out, tokenizer, layouts = sys.argv[1:]
    results = {}
    for layout in layouts.split(","):
        tp = 2 if layout == "tp2" else 1
        pp = 2 if layout == "pp2" else 1
        if tokenizer == "video":
            results[layout] = video_dpo_steps(tp, pp)
        else:
            results[layout] = dpo_steps(Path(tokenizer), tp, pp)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
