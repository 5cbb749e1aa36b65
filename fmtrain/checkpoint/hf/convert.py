"""``fmtrain convert from-hf | to-hf`` and ``model.init_from_hf``: released weights in and out.

(The command line is :mod:`fmtrain.cli_convert`; this module does the work.) Everything here
is family-generic: the family's converter (:func:`converter`, the ``converter`` of its registry
entry: Hugging Face ``LlamaForCausalLM`` for Yi, the Step-Video-T2V ``transformer/`` release
layout for step_video) supplies the config translation and the key / shape mapping.

Import (``from-hf``) runs on the ranks of the target layout, like ``fmtrain train``: every
rank builds its model chunk(s) for the (TP, PP, VPP) the ``parallel.*`` overrides give, reads
only the rows / columns of each Hugging Face tensor it holds (safetensors ``get_slice``) and
the ranks write one model-only fmtrain checkpoint together (``dist_checkpointing``; the
optimizer starts fresh when training loads it). ``model.init_from_hf`` does the same reading
straight into a training engine, for a run that has no checkpoint of its own yet.

Export (``to-hf``) reads a checkpoint of any training layout in one process, one tensor at a
time: each global tensor (one layer's fused QKV, say) is read from the distributed checkpoint
as its full TP = PP = 1 value, split into Hugging Face tensors and appended to the safetensors
shard being written, whose header was written first from a plan of every tensor's name, dtype
and shape. Peak memory is one tensor plus the process itself, whatever the model size.

megatron's own ``dist_checkpointing.load`` cannot load part of a stacked per-layer tensor in
a single process (its PyTorch ``ShardedTensor`` conversion declares every other piece to be on
rank ``(rank + 1) % world_size``, which is this rank when the world is one process), and
loading whole keys would hold every layer's MLP at once (11.5 GB for Yi-6B in fp32). The
export therefore reads the same files through PyTorch's distributed-checkpoint reader with a
planner that asks for one region (a layer) per call; that reader reshards exactly as
megatron's loader does.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fmtrain.config import BUILTIN_FAMILIES, Config, ConfigError, config_from_dict, load_config
from fmtrain.models.release import read_config_json, weights_dir

STATE_FILE = "fmtrain_state.json"  # == fmtrain.checkpoint.STATE_FILE (not imported: keeps to-hf light)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}

Log = Callable[[str], None]


# ---------------------------------------------------------------------- family converters


def converter(family: str):
    """The release / Hugging Face converter of a model family (:class:`fmtrain.models.registry.Converter`)."""
    from fmtrain.models.registry import get_family

    conv = get_family(family).converter
    if conv is None:
        with_converters = [name for name in BUILTIN_FAMILIES if get_family(name).converter is not None]
        raise ConfigError(
            f"model.family={family!r} has no checkpoint converter; families with one: {', '.join(with_converters)}"
        )
    return conv


def detect_family(path: Path, *, allow_pickle: bool = False) -> str:
    """The built-in family whose converter recognises the ``config.json`` of ``path`` (or, for a
    release without one, its tensors); the default family when none does (its config
    translation then names what it refuses). When none does and a converter found only pickled
    weights it was not allowed to read, that refusal is raised: it is what to act on."""
    from fmtrain.checkpoint.hf.io import HFCheckpointError, PickleRefusedError
    from fmtrain.models.registry import get_family

    refused = None
    for family in BUILTIN_FAMILIES:
        conv = get_family(family).converter
        if conv is None:
            continue
        try:
            config_json, _ = release_config(Path(path), conv, allow_pickle=allow_pickle)
        except PickleRefusedError as exc:
            refused = refused or exc
            continue
        except (ConfigError, HFCheckpointError):
            continue
        if isinstance(config_json, dict) and conv.recognizes(config_json):
            return family
    if refused is not None:
        raise refused
    return BUILTIN_FAMILIES[0]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def _read_hf_config(hf_dir: Path) -> dict:
    return read_config_json(
        Path(hf_dir) / "config.json", f"{hf_dir}: no config.json (a Hugging Face model directory has one)"
    )


def release_config(path: Path, conv, *, allow_pickle: bool = False) -> tuple[dict, str]:
    """(the architecture description of a release directory, where it came from): its
    ``config.json``, or what the converter reads off the weights when the release has none
    (``release_config``: the Video-VAE ships only its safetensors)."""
    from fmtrain.checkpoint.hf.io import HFCheckpoint

    where = weights_dir(path, conv)
    if hasattr(conv, "release_config"):
        with HFCheckpoint(where, allow_pickle=allow_pickle) as ckpt:
            return conv.release_config(ckpt)
    return _read_hf_config(where), f"{where}/config.json"


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it")


# ---------------------------------------------------------------------- import


def from_hf_config(
    hf_dir: Path, recipe: str | None, overrides: list[str], *, allow_pickle: bool = False, family: str | None = None
) -> Config:
    """The run config for converting ``hf_dir``: the recipe's, or one made from config.json
    (the family recognised from it, or ``family``'s reading of it: a directory may hold the
    releases of several families, LaVin-DiT's DiT and VAE); either way every architecture field
    must match the checkpoint (the error names it)."""
    from fmtrain.checkpoint.hf.io import HFCheckpoint

    family_args: list[str] = []
    if recipe is None:
        family_conv = converter(family or detect_family(hf_dir, allow_pickle=allow_pickle))
        where = weights_dir(hf_dir, family_conv)
        config_json, _ = release_config(hf_dir, family_conv, allow_pickle=allow_pickle)  # a clear error when none
        with HFCheckpoint(where, allow_pickle=allow_pickle) as ckpt:
            family_args = family_conv.model_overrides(config_json, ckpt)
    cfg = load_config(recipe, family_args + list(overrides))
    conv = converter(cfg.model.family)
    hf_config, source = release_config(hf_dir, conv, allow_pickle=allow_pickle)
    try:
        conv.check_model_matches_hf(cfg, hf_config, source)
    except ConfigError as exc:
        raise ConfigError(f"recipe {recipe}: {exc}" if recipe else str(exc)) from None
    return cfg


def build_chunks(cfg: Config, params_dtype: torch.dtype, device: torch.device) -> list[torch.nn.Module]:
    """This rank's chunk(s) of the primary part, as the engine builds them (same modules, so the
    same checkpoint keys), without DDP, optimizer or initialisation (every weight is overwritten)."""
    from fmtrain.engine.parts import build_part_chunks, megatron_config_of
    from fmtrain.models.registry import get_family

    spec = get_family(cfg.model.family).primary(cfg)
    config = megatron_config_of(cfg, spec, params_dtype=params_dtype, use_cpu=device.type == "cpu")
    config.perform_initialization = False
    chunks = build_part_chunks(cfg, spec, config, device)
    if spec.megatron_config is None:
        # A plain torch module is built in fp32 whatever params_dtype says (megatron's modules
        # take it from the config): cast it, so a bf16 release is stored as bf16, as read.
        chunks = [chunk.to(params_dtype) for chunk in chunks]
    return chunks


def load_hf_weights(
    chunks: list[torch.nn.Module], hf_dir: Path, cfg: Config, *, allow_pickle: bool = False
) -> tuple[int, int, int]:
    """Read this rank's slices of ``hf_dir`` into ``chunks``; (tensors set, bytes read, bytes
    in the checkpoint's model tensors)."""
    from fmtrain.checkpoint.hf.io import HFCheckpoint
    from fmtrain.checkpoint.hf.layout import load_global_pieces

    conv = converter(cfg.model.family)
    shapes = conv.shapes_from_config(cfg)
    with HFCheckpoint(weights_dir(hf_dir, conv), allow_pickle=allow_pickle) as ckpt:
        conv.check_hf_names(ckpt, shapes)
        total = sum(ckpt.nbytes(name) for name in ckpt.names)
        count = load_global_pieces(chunks, conv.piece_reader(ckpt, shapes))
        return count, ckpt.bytes_read, total


