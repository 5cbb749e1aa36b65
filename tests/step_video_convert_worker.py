"""Worker for tests/test_step_video_convert.py: import a Step-Video-T2V release at some layout.

``python -m torch.distributed.run --standalone --nproc_per_node N tests/step_video_convert_worker.py
RELEASE OUT_JSON CKPT_OUT RECIPE [overrides]``

Every rank builds its model chunk(s) for the layout the overrides give (e.g. parallel.tp=2),
reads its slices of RELEASE (``load_hf_weights``, what ``convert from-hf`` and
``model.init_from_hf`` use) and checks each local tensor against the matching region of the
release tensor (mapped to fmtrain's layout). Then, when every tensor has exactly one main
replica over the ranks (what megatron's ``dist_checkpointing.save`` requires), the ranks
write RELEASE as a model-only fmtrain checkpoint CKPT_OUT (``import_step_video``). Rank 0
writes OUT_JSON: pieces checked, how many were strict slices, the largest share of the
release one rank read, duplicated main replicas (if any) and whether CKPT_OUT was written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from convert_helpers import import_step_video

    from fmtrain import parallel
    from fmtrain.checkpoint.hf.convert import _read_share, build_chunks, load_hf_weights
    from fmtrain.checkpoint.hf.io import HFCheckpoint
    from fmtrain.checkpoint.hf.layout import local_shards
    from fmtrain.config import load_config
    from fmtrain.models.step_video import convert as sv

    release, out_json, ckpt_out, recipe, *overrides = sys.argv[1:]
    cfg = load_config(recipe, list(overrides) + ["train.precision=fp32"])
    topo = parallel.initialize(cfg)
    chunks = build_chunks(cfg, torch.float32, topo.device)
    count, read, total = load_hf_weights(chunks, Path(release), cfg)
    share = _read_share(read, total, topo)

    s = sv.shapes_from_config(cfg)
    checked = sliced = 0
    mains = []
    with HFCheckpoint(Path(release) / "transformer") as ckpt:
        for shard in local_shards(chunks):
            full = sv.fmtrain_tensor_from_release(shard.key, ckpt[shard.key], s)
            assert tuple(full.shape) == shard.global_shape, (shard.key, tuple(full.shape), shard.global_shape)
            assert torch.equal(shard.data, shard.piece_of(full)), shard.key
            checked += 1
            sliced += shard.data.numel() < full.numel()
            if shard.main_replica:
                mains.append((shard.key, shard.offset))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mains)
    seen: dict = {}
    for rank_mains in gathered:
        for item in rank_mains:
            seen[item] = seen.get(item, 0) + 1
    duplicates = sorted({key for (key, _), n in seen.items() if n > 1})
    checked_all = torch.tensor([checked, sliced], dtype=torch.int64)
    dist.all_reduce(checked_all)

    saved = False
    if not duplicates:  # every rank sees the same list, so all of them take the same branch
        import_step_video(release, cfg, ckpt_out)
        saved = True
    if topo.rank == 0:
        Path(out_json).write_text(
            json.dumps(
                {
                    "pieces": int(checked_all[0]),
                    "sliced": int(checked_all[1]),
                    "tensors_set": count,
                    "read_share": share,
                    "duplicate_main_replicas": duplicates,
                    "saved": saved,
                }
            )
        )
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
