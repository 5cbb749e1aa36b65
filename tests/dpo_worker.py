"""Worker for tests/test_dpo.py: DPO steps of a tiny Yi on fixed preference pairs at some layouts.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dpo_worker.py OUT TOKENIZER tp2,pp2,dp2``
runs :func:`dpo_steps` at each layout (data parallelism takes the ranks TP x PP leaves) and
writes ``{layout: [per-step metrics]}`` to OUT (torch.save, from rank 0). Every layout sees the
same global batch per step: data-parallel rank r takes the r-th slice of its pairs.
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


def main() -> None:
    out, tokenizer, layouts = sys.argv[1:]
    results = {}
    for layout in layouts.split(","):
        tp = 2 if layout == "tp2" else 1
        pp = 2 if layout == "pp2" else 1
        results[layout] = dpo_steps(Path(tokenizer), tp, pp)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
