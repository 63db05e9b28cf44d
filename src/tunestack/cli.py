"""`tunestack <command> [recipe.yaml] [--flags]`: parse the command, dispatch, turn user errors into exit code 2."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

# Offline always: nothing is fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# torch's CPU allocator: blocks of 2 MB and more page-aligned and advised to use transparent huge pages.
# A CPU training step allocates and frees gigabytes of activations; with glibc's default placement its peak RSS
# stood ~2 GB above the live tensors. Measured on SmolLM2 LoRA (bench/README.md): peak RSS 5.5 -> 3.9 GB in SFT
# and 7.9 -> 6.3 GB in DPO, steps no slower. torch reads it once, at its first allocation, so it is set before
# torch is imported; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
if sys.platform.startswith("linux"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# PEFT reads the property transformers 5 deprecated whenever it wraps a model; nothing for a user to act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# bitsandbytes tries to fetch an optional CPU kernel from the hub at import and warns when it cannot (offline);
# it falls back to its built-in kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# command -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pt": ("tunestack.train.pt:main", "continued pretraining on raw domain text"),
    "sft": ("tunestack.train.sft:main", "supervised fine-tuning on chat / instruction data"),
    "rm": ("tunestack.train.rm:main", "reward model on preference pairs (scalar head on any causal LM)"),
    "dpo": ("tunestack.train.dpo:main", "direct preference optimization; --loss_type sigmoid|ipo|hinge|orpo|simpo"),
    "kto": ("tunestack.train.kto:main", "KTO on unpaired desirable / undesirable answers"),
    "score": ("tunestack.score:main", "score pairs or responses with a reward model"),
    "rl": ("tunestack.train.rl:main", "reinforcement learning: PPO, GRPO or RLOO against a reward model or functions"),
    "merge": ("tunestack.model.merge:main", "merge an adapter into its base: a standalone model folder"),
    "export": ("tunestack.export.command:main", "GGUF (f16, q8_0, q4_0 ...) + Ollama Modelfile, or sharded safetensors"),
    "chat": ("tunestack.infer.chat:main", "chat with a model or stage output (interactive, or one --prompt)"),
    "infer": ("tunestack.infer.batch:main", "batch generation from a jsonl/json/txt file of prompts"),
    "data": ("tunestack.data.commands:main", "data preview: samples as the model sees them, trained span marked"),
    "eval": ("tunestack.eval:main", "evaluate models: perplexity, BLEU/ROUGE vs references, RM score, probe answers"),
    "run": (
        "tunestack.pipeline:main",
        "run a pipeline recipe (pt -> sft -> rm -> rl / dpo -> eval), cached and resumable",
    ),
    "report": ("tunestack.report:main", "write report.html / report.md of a pipeline output or stage folder"),
}

USAGE = """usage: tunestack <command> [recipe.yaml] [--option value ...]

tunestack runs the fine-tuning pipeline of a domain chat model, offline, on CPU or GPUs.
Every training command takes the MedicalGPT-style flags (--model_name_or_path, --train_file_dir,
--use_peft, --target_modules all, --lora_rank ...) and every transformers TrainingArguments flag;
a YAML file given first supplies the same keys. `tunestack <command> --help` lists them all.

commands:
{commands}

The default model is the embedded SmolLM2-135M-Instruct (alias smollm2-135m-instruct).
Multi-process: torchrun --nproc_per_node N -m tunestack <command> ...
"""


def _usage() -> str:
    rows = "\n".join(f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())
    return USAGE.format(commands=rows)


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[tunestack] %(message)s" if rank == 0 else f"[tunestack rank {rank}] %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes logs a missing optional kernel package at import; its CPU path works without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())  # noqa: T201
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from tunestack import __version__

        print(f"tunestack {__version__}")  # noqa: T201
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"tunestack: error: unknown command '{command}'{hint}; see tunestack --help", file=sys.stderr)
        sys.exit(2)
    _setup_logging()
    from tunestack.errors import TunestackError

    try:
        code = _resolve(COMMANDS[command][0])(rest)
    except TunestackError as exc:
        print(f"tunestack {command}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"tunestack {command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
