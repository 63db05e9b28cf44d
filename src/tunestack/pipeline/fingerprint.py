"""A stage's fingerprint: what it would produce, computed from files only (so every process agrees on it).

It covers the stage's options, the fingerprints of the stages it reads (or, for a model outside the recipe, its
config and weight files' names, sizes and modification times, or the alias name), the content (sha256) of its
data and config files, and the tunestack version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError
from tunestack.pipeline.kinds import MODEL_KEYS, PATH_KEYS, RUNNER_KEYS
from tunestack.pipeline.recipe import REFERENCE, StageSpec

_MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf", "adapter_config.json", "adapter_model.*")


def _parts(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [p.strip() for p in str(value).split(",") if p.strip()]


def hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's non-hidden files (relative names and bytes), recursively."""
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    )
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_signature(key: str, value: Any) -> dict[str, str]:
    """{path: content hash} of the files an option names; a missing path is a ConfigError."""
    if key == "deepspeed":  # a shipped config's name, a file, or the settings themselves
        from tunestack.config.deepspeed import resolve_deepspeed

        resolved = resolve_deepspeed(json.dumps(value) if isinstance(value, dict) else value)
        if isinstance(resolved, dict):
            return {"inline": hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]}
        return {str(value): hash_path(Path(resolved))} if resolved else {}
    out = {}
    for part in _parts(value):
        if REFERENCE.search(part) or part.lower() in ("none", "no", "false"):
            continue
        candidate = part
        if key == "reward_funcs" and ":" in part:
            candidate = part.rsplit(":", 1)[0]
            if not candidate.endswith(".py"):
                out[part] = "module"  # an importable module:function; its code is not hashed
                continue
        path = Path(candidate).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}: {candidate} does not exist")
        out[part] = hash_path(path)
    return out


def model_signature(value: Any) -> dict[str, str]:
    """A model outside the recipe: alias name, or its config/weight files' names, sizes and mtimes."""
    from tunestack.model.builtin import BUILTIN_MODELS

    out = {}
    for part in _parts(value):
        if REFERENCE.search(part):
            continue
        path = Path(part).expanduser()
        if part in BUILTIN_MODELS:
            out[part] = f"builtin:{part}"
        elif path.is_file():
            stat = path.stat()
            out[part] = f"{stat.st_size}:{stat.st_mtime_ns}"
        elif path.is_dir():
            files = sorted({f for pattern in _MODEL_FILES for f in path.glob(pattern) if f.is_file()})
            h = hashlib.sha256()
            for f in files:
                stat = f.stat()
                h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            out[part] = h.hexdigest()[:16]
        else:
            out[part] = f"name:{part}"  # a model in the Hugging Face cache, or a missing one (the stage says so)
    return out


def fingerprint(spec: StageSpec, upstream: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, the parts it was made of) of a stage, given its upstream stages' fingerprints."""
    from tunestack import __version__

    options = {k: spec.options[k] for k in sorted(spec.options) if k not in RUNNER_KEYS}
    parts: dict[str, Any] = {
        "kind": spec.kind.name,
        "options": options,
        "nproc_per_node": spec.nproc_per_node,
        "inputs": {ref: upstream[ref] for ref in spec.refs},
        "models": {k: model_signature(v) for k, v in options.items() if k in MODEL_KEYS and v is not None},
        "data": {k: data_signature(k, v) for k, v in options.items() if k in PATH_KEYS and v is not None},
        "version": __version__,
    }
    if spec.nnodes > 1:  # how many processes train (not which node this is): part of what the stage makes
        parts["nnodes"] = spec.nnodes
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16], parts


def what_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A short reason why a stage's fingerprint changed, e.g. 'options changed (learning_rate)'."""
    if not old:
        return "its output was not made by this pipeline"
    reasons = []
    if old.get("kind") != new["kind"]:
        reasons.append("stage kind changed")
    old_opts, new_opts = old.get("options", {}), new["options"]
    changed = sorted(k for k in set(old_opts) | set(new_opts) if old_opts.get(k) != new_opts.get(k))
    if changed:
        reasons.append(f"options changed ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''})")
    if old.get("nproc_per_node") != new["nproc_per_node"]:
        reasons.append("nproc_per_node changed")
    if old.get("nnodes", 1) != new.get("nnodes", 1):
        reasons.append("nnodes changed")
    old_data = old.get("data", {})
    if old_data != new["data"]:
        keys = sorted(k for k in set(old_data) | set(new["data"]) if old_data.get(k) != new["data"].get(k))
        reasons.append(f"data changed ({', '.join(keys)})")
    if old.get("inputs") != new["inputs"] or old.get("models") != new["models"]:
        reasons.append("input model changed")
    if old.get("version") != new["version"]:
        reasons.append(f"tunestack {old.get('version')} -> {new['version']}")
    return "; ".join(reasons) or "fingerprint changed"
