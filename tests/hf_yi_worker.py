"""Import a Hugging Face Llama checkpoint into fmtrain's Yi model at some (TP, PP) and run it.

Used in-process by tests/test_hf_yi.py for TP=PP=1 and under torchrun (gloo) for the other
layouts:

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/hf_yi_worker.py \
        --hf-dir HF --tokens tokens.safetensors --out OUT --layouts 2x1,1x2,2x2 --export 2x2

A layout is ``TPxPP`` or ``TPxPPxVPP``; data parallelism takes the remaining ranks. Each layout
writes ``OUT/logits_{layout}.safetensors`` (full-vocabulary logits, from the last stage's
tensor-parallel rank 0 of data-parallel rank 0); ``--export`` layouts also write the model
back as a Hugging Face directory ``OUT/export_{layout}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_config(hf_dir: Path, tp: int, pp: int, batch: int, seq: int, world_size: int, vpp: int = 1, extra=()):
    """The fmtrain config for ``hf_dir``'s model at (tp, pp, vpp): fp32, one sample per microbatch."""
    from fmtrain.config import load_config
    from fmtrain.models.release import overrides_as_args
    from fmtrain.models.yi.convert import fmtrain_model_overrides_from_hf

    overrides = fmtrain_model_overrides_from_hf(json.loads((hf_dir / "config.json").read_text()))
    dp = world_size // (tp * pp)
    return load_config(
        None,
        overrides_as_args(overrides)
        + [
            f"model.seq_length={seq}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.vpp={vpp}",
            "train.micro_batch_size=1",
            f"train.global_batch_size={batch * dp}",
            "train.precision=fp32",
            "model.attention_backend=sdpa",
            *extra,
        ],
    )


@torch.no_grad()
def forward_logits(engine, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full logits [b, s, vocab] on the last stage (every TP rank there), None elsewhere.

    The engine's forward-only outputs (megatron's own pipeline schedule), one sample per
    microbatch: the last stage's output is its TP shard of the logits.
    """
    from megatron.core import parallel_state

    batch, seq = tokens.shape
    microbatches = [{"tokens": tokens[i : i + 1]} for i in range(batch)]

    def forward_step(data_iterator, model):
        toks = next(data_iterator)["tokens"]
        position_ids = torch.arange(seq).unsqueeze(0).expand_as(toks)
        return model(toks, position_ids, None), None  # no labels: logits [b, s, vocab / tp]

    outputs = engine.forward_outputs(microbatches, forward_step=forward_step)
    if parallel_state.get_pipeline_model_parallel_rank() != parallel_state.get_pipeline_model_parallel_world_size() - 1:
        return None
    shard = torch.cat(outputs, dim=0)
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return shard
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


def run_layout(
    hf_dir: Path, tp: int, pp: int, tokens: torch.Tensor, export_dir: Path | None = None, vpp: int = 1
) -> torch.Tensor | None:
    """Build the engine at (tp, pp, vpp), import ``hf_dir``, return logits on the reporting rank.

    The reporting rank is the last stage's TP rank 0 of DP rank 0; other ranks get None.
    megatron's model-parallel groups are torn down afterwards (torch.distributed stays up).
    """
    from convert_helpers import load_hf_into_engine, save_hf
    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    world = parallel.process_env()[1]
    cfg = build_config(hf_dir, tp, pp, tokens.shape[0], tokens.shape[1], world, vpp)
    topo = parallel.initialize(cfg)
    try:
        engine = build_engine(cfg, topo, get_family("yi"))
        load_hf_into_engine(engine, hf_dir)
        logits = forward_logits(engine, tokens)
        if export_dir is not None:
            save_hf(engine.unwrapped_chunks(), cfg, export_dir)
        reporter = topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0
        return logits if reporter else None
    finally:
        parallel_state.destroy_model_parallel()


def main() -> None:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layouts", default="2x1,1x2,2x2", help="comma-separated TPxPP or TPxPPxVPP")
    ap.add_argument("--export", default="", help="comma-separated layouts to export from")
    args = ap.parse_args()

    tokens = load_file(str(args.tokens))["tokens"]
    exports = set(filter(None, args.export.split(",")))
    for layout in args.layouts.split(","):
        tp, pp, vpp = ([int(x) for x in layout.split("x")] + [1])[:3]
        export = args.out / f"export_{layout}" if layout in exports else None
        logits = run_layout(args.hf_dir, tp, pp, tokens, export_dir=export, vpp=vpp)
        if logits is not None:
            save_file({"logits": logits.contiguous()}, str(args.out / f"logits_{layout}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
