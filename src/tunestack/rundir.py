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

from tunestack.atomic import commit_folder, write_json_atomic
from tunestack.errors import ConfigError, ModelError, TunestackError

logger = logging.getLogger(__name__)

RUN_MANIFEST = "run.json"
METRICS_FILE = "metrics.jsonl"
PIPELINE_STATE = "pipeline.json"  # a stage folder: the fingerprint it was run with; an output root: the last run
MARKER = "tunestack_checkpoint.json"
STAGING_DIR = ".staging"
REDACTED = "<redacted>"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
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
# Checkpoints


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
    """Mark a fully written staging checkpoint complete (its files and sizes listed) and move it into place."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in staging.rglob("*") if p.is_file()}
    _fsync_tree(staging)
    marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
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
        elif trained and json.loads(config.read_text()).get("peft_type") != "ADALORA" and _untrained(adapter):
            problems.append(f"{adapter}: every LoRA B matrix is zero, the adapter never trained")
    elif not (folder / "config.json").exists():
        problems.append(f"{folder}: no config.json or adapter_config.json was written")
    elif not any(folder.glob("*.safetensors")):
        problems.append(f"{folder}: no *.safetensors weights were written")
    if problems:
        raise SaveCheckError("save check failed: " + "; ".join(problems))


def _untrained(adapter_file: Path) -> bool:
    """True when every LoRA B matrix of the adapter file is zero (PEFT initialises B to zero)."""
    from safetensors import safe_open

    with safe_open(str(adapter_file), framework="pt") as fh:
        keys = [k for k in fh.keys() if "lora_B" in k]
        return bool(keys) and all(not fh.get_tensor(k).any() for k in keys)


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

    def plan(self, resume: str | None, overwrite: bool) -> Path | None:
        """Decide where training starts. Returns the checkpoint to resume from, or None.

        Raises ConfigError when the folder holds another run and neither resume nor overwrite was asked.
        """
        previous = read_run_manifest(self.path) if self.path.is_dir() else None
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
            if self.is_main:
                for _, ckpt, _ in checkpoints:
                    shutil.rmtree(ckpt)
                for name in (RUN_MANIFEST, METRICS_FILE, "loss.png", STAGING_DIR):
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
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
        self.created_here = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)
        self.write()

    def write(self) -> None:
        if self.is_main:
            write_run_manifest(self.path, self.manifest)

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.write()

    def finish(self, status: str, **fields: Any) -> None:
        self.update(status=status, finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **fields)

    def abandon(self, reason: str) -> None:
        """A user error before any result: remove a folder this run created, else record the failure."""
        if not self.is_main or not self.path.exists():
            return
        if self.created_here and not checkpoint_dirs(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.finish("failed", error=reason)

    @contextlib.contextmanager
    def running(self, manifest: dict[str, Any]) -> Iterator[OutputFolder]:
        """begin(); a user error inside abandons the run, any other exception marks it failed. The caller
        finishes it (complete or interrupted)."""
        self.begin(manifest)
        try:
            yield self
        except TunestackError as exc:
            self.abandon(str(exc))
            raise
        except BaseException as exc:
            self.finish("failed", error=f"{type(exc).__name__}: {exc}")
            raise
