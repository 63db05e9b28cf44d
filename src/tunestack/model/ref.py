"""Resolve a model reference, offline, to a base model plus the adapters to stack on it.

A reference is one of: a built-in alias (the embedded SmolLM2), a local Hugging Face folder, a `.gguf` file,
a tunestack stage output folder (its run.json names the base; an adapter in it is stacked on that base), a
bare PEFT adapter folder, or a model already in the local Hugging Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.errors import ModelError
from tunestack.model.adapters import adapter_config
from tunestack.model.builtin import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_dir
from tunestack.rundir import read_run_manifest

_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


@dataclass
class ModelRef:
    """Where the weights are: a base (HF folder or GGUF) plus adapters to stack, base first."""

    reference: str
    base_dir: Path
    gguf_file: str | None = None
    adapters: list[Path] = field(default_factory=list)
    run_info: dict[str, Any] | None = None

    @property
    def tokenizer_dir(self) -> Path:
        """The newest folder in the stack that carries tokenizer files (stages save theirs)."""
        for folder in reversed(self.adapters):
            if (folder / "tokenizer_config.json").exists():
                return folder
        return self.base_dir

    @property
    def head_dir(self) -> Path:
        return self.adapters[-1] if self.adapters else self.base_dir


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(
        any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json")
    )


def _not_found(reference: str) -> ModelError:
    aliases = ", ".join(BUILTIN_MODELS)
    return ModelError(
        f"model '{reference}' not found: it is not a local folder or .gguf file, not a built-in alias ({aliases}), "
        "and not in the local Hugging Face cache. tunestack runs offline: download it once "
        f"(e.g. `hf download {reference} --local-dir models/{reference.split('/')[-1]}`) and pass that folder"
    )


def resolve_model(reference: str | None, _seen: tuple[str, ...] = ()) -> ModelRef:
    """Resolve a model reference to a base folder and an adapter stack. Raises ModelError."""
    reference = reference or DEFAULT_MODEL
    if reference in _seen:
        raise ModelError(f"model reference cycle: {' -> '.join((*_seen, reference))}")
    if reference in BUILTIN_MODELS:
        return ModelRef(reference, builtin_model_dir(reference))
    path = Path(reference).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: a model file must be .gguf; otherwise pass the model's folder")
        return ModelRef(reference, path.parent, gguf_file=path.name)
    if path.is_dir():
        manifest = read_run_manifest(path)
        if manifest is not None and manifest.get("status") != "complete":
            raise ModelError(
                f"the run in {path} has not finished (status {manifest.get('status')}): resume it, or name a "
                "checkpoint-N folder"
            )
        if manifest is None and _CHECKPOINT.match(path.name):
            manifest = read_run_manifest(path.parent)  # a checkpoint stacks on the base of its run
        if (path / "adapter_config.json").exists():
            base = (manifest or {}).get("base_model") or _adapter_base(path)
            parent = resolve_model(str(base), (*_seen, reference))
            return ModelRef(reference, parent.base_dir, parent.gguf_file, [*parent.adapters, path], manifest)
        if _has_weights(path):
            return ModelRef(reference, path, run_info=manifest)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(reference, path, gguf_file=ggufs[0].name)
        raise ModelError(
            f"{path}: no model weights (config.json + *.safetensors), adapter or .gguf file in this folder"
        )
    if os.sep in reference and (reference.startswith((".", "/", "~")) or reference.count("/") > 1):
        raise ModelError(
            f"model path does not exist: {reference}. tunestack runs offline: pass a local folder, a .gguf file "
            f"or the built-in {DEFAULT_MODEL}; download other models once (e.g. `hf download ORG/NAME --local-dir DIR`)"
        )
    cached = _hub_cache_dir(reference)
    if cached is None:
        raise _not_found(reference)
    return ModelRef(reference, cached)


def _adapter_base(adapter_dir: Path) -> str:
    base = (adapter_config(adapter_dir) or {}).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: adapter without a base model; pass the base with --model_name_or_path")
    return base


def _hub_cache_dir(repo_id: str) -> Path | None:
    """A model already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss or malformed id means: not available offline
        return None


def resolve_stack(reference: str | None = None, adapter: str | None = None) -> ModelRef:
    """The model to load from MedicalGPT-style flags.

    `reference` alone is any model reference (see `resolve_model`). With `adapter`, the adapter is
    stacked on `reference` when given (MedicalGPT's --base_model + --lora_model), else on the base
    recorded in the adapter's run.json / adapter_config.json.
    """
    if not adapter:
        return resolve_model(reference)
    adapter_dir = Path(adapter).expanduser()
    if not adapter_dir.is_dir():
        raise ModelError(f"adapter folder does not exist: {adapter}")
    is_adapter = (adapter_dir / "adapter_config.json").exists()
    if reference is None:
        try:
            return resolve_model(adapter)
        except ModelError as exc:
            if is_adapter:
                raise ModelError(f"{exc}; or pass the base model with --base_model") from None
            raise
    if not is_adapter:
        raise ModelError(f"{adapter_dir}: no adapter_config.json, so it is not an adapter to put on {reference}")
    base = resolve_model(reference)
    return ModelRef(
        adapter, base.base_dir, base.gguf_file, [*base.adapters, adapter_dir], read_run_manifest(adapter_dir)
    )


def training_system_prompt(ref: ModelRef) -> str | None:
    """The system prompt the newest stage of the stack trained with (run.json), so chat and merge keep it."""
    for folder in [*reversed(ref.adapters), ref.base_dir]:
        manifest = read_run_manifest(folder) or {}
        data_options = (manifest.get("options") or {}).get("data") or {}
        found = data_options.get("system_prompt") or manifest.get("system_prompt")
        if found:
            return str(found)
    return None


def root_base(reference: str) -> str:
    """The model at the bottom of a stage output's run.json chain (the alias or folder training started from)."""
    seen = set()
    while reference not in seen:
        seen.add(reference)
        path = Path(reference).expanduser()
        manifest = read_run_manifest(path) if path.is_dir() else None
        if not manifest or not manifest.get("base_model"):
            return reference
        reference = str(manifest["base_model"])
    return reference
