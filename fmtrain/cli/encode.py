"""``fmtrain data encode``: pixel shards -> latent shards for a DiT (:mod:`fmtrain.encode`).

    fmtrain data encode VIDEO_SHARDS --vae CKPT_OR_RELEASE --llm-encoder DIR [--clip-encoder DIR]
        --frames N --size S --out DIR [--nproc N] [--stride K] [--llm-tokens L] [--clip-tokens L2]
        [--posterior sample|mean] [--dtype float32|float16] [--seed S]
    fmtrain data encode TASK_SHARDS --vae CKPT_OR_RELEASE --size S --out DIR [--frames N] [--nproc N]
        [--posterior sample|mean] [--dtype float32|float16] [--seed S]

The input's kind (video + captions, or in-context tasks) is its index.json's.

Under torchrun or srun each task is one rank; ``--nproc N`` starts N local ranks itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fmtrain.config import ConfigError


def input_kind(shards: str) -> str:
    """``video`` or ``tasks``: what the shards' index.json says they hold."""
    from fmtrain.data.shards import INDEX_NAME, BadDataError, is_local, local_path
    from fmtrain.encode import TASK_KIND, VIDEO_KIND

    path = local_path(shards) if is_local(shards) else None
    index = path / INDEX_NAME if path is not None and path.is_dir() else path
    if index is None or index.suffix != ".json" or not index.is_file():
        return VIDEO_KIND  # a shard pattern: video shards, as before tasks existed
    import json

    kind = json.loads(index.read_text()).get("kind")
    if kind not in (VIDEO_KIND, TASK_KIND):
        raise BadDataError(f"{shards}: index.json kind {kind!r}; data encode reads {VIDEO_KIND} or {TASK_KIND} shards")
    return kind


def settings_of(args: argparse.Namespace):
    from fmtrain.encode import VIDEO_KIND, EncodeSettings

    def where(path: str) -> str:
        return str(Path(path).resolve()) if path else ""

    kind = input_kind(args.shards)
    frames = args.frames if args.frames is not None else (17 if kind == VIDEO_KIND else 0)
    return EncodeSettings(
        shards=args.shards,
        kind=kind,
        vae=where(args.vae),
        llm_encoder=where(args.llm_encoder),
        clip_encoder=where(args.clip_encoder),
        frames=frames,
        stride=args.stride,
        size=args.size,
        llm_tokens=args.llm_tokens,
        clip_tokens=args.clip_tokens,
        posterior=args.posterior,
        dtype=args.dtype,
        seed=args.seed,
    )


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before any process starts: inputs exist, numbers are positive."""
    from fmtrain.data.shards import check_shard_spec
    from fmtrain.encode import VIDEO_KIND

    check_shard_spec(args.shards)
    for flag, path in (("--vae", args.vae), ("--llm-encoder", args.llm_encoder), ("--clip-encoder", args.clip_encoder)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    for flag in ("stride", "size", "llm_tokens", "clip_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    kind = input_kind(args.shards)
    if args.frames is not None and args.frames < (1 if kind == VIDEO_KIND else 0):
        raise ValueError(f"--frames={args.frames} must be at least {1 if kind == VIDEO_KIND else 0}")
    if kind == VIDEO_KIND and not args.llm_encoder:
        raise ValueError(f"{args.shards} holds videos with captions: --llm-encoder DIR embeds the captions")
    if kind != VIDEO_KIND and (args.llm_encoder or args.clip_encoder):
        raise ValueError(f"{args.shards} holds in-context tasks, which have no captions: drop the text encoders")


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The command line each launched rank runs (paths resolved, everything but --nproc)."""
    s = settings_of(args)
    argv = ["data", "encode", s.shards, "--vae", s.vae, "--out", args.out]
    argv += ["--llm-encoder", s.llm_encoder] if s.llm_encoder else []
    argv += ["--clip-encoder", s.clip_encoder] if s.clip_encoder else []
    for flag in ("frames", "stride", "size", "llm_tokens", "clip_tokens", "posterior", "dtype", "seed"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(s, flag))]
    return argv + (["--quiet"] if args.quiet else [])


def cmd_encode(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import BadDataError
    from fmtrain.launch.local import free_port, launch_local, under_launcher

    try:
        check_args(args)
        if args.nproc > 1 and not under_launcher():
            return launch_local(args.nproc, rank_argv(args))
        if not under_launcher():
            os.environ.setdefault("MASTER_PORT", str(free_port()))  # one process: any free port
        from fmtrain.encode import encode_shards

        index = encode_shards(settings_of(args), args.out, progress=not args.quiet)
    except (BadDataError, ValueError, FileNotFoundError) as exc:
        print(f"fmtrain data encode: error: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"fmtrain data encode: --vae: {exc}", file=sys.stderr)
        return 2
    if index is not None:
        print(
            f"fmtrain data encode: {index['samples']} latent samples in {len(index['shards'])} shards in {args.out} "
            f"({len(index['skipped'])} skipped; shapes {index['shapes']}; index: {Path(args.out) / 'index.json'})"
        )
    return 0


def register_encode(data_commands) -> None:
    enc = data_commands.add_parser(
        "encode",
        help="pixel shards -> latent shards for a DiT: video + captions (a VAE, text encoders) or in-context tasks",
    )
    enc.add_argument(
        "shards", help="video or task shards: directory, index.json or pattern (fmtrain data shard video / tasks)"
    )
    enc.add_argument(
        "--vae", required=True, help="a VAE family's fmtrain checkpoint or run dir, or a release (vae/, stvae.pt)"
    )
    enc.add_argument("--llm-encoder", default="", help="video shards: Hugging Face LLM directory (or a Yi checkpoint)")
    enc.add_argument("--clip-encoder", default="", help="Hugging Face text-encoder directory (the CLIP slot)")
    enc.add_argument("--out", required=True, help="output directory (latent shards + index.json)")
    enc.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per clip (videos: default 17, 3 Video-VAE latent frames; tasks: default 0, as stored)",
    )
    enc.add_argument("--stride", type=int, default=1, help="frame step within a clip (default 1)")
    enc.add_argument(
        "--size", type=int, default=256, help="videos: shorter side resized, centre crop; tasks: resized to S x S"
    )
    enc.add_argument("--llm-tokens", type=int, default=320, help="caption tokens for the LLM slot (default 320)")
    enc.add_argument("--clip-tokens", type=int, default=77, help="caption tokens for the CLIP slot (default 77)")
    enc.add_argument(
        "--posterior",
        choices=("sample", "mean"),
        default="sample",
        help="latent = a posterior sample (the release's encode; seeded per sample) or its mean",
    )
    enc.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored latents and embeddings")
    enc.add_argument("--seed", type=int, default=0, help="seed of clip starts and posterior noise")
    enc.add_argument("--nproc", type=int, default=1, help="start this many local ranks")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(func=cmd_encode)


__all__ = ["register_encode"]
