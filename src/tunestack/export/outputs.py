"""Which files in an export folder tunestack wrote, so that an export replaces only its own earlier files.

`export.json` in the output folder lists every file an export wrote there (with its size and what it holds). A
file about to be written may replace a file of that name only when the manifest lists it with the same size, i.e.
an earlier export that nobody changed since; anything else is refused (exit 2) and left alone. Files are written
under a hidden temporary name and moved into place with os.replace after the manifest lists them, so a crash
leaves either the old file or the new one, never a half-written one under the real name.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tunestack.atomic import write_json_atomic
from tunestack.errors import ConfigError

MANIFEST = "export.json"
TOOL = "tunestack export"


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        return {"tool": TOOL, "files": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL or not isinstance(manifest.get("files"), dict):
        raise ConfigError(f"{path} exists and was not written by tunestack export; choose another --output_dir")
    return manifest


def check_replaceable(folder: Path, names: list[str]) -> None:
    """ConfigError unless each of `names` in `folder` is absent or an unchanged file of an earlier export."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output_dir {folder} is a file")
    manifest = read_manifest(folder)
    for name in names:
        path = folder / name
        if not path.exists() and not path.is_symlink():
            continue
        entry = manifest["files"].get(name)
        if entry is None or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            raise ConfigError(
                f"{path} exists and is not a file an earlier tunestack export wrote; remove it or choose another "
                "--output_dir"
            )


def temporary_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.tmp-{os.getpid()}"


def commit(folder: Path, written: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    """Record the files in the manifest, then move each temporary file to its name."""
    manifest = read_manifest(folder)
    for name, (tmp, info) in written.items():
        manifest["files"][name] = {"bytes": tmp.stat().st_size, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_json_atomic(folder / MANIFEST, manifest)
    for name, (tmp, _) in written.items():
        os.replace(tmp, folder / name)
