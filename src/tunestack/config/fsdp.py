"""FSDP through the flags tutorials pass: `--fsdp "full_shard auto_wrap"` and `--fsdp_config FILE`.

transformers 5 reads the words of `--fsdp` only with a deprecation warning (and drops them in 5.20); tunestack
turns them into `fsdp_config` entries itself, so the tutorial spelling keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError

WORDS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
FSDP1_ONLY = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")


def _config(fsdp_config: Any) -> dict[str, Any]:
    if fsdp_config is None:
        return {}
    if isinstance(fsdp_config, dict):
        return dict(fsdp_config)
    text = str(fsdp_config).strip()
    try:
        data = json.loads(text) if text.startswith("{") else json.loads(Path(text).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--fsdp_config {text}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--fsdp_config {text}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--fsdp_config {text}: expected a JSON object of FSDP settings")
    # Accept accelerate's spelling of the keys (fsdp_version, fsdp_state_dict_type ...) too.
    return {k[5:] if k.startswith("fsdp_") else k: v for k, v in data.items()}


def fsdp_settings(fsdp: Any, fsdp_config: Any) -> tuple[bool | None, dict[str, Any] | None]:
    """(fsdp, fsdp_config) for transformers: FSDP on (True) with the words of `--fsdp` as config entries."""
    if fsdp in (None, False, "", [], "false", "False", "no"):
        return None, fsdp_config if fsdp_config is None else _config(fsdp_config)
    config = _config(fsdp_config)
    words = fsdp.split() if isinstance(fsdp, str) else [str(w) for w in fsdp] if isinstance(fsdp, list) else []
    words = [w.lower() for w in words if w.lower() not in ("true", "1", "yes")]
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        raise ConfigError(f"--fsdp {fsdp}: unknown word '{unknown[0]}'; use {', '.join(WORDS)}")
    version = int(config.get("version", 2))
    for word in words:
        if word == "offload":
            config.setdefault("cpu_offload", True)
        elif word == "auto_wrap":
            continue  # transformers wraps every decoder layer by default
        elif version == 2 and word in FSDP1_ONLY:
            raise ConfigError(
                f"--fsdp {word} exists only in FSDP1 (deprecated); use full_shard or shard_grad_op, or set "
                '"version": 1 in --fsdp_config'
            )
        elif version == 2:
            config.setdefault("reshard_after_forward", word == "full_shard")
        else:
            config.setdefault("reshard_after_forward", word)
    return True, config
