"""Worker for tests/test_fused_kernels.py: megatron's fused vocab-parallel cross entropy in bf16.

``python -m torch.distributed.run --nproc_per_node 2 tests/fused_ce_worker.py OUT``: bf16
logits with the vocabulary split over two tensor-parallel ranks go through megatron's fused
cross entropy (what fmtrain enables for bf16 runs with ``model.fused_kernels``) and its plain
one; rank 0 saves both losses and the gathered logit gradients, plus the full logits, labels
and output weights the test recomputes the reference from.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank, tp = dist.get_rank(), dist.get_world_size()

    g = torch.Generator().manual_seed(7)
    seq, batch, vocab = 48, 2, 512
    logits = (3 * torch.randn(seq, batch, vocab, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (seq, batch), generator=g)
    weights = torch.rand(seq, batch, generator=g)  # a loss mask / token weighting
    part = vocab // tp
    local = logits[..., rank * part : (rank + 1) * part]

    out = {"logits": logits, "labels": labels, "weights": weights}
    for name, fn in (
        ("fused", lambda x: fused_vocab_parallel_cross_entropy(x, labels, tp_group)),
        ("plain", lambda x: tensor_parallel.vocab_parallel_cross_entropy(x, labels)),
    ):
        x = local.clone().requires_grad_(True)
        loss = fn(x)
        (loss * weights).sum().backward()
        grads = [torch.empty_like(x.grad) for _ in range(tp)]
        dist.all_gather(grads, x.grad.contiguous())
        out[f"{name}_loss"] = loss.detach()
        out[f"{name}_grad"] = torch.cat(grads, dim=-1)
    if rank == 0:
        torch.save(out, sys.argv[1])
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
