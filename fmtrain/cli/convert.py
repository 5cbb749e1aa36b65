"""``fmtrain convert from-hf | to-hf``: argument parsing and pre-flight checks.

The work is in :mod:`fmtrain.checkpoint.hf.convert`, imported when a command runs, so that
building the ``fmtrain`` parser stays light (that package pulls in megatron-core). Both
commands dispatch on the model family: Yi <-> Hugging Face ``LlamaForCausalLM``; step_video
<-> the Step-Video-T2V release layout (``RELEASE/transformer/``). ``from-hf`` recognises the
family from the directory's config.json (or takes the recipe's); ``to-hf`` from the
checkpoint's saved config.

    fmtrain convert from-hf HF_DIR OUT_DIR [--recipe RECIPE] [--allow-pickle] [--dtype auto|bf16|fp32]
                            [--nproc N] [--overwrite] [section.key=value ...]
    fmtrain convert to-hf CKPT_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--overwrite]
                          [--encoder-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmtrain.config import ConfigError, validate

DTYPE_CHOICES = ("bf16", "fp32")


def _launcher_argv(args: argparse.Namespace) -> list[str]:
    argv = ["convert", "from-hf", str(args.hf_dir), str(args.out_dir), "--dtype", args.dtype]
    if args.recipe:
        argv += ["--recipe", args.recipe]
    if args.allow_pickle:
        argv.append("--allow-pickle")
    if args.overwrite:
        argv.append("--overwrite")
    return argv + list(args.overrides)


def cmd_from_hf(args: argparse.Namespace) -> int:
    from fmtrain.checkpoint.hf.convert import (
        convert_from_hf,
        converter,
        detect_family,
        from_hf_config,
        refuse_existing,
        weights_dir,
    )
    from fmtrain.checkpoint.hf.io import HFCheckpoint, HFCheckpointError
    from fmtrain.launch.local import launch_local, under_launcher

    hf_dir, out_dir = Path(args.hf_dir), Path(args.out_dir)
    if not hf_dir.exists():
        raise ConfigError(f"{hf_dir}: no such model directory or checkpoint file")
    try:
        # Finds the files and refuses pickles before anything else reads them.
        family = detect_family(hf_dir, allow_pickle=args.allow_pickle)
        HFCheckpoint(weights_dir(hf_dir, converter(family)), allow_pickle=args.allow_pickle).close()
        cfg = from_hf_config(hf_dir, args.recipe, args.overrides, allow_pickle=args.allow_pickle)
        conv = converter(cfg.model.family)
        # Names and shapes from the file headers, before any rank starts.
        with HFCheckpoint(weights_dir(hf_dir, conv), allow_pickle=args.allow_pickle) as ckpt:
            conv.check_hf_names(ckpt, conv.shapes_from_config(cfg))
    except HFCheckpointError as exc:
        text = str(exc).replace("pass allow_pickle=True", "pass --allow-pickle")
        print(f"fmtrain convert from-hf: {text}", file=sys.stderr)
        return 2
    refuse_existing(out_dir, args.overwrite)
    if not under_launcher():
        # The layout's ranks, started here unless --nproc says otherwise (a larger DP is allowed).
        p = cfg.parallel
        nproc = args.nproc or p.tp * p.pp * p.cp * max(p.dp, 1)
        validate(cfg, nproc)
        if nproc > 1:
            return launch_local(nproc, _launcher_argv(args))
    from fmtrain import parallel

    try:
        convert_from_hf(
            cfg, hf_dir, out_dir, dtype=args.dtype, allow_pickle=args.allow_pickle, overwrite=args.overwrite
        )
    finally:
        parallel.destroy()
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    from torch.distributed.checkpoint.api import CheckpointException

    from fmtrain.checkpoint import CheckpointError
    from fmtrain.checkpoint.hf.convert import export_to_hf
    from fmtrain.checkpoint.hf.io import HFCheckpointError
    from fmtrain.config import parse_size

    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None
    try:
        export_to_hf(
            Path(args.ckpt_dir),
            Path(args.out_dir),
            dtype=args.dtype,
            max_shard_bytes=max_shard,
            overwrite=args.overwrite,
            variant="encoder" if args.encoder_only else "",
        )
    except (HFCheckpointError, CheckpointException, CheckpointError) as exc:
        print(f"fmtrain convert to-hf: {exc}", file=sys.stderr)
        return 2
    return 0


class _OverridesParser(argparse.ArgumentParser):
    """A subcommand parser whose ``section.key=value`` overrides may also follow its options
    (``from-hf HF OUT --recipe R parallel.tp=2``), which plain argparse leaves unrecognised."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if hasattr(ns, "overrides"):
            is_override = [("=" in a and not a.startswith("-")) for a in extras]
            ns.overrides = list(ns.overrides or []) + [a for a, o in zip(extras, is_override) if o]
            extras = [a for a, o in zip(extras, is_override) if not o]
        return ns, extras


def register_convert(sub) -> None:
    """Add ``fmtrain convert {from-hf,to-hf}`` to the top-level subparsers ``sub``."""
    convert = sub.add_parser(
        "convert", help="convert checkpoints to and from released formats (Hugging Face Llama / Yi, Step-Video-T2V)"
    )
    direction = convert.add_subparsers(dest="direction", required=True, parser_class=_OverridesParser)

    f = direction.add_parser(
        "from-hf",
        help="Hugging Face Llama / Yi directory, or Step-Video-T2V release -> fmtrain checkpoint (model only, step 0)",
        description="HF_DIR is a Hugging Face Llama / Yi directory or a Step-Video-T2V release (the directory "
        "holding transformer/, or transformer/ itself). Without --recipe the model config comes from "
        "its config.json (family recognised from it); with one, every architecture field of the recipe "
        "must match it. parallel.* overrides choose the layout written; the TP x PP ranks it needs "
        "start here (or run under torchrun / srun with that many ranks; --nproc for more).",
    )
    f.add_argument("hf_dir")
    f.add_argument("out_dir")
    f.add_argument("--recipe", default=None, help="recipe whose model section must match the checkpoint")
    f.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled pytorch_model*.bin (torch.load(weights_only=True)); only for trusted files",
    )
    f.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="dtype of the written weights (auto: as stored in HF_DIR)",
    )
    f.add_argument("--nproc", type=int, default=0, help="start this many local ranks (default: the layout's TP x PP)")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    f.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tp=2")
    f.set_defaults(func=cmd_from_hf)

    t = direction.add_parser(
        "to-hf",
        help="fmtrain checkpoint (any layout) -> Hugging Face LlamaForCausalLM directory (yi) or "
        "Step-Video-T2V release layout OUT_DIR/transformer/ (step_video)",
        description="CKPT_DIR is a checkpoint (RUN_DIR/checkpoints/step_N) or a run directory (its latest "
        "checkpoint); the format follows its model.family. Runs in one process; memory stays at "
        "about one tensor.",
    )
    t.add_argument("ckpt_dir")
    t.add_argument("out_dir")
    t.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="dtype of the exported weights (default: as stored in the checkpoint)",
    )
    t.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    t.add_argument(
        "--encoder-only",
        action="store_true",
        help="videomae_v2: export the encoder alone as transformers VideoMAEModel (for fine-tuning)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    t.set_defaults(func=cmd_to_hf)


__all__ = ["register_convert", "cmd_from_hf", "cmd_to_hf"]
