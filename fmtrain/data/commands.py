"""``fmtrain data ...`` and ``fmtrain tokenizer ...`` subcommands.

    fmtrain data shard text FILES... --out DIR [--shard-size 64MB] [--max-count N] [--tokenizer MODEL]
    fmtrain data shard video VIDEOS... --out DIR [--captions FILE] [--latents DIR] [--text-embs DIR]
    fmtrain data index PATTERN --out DIR/index.json
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


def _videos(paths: list[str]) -> list[Path]:
    from fmtrain.data.shards import VIDEO_EXTENSIONS

    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS)
        else:
            out.append(path)
    return out


def cmd_shard_text(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import parse_size, write_text_shards

    index = write_text_shards(args.files, args.out, shard_size=parse_size(args.shard_size),
                              max_count=args.max_count, tokenizer=args.tokenizer)
    print(f"wrote {index['samples']} documents in {len(index['shards'])} shards to {args.out} "
          f"(index: {Path(args.out) / 'index.json'})")
    return 0


def cmd_shard_video(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import parse_size, read_captions, write_video_shards

    videos = _videos(args.videos)
    if not videos:
        print("fmtrain: error: no video files given", file=sys.stderr)
        return 1
    captions = read_captions(args.captions) if args.captions else None
    index = write_video_shards(videos, args.out, captions=captions, latents=args.latents,
                               text_embs=args.text_embs, shard_size=parse_size(args.shard_size),
                               max_count=args.max_count)
    print(f"wrote {index['samples']} videos in {len(index['shards'])} shards to {args.out} "
          f"({len(index['skipped'])} skipped; index: {Path(args.out) / 'index.json'})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import write_index

    index = write_index(args.pattern, args.out)
    print(f"{args.out}: {len(index['shards'])} shards, {index['samples']} samples")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from fmtrain.data.shards import Progress, iter_samples, resolve_shards, sample_text
    from fmtrain.data.text import train_tokenizer

    docs = []
    bar = Progress("reading shards", unit="docs")
    for sample in iter_samples(resolve_shards(args.shards)):
        try:
            text = sample_text(sample)
        except UnicodeDecodeError:
            print(f"fmtrain: warning: {sample.get('__url__')} key {sample.get('__key__')}: .txt is not UTF-8; "
                  "skipped", file=sys.stderr)
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


def register_data(sub) -> None:
    """Add ``data`` and ``tokenizer`` to the ``fmtrain`` subcommand parser ``sub``."""
    data = sub.add_parser("data", help="write and index WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True)
    shard = dsub.add_parser("shard", help="write text or video shards (with index.json)")
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

    video = ssub.add_parser("video", help="video files (or folders of them) -> .mp4/.json/.txt samples")
    video.add_argument("videos", nargs="+")
    sizes(video)
    video.add_argument("--captions", default=None, help=".jsonl ({video, caption}), .json ({name: caption}) or .tsv")
    video.add_argument("--latents", default=None, help="folder of STEM.npy precomputed latents (.latent.npy)")
    video.add_argument("--text-embs", default=None, help="folder of STEM.npy text embeddings (.text_emb.npy)")
    video.set_defaults(func=_guarded(cmd_shard_video))

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


__all__ = ["register_data"]
