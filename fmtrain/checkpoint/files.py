"""Names and bookkeeping of the checkpoints directory: completeness, ``latest``, retention.

Everything here is plain file work done by rank 0 (or read by every rank); nothing is
collective. Names:

    step_NNNNNNN/           complete: renamed into place after every rank finished writing
    step_NNNNNNN.tmp/       being written, or left by a run killed while writing: never loaded
    step_NNNNNNN.deleting/  being removed by retention (renamed first, so a kill mid-delete
                            cannot leave a half-deleted directory under a complete name)
    latest                  text: the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from fmtrain.checkpoint.errors import CheckpointError

STATE_FILE = "fmtrain_state.json"
LATEST = "latest"
_COMPLETE_NAME = re.compile(r"step_(\d{7,})")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:07d}"


def step_of(path: Path) -> int | None:
    """The step of a complete checkpoint's directory name (None for .tmp and other names)."""
    match = _COMPLETE_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    path = Path(path)
    # megatron's index, or the deepspeed backend's DeepSpeed directory (fmtrain_state.json is
    # written after every rank finished either way).
    return (path / STATE_FILE).is_file() and ((path / "metadata.json").is_file() or (path / "deepspeed").is_dir())


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under ``root``, oldest first."""
    if not Path(root).is_dir():
        return []
    found = []
    for path in Path(root).iterdir():
        step = step_of(path)
        if step is not None and path.is_dir() and is_complete(path):
            found.append((step, path))
    return sorted(found)


def find_latest(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one; incomplete ones are reported."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    for partial in sorted(root.glob("step_*.tmp")):
        log(f"ignoring incomplete checkpoint {partial} (a save that did not finish)")
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if step_of(named) is not None and named.is_dir() and is_complete(named):
            return named
        log(
            f"checkpoints/latest names {named}, which is missing or incomplete; "
            "looking for the newest complete checkpoint"
        )
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_state(path: Path) -> dict:
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete fmtrain checkpoint (no {STATE_FILE})")
    try:
        return json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None


def write_latest(run_dir: Path, final: Path) -> None:
    """Point ``latest`` at ``final`` (atomic replace)."""
    root = checkpoints_dir(run_dir)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(Path(final).name + "\n")
    os.replace(tmp, root / LATEST)


def _remove(path: Path) -> None:
    doomed = path.with_name(path.name.split(".")[0] + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(
    run_dir: Path, keep_last: int, keep_every: int, newest_step: int, log: Callable[[str], None] = print
) -> list[Path]:
    """Retention after ``newest_step`` was completed (rank 0 only); returns what was removed.

    Kept: the ``keep_last`` newest complete checkpoints (all when 0), every one whose step is a
    multiple of ``keep_every`` (none when 0), and the one ``latest`` names. Removed as well:
    ``.tmp`` directories of steps before ``newest_step`` (saves that can no longer finish) and
    leftovers of an interrupted removal.
    """
    root = checkpoints_dir(run_dir)
    removed: list[Path] = []
    complete = complete_checkpoints(root)
    keep = {step for step, _ in (complete[-keep_last:] if keep_last > 0 else complete)}
    if keep_every > 0:
        keep |= {step for step, _ in complete if step % keep_every == 0}
    pointer = root / LATEST
    if pointer.is_file():
        named = step_of(root / pointer.read_text().strip())
        if named is not None:
            keep.add(named)
    for step, path in complete:
        if step not in keep:
            _remove(path)
            removed.append(path)
    for leftover in list(root.glob("step_*.tmp")) + list(root.glob("step_*.deleting")):
        step = step_of(root / leftover.name.split(".")[0])
        stale_tmp = leftover.suffix == ".tmp" and step is not None and step < newest_step
        if leftover.suffix == ".deleting" or stale_tmp:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    if removed:
        log("retention (checkpoint.keep_last / keep_every) removed " + ", ".join(p.name for p in sorted(removed)))
    return removed
