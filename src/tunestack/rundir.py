"""The run folder: the contract between stages, read and written here only.

Every stage writes a self-describing folder: `run.json` (stage, base model, options with secrets redacted, data
fingerprint, versions, metrics, status running -> complete | interrupted | failed), the weights, `metrics.jsonl`,
plots, TensorBoard events and `checkpoint-N/` folders. A checkpoint is built in `.staging/`, checked, stamped
with a completion marker and only then renamed into place, so resume never picks a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from tunestack.atomic import write_json_atomic
from tunestack.checkpoints import STAGING_DIR, checkpoint_dirs, latest_complete_checkpoint
from tunestack.errors import ConfigError, ModelError, TunestackError
from tunestack.locks import WriterLock

logger = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"
METRICS_FILE = "metrics.jsonl"
PIPELINE_STATE = "pipeline.json"  # a stage folder: the fingerprint it was run with; an output root: the last run
REDACTED = "<redacted>"
LOCK_FILE = ".tunestack.lock"
# Option names whose values are secrets: hub tokens, API keys, passwords.
_SECRET = re.compile(r"(^|_)token$|api_key|apikey|password|secret", re.IGNORECASE)
_LIBRARIES = ("tunestack", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def tunestack_home() -> Path:
    """Cache root for converted models and tokenized data (env TUNESTACK_HOME, default ~/.cache/tunestack)."""
    return Path(os.environ.get("TUNESTACK_HOME") or Path.home() / ".cache" / "tunestack").expanduser()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def redact(value: Any) -> Any:
    """`value` with the value of every secret-named field (at any depth) replaced by a placeholder."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if is_secret(str(k)) and v not in (None, "") else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# run.json and metrics.jsonl


def read_run_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RUN_MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: corrupt run manifest ({exc.msg})") from None
    return data if isinstance(data, dict) else None


def write_run_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(Path(folder) / RUN_MANIFEST, redact(manifest))


def append_metrics(folder: Path, row: dict[str, Any]) -> None:
    """One JSON line per logged step or evaluation; non-finite numbers are kept as strings ("nan")."""
    clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
    with open(Path(folder) / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(clean) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a run folder, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file of a run folder; a line cut by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(folder) / METRICS_FILE)


# ---------------------------------------------------------------------------------------------
# Whose folder it is


def is_tunestack_folder(folder: Path) -> bool:
    """Whether tunestack may write, clean or replace `folder`: it is absent or empty, or its run.json (or the
    pipeline's record, or a marked checkpoint) says tunestack wrote it."""
    folder = Path(folder)
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if not any(p.name != LOCK_FILE for p in folder.iterdir()):
        return True
    records = any((read_json(folder / name) or {}).get("stage") for name in (RUN_MANIFEST, PIPELINE_STATE))
    return records or any(complete for _, _, complete in checkpoint_dirs(folder))


def require_tunestack_folder(folder: Path, flag: str = "--output_dir") -> None:
    """ConfigError naming the folder and what is in it, unless tunestack may write there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file, not a folder")
    if is_tunestack_folder(folder):
        return
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise ConfigError(
        f"{flag} {folder} holds files tunestack did not write ({shown}); tunestack writes only into an empty "
        "folder or one of its own output folders: choose another folder"
    )


def claim_output_folder(output: Path, overwrite: bool, inputs: list[Path]) -> WriterLock:
    """The lock on a folder that a command builds whole and puts in place at the end (merge, export), after
    checking that it may: not one of its inputs, and empty or (with overwrite) an earlier tunestack output."""
    output = Path(output)
    resolved = output.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if resolved == folder or folder.is_relative_to(resolved):
            raise ConfigError(f"--output_dir {output} would replace the input {folder}; choose another folder")
    require_tunestack_folder(output)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"--output_dir {output} is not empty; pass --overwrite_output_dir to replace it")
    return WriterLock(output.with_name(f".{output.name}{LOCK_FILE}"), output).acquire()


def clear_run_folder(folder: Path) -> None:
    """Everything an earlier run left in its folder (weights, checkpoints, logs, plots), not the lock and not the
    pipeline's record of this run."""
    for child in Path(folder).iterdir():
        if child.name in (LOCK_FILE, PIPELINE_STATE):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def promote_final(staging: Path, folder: Path) -> None:
    """Move the files of a finished, checked final save from its staging folder into the run folder."""
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The output folder of one run


