"""Turn a YAML recipe and/or command-line flags into the stage's dataclasses.

Flags use the names of transformers.HfArgumentParser (so every TrainingArguments flag works);
a YAML/JSON file given first supplies the same keys, and flags after it override them. Every
problem is collected and reported at once as a ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from tunestack.errors import ConfigError

# Old or alternative flag spellings found in tutorial scripts (MedicalGPT 2024 and 2026) -> the name tunestack uses.
FLAG_ALIASES = {
    "dtype": "torch_dtype",
    "neft_alpha": "neftune_noise_alpha",
    "reward_model_name_or_path": "reward_model",
    "reward_model_path": "reward_model",
    "sft_model_path": "model_name_or_path",
    "max_completion_length": "max_target_length",
    "lora_r": "lora_rank",
    "lora_target_modules": "target_modules",
    "train_samples": "max_train_samples",
}
# Aliases whose value wins over the canonical flag when both are given: MedicalGPT's PPO script passes
# --sft_model_path (the policy it trains) and --model_name_or_path (unused by it).
WINNING_ALIASES = ("sft_model_path",)
# Flags whose value may be a space-separated list (MedicalGPT's --lora_target_modules q_proj k_proj ...).
SPACE_LISTS = ("target_modules", "lora_target_modules")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: key '{key}' is given twice in this mapping "
                    f"(first on line {seen[key]}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"key '{twice[0]}' is given twice in one object; keep one")
    return dict(pairs)


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        else:
            loader = _UniqueKeyLoader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except ConfigError as exc:
        raise ConfigError(exc.problems if path.suffix != ".json" else f"{path}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def option_types(dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """Option name -> type of every field of the dataclasses (the first class to have a name wins)."""
    out: dict[str, Any] = {}
    for dc in dataclass_types:
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, f.type))
    return out


def _is_str_type(tp: Any) -> bool:
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    return str in args and not any(typing.get_origin(a) is list for a in args)


def mapping_to_argv(options: dict[str, Any], field_types: dict[str, Any]) -> list[str]:
    """Recipe keys -> flags. Lists become a comma string for str options, repeated values otherwise."""
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv += [flag, str(value).lower()]
        elif isinstance(value, (list, tuple)):
            if _is_str_type(field_types.get(FLAG_ALIASES.get(key, key))):
                argv += [flag, ",".join(str(v) for v in value)]
            else:
                argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _flag_name(tok: str) -> str | None:
    return tok[2:].partition("=")[0] if tok.startswith("--") else None


def _drop_flag(argv: list[str], name: str) -> list[str]:
    """argv without every `--name value` / `--name=value`."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            if not tok.startswith("--"):
                continue
        if _flag_name(tok) == name:
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def _apply_aliases(argv: list[str], known: set[str]) -> list[str]:
    for alias in WINNING_ALIASES:
        if alias not in known and any(_flag_name(t) == alias for t in argv):
            argv = _drop_flag(argv, FLAG_ALIASES[alias])
    out: list[str] = []
    values = -1  # values taken so far by a space-separated list flag (-1: not in one)
    for tok in argv:
        name = _flag_name(tok)
        if values >= 0 and name is None:
            if values:
                out[-1] += "," + tok  # q_proj k_proj v_proj -> q_proj,k_proj,v_proj
            else:
                out.append(tok)
            values += 1
            continue
        values = -1
        if name is not None:
            _, eq, value = tok[2:].partition("=")
            values = 0 if name in SPACE_LISTS and not eq else -1
            if name not in known and name in FLAG_ALIASES:
                tok = f"--{FLAG_ALIASES[name]}{eq}{value}"
        out.append(tok)
    return out


def _unknown_flag_problems(remaining: list[str], known: set[str]) -> list[str]:
    problems = []
    for tok in remaining:
        if not tok.startswith("--"):
            continue
        name = tok[2:].split("=", 1)[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        problems.append(f"unknown option --{name}{hint}")
    stray = [t for t in remaining if not t.startswith("--")]
    if stray and not problems:
        problems.append(f"unexpected arguments: {' '.join(stray)}")
    return problems


def parse_into(dataclass_types: tuple[type, ...], argv: list[str], prog: str, description: str = "") -> list[Any]:
    """Parse `[recipe.yaml] [--flag value ...]` into instances of `dataclass_types` (in order).

    Raises ConfigError listing every unknown flag and every problem reported by the
    dataclasses' `problems()` methods.
    """
    field_types = option_types(dataclass_types)
    known = set(field_types)
    argv = list(argv)
    prefix: list[str] = []
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        recipe = load_recipe_file(argv.pop(0))
        unknown = [k for k in recipe if k not in known and k not in FLAG_ALIASES]
        if unknown:
            raise ConfigError(_unknown_flag_problems([f"--{k}" for k in unknown], known))
        prefix = mapping_to_argv(recipe, field_types)
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    try:
        *objs, remaining = parser.parse_args_into_dataclasses(
            args=_apply_aliases(prefix + argv, known), return_remaining_strings=True
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    problems = _unknown_flag_problems(remaining, known)
    for obj in objs:
        check = getattr(obj, "problems", None)
        if callable(check):
            problems += check()
    if problems:
        raise ConfigError(problems)
    return objs


def hub_dataset_problem(dataset_name: str | None) -> list[str]:
    """The problem with a --dataset_name (hub datasets are never fetched), or none."""
    if not dataset_name:
        return []
    return [
        f"--dataset_name {dataset_name}: tunestack runs offline and does not fetch hub datasets; "
        "download it once and pass the files with --train_file_dir"
    ]


def print_help(dataclass_types: tuple[type, ...], prog: str, description: str) -> None:
    HfArgumentParser(dataclass_types, prog=prog, description=description).print_help(sys.stdout)


def to_jsonable(obj: Any) -> Any:
    """Dataclass -> plain dict for run.json (TrainingArguments has its own to_dict)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {k: v for k, v in dataclasses.asdict(obj).items()}
