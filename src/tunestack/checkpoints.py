"""Checkpoints that a crash can never leave half-written where resume would find them, and the checks on
every save.

A checkpoint is written into `.staging/`, checked, stamped with a completion marker that lists its files and
their sizes (and the record of the run that wrote it), and only then renamed to `checkpoint-N`. Resume takes
the newest checkpoint whose marker is there and whose files are all there with their listed sizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunestack.atomic import commit_folder, write_json_atomic
from tunestack.errors import DiskFull, TunestackError, is_disk_full

logger = logging.getLogger(__name__)

MARKER = "tunestack_checkpoint.json"
STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _read_marker(checkpoint: Path) -> dict[str, Any]:
    try:
        data = json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint-N folder, by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child, (child / MARKER).exists()))
    return sorted(out)


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why a marked checkpoint cannot be trusted (a file missing or of another size than its marker lists)."""
    marker = _read_marker(checkpoint)
    for name, size in (marker.get("files") or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its marker says {size}"
    return None


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that is marked complete and whose files are all there, whole."""
    for _step, path, complete in reversed(checkpoint_dirs(output_dir)):
        if not complete:
            logger.warning("ignoring incomplete checkpoint %s (no %s)", path, MARKER)
            continue
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        logger.warning("ignoring damaged checkpoint %s (%s); falling back to the one before", path, damage)
    return None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def commit_checkpoint(staging: Path, final: Path, step: int, record: dict[str, Any] | None = None) -> None:
    """Mark a fully written staging checkpoint complete (its files and sizes listed, and the record of the run
    that wrote it, see resume_record) and move it into place."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
    _fsync_tree(staging)
    marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, "run": record}
    write_json_atomic(staging / MARKER, marker)
    commit_folder(staging, final)


class SaveCheckError(TunestackError):
    """A save that would be useless (empty or untrained adapter, missing config)."""

    exit_code = 1


def verify_saved_model(folder: Path, trained: bool) -> None:
    """Refuse a save that is empty, untrained or incomplete (a silent failure in other toolkits)."""
    folder = Path(folder)
    problems = []
    adapter = folder / "adapter_model.safetensors"
    config = folder / "adapter_config.json"
    if config.exists():
        if not adapter.exists() or adapter.stat().st_size < 256:
            problems.append(f"{adapter} is missing or empty")
        elif _empty_tensors(adapter):
            problems.append(
                f"{adapter}: {_empty_tensors(adapter)} of its tensors hold no values (the placeholders of "
                "ZeRO-3-partitioned weights, saved without gathering them)"
            )
        elif trained and json.loads(config.read_text()).get("peft_type") != "ADALORA" and _untrained(adapter):
            problems.append(f"{adapter}: every LoRA B matrix is zero, the adapter never trained")
    elif not (folder / "config.json").exists():
        problems.append(f"{folder}: no config.json or adapter_config.json was written")
    elif not any(folder.glob("*.safetensors")):
        problems.append(f"{folder}: no *.safetensors weights were written")
    if problems:
        raise SaveCheckError("save check failed: " + "; ".join(problems))


def _empty_tensors(adapter_file: Path) -> int:
    """How many tensors of a safetensors file are ZeRO-3 placeholders: one-dimensional with no elements (a
    rank AdaLoRA pruned away leaves a matrix with one zero dimension, which is a real, empty adapter part)."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), framework="pt") as fh:
        return sum(1 for k in fh.keys() if fh.get_slice(k).get_shape() == [0])


def _untrained(adapter_file: Path) -> bool:
    """True when every LoRA B matrix of the adapter file is zero (PEFT initialises B to zero)."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), framework="pt") as fh:
        keys = [k for k in fh.keys() if "lora_B" in k]
        return bool(keys) and all(not fh.get_tensor(k).any() for k in keys)


@contextlib.contextmanager
def saving(staging: Path, what: str) -> Iterator[None]:
    """A save into `staging`: when the disk fills up, what was written is removed (nothing half-written is ever
    promoted) and the error is one line saying where."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise DiskFull(
            f"no space left on device while writing {what} in {staging.parent}: it was discarded, earlier "
            "checkpoints are intact; free some space and resume with --resume_from_checkpoint true"
        ) from None
