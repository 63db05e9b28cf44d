"""`tunestack <command> [recipe.yaml] [--flags]`: parse the command, dispatch, turn user errors into exit code 2."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Any

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

@dataclass(frozen=True)
class Command:
    """One tunestack command. Those with a `stage` (a training Stage class) or `options` (a function returning
    the option dataclasses) may also appear in a pipeline recipe; `variants` are recipe kinds that are this
    command with some options fixed (ppo = rl with algo ppo)."""

    target: str  # "module:function": takes argv, returns an exit code
    help: str
    stage: str | None = None  # "module:Class" of a tunestack.train.base.Stage
    options: str | None = None  # "module:function" returning the option dataclasses (non-stage commands)
    model_key: str = "model_name_or_path"  # the option naming the input model
    makes_policy: bool = True  # its output is a chat model that a later stage may start from
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


COMMANDS: dict[str, Command] = {
    "pt": Command("tunestack.train.pt:main", "continued pretraining on raw domain text", "tunestack.train.pt:PretrainStage"),
    "sft": Command(
        "tunestack.train.sft:main",
        "supervised fine-tuning on chat / instruction data",
        "tunestack.train.sft:SupervisedStage",
    ),
    "rm": Command(
        "tunestack.train.rm:main",
        "reward model on preference pairs (scalar head on any causal LM)",
        "tunestack.train.rm:RewardModelStage",
        makes_policy=False,
    ),
    "dpo": Command(
        "tunestack.train.dpo:main",
        "direct preference optimization; --loss_type sigmoid|ipo|hinge|orpo|simpo",
        "tunestack.train.dpo:DPOStage",
        variants=(("orpo", (("loss_type", "orpo"),)), ("simpo", (("loss_type", "simpo"),))),
    ),
    "kto": Command(
        "tunestack.train.kto:main", "KTO on unpaired desirable / undesirable answers", "tunestack.train.kto:KTOStage"
    ),
    "score": Command("tunestack.score:main", "score pairs or responses with a reward model"),
    "rl": Command(
        "tunestack.train.rl:main",
        "reinforcement learning: PPO, GRPO or RLOO against a reward model or functions",
        "tunestack.train.rl:RLStage",
        variants=tuple((algo, (("algo", algo),)) for algo in ("ppo", "grpo", "rloo")),
    ),
    "merge": Command(
        "tunestack.model.merge:main",
        "merge an adapter into its base: a standalone model folder",
        options="tunestack.config.merge:option_classes",
        model_key="lora_model",
    ),
    "serve": Command(
        "tunestack.serve.command:main", "OpenAI-compatible API and web chat page (127.0.0.1; key for others)"
    ),
    "export": Command(
        "tunestack.export.command:main", "GGUF (f16, q8_0, q4_0 ...) + Ollama Modelfile, or sharded safetensors"
    ),
    "chat": Command("tunestack.infer.chat:main", "chat with a model or stage output (interactive, or one --prompt)"),
    "infer": Command("tunestack.infer.batch:main", "batch generation from a jsonl/json/txt file of prompts"),
    "data": Command("tunestack.data.commands:main", "data preview: samples as the model sees them, trained span marked"),
    "eval": Command(
        "tunestack.eval:main",
        "evaluate models: perplexity, BLEU/ROUGE vs references, RM score, probe answers",
        options="tunestack.config.eval:option_classes",
        makes_policy=False,
    ),
    "run": Command(
        "tunestack.pipeline:main", "run a pipeline recipe (pt -> sft -> rm -> rl / dpo -> eval), cached and resumable"
    ),
    "report": Command("tunestack.report:main", "write report.html / report.md of a pipeline output or stage folder"),
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
    rows = "\n".join(f"  {name:<8} {command.help}" for name, command in COMMANDS.items())
    return USAGE.format(commands=rows)


def resolve(target: str) -> Any:
    """The object a "module:attr" target names."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _every_rank_or_warning(record: logging.LogRecord) -> bool:
    """What a non-main rank prints: warnings, and the notes only it can give (logged with
    extra={"every_rank": True}), such as 'converting the built-in model' when that rank won the race to do it."""
    return record.levelno >= logging.WARNING or getattr(record, "every_rank", False)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format="[tunestack] %(message)s" if rank == 0 else f"[tunestack rank {rank}] %(message)s",
    )
    if rank != 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_every_rank_or_warning)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes asks the kernels package for an optional hub kernel at import and logs when there is none;
    # offline, kernels itself logs that it skipped the publisher check. Its CPU path works without that kernel.
    for quiet in ("bitsandbytes", "kernels"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
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
    from tunestack.timing import command_clock, process_age

    clock = command_clock()
    clock.take()  # a fresh start (an earlier command in this process may have stopped half-way)
    started = process_age() if from_command_line else None
    if started is not None:
        clock.add("start", started)  # the interpreter and `import tunestack.cli`
    _setup_logging()
    from tunestack.errors import TunestackError

    received = _stop_on_sigterm()
    leave = _leave if from_command_line else sys.exit
    try:
        with clock("imports"):
            entry = resolve(COMMANDS[command].target)
        code = entry(rest)
    except TunestackError as exc:
        print(f"tunestack {command}: error: {exc}", file=sys.stderr)
        leave(exc.exit_code)
    except KeyboardInterrupt:
        name = received[-1] if received else signal.SIGINT
        print(f"tunestack {command}: stopped by {name.name}; nothing half-written is left", file=sys.stderr)
        leave(128 + name.value)
    leave(code or 0)


def _leave(code: int) -> None:
    """End the `tunestack` process once its command returned: other threads finished, exit handlers run, output
    flushed, then exit without tearing the interpreter down object by object (about 2 s with torch and
    transformers loaded, freeing memory the system takes back anyway)."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_on_sigterm() -> list[signal.Signals]:
    """SIGTERM unwinds the command like Ctrl-C (its temporary files are removed on the way out); training stages
    replace this with a stop after the current step. Returns the list the received signal is appended to."""
    received: list[signal.Signals] = []

    def handle(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum))
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handle)
    return received
