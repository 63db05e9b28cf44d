"""Writes that a crash never leaves half-done: everything goes to a temporary name beside its target and is
renamed into place in one step once complete (files), or built in a hidden staging folder that replaces the
target when done (folders). Every tunestack writer of a result goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tunestack.locks import file_lock


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str, ensure_ascii=False))


def jsonl_text(rows: Iterable[Any]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    """One JSON object per line."""
    return write_text_atomic(path, jsonl_text(rows))


def commit_folder(staging: Path, final: Path) -> None:
    """Put a finished staging folder at `final`, replacing what is there (the old folder is moved aside first,
    so `final` is at every moment either the old or the new folder)."""
    if final.exists():
        aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, final)


def staging_prefix(final: Path, tag: str) -> str:
    return f".{final.name}.{tag}-{os.getpid()}-"


@contextlib.contextmanager
def staged_folder(final: str | Path, tag: str = "staging") -> Iterator[Path]:
    """A hidden sibling folder of `final` to build in: committed to `final` when the block ends normally,
    removed when it raises (or is interrupted)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(final, tag), dir=final.parent))
    try:
        yield staging
        commit_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path, tag: str = "staging") -> None:
    """Staging folders of `final` left by a process that was killed (their pid is gone)."""
    if not final.parent.is_dir():
        return
    head = f".{final.name}.{tag}-"
    for child in final.parent.iterdir():
        if not (child.name.startswith(head) and child.is_dir()):
            continue
        pid = child.name[len(head) :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(child, ignore_errors=True)


def build_once(target: str | Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """A cache folder made once for every process that asks at the same time (torchrun ranks, nodes sharing
    the cache): one builds it into a staging folder while the others wait for the lock, then all read it.
    A folder counts only when `complete` says so, checked before it is put in place; an incomplete one
    (left by an older version or a crash) is built again and replaced, never trusted."""
    target = Path(target)
    if complete(target):
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if complete(target):  # another process built it while this one waited
            return target
        with staged_folder(target, "building") as staging:
            build(staging)
            if not complete(staging):
                raise RuntimeError(f"building the cache folder {target} left it incomplete")
    return target
