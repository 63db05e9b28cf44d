"""DeepSpeed by name: the ZeRO configs tunestack ships, the names other toolkits' scripts use for them, and a
one-line reason when DeepSpeed cannot start.

`--deepspeed` takes a name (`zero0` ... `zero3_offload`; xtuner's `deepspeed_zero2` ...), a JSON file, or the
JSON text itself (what a recipe's mapping becomes). Every shipped config leaves batch sizes, gradient clipping,
precision and the optimizer's settings "auto", so the Trainer fills them from the usual flags.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError

logger = logging.getLogger("tunestack")

CONFIG_DIR = Path(__file__).with_name("deepspeed_configs")
NAMES = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
# xtuner's names, and the file names LLaMA-Factory and MedicalGPT scripts pass (used when no such file exists).
ALIASES = {
    **{f"deepspeed_{name}": name for name in NAMES},
    "ds_z0_config.json": "zero0",
    "ds_z2_config.json": "zero2",
    "ds_z2_offload_config.json": "zero2_offload",
    "ds_z3_config.json": "zero3",
    "ds_z3_offload_config.json": "zero3_offload",
    "zero1.json": "zero1",
    "zero2.json": "zero2",
    "zero3.json": "zero3",
    "deepspeed_zero_stage2_config.json": "zero2",
    "deepspeed_zero_stage3_config.json": "zero3",
}
MIN_VERSION = "0.9.3"  # what transformers' DeepSpeed integration requires
HELP = (
    "DeepSpeed ZeRO: a name (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload; also deepspeed_zero1 ... "
    "and ds_z3_config.json / zero2.json ...) for the configs tunestack ships, or a DeepSpeed JSON file. "
    "Needs the deepspeed package (pip install 'tunestack[deepspeed]')."
)


def shipped_config(name: str) -> Path:
    return CONFIG_DIR / f"{name}.json"


def config_name(value: str) -> str | None:
    """The shipped config a name (or a tutorial's file name) stands for, if any."""
    key = value.strip().lower()
    if key in NAMES:
        return key
    return ALIASES.get(key) or ALIASES.get(Path(key).name)


def _read_json(path: Path, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object of DeepSpeed settings")
    return data


def resolve_deepspeed(value: Any) -> str | dict[str, Any] | None:
    """The path (or dict) transformers gets for a `--deepspeed` value; ConfigError for a bad one."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text or text.lower() in ("none", "false", "no"):
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--deepspeed: the inline JSON is not valid (column {exc.colno}: {exc.msg})") from None
        return data
    path = Path(text).expanduser()
    if path.is_file():
        _read_json(path, "--deepspeed")
        return str(path)
    name = config_name(text)
    if name is None:
        raise ConfigError(
            f"--deepspeed {text}: no such file, and not a config name; names: {', '.join(NAMES)} "
            "(also deepspeed_zero1 ... deepspeed_zero3_offload), or give a DeepSpeed JSON file"
        )
    if path.suffix == ".json":  # a tutorial's file name: say which config stands in for it
        logger.info("--deepspeed %s: no such file here, using tunestack's %s config", text, name)
    return str(shipped_config(name))


def zero_stage(config: str | dict[str, Any] | None) -> int | None:
    """The ZeRO stage of a resolved config (None without DeepSpeed)."""
    if config is None:
        return None
    data = config if isinstance(config, dict) else _read_json(Path(config), "--deepspeed")
    stage = (data.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def deepspeed_problem() -> str | None:
    """Why DeepSpeed cannot start in this environment (not installed, too old, or failing to import), or None."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed: pip install 'tunestack[deepspeed]' (or pip install deepspeed)"
    from packaging.version import Version

    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "the deepspeed module has no package metadata; reinstall it: pip install --force-reinstall deepspeed"
    if Version(version) < Version(MIN_VERSION):
        return f"DeepSpeed {version} is too old (transformers needs >= {MIN_VERSION}): pip install -U deepspeed"
    try:
        import deepspeed  # noqa: F401 - importing is the check (it fails on a broken build or a missing toolkit)
    except Exception as exc:  # noqa: BLE001 - whatever the reason, the user gets its first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"DeepSpeed {version} does not start here ({type(exc).__name__}: {first})"
    return None


def check_deepspeed(value: Any, fsdp: Any) -> str | dict[str, Any] | None:
    """resolve_deepspeed, plus the reasons a run with it cannot start (one ConfigError listing them)."""
    resolved = resolve_deepspeed(value)
    if resolved is None:
        return None
    problems = []
    if fsdp:
        problems.append("--deepspeed and --fsdp both shard the model: choose one")
    problem = deepspeed_problem()
    if problem:
        problems.append(f"--deepspeed {value}: {problem}")
    if problems:
        raise ConfigError(problems)
    return resolved


def fill_auto(
    config: dict[str, Any],
    *,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    max_grad_norm: float,
    bf16: bool,
    fp16: bool,
    learning_rate: float,
    weight_decay: float,
    hidden_size: int,
) -> dict[str, Any]:
    """A copy of `config` with its "auto" values set as transformers' Trainer sets them (for a loop of our own)."""
    import copy

    out = copy.deepcopy(config)
    top = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in top.items():
        if out.get(key) == "auto":
            out[key] = value
    for key, enabled in (("bf16", bf16), ("fp16", fp16)):
        if isinstance(out.get(key), dict) and out[key].get("enabled") == "auto":
            out[key]["enabled"] = enabled
    params = (out.get("optimizer") or {}).get("params") or {}
    optimizer = {"lr": learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay}
    for key, value in optimizer.items():
        if params.get(key) == "auto":
            params[key] = value
    zero = out.get("zero_optimization") or {}
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    left = sorted(_auto_keys(out))
    if left:
        raise ConfigError(f"--deepspeed: tunestack cannot fill these 'auto' values here: {', '.join(left)}")
    return out


def _auto_keys(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if value == "auto" else []
