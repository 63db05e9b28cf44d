"""The stage output folder: run.json manifest, resume discovery, no half-written folders."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError
from tunestack.model.load import RUN_MANIFEST, read_run_manifest
from tunestack.train.checkpoint import STAGING_DIR, checkpoint_dirs, latest_complete_checkpoint

_LIBRARIES = ("tunestack", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class OutputFolder:
    """Owns OUTPUT_DIR for one stage run. Only the main process writes."""

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
                for name in (RUN_MANIFEST, "metrics.jsonl", "loss.png", STAGING_DIR):
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
            write_json_atomic(self.path / RUN_MANIFEST, self.manifest)

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
