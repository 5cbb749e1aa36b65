"""``fmtrain data ...`` and ``fmtrain tokenizer ...`` subcommands.

    fmtrain data shard text FILES... --out DIR [--shard-size 64MB] [--max-count N] [--tokenizer MODEL]
    fmtrain data shard preference FILE.jsonl --out DIR [--chat-template chatml|FILE] [--shard-size 64MB] [--max-count N]
    fmtrain data shard video VIDEOS... --out DIR [--captions FILE] [--latents DIR] [--text-embs DIR]
    fmtrain data shard latents NPZ_FILES|DIRS... --out DIR [--channels C] [--caption-dim D] [--clip-dim D2]
    fmtrain data shard tasks --manifest FILE.jsonl --out DIR [--shard-size 64MB] [--max-count N]
    fmtrain data shard tasks --from SHARDS|FILES|DIRS... --synthetic flip_h,colorize,... --pairs K --size S
        [--frames F] [--fit center_crop|resize] [--samples N] [--seed S] [--max-sources N] --out DIR
    fmtrain data synth-latents OUT_DIR --shapes 2x8x8,3x8x6 --samples N --classes K --channels C
        --caption-dim D --caption-tokens L [--clip-dim D2 --clip-tokens L2] [--seed S] [--valid-fraction F]
        [--preference]
    fmtrain data synth-preference OUT_DIR --pairs N [--valid-pairs M] [--seed S]
    fmtrain data index PATTERN --out DIR/index.json
    fmtrain data encode SHARDS --vae SRC --llm-encoder DIR [--clip-encoder DIR] --out DIR  (fmtrain.cli.encode)
    fmtrain tokenizer train --shards PATTERN --vocab-size N --out PREFIX
    fmtrain tokenizer encode --model MODEL [--text TEXT ...] [FILES...]

Every writer shows progress on stderr and writes ``index.json`` (shards and sample counts)
next to its shards; ``data.shards=DIR`` (or the index, or a brace pattern) then trains on them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmtrain.config import parse_size


def _videos(paths: list[str]) -> list[Path]:
    from fmtrain.data.video import VIDEO_EXTENSIONS

    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS)
        else:
            out.append(path)
    return out


def cmd_shard_text(args: argparse.Namespace) -> int:
    from fmtrain.data.text import write_text_shards

    index = write_text_shards(
        args.files, args.out, shard_size=parse_size(args.shard_size), max_count=args.max_count, tokenizer=args.tokenizer
    )
    print(
        f"wrote {index['samples']} documents in {len(index['shards'])} shards to {args.out} "
        f"(index: {Path(args.out) / 'index.json'})"
    )
    return 0


def cmd_shard_preference(args: argparse.Namespace) -> int:
    from fmtrain.data.preference import write_preference_shards

    size = parse_size(args.shard_size)
    index = write_preference_shards(
        args.file, args.out, shard_size=size, max_count=args.max_count, chat_template=args.chat_template
    )
    print(
        f"wrote {index['samples']} preference pairs in {len(index['shards'])} shards to {args.out} "
        f"(index: {Path(args.out) / 'index.json'})"
    )
    return 0


def cmd_shard_video(args: argparse.Namespace) -> int:
    from fmtrain.data.video import read_captions, write_video_shards

    videos = _videos(args.videos)
    if not videos:
        print("fmtrain: error: no video files given", file=sys.stderr)
        return 1
    captions = read_captions(args.captions) if args.captions else None
    index = write_video_shards(
        videos,
        args.out,
        captions=captions,
        latents=args.latents,
        text_embs=args.text_embs,
        shard_size=parse_size(args.shard_size),
        max_count=args.max_count,
    )
    print(
        f"wrote {index['samples']} videos in {len(index['shards'])} shards to {args.out} "
        f"({len(index['skipped'])} skipped; index: {Path(args.out) / 'index.json'})"
    )
    return 0


def _npz_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        out += sorted(path.rglob("*.npz")) if path.is_dir() else [path]
    return out


def cmd_shard_latents(args: argparse.Namespace) -> int:
    from fmtrain.data.latents import write_npz_latent_shards

    files = _npz_files(args.files)
    if not files:
        print("fmtrain: error: no .npz files given", file=sys.stderr)
        return 1
    index = write_npz_latent_shards(
        files,
        args.out,
        shard_size=parse_size(args.shard_size),
        max_count=args.max_count,
        in_channels=args.channels or None,
        patch_size=args.patch_size,
        caption_dim=args.caption_dim or None,
        clip_dim=args.clip_dim or None,
    )
    skipped = index["skipped"]
    print(
        f"wrote {index['samples']} latent samples in {len(index['shards'])} shards to {args.out} "
        f"({len(skipped)} of {len(files)} files skipped{': see the warnings' if skipped else ''}; "
        f"index: {Path(args.out) / 'index.json'})"
    )
    return 0


def cmd_shard_tasks(args: argparse.Namespace) -> int:
    from fmtrain.data.tasks import write_manifest_task_shards, write_synthetic_task_shards

    common = dict(shard_size=parse_size(args.shard_size), max_count=args.max_count)
    if bool(args.manifest) == bool(args.sources):
        raise ValueError("give either --manifest FILE or --from SOURCES (with --synthetic TASKS)")
    if args.manifest:
        if args.synthetic:
            raise ValueError("--synthetic derives tasks from --from sources; a --manifest names its own tasks")
        index = write_manifest_task_shards(args.manifest, args.out, **common)
    else:
        missing = [
            flag
            for flag, value in (("--synthetic", args.synthetic), ("--pairs", args.pairs), ("--size", args.size))
            if not value
        ]
        if missing:
            raise ValueError(f"--from needs {', '.join(missing)}")
        index = write_synthetic_task_shards(
            args.sources,
            args.out,
            tasks=[t.strip() for t in args.synthetic.split(",") if t.strip()],
            pairs=args.pairs,
            size=args.size,
            frames=args.frames,
            samples=args.samples,
            seed=args.seed,
            fit=args.fit,
            max_sources=args.max_sources,
            **common,
        )
    tasks = ", ".join(f"{task} {count}" for task, count in sorted(index["tasks"].items()))
    skipped = index["skipped"]
    print(
        f"wrote {index['samples']} task samples ({tasks}) in {len(index['shards'])} shards to {args.out} "
        f"({len(skipped)} inputs skipped{': see the warnings' if skipped else ''}; "
        f"index: {Path(args.out) / 'index.json'})"
    )
    return 0


def cmd_synth_latents(args: argparse.Namespace) -> int:
    from fmtrain.data.latents import parse_latent_shapes, write_synthetic_latent_shards

    if (args.clip_dim > 0) != (args.clip_tokens > 0):
        raise ValueError(
            f"--clip-dim={args.clip_dim} and --clip-tokens={args.clip_tokens} must both be positive or both 0"
        )
    train, valid = write_synthetic_latent_shards(
        args.out_dir,
        shapes=parse_latent_shapes(args.shapes),
        samples=args.samples,
        classes=args.classes,
        channels=args.channels,
        caption_tokens=args.caption_tokens,
        caption_dim=args.caption_dim,
        clip_tokens=args.clip_tokens,
        clip_dim=args.clip_dim,
        seed=args.seed,
        valid_fraction=args.valid_fraction,
        shard_size=parse_size(args.shard_size),
        max_count=args.max_count,
        preference=args.preference,
    )
    out = Path(args.out_dir)
    print(
        f"wrote {train['samples']} training samples in {len(train['shards'])} shards to {out / 'train'}"
        + (f" and {valid['samples']} validation samples to {out / 'valid'}" if valid else "")
    )
    return 0


def cmd_synth_preference(args: argparse.Namespace) -> int:
    from fmtrain.data.preference import write_synthetic_preference

    train, valid = write_synthetic_preference(
        args.out_dir, pairs=args.pairs, valid_pairs=args.valid_pairs, seed=args.seed
    )
    print(f"wrote {args.pairs} training pairs to {train}" + (f" and {args.valid_pairs} to {valid}" if valid else ""))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import write_index

    index = write_index(args.pattern, args.out)
    print(f"{args.out}: {len(index['shards'])} shards, {index['samples']} samples")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import iter_samples, progress_bar, resolve_shards
    from fmtrain.data.text import sample_text, train_tokenizer

    docs = []
    bar = progress_bar("reading shards", unit="docs")
    for sample in iter_samples(resolve_shards(args.shards)):
        try:
            text = sample_text(sample)
        except UnicodeDecodeError:
            print(
                f"fmtrain: warning: {sample.get('__url__')} key {sample.get('__key__')}: .txt is not UTF-8; skipped",
                file=sys.stderr,
            )
            continue
        if text:
            docs.append(text)
            bar.update(1)
        if args.max_docs and len(docs) >= args.max_docs:
            break
    bar.close()
    if not docs:
        print(f"fmtrain: error: no .txt samples in {args.shards}", file=sys.stderr)
        return 1
    path = train_tokenizer(docs, args.vocab_size, args.out)
    print(f"trained a {args.vocab_size}-piece tokenizer on {len(docs)} documents: {path}")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from fmtrain.data.text import load_tokenizer, read_documents

    processor = load_tokenizer(args.model)
    texts = list(args.text or [])
    for name in args.files:
        texts += read_documents(name)
    if not texts and not args.files:
        texts = [sys.stdin.read()]
    for text in texts:
        ids = processor.encode(text)
        print(json.dumps({"ids": ids} if not args.pieces else {"ids": ids, "pieces": processor.id_to_piece(ids)}))
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        from fmtrain.data.shards import BadDataError

        try:
            return func(args)
        except (BadDataError, ValueError, FileNotFoundError) as exc:
            print(f"fmtrain: error: {exc}", file=sys.stderr)
            return 1

    return run


def register_data(sub):
    """Add ``data`` and ``tokenizer`` to the ``fmtrain`` subcommand parser ``sub``; returns the
    ``data`` subcommands (``fmtrain.cli`` adds ``data encode``, which needs the models)."""
    data = sub.add_parser("data", help="write and index WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True)
    shard = dsub.add_parser("shard", help="write text, preference, video, latent or task shards (with index.json)")
    ssub = shard.add_subparsers(dest="shard_kind", required=True)

    def sizes(p):
        p.add_argument("--out", required=True, help="output directory (shards + index.json)")
        p.add_argument("--shard-size", default="64MB", help="target shard size, e.g. 64MB, 1GiB (default 64MB)")
        p.add_argument("--max-count", type=int, default=100_000, help="at most this many samples per shard")

    text = ssub.add_parser("text", help=".txt/.jsonl(.gz) files or builtin:NAME -> .txt or .tokens.npy samples")
    text.add_argument("files", nargs="+")
    sizes(text)
    text.add_argument("--tokenizer", default=None, help="SentencePiece model: store .tokens.npy instead of .txt")
    text.set_defaults(func=_guarded(cmd_shard_text))

    preference = ssub.add_parser(
        "preference", help='.jsonl(.gz) of {"prompt", "chosen", "rejected"} records (TRL\'s format) -> DPO shards'
    )
    preference.add_argument("file")
    sizes(preference)
    preference.add_argument(
        "--chat-template",
        default=None,
        help="conversational records (lists of messages) -> text: chatml (Yi's chat format), a Jinja "
        "template file, or a Hugging Face tokenizer_config.json / its directory",
    )
    preference.set_defaults(func=_guarded(cmd_shard_preference))

    video = ssub.add_parser("video", help="video files (or folders of them) -> .mp4/.json/.txt samples")
    video.add_argument("videos", nargs="+")
    sizes(video)
    video.add_argument("--captions", default=None, help=".jsonl ({video, caption}), .json ({name: caption}) or .tsv")
    video.add_argument("--latents", default=None, help="folder of STEM.npy precomputed latents (.latent.npy)")
    video.add_argument("--text-embs", default=None, help="folder of STEM.npy text embeddings (.text_emb.npy)")
    video.set_defaults(func=_guarded(cmd_shard_video))

    latents = ssub.add_parser(
        "latents",
        help="per-sample .npz files (latent, text_emb, optional text_mask, "
        "clip_emb, clip_mask, caption) -> latent shards",
    )
    latents.add_argument("files", nargs="+", help=".npz files or folders of them")
    sizes(latents)
    latents.add_argument("--channels", type=int, default=0, help="check the latent channel count (0: any)")
    latents.add_argument("--patch-size", type=int, default=1, help="check H and W are divisible by it")
    latents.add_argument("--caption-dim", type=int, default=0, help="check the text_emb width (0: any)")
    latents.add_argument("--clip-dim", type=int, default=0, help="require clip_emb of this width (0: optional)")
    latents.set_defaults(func=_guarded(cmd_shard_latents))

    tasks = ssub.add_parser(
        "tasks",
        help="in-context task instances (LaVin-DiT): a JSONL manifest of your files, or synthetic tasks "
        "derived from video shards, videos or images -> pixel task shards",
    )
    tasks.add_argument(
        "--manifest", default=None, help='JSONL: {"task", "pairs": [[in, out], ...], "query", "target"} per line'
    )
    tasks.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=None,
        help="source items for --synthetic: shard specs (video shards), video / image files or folders of them",
    )
    tasks.add_argument(
        "--synthetic",
        default=None,
        help="tasks, comma separated: colorize, flip_h, flip_v, deblur, edges, frame_prediction",
    )
    tasks.add_argument("--pairs", type=int, default=0, help="example pairs per sample (besides the query)")
    tasks.add_argument("--size", type=int, default=0, help="item side in pixels (square)")
    tasks.add_argument("--frames", type=int, default=1, help="frames per item: 1 = images (PNG), more = clips (mp4)")
    tasks.add_argument(
        "--fit",
        default="center_crop",
        choices=("center_crop", "resize"),
        help="center_crop (shorter side to --size, centre square; default) or resize (straight to the square)",
    )
    tasks.add_argument("--samples", type=int, default=0, help="task samples to write (0: one per source item)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--max-sources", type=int, default=1024, help="source items held in memory (default 1024)")
    sizes(tasks)
    tasks.set_defaults(func=_guarded(cmd_shard_tasks))

    synth = dsub.add_parser("synth-latents", help="write shards of the synthetic latent dataset (DiT tests, demos)")
    synth.add_argument("out_dir", help="writes OUT_DIR/train (and OUT_DIR/valid with --valid-fraction)")
    synth.add_argument("--shapes", default="2x8x8", help="latent T x H x W shapes, comma separated (default 2x8x8)")
    synth.add_argument("--samples", type=int, default=64, help="samples per shape (default 64)")
    synth.add_argument("--classes", type=int, default=8, help="prototype classes (default 8)")
    synth.add_argument("--channels", type=int, default=16, help="latent channels (default 16)")
    synth.add_argument("--caption-dim", type=int, default=64, help="text embedding width (default 64)")
    synth.add_argument("--caption-tokens", type=int, default=16, help="text embedding length (default 16)")
    synth.add_argument("--clip-dim", type=int, default=0, help="CLIP-style embedding width (0: none)")
    synth.add_argument("--clip-tokens", type=int, default=0, help="CLIP-style embedding length (0: none)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--valid-fraction", type=float, default=0.0, help="share of each shape held out to valid/")
    synth.add_argument("--shard-size", default="64MB", help="target shard size (default 64MB)")
    synth.add_argument("--max-count", type=int, default=100_000, help="at most this many samples per shard")
    synth.add_argument(
        "--preference",
        action="store_true",
        help="Video-DPO pairs: the caption's own latent chosen, another class's rejected",
    )
    synth.set_defaults(func=_guarded(cmd_synth_latents))

    synth_pref = dsub.add_parser(
        "synth-preference", help="write the synthetic 'repeat the words' preference task (DPO tests, demos)"
    )
    synth_pref.add_argument("out_dir", help="writes OUT_DIR/train.jsonl, OUT_DIR/train/ (and valid with --valid-pairs)")
    synth_pref.add_argument("--pairs", type=int, default=512, help="training pairs (default 512)")
    synth_pref.add_argument("--valid-pairs", type=int, default=0, help="held-out pairs (default 0)")
    synth_pref.add_argument("--seed", type=int, default=0)
    synth_pref.set_defaults(func=_guarded(cmd_synth_preference))

    index = dsub.add_parser("index", help="count the samples of existing shards into an index.json")
    index.add_argument("pattern", help="brace pattern, '::'-joined list, or pipe: URLs")
    index.add_argument("--out", required=True, help="index file to write")
    index.set_defaults(func=_guarded(cmd_index))

    tok = sub.add_parser("tokenizer", help="train or apply a SentencePiece tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tsub.add_parser("train", help="byte-fallback BPE with Yi's special ids on the .txt of text shards")
    train.add_argument("--shards", required=True, help="data spec: pattern, index.json or directory")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--max-docs", type=int, default=0, help="use at most this many documents (0: all)")
    train.set_defaults(func=_guarded(cmd_tokenizer_train))
    encode = tsub.add_parser("encode", help="print token ids as JSON lines (one per document or --text)")
    encode.add_argument("--model", required=True)
    encode.add_argument("--text", action="append", help="text to encode (repeatable)")
    encode.add_argument("--pieces", action="store_true", help="also print the pieces")
    encode.add_argument("files", nargs="*", help=".txt/.jsonl files (one line of output per document)")
    encode.set_defaults(func=_guarded(cmd_tokenizer_encode))
    return dsub


__all__ = ["register_data"]