class OutputFolder:
    """Owns OUTPUT_DIR for one run: decides where training starts, and keeps run.json's status. Only the main
    process writes."""

    def __init__(self, path: str | Path, stage: str, is_main: bool = True):
        self.path = Path(path)
        self.stage = stage
        self.is_main = is_main
        self.created_here = False
        self.manifest: dict[str, Any] = {}
        self.lock: WriterLock | None = None

    def plan(self, resume: str | None, overwrite: bool) -> Path | None:
        """Take the folder (one writer at a time) and decide where training starts: the checkpoint to resume
        from, or None. Call it on the main process only.

        Raises ConfigError when the folder is another process's, holds files tunestack did not write, or holds
        another run and neither resume nor overwrite was asked.
        """
        require_tunestack_folder(self.path)
        self.created_here = not self.path.exists()
        self.lock = WriterLock(self.path / LOCK_FILE, self.path).acquire()
        try:
            return self._start(resume, overwrite)
        except ConfigError:
            self.release()
            raise

    def release(self) -> None:
        """Give up the folder (a folder this run created and left empty goes too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created_here and self.path.is_dir() and not any(p.name != LOCK_FILE for p in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    def _start(self, resume: str | None, overwrite: bool) -> Path | None:
        previous = read_run_manifest(self.path)
        checkpoints = checkpoint_dirs(self.path)
        if resume and resume.lower() not in ("false", "no", "0"):
            if resume.lower() in ("true", "yes", "1", "auto", "latest"):
                found = latest_complete_checkpoint(self.path)
                if found is None and resume.lower() != "auto":
                    raise ConfigError(f"--resume_from_checkpoint: no complete checkpoint-N folder in {self.path}")
                return found
            path = Path(resume)
            if not path.is_dir():
                raise ConfigError(f"--resume_from_checkpoint: {path} is not a folder")
            return path
        if overwrite:
            clear_run_folder(self.path)
            return None
        if checkpoints:
            raise ConfigError(
                f"{self.path} already holds checkpoints of a run; pass --resume_from_checkpoint true to continue it "
                "or --overwrite_output_dir to start over"
            )
        if previous is not None:
            raise ConfigError(
                f"{self.path} already holds a {previous.get('stage', '')} run ({previous.get('status')}); "
                "pass --overwrite_output_dir to replace it"
            )
        return None

    def begin(self, manifest: dict[str, Any]) -> None:
        self.manifest = {
            "stage": self.stage,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": library_versions(),
            **manifest,
        }
        if not self.is_main:
            return
        self.created_here = self.created_here or not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)
        self.write()

    def write(self) -> None:
        if self.is_main:
            write_run_manifest(self.path, self.manifest)

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.write()

    def fail(self, exc: BaseException) -> None:
        """The run stopped on an error: its folder is kept, the error in run.json and as the last metrics row."""
        error = f"{type(exc).__name__}: {exc}"
        if self.is_main and self.path.is_dir():
            append_metrics(self.path, {"error": error})
        self.finish("failed", error=error)

    def finish(self, status: str, **fields: Any) -> None:
        self.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self, reason: str) -> None:
        """A user error before any result: remove a folder this run created, else record the failure."""
        if not self.is_main or not self.path.exists():
            return
        if self.created_here and not checkpoint_dirs(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
            self.release()
        else:
            self.finish("failed", error=reason)

    @contextlib.contextmanager
    def running(self, manifest: dict[str, Any]) -> Iterator[OutputFolder]:
        """begin(); a user error inside abandons the run, a signal marks it interrupted, any other exception
        failed. The caller finishes it (complete or interrupted)."""
        self.begin(manifest)
        try:
            yield self
        except TunestackError as exc:
            self.abandon(str(exc))
            raise
        except KeyboardInterrupt:
            self.finish("interrupted", error="stopped by a signal")
            raise
        except BaseException as exc:
            self.fail(exc)
            raise
