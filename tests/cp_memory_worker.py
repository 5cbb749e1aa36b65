"""Worker for tests/test_context_parallel.py: activation bytes one rank keeps for backward.

``python -m torch.distributed.run --nproc_per_node CP tests/cp_memory_worker.py OUT FAMILY CP``
builds the engine for ``FAMILY`` (yi | step_video) at context-parallel size CP with one long
sample per step, runs one training step under torch's saved-tensor hooks and counts the bytes of
every distinct tensor autograd saved that is not a parameter: the activations the rank holds
at the start of backward. Rank 0 writes ``{"bytes": max over ranks}`` to OUT (torch.save).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent

YI = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "model.vocab_size=512",
    "model.seq_length=1024",
]
STEP_VIDEO = ["model.num_layers=2", "data.synthetic_latent_shapes=[[4,16,16]]"]


def microbatch(cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    if cfg.model.family == "yi":
        s = cfg.model.seq_length
        tokens = torch.randint(0, cfg.model.vocab_size, (1, s + 1), generator=g)
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, s)}
    m = cfg.model
    return {
        "latent": torch.randn(1, m.in_channels, 4, 16, 16, generator=g),
        "text_emb": torch.randn(1, m.caption_tokens, m.caption_dim, generator=g),
        "text_mask": torch.ones(1, m.caption_tokens, dtype=torch.bool),
        "clip_emb": torch.randn(1, m.clip_tokens, m.clip_dim, generator=g),
        "clip_mask": torch.ones(1, m.clip_tokens, dtype=torch.bool),
        "sample_seed": torch.tensor([7]),
    }


def main() -> None:
    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family

    out, family, cp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    recipe = REPO / "recipes" / ("yi/tiny.yaml" if family == "yi" else "step_video/dit_tiny.yaml")
    overrides = (YI if family == "yi" else STEP_VIDEO) + [
        f"parallel.cp={cp}",
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        "train.precision=fp32",
    ]
    cfg = load_config(recipe, overrides)
    topo = parallel.initialize(cfg)
    engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
    params = {p.data_ptr() for chunk in engine.primary.chunks for p in chunk.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor):
        if tensor.data_ptr() not in params and tensor.numel():
            seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        engine.train_step([microbatch(cfg)], lr=1e-3)
    total = torch.tensor([float(sum(seen.values()))], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    if topo.rank == 0:
        torch.save({"bytes": float(total.item())}, out)
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
