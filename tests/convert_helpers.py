"""Conversion shortcuts the tests use (not fmtrain API): load a Hugging Face / release directory
into a built engine, gather a Yi model to one rank as a Hugging Face directory, and the
Step-Video release import / export with the checks the command line does."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from fmtrain.checkpoint.hf.convert import convert_from_hf, export_to_hf, load_hf_weights, weights_dir
from fmtrain.checkpoint.hf.io import HFCheckpoint, save_hf_checkpoint
from fmtrain.checkpoint.hf.layout import gather_global_tensors, load_global_pieces
from fmtrain.config import Config, ConfigError, parse_size
from fmtrain.models.release import read_config_json
from fmtrain.models.step_video import convert as sv
from fmtrain.models.yi import convert as yi


def load_hf_into_engine(engine, path: str | Path, *, allow_pickle: bool = False, strict: bool = True) -> int:
    """A Hugging Face Llama / Yi directory into a built engine's Yi chunks (any layout), then the
    optimizer's main weights refreshed; ``strict`` refuses missing / extra tensors first."""
    chunks = engine.unwrapped_chunks()
    s = yi.YiShapes.from_chunk(chunks[0])
    with HFCheckpoint(path, allow_pickle=allow_pickle) as ckpt:
        if strict:
            yi.check_hf_names(ckpt, s)
        count = load_global_pieces(chunks, yi.piece_reader(ckpt, s))
    engine.weights_changed()
    return count


def save_hf(
    chunks, cfg: Config, out_dir: str | Path, *, dtype=None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False
) -> Path | None:
    """A ``LlamaForCausalLM`` directory from Yi chunks of any layout, gathered to rank 0
    (collective); the directory on rank 0, None elsewhere."""
    s = yi.YiShapes.from_chunk(chunks[0])
    full = gather_global_tensors(chunks, dst=0)
    written = None
    if full is not None:
        out: dict = {}
        for (key, index), t in full.items():
            for name, value in yi.hf_tensors_from_megatron(key, index, t, s).items():
                out[name] = value if dtype is None else value.to(dtype)
        state = {name: out[name] for name in yi.hf_names(s)}
        out_dtype = dtype or next(iter(state.values())).dtype
        written = save_hf_checkpoint(
            state,
            out_dir,
            yi.hf_config_from_fmtrain(cfg, out_dtype),
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
        )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return written


def read_release_config(release_dir: str | Path) -> dict:
    where = weights_dir(Path(release_dir), sv)
    return read_config_json(where / "config.json", f"{release_dir}: no {sv.WEIGHTS_SUBDIR}/config.json")


def load_step_video_into_engine(engine, release_dir: str | Path, cfg: Config | None = None) -> int:
    """A Step-Video release into a built engine (config.json checked against ``cfg.model``)."""
    cfg = cfg or engine.cfg
    where = weights_dir(Path(release_dir), sv)
    sv.check_model_matches_hf(cfg, read_release_config(release_dir), f"{where}/config.json")
    count, _, _ = load_hf_weights(engine.unwrapped_chunks(), Path(release_dir), cfg)
    engine.weights_changed()
    return count


def import_step_video(
    release_dir: str | Path, cfg: Config, out_dir: str | Path, *, dtype: str = "auto", overwrite: bool = False
) -> Path:
    """The release as a model-only fmtrain checkpoint for ``cfg.parallel`` (collective)."""
    where = weights_dir(Path(release_dir), sv)
    sv.check_model_matches_hf(cfg, read_release_config(release_dir), f"{where}/config.json")
    return convert_from_hf(cfg, Path(release_dir), Path(out_dir), dtype=dtype, overwrite=overwrite)


def export_step_video(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    cfg: Config | None = None,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    log=print,
) -> Path:
    """``fmtrain convert to-hf`` for a step_video checkpoint (refusing another family's)."""
    from fmtrain.checkpoint import read_state, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(checkpoint_dir))
    family = cfg.model.family if cfg is not None else read_state(ckpt).get("config", {}).get("model", {}).get("family")
    if family != "step_video":
        raise ConfigError(f"{ckpt}: model.family={family!r}, not step_video")
    return export_to_hf(
        ckpt, out_dir, dtype=dtype, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite, log=log, cfg=cfg
    )
