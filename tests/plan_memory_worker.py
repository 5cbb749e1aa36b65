"""Worker for tests/test_plan.py: the bytes each rank holds, measured, for several layouts.

``python -m torch.distributed.run --nproc_per_node 4 tests/plan_memory_worker.py OUT FAMILY LAYOUTS``
runs, in one process group, one training step of ``FAMILY`` (yi | step_video | lavin_dit |
videomae_v2 | video_vae, tiny shapes, fp32 or with ``bf16`` bf16) for each layout of LAYOUTS
(``tp,pp,vpp,recompute[,sp][,bf16][,zeroN];...``; DP is the rest of the world; ``zeroN``: on the
deepspeed backend at ZeRO stage N) and records per rank:

- ``activation_bytes``: the peak over the step of the distinct storages autograd keeps for
  backward (saved-tensor hooks; each storage counted from the first tensor saved on it until
  autograd releases the last value saved on it; parameters excluded): the activations of
  every microbatch in flight under the pipeline schedule, the loss's buffers, and a recomputed
  layer during its backward;
- ``state_bytes``: parameters, gradient buffers and optimizer state the rank holds (the
  DDP buffers and every tensor of the optimizer's state, summed; on the deepspeed backend the
  engine's count at its peak, sampled around each backward and at the optimizer step);
- ``comm_bytes``: by group (tp, cp, pp, dp, other), the bytes the rank handed to
  torch.distributed during the step: the tensor of an all-reduce or a send, the whole tensor
  of a reduce-scatter (its input) or an all-gather (its output). torch.distributed's functions
  are wrapped before megatron imports them; a collective called from inside another (a
  fallback) counts once.

Rank 0 writes ``{layout: [per-rank dicts]}`` to OUT (torch.save).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent

SHAPES = {
    "yi": [
        "model.num_layers=4",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.ffn_hidden_size=128",
        "model.vocab_size=512",
        "model.seq_length=512",
    ],
    "step_video": ["model.num_layers=4", "model.seq_length=512", "data.synthetic_latent_shapes=[[2,16,16]]"],
    # 2 example pairs of 12x12 latents: (2 x 2 + query + target) x 6 x 6 = 216 tokens, 36 of them
    # the target's
    "lavin_dit": ["model.num_layers=4", "model.seq_length=216", "data.task_latent_size=12"],
    # 8 frames of 64x64 in 2x8x8 tubelets: 4 x 8 x 8 tokens, 16 per time slice visible to the
    # encoder (mask ratio 0.75: 64 tokens), 32 per slice reconstructed (decoder mask ratio 0.5):
    # the decoder sees 64 + 128 = 192 tokens
    "videomae_v2": ["data.video_size=64"],
    # 9 frames of 32 x 32 through the tiny Video-VAE (z 16), L1 + MSE + KL, no GAN
    "video_vae": [
        "data.video_frames=9",
        "model.z_channels=16",
        "objective.gan_weight=0",
        "objective.ssim_weight=0",
        "objective.mse_weight=1.0",
    ],
}
RECIPES = {
    "yi": "yi/tiny.yaml",
    "step_video": "step_video/dit_tiny.yaml",
    "lavin_dit": "lavin_dit/tiny.yaml",
    "videomae_v2": "videomae_v2/tiny.yaml",
    "video_vae": "step_video/vae_tiny.yaml",
}
MICROBATCHES = 4
MICRO_BATCH_SIZE = {"lavin_dit": 2, "videomae_v2": 2, "video_vae": 2}
"""Samples per microbatch (default 1); the J-DiT's and VideoMAE's recipes train several per
microbatch (VideoMAE's attention output is then copied into the projection's layout)."""


class CollectiveBytes:
    """Bytes handed to torch.distributed per group while ``counting``."""

    # name: (position and keyword of the tensor whose bytes count, position of the group argument)
    WRAPPED = {
        "all_reduce": (0, "tensor", 2),
        "reduce_scatter_tensor": (1, "input", 3),
        "_reduce_scatter_base": (1, "input", 3),
        "all_gather_into_tensor": (0, "output_tensor", 2),
        "_all_gather_base": (0, "output_tensor", 2),
        "all_to_all_single": (1, "input", 4),
        "isend": (0, "tensor", 2),
        "send": (0, "tensor", 2),
    }

    def __init__(self):
        from torch.distributed import distributed_c10d

        self.counting = False
        self.depth = 0
        self.dp_ranks: list[int] | None = None
        """Set on the deepspeed backend: DeepSpeed reduces over its own group of the DP ranks."""
        self.bytes: dict[str, int] = {}
        for name, (tensor_at, keyword, group_at) in self.WRAPPED.items():
            # both names: torch's P2POp checks its op against distributed_c10d.isend
            wrapped = self._wrap(getattr(dist, name), tensor_at, keyword, group_at)
            setattr(dist, name, wrapped)
            setattr(distributed_c10d, name, wrapped)

    def _label(self, group) -> str:
        from megatron.core import parallel_state as ps

        for label, get in (
            ("tp", ps.get_tensor_model_parallel_group),
            ("cp", ps.get_context_parallel_group),
            ("pp", ps.get_pipeline_model_parallel_group),
            ("dp", lambda: ps.get_data_parallel_group(with_context_parallel=True)),
        ):
            if group is not None and group == get():
                return label
        if self.dp_ranks is not None and dist.get_process_group_ranks(group or dist.group.WORLD) == self.dp_ranks:
            return "dp"
        return "other"

    def _wrap(self, function, tensor_at: int, keyword: str, group_at: int):
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            if self.counting and self.depth == 0:
                tensor = kwargs[keyword] if keyword in kwargs else args[tensor_at]
                group = kwargs.get("group", args[group_at] if len(args) > group_at else None)
                label = self._label(group)
                self.bytes[label] = self.bytes.get(label, 0) + tensor.numel() * tensor.element_size()
            self.depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapped


COLLECTIVES = CollectiveBytes()


def microbatch(cfg, index: int) -> dict:
    g = torch.Generator().manual_seed(index)
    m = cfg.model
    if m.family == "yi":
        tokens = torch.randint(0, m.vocab_size, (1, m.seq_length + 1), generator=g)
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, m.seq_length)}
    if m.family == "lavin_dit":
        b, pairs, size = cfg.train.micro_batch_size, cfg.data.task_pairs, cfg.data.task_latent_size
        return {
            "context": torch.randn(b, m.in_channels, 2 * pairs + 1, size, size, generator=g),
            "target": torch.randn(b, m.in_channels, 1, size, size, generator=g),
            "item_frames": 1,
            "pairs": pairs,
            "sample_seed": torch.arange(b) + b * index,
        }
    if m.family in ("videomae_v2", "video_vae"):
        b, d = cfg.train.micro_batch_size, cfg.data
        return {
            "video": torch.randn(b, m.in_channels, d.video_frames, d.video_size, d.video_size, generator=g),
            "sample_seed": torch.arange(b) + b * index,
        }
    t, h, w = cfg.data.synthetic_latent_shapes[0]
    return {
        "latent": torch.randn(1, m.in_channels, t, h, w, generator=g),
        "text_emb": torch.randn(1, m.caption_tokens, m.caption_dim, generator=g),
        "text_mask": torch.ones(1, m.caption_tokens, dtype=torch.bool),
        "clip_emb": torch.randn(1, m.clip_tokens, m.clip_dim, generator=g),
        "clip_mask": torch.ones(1, m.clip_tokens, dtype=torch.bool),
        "sample_seed": torch.tensor([index]),
    }


def state_bytes(engine) -> int:
    total = 0
    for chunk in engine.primary.chunks:
        for buffer in chunk.buffers:
            total += buffer.param_data.numel() * buffer.param_data.element_size()
            total += buffer.grad_data.numel() * buffer.grad_data.element_size()
    seen = set()
    for optimizer in getattr(engine.primary.optimizer, "chained_optimizers", [engine.primary.optimizer]):
        inner = optimizer.optimizer
        for state in inner.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.numel() > 1 and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    total += value.numel() * value.element_size()
        for group in getattr(optimizer, "shard_fp32_from_float16_groups", []):
            for shard in group:
                total += shard.numel() * shard.element_size()
    return total


def zero_state_peak(engine) -> list[int]:
    """Samples of the deepspeed engine's model-state bytes (weights, gradients, ZeRO's fp32
    partitions, Adam moments; ZeRO-3's gathered weights included) around each microbatch's
    backward and at the optimizer step; the step's peak is their maximum."""
    samples: list[int] = []
    ds = engine.primary.ds
    backward = ds.backward

    def sampled_backward(*args, **kwargs):
        samples.append(engine.model_state_bytes())
        result = backward(*args, **kwargs)
        samples.append(engine.model_state_bytes())
        return result

    ds.backward = sampled_backward
    ds.optimizer.optimizer.register_step_pre_hook(lambda *_: samples.append(engine.model_state_bytes()))
    return samples


