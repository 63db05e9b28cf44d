"""The stage kinds a recipe may list, the command that runs each, and the options each accepts."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cache
from typing import Any

from tunestack.cli import COMMANDS, Command, resolve
from tunestack.config.parse import option_types

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
PIPELINE_KEYS = (
    "name", "stage", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "allow_outside_root"
)  # fmt: skip
# The launch keys of a stage (torchrun's flags), also accepted in a recipe's defaults.
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")
# Options the runner sets itself; they do not change what a stage produces.
RUNNER_KEYS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint")


@dataclass(frozen=True)
class Kind:
    """A stage kind of a recipe: a tunestack command (tunestack.cli.COMMANDS), possibly with fixed options."""

    name: str
    command: str  # the tunestack sub-command
    model_key: str = "model_name_or_path"  # the option that takes the input model
    makes_policy: bool = True  # its output is a chat model that a later stage may start from
    resumable: bool = True  # a training stage: takes --resume_from_checkpoint (writes checkpoint-N folders)
    fixed: tuple[tuple[str, Any], ...] = ()  # options implied by the kind (orpo = dpo with loss_type orpo)

    @property
    def spec(self) -> Command:
        return COMMANDS[self.command]


def _kinds() -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for name, command in COMMANDS.items():
        if command.stage is None and command.options is None:
            continue
        common = dict(
            command=name,
            model_key=command.model_key,
            makes_policy=command.makes_policy,
            resumable=command.stage is not None,
        )
        kinds[name] = Kind(name, **common)
        for variant, fixed in command.variants:
            kinds[variant] = Kind(variant, fixed=fixed, **common)
    return kinds


KINDS: dict[str, Kind] = _kinds()


@cache
def argument_classes(kind: Kind) -> tuple[type, ...]:
    """The option dataclasses of a kind's command."""
    spec = kind.spec
    return resolve(spec.stage).option_classes() if spec.stage else tuple(resolve(spec.options)())


def parse_options(kind: Kind, argv: list[str]) -> None:
    """Parse argv as the kind's command would (a stage's own checks included); raises ConfigError.

    argparse reports a bad value by printing usage and exiting: that becomes its one-line message instead.
    """
    from tunestack.config.parse import parse_into
    from tunestack.errors import ConfigError

    spec = kind.spec
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            if spec.stage:
                resolve(spec.stage)().parse(argv)
            else:
                parse_into(argument_classes(kind), argv, prog=f"tunestack {kind.command}")
    except SystemExit:
        lines = printed.getvalue().strip().splitlines() or ["invalid options"]
        raise ConfigError(lines[-1].split("error: ", 1)[-1]) from None


@cache
def field_types(kind: Kind) -> dict[str, Any]:
    """Option name -> type of every option the kind's command takes."""
    return option_types(argument_classes(kind))


def accepts(kind: Kind, key: str) -> bool:
    return key in field_types(kind)


def all_option_names() -> set[str]:
    names: set[str] = set()
    for kind in KINDS.values():
        names |= set(field_types(kind))
    return names