def _read_share(bytes_read: int, total: int, topo) -> float:
    """The largest share of the checkpoint any rank read (collective)."""
    import torch.distributed as dist

    share = torch.tensor([bytes_read / max(total, 1)], dtype=torch.float64, device=topo.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(share, op=dist.ReduceOp.MAX)
    return float(share.item())


def _hf_dtype(hf_dir: Path, conv, allow_pickle: bool) -> torch.dtype:
    from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError

    with HFCheckpoint(weights_dir(hf_dir, conv), allow_pickle=allow_pickle) as ckpt:
        probe = conv.dtype_probe(ckpt) if hasattr(conv, "dtype_probe") else conv.DTYPE_PROBE
        try:
            return ckpt.info(probe)[1]
        except KeyError:
            raise HFCheckpointError(f"{ckpt.path}: no tensor {probe} ({conv.FORMAT})") from None


def convert_from_hf(
    cfg: Config,
    hf_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "auto",
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``hf_dir`` as a model-only fmtrain checkpoint for ``cfg.parallel`` (every rank)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from fmtrain import parallel
    from fmtrain.engine.parts import sharded_state_dict

    refuse_existing(out_dir, overwrite)
    topo = parallel.initialize(cfg)
    log: Log = (lambda m: print(m, flush=True)) if topo.is_writer else (lambda m: None)
    started = time.perf_counter()
    params_dtype = _hf_dtype(hf_dir, converter(cfg.model.family), allow_pickle) if dtype == "auto" else DTYPES[dtype]
    if params_dtype not in (torch.float32, torch.bfloat16):
        params_dtype = torch.float32
    chunks = build_chunks(cfg, params_dtype, topo.device)
    log(
        f"fmtrain convert from-hf: {hf_dir} -> {out_dir} at TP={topo.tp} PP={topo.pp} VPP={topo.vpp} "
        f"DP={topo.dp} ({topo.world_size} rank(s)), {_DTYPE_NAMES[params_dtype]}"
    )
    count, read, total = load_hf_weights(chunks, hf_dir, cfg, allow_pickle=allow_pickle)
    share = _read_share(read, total, topo)
    log(
        f"loaded {count} tensor pieces on rank 0; each rank read at most {100 * share:.1f}% of the "
        f"checkpoint's {total / 2**20:.1f} MiB"
    )

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if topo.is_writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": sharded_state_dict(chunks)}, str(tmp))
    dist.barrier()
    if topo.is_writer:
        state = {
            "step": 0,
            "consumed_samples": 0,
            "layout": {"tp": topo.tp, "pp": topo.pp, "vpp": topo.vpp, "dp": topo.dp},
            "contents": ["model"],
            "source": {"hugging_face": str(hf_dir), "dtype": _DTYPE_NAMES[params_dtype]},
            "config": cfg.to_dict(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        tokenizer = Path(hf_dir) / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copy2(tokenizer, tmp / "tokenizer.model")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        log(
            f"wrote {out_dir} (model only, step 0{', with tokenizer.model' if tokenizer.is_file() else ''}) "
            f"in {time.perf_counter() - started:.1f}s; train from it with checkpoint.load={out_dir}"
        )
    dist.barrier()
    return out_dir


def init_from_hf(cfg: Config, run_dir: Path, engine, topo, log: Log = print) -> bool:
    """``model.init_from_hf``: load released weights into a freshly built engine (all ranks).

    Skipped (False) when the run resumes: ``checkpoint.load`` is set or RUN_DIR has a
    checkpoint. Otherwise every rank reads only its slices, and the optimizer's main (fp32)
    weights are refreshed from the loaded parameters.
    """
    if not cfg.model.init_from_hf:
        return False
    from fmtrain.checkpoint import find_latest

    hf_dir = Path(cfg.model.init_from_hf)
    resuming = cfg.checkpoint.load or find_latest(run_dir, log=lambda m: None)
    if resuming:
        log(f"model.init_from_hf={hf_dir} not used: the run resumes from {cfg.checkpoint.load or resuming}")
        return False
    if not hf_dir.is_dir():
        raise ConfigError(f"model.init_from_hf={hf_dir}: no such directory")
    conv = converter(cfg.model.family)
    conv.check_model_matches_hf(cfg, *release_config(hf_dir, conv))
    started = time.perf_counter()
    count, read, total = load_hf_weights(engine.unwrapped_chunks(), hf_dir, cfg)
    engine.weights_changed()
    share = _read_share(read, total, topo)
    log(
        f"initialised from {conv.FORMAT} weights {hf_dir} ({count} tensor pieces on rank 0; each rank read "
        f"at most {100 * share:.1f}% of {total / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f}s"
    )
    return True


# ---------------------------------------------------------------------- export


class DistCheckpointReader:
    """Tensors of a megatron ``torch_dist`` checkpoint, one region at a time, in one process.

    ``read(key, index)`` returns the full value of ``key`` at the prepended indices ``index``
    (the layer number of ``decoder.layers.*``), whatever layout wrote it.
    """

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        try:
            backend = json.loads(meta_file.read_text()).get("sharded_backend")
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: not a distributed checkpoint ({meta_file}: {exc})") from None
        if backend != "torch_dist":
            raise ConfigError(f"{self.path}: sharded_backend={backend!r}; only torch_dist checkpoints are read")
        self._reader_cls = FileSystemReader
        self.metadata = FileSystemReader(str(self.path)).read_metadata().state_dict_metadata

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def info(self, key: str, prepend: int) -> tuple[tuple[int, ...], torch.dtype]:
        md = self.metadata[key]
        return tuple(md.size)[prepend:], md.properties.dtype

    def read(self, key: str, index: tuple[int, ...]) -> torch.Tensor:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata[key]
        size = tuple(md.size)
        region_offsets = tuple(index) + (0,) * (len(size) - len(index))
        region_sizes = (1,) * len(index) + size[len(index) :]

        class OneRegion(DefaultLoadPlanner):
            def create_local_plan(self) -> LoadPlan:
                chunk = ChunkStorageMetadata(offsets=torch.Size(region_offsets), sizes=torch.Size(region_sizes))
                return LoadPlan(create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]))

            def lookup_tensor(self, index):  # the destination is the region itself
                return self.state_dict[index.fqn]

        buffer = torch.empty(region_sizes, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
            warnings.simplefilter("ignore", UserWarning)
            load({key: buffer}, storage_reader=self._reader_cls(str(self.path)), planner=OneRegion(), no_dist=True)
        return buffer.reshape(size[len(index) :])


def _resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    if (path / STATE_FILE).is_file():
        return path
    if (path / "checkpoints").is_dir():
        from fmtrain.checkpoint import find_latest

        latest = find_latest(path, log=lambda m: None)
        if latest is not None:
            return latest
    raise ConfigError(f"{path}: not an fmtrain checkpoint (no {STATE_FILE}) nor a run directory with one")


def export_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    log: Log = print,
    cfg: Config | None = None,
    variant: str = "",
) -> Path:
    """Write the released format of the checkpoint's family from an fmtrain checkpoint (one
    process): a Hugging Face ``LlamaForCausalLM`` directory for Yi, the Step-Video-T2V
    ``transformer/`` layout for step_video.

    ``cfg`` defaults to the config saved in the checkpoint (its model section decides the
    tensors; one that does not fit the stored tensors is refused naming the tensor).
    ``dtype`` (bf16 | fp32) defaults to the dtype the weights are stored in. fp32 from a bf16
    run takes the optimizer's fp32 main weights when the checkpoint has them. ``variant`` picks
    another export target of the family's converter (``encoder``: VideoMAE's encoder alone).
    """
    from fmtrain.checkpoint.hf.io import StreamingShardWriter, plan_shards

    started = time.perf_counter()
    ckpt = _resolve_checkpoint(Path(ckpt_dir))
    out = Path(out_dir)
    refuse_existing(out, overwrite)
    from fmtrain.checkpoint import read_state

    state = read_state(ckpt)
    if cfg is None:
        if not isinstance(state.get("config"), dict):
            raise ConfigError(f"{ckpt}/{STATE_FILE} has no resolved config to export the model from")
        cfg = config_from_dict(state["config"])
        whose = "its saved config"
    else:
        saved = (state.get("config") or {}).get("model", {}).get("family", cfg.model.family)
        if saved != cfg.model.family:
            raise ConfigError(
                f"model.family={cfg.model.family!r} does not match the checkpoint {ckpt}, "
                f"saved with model.family={saved!r}"
            )
        whose = "the given config"
    conv = converter(cfg.model.family)
    if variant:
        variants = getattr(conv, "variants", {})
        if variant not in variants:
            raise ConfigError(
                f"model.family={cfg.model.family!r} has no {variant!r} export"
                + (f" (it has: {', '.join(variants)})" if variants else "")
            )
        conv = variants[variant]
    s = conv.shapes_from_config(cfg)
    if state.get("backend") == "deepspeed":
        from fmtrain.checkpoint.backends import DeepSpeedCheckpointReader

        reader = DeepSpeedCheckpointReader(ckpt)
    else:
        reader = DistCheckpointReader(ckpt)

    # The plan: fmtrain tensors in the release's order, and the release tensors each one becomes.
    order = conv.export_order(s, present=lambda key: key in reader)
    expected = conv.hf_shapes(s)
    work = []  # (key, index, source key, [(release name, shape)])
    stored_dtypes, from_main = set(), 0
    for key, index in order:
        if key not in reader:
            raise ConfigError(
                f"{ckpt}: the checkpoint has no tensor {key!r}, which {whose} (model.family={cfg.model.family}) needs"
            )
        shape, stored = reader.info(key, len(index))
        source = key
        if dtype == "fp32" and stored != torch.float32 and f"optimizer.state.param.{key}" in reader:
            source = f"optimizer.state.param.{key}"  # the fp32 main weights of a bf16 run
            from_main += 1
        stored_dtypes.add(stored)
        try:
            produced = conv.hf_tensors_from_megatron(key, index, torch.empty(shape, device="meta"), s)
        except RuntimeError as exc:  # a reshape the stored shape does not allow
            raise ConfigError(f"{ckpt}: {key} {index} has shape {shape}, which does not fit {whose} ({exc})") from None
        for name, t in produced.items():
            if tuple(t.shape) != expected[name]:
                raise ConfigError(
                    f"{ckpt}: {key} {index} has shape {shape}, which does not give {name} "
                    f"the shape {expected[name]} that {whose} implies"
                )
        work.append((key, index, source, [(name, tuple(t.shape)) for name, t in produced.items()]))
    names = [name for *_, outs in work for name, _ in outs]
    if names != list(expected):
        missing = [n for n in expected if n not in names]
        raise ConfigError(f"{ckpt}: the checkpoint lacks tensors for {', '.join(missing[:3])}")
    if dtype is None:
        out_dtype = stored_dtypes.pop() if len(stored_dtypes) == 1 else torch.float32
    else:
        out_dtype = DTYPES[dtype]
    specs = [(name, out_dtype, shape) for *_, outs in work for name, shape in outs]
    shards = plan_shards(specs, max_shard_bytes)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    target = tmp / conv.WEIGHTS_SUBDIR if conv.WEIGHTS_SUBDIR else tmp
    target.mkdir(parents=True)
    prefix = conv.weights_prefix(cfg) if hasattr(conv, "weights_prefix") else conv.WEIGHTS_PREFIX
    writer = StreamingShardWriter(target, shards, prefix=prefix)
    log(
        f"fmtrain convert to-hf: {ckpt} (saved at TP={state['layout'].get('tp')} PP={state['layout'].get('pp')}, "
        f"step {state.get('step')}) -> {out} ({conv.FORMAT}): {len(specs)} tensors, "
        f"{writer.total_bytes / 2**20:.1f} MiB {_DTYPE_NAMES.get(out_dtype, out_dtype)} in {len(shards)} shard(s)"
        + (f", {from_main} of {len(work)} from the optimizer's fp32 main weights" if from_main else "")
    )
    last_report = time.perf_counter()
    for i, (key, index, source, _) in enumerate(work, 1):
        full = reader.read(source, index)
        for name, t in conv.hf_tensors_from_megatron(key, index, full, s).items():
            writer.write(name, t.to(out_dtype))
        del full
        if time.perf_counter() - last_report > 10 and i < len(work):
            log(f"  {i}/{len(work)} checkpoint tensors exported")
            last_report = time.perf_counter()
    writer.close()

    config = conv.hf_config_from_fmtrain(cfg, out_dtype)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    extra = conv.write_export_extras(ckpt, target, cfg, log)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(
        f"wrote {out}: {len(shards)} safetensors shard(s){extra} in {time.perf_counter() - started:.1f}s, "
        f"peak memory {_peak_rss_mb():.0f} MiB"
    )
    return out


# ---------------------------------------------------------------------- demo


def demo_export_and_generate(run_dir: Path, prompt: str, max_new_tokens: int = 20, log: Log = print) -> int:
    """Export the run's latest checkpoint to RUN_DIR/hf and greedy-generate with transformers."""
    out = Path(run_dir) / "hf"
    export_to_hf(Path(run_dir), out, overwrite=True, log=log)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        log("transformers is not installed (pip install -e '.[test]'); skipping generation")
        return 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=False)
    log(f"transformers ({type(model).__name__} from {out}), greedy, {max_new_tokens} tokens:\n  {prompt!r} -> {text!r}")
    return 0


__all__ = [
    "convert_from_hf",
    "from_hf_config",
    "init_from_hf",
    "export_to_hf",
    "load_hf_weights",
    "DistCheckpointReader",
    "demo_export_and_generate",
    "converter",
    "detect_family",
    "weights_dir",
    "build_chunks",
]
