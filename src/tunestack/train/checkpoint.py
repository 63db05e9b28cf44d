"""Checkpoints that a crash can never leave half-written where resume would find them.

A checkpoint is written into a staging folder, checked, stamped with a completion marker, and
only then renamed to `checkpoint-N`. Resume picks the newest folder that carries the marker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tunestack.errors import TunestackError

logger = logging.getLogger(__name__)

MARKER = "tunestack_checkpoint.json"
STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class SaveCheckError(TunestackError):
    """A save that would be useless (empty or untrained adapter, missing config)."""

    exit_code = 1


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every checkpoint-N folder, by step."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child, (child / MARKER).exists()))
    return sorted(out)


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    for _step, path, complete in reversed(checkpoint_dirs(output_dir)):
        if complete:
            return path
        logger.warning("ignoring incomplete checkpoint %s (no %s)", path, MARKER)
    return None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def commit_checkpoint(staging: Path, final: Path, step: int) -> None:
    """Mark a fully written staging checkpoint complete and move it into place."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
    _fsync_tree(staging)
    marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    tmp = staging / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, staging / MARKER)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def verify_saved_model(folder: Path, model: Any, trained: bool) -> None:
    """Refuse a save that is empty, untrained or incomplete (a silent failure in other toolkits)."""
    from tunestack.model.adapters import lora_b_all_zero

    problems = []
    adapter = folder / "adapter_model.safetensors"
    if (folder / "adapter_config.json").exists():
        if not adapter.exists() or adapter.stat().st_size < 256:
            problems.append(f"{adapter} is missing or empty")
        elif trained and not _is_adalora_config(folder):
            from safetensors.torch import load_file

            if lora_b_all_zero(load_file(adapter)):
                problems.append(f"{adapter}: every LoRA B matrix is zero, the adapter never trained")
    elif not (folder / "config.json").exists():
        problems.append(f"{folder}: no config.json or adapter_config.json was written")
    elif not any(folder.glob("*.safetensors")):
        problems.append(f"{folder}: no *.safetensors weights were written")
    if problems:
        raise SaveCheckError("save check failed: " + "; ".join(problems))


def _is_adalora_config(folder: Path) -> bool:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("peft_type") == "ADALORA"
    except (OSError, json.JSONDecodeError):
        return False
