"""The stage kinds a recipe may list, the command that runs each, and the options each accepts."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

# Options that name a model (a `${stage}` reference, a folder, a .gguf file or an alias).
MODEL_KEYS = (
    "model_name_or_path",
    "tokenizer_name_or_path",
    "reward_model",
    "ref_model",
    "lora_model",
    "base_model",
    "model",
    "tokenizer_path",
)
# Options that name data or config files: their content is part of the stage's fingerprint.
PATH_KEYS = (
    "train_file_dir",
    "validation_file_dir",
    "eval_file",
    "eval_text_dir",
    "probe_prompts",
    "data_file",
    "deepspeed",
    "model_config",
    "reward_funcs",
    "benchmark_dir",
    "replay_prompts",
    "drift_prompts",
)
# Keys of a recipe stage that belong to the pipeline, not to the stage command.
PIPELINE_KEYS = ("name", "stage", "nproc_per_node")
# Options the runner sets itself; they do not change what a stage produces.
RUNNER_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")


@dataclass(frozen=True)
class Kind:
    name: str
    command: str  # the tunestack sub-command
    target: str  # "module:Class" of a Stage, or "module:function" returning the option dataclasses
    model_key: str = "model_name_or_path"  # the option that takes the input model
    makes_policy: bool = True  # its output is a chat model that a later stage may start from
    resumable: bool = True  # takes --resume_from_checkpoint (writes checkpoint-N folders)
    fixed: tuple[tuple[str, Any], ...] = ()  # options implied by the kind (orpo = dpo with loss_type orpo)


_PT = "tunestack.train.pt:PretrainStage"
_SFT = "tunestack.train.sft:SupervisedStage"
_RM = "tunestack.train.rm:RewardModelStage"
_RL = "tunestack.train.rl:RLStage"
_DPO = "tunestack.train.dpo:DPOStage"
_KTO = "tunestack.train.kto:KTOStage"

KINDS: dict[str, Kind] = {
    "pt": Kind("pt", "pt", _PT),
    "sft": Kind("sft", "sft", _SFT),
    "rm": Kind("rm", "rm", _RM, makes_policy=False),
    "rl": Kind("rl", "rl", _RL),
    "ppo": Kind("ppo", "rl", _RL, fixed=(("algo", "ppo"),)),
    "grpo": Kind("grpo", "rl", _RL, fixed=(("algo", "grpo"),)),
    "rloo": Kind("rloo", "rl", _RL, fixed=(("algo", "rloo"),)),
    "dpo": Kind("dpo", "dpo", _DPO),
    "orpo": Kind("orpo", "dpo", _DPO, fixed=(("loss_type", "orpo"),)),
    "simpo": Kind("simpo", "dpo", _DPO, fixed=(("loss_type", "simpo"),)),
    "kto": Kind("kto", "kto", _KTO),
    "merge": Kind("merge", "merge", "tunestack.model.merge:MergeArguments", model_key="lora_model", resumable=False),
    "eval": Kind("eval", "eval", "tunestack.eval.command:argument_classes", makes_policy=False, resumable=False),
}


def _target(kind: Kind) -> Any:
    module, attr = kind.target.split(":")
    return getattr(importlib.import_module(module), attr)


def _is_stage(obj: Any) -> bool:
    return isinstance(obj, type) and not dataclasses.is_dataclass(obj)


@cache
def argument_classes(kind: Kind) -> tuple[type, ...]:
    """The option dataclasses of a kind's command (a stage's via train.base.stage_argument_classes)."""
    obj = _target(kind)
    if _is_stage(obj):
        from tunestack.train.base import stage_argument_classes

        return stage_argument_classes(obj())
    return (obj,) if isinstance(obj, type) else tuple(obj())


def parse_options(kind: Kind, argv: list[str]) -> None:
    """Parse argv as the kind's command would (a stage's own checks included); raises ConfigError.

    argparse reports a bad value by printing usage and exiting: that becomes its one-line message instead.
    """
    from tunestack.config.parse import parse_into
    from tunestack.errors import ConfigError

    obj = _target(kind)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            if _is_stage(obj):
                obj().parse(argv)
            else:
                parse_into(argument_classes(kind), argv, prog=f"tunestack {kind.command}")
    except SystemExit:
        lines = printed.getvalue().strip().splitlines() or ["invalid options"]
        raise ConfigError(lines[-1].split("error: ", 1)[-1]) from None


@cache
def field_types(kind: Kind) -> dict[str, Any]:
    """Option name -> type of every option the kind's command takes."""
    out: dict[str, Any] = {}
    for dc in argument_classes(kind):
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, f.type))
    return out


def accepts(kind: Kind, key: str) -> bool:
    return key in field_types(kind)


def all_option_names() -> set[str]:
    names: set[str] = set()
    for kind in KINDS.values():
        names |= set(field_types(kind))
    return names
