"""Worker for tests/test_parts.py: a trainable Yi model and its frozen copy under a (TP, PP) layout.

``python -m torch.distributed.run --nproc_per_node N tests/frozen_worker.py OUT CKPT [overrides]``:
forward outputs of both parts on fixed tokens at step 0 (after loading the frozen part from its
source, ``model.reference_source``, when given), 3 training steps, then the outputs again, the
frozen part's weights against their step-0 values and what the frozen part holds (gradients,
DDP buffers, optimizer entries); the trained model is saved as checkpoint CKPT. Rank 0 of the
last pipeline stage writes OUT (torch.save)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def optimizer_params(optimizer) -> set[int]:
    """ids of the model parameters an (optionally chained, optionally distributed) megatron optimizer steps."""
    ids = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "model_param_group_index_map"):
            ids |= {id(p) for p in opt.model_param_group_index_map}
        for group in opt.param_groups:
            ids |= {id(p) for p in group["params"]}
        for groups in (getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_fp32_groups", [])):
            ids |= {id(p) for group in groups for p in group}
    return ids


def main() -> None:
    from megatron.core.distributed import DistributedDataParallel

    from fmtrain import checkpoint, parallel
    from fmtrain.config import load_config
    from fmtrain.engine import build_engine
    from fmtrain.models.registry import get_family

    out, ckpt, *overrides = sys.argv[1:]
    cfg = load_config(None, ["model.family=tests.families.frozen_copy", *overrides])
    topo = parallel.initialize(cfg)
    engine = build_engine(cfg, topo, get_family(cfg.model.family))
    loaded_frozen = checkpoint.load_frozen_parts(cfg, engine, log=lambda message: None)
    m, t = cfg.model, cfg.train
    g = torch.Generator().manual_seed(7)

    def microbatches(seed: int) -> list[dict]:
        g.manual_seed(seed)
        out = []
        for _ in range(engine.num_microbatches):
            tokens = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length + 1), generator=g)
            out.append(
                {
                    "tokens": tokens[:, :-1],
                    "labels": tokens[:, 1:],
                    "loss_mask": torch.ones(t.micro_batch_size, m.seq_length),
                }
            )
        return out

    fixed = microbatches(1)
    before = {name: engine.forward_outputs(fixed, part=name) for name in ("model", "reference")}
    reference = engine.parts["reference"]
    frozen_before = [p.detach().clone() for chunk in reference.modules for p in chunk.parameters()]
    trained_before = [p.detach().clone() for chunk in engine.unwrapped_chunks() for p in chunk.parameters()]
    losses = [engine.train_step(microbatches(100 + step), 1e-3).loss for step in range(3)]
    after = {name: engine.forward_outputs(fixed, part=name) for name in ("model", "reference")}
    checkpoint.save(cfg, Path(ckpt), 3, engine, topo)
    frozen_params = [p for chunk in reference.modules for p in chunk.parameters()]
    frozen_ids = {id(p) for p in frozen_params}
    report = {
        "outputs_equal_at_step_0": all(torch.equal(a, b) for a, b in zip(before["model"], before["reference"])),
        "outputs_at_step_0": len(before["model"]),
        "frozen_outputs_unchanged": all(torch.equal(a, b) for a, b in zip(before["reference"], after["reference"])),
        "trained_outputs_changed": any(not torch.equal(a, b) for a, b in zip(before["model"], after["model"])),
        "frozen_weights_identical": all(torch.equal(a, p) for a, p in zip(frozen_before, frozen_params)),
        "trained_weights_changed": any(
            not torch.equal(a, p)
            for a, p in zip(trained_before, (p for c in engine.unwrapped_chunks() for p in c.parameters()))
        ),
        "frozen_requires_grad": any(p.requires_grad for p in frozen_params),
        "frozen_grads": any(p.grad is not None or getattr(p, "main_grad", None) is not None for p in frozen_params),
        "frozen_ddp_wrapped": any(isinstance(chunk, DistributedDataParallel) for chunk in reference.chunks),
        "trained_ddp_wrapped": all(isinstance(chunk, DistributedDataParallel) for chunk in engine.primary.chunks),
        "frozen_optimizer": reference.optimizer is not None,
        "frozen_in_optimizer": bool(frozen_ids & optimizer_params(engine.optimizer)),
        "trained_in_optimizer": {id(p) for c in engine.unwrapped_chunks() for p in c.parameters()}
        <= optimizer_params(engine.optimizer),
        "frozen_in_checkpoint": "parts" in engine.state_dict(),
        "frozen_param_count": sum(p.numel() for p in frozen_params),
        "losses": losses,
        "loaded_frozen_parts": loaded_frozen,
        "outputs_at_step_0_of": before,
        "trained_outputs": after["model"],
    }
    if topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0:
        torch.save(report, out)
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