def measure(
    family: str, tp: int, pp: int, vpp: int, recompute: str, sp: bool, world: int, bf16: bool = False, zero: int = 0
) -> dict:
    from megatron.core import parallel_state

    from fmtrain import parallel
    from fmtrain.config import load_config
    from fmtrain.engine.megatron import MegatronEngine
    from fmtrain.models.registry import get_family
    from fmtrain.models.saved_tensors import SavedStorageBytes

    dp = world // (tp * pp)
    mbs = MICRO_BATCH_SIZE.get(family, 1)
    overrides = SHAPES[family] + [
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.vpp={vpp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"model.recompute={recompute}",
        f"train.global_batch_size={MICROBATCHES * dp * mbs}",
        f"train.micro_batch_size={mbs}",
        f"train.precision={'bf16' if bf16 else 'fp32'}",
    ]
    if zero:
        overrides += ["engine.backend=deepspeed", f"engine.zero_stage={zero}"]
    cfg = load_config(REPO / "recipes" / RECIPES[family], overrides)
    topo = parallel.initialize(cfg)
    if zero:
        from fmtrain.engine.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(cfg, topo, get_family(cfg.model.family))
        params = {p.data_ptr() for p in engine.primary.module.parameters()}
        state_samples = zero_state_peak(engine)
    else:
        engine = MegatronEngine(cfg, topo, get_family(cfg.model.family))
        params = {p.data_ptr() for chunk in engine.primary.chunks for p in chunk.parameters()}
    counter = SavedStorageBytes(params)
    batches = [microbatch(cfg, topo.dp_rank * MICROBATCHES + i) for i in range(MICROBATCHES)]
    if zero:
        # DeepSpeed creates Adam's moments in its first step: measure the second
        engine.train_step(batches, lr=1e-3)
        state_samples.clear()
        COLLECTIVES.dp_ranks = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())
    COLLECTIVES.bytes = {}
    COLLECTIVES.counting = True
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        engine.train_step(batches, lr=1e-3)
    COLLECTIVES.counting = False
    result = {
        "comm_bytes": dict(COLLECTIVES.bytes),
        "activation_bytes": counter.peak,
        "state_bytes": max(state_samples) if zero else state_bytes(engine),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp": dp,
    }
    COLLECTIVES.dp_ranks = None
    del engine
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    out, family, layouts = sys.argv[1], sys.argv[2], sys.argv[3]
    results = {}
    for layout in layouts.split(";"):
        fields = layout.split(",")
        tp, pp, vpp = (int(x) for x in fields[:3])
        recompute, sp, bf16 = fields[3], "sp" in fields[4:], "bf16" in fields[4:]
        zero = next((int(f[4:]) for f in fields[4:] if f.startswith("zero")), 0)
        world = int(__import__("os").environ["WORLD_SIZE"])
        mine = measure(family, tp, pp, vpp, recompute, sp, world, bf16, zero)
        gathered = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        results[layout] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
