"""The shared stage scaffold: parse options, load model and data, tune, train, write the output folder.

A stage (pt, sft, rm, dpo ...) subclasses `Stage` and overrides only the public hooks below for what is
particular to it (its data, its model, its trainer, its loss, its summary); the plumbing (checks before
anything is written, callbacks, checkpoints, resume, run.json, metrics.jsonl, loss.png, TensorBoard, clean
stop) lives here once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.config.model import ModelArguments
from tunestack.config.parse import parse_into, print_help, to_jsonable
from tunestack.config.train import TrainArguments
from tunestack.config.tuning import TuningArguments
from tunestack.data.records import write_rejects
from tunestack.errors import ConfigError, DataError, ModelError
from tunestack.model.load import build_from_scratch, load_config, load_model, load_tokenizer
from tunestack.model.ref import ModelRef, resolve_model
from tunestack.model.tuning import apply_tuning, describe_trainable
from tunestack.rundir import OutputFolder, tunestack_home
from tunestack.timing import PhaseClock, command_clock, describe
from tunestack.train.callbacks import GracefulStop
from tunestack.train.distributed import check_launch, data_first_on_main, start_deepspeed
from tunestack.train.fast import fit_fast_paths
from tunestack.train.fit import train_with_trainer
from tunestack.train.resume import check_resume

logger = logging.getLogger("tunestack")

EXIT_INTERRUPTED = 143


def _interrupted_together(state: Any) -> int:
    """The exit code of a stopped run, once every process got here: torchrun stops the whole group as soon as one
    process exits with a failure code, which would cut short the main process still writing the run's records."""
    state.wait_for_everyone()
    return EXIT_INTERRUPTED


@dataclass
class StageArgs:
    model: ModelArguments
    data: Any
    tuning: TuningArguments
    train: TrainArguments
    method: str = "lora"
    options: Any = None  # the stage's own options (Stage.options_class), if it has any


@dataclass
class PreparedData:
    train: Any
    eval: Any
    collator: Any
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)  # skipped bad records, for rejects.jsonl
    extras: dict[str, Any] = field(default_factory=dict)  # whatever a stage's later hooks need


@dataclass
class StageContext:
    """Everything a stage hook may need, built by the scaffold."""

    args: StageArgs
    ref: ModelRef | None
    tokenizer: Any
    model_config: Any
    clock: PhaseClock = field(default_factory=PhaseClock)  # seconds per phase of the run, for run.json


class Stage:
    """Override the hooks; `run` does the rest."""

    name = "stage"
    description = ""
    data_class: type = object
    options_class: type | None = None
    task_type = "CAUSAL_LM"

    # ----------------------------------------------------------------------------------- hooks

    def validate(self, args: StageArgs) -> list[str]:
        """Problems with this combination of options (the arguments are not changed)."""
        return []

    def model_class(self, ctx: StageContext) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, ctx: StageContext) -> Any:
        """The model before tuning: the reference's weights with its adapters merged, or a fresh one."""
        args = ctx.args
        if args.model.from_scratch:
            return build_from_scratch(args.model, ctx.tokenizer, ctx.ref)
        assert ctx.ref is not None
        return load_model(ctx.ref, args.model, model_class=self.model_class(ctx), tokenizer=ctx.tokenizer)

    def build_model(self, ctx: StageContext, data: PreparedData) -> Any:
        """The model ready to train: loaded (same seed every run), then tuned by the run's method."""
        from transformers import set_seed

        args = ctx.args
        set_seed(args.train.seed)  # adapter, head and from-scratch initialisation must repeat across runs
        model = self.load_model(ctx)
        if hasattr(model, "config"):
            model.config.use_cache = False
        set_seed(args.train.seed)  # the adapter starts the same however the weights loaded (ZeRO-3 draws while loading)
        model = apply_tuning(
            model,
            args.tuning,
            args.method,
            planned_steps(args.train, data.train),
            gradient_checkpointing=bool(args.train.gradient_checkpointing),
            task_type=self.task_type,
        )
        logger.info("%s: %s", args.method, describe_trainable(model))
        return model

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        raise NotImplementedError

    def trainer_class(self, ctx: StageContext) -> type:
        from transformers import Trainer

        return Trainer

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"data_collator": data.collator, "processing_class": ctx.tokenizer}

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        """Extra trainer behaviour for this run (e.g. the trained-positions loss of LM stages)."""
        return ()

    def trainer_args(self, ctx: StageContext) -> Any:
        """The TrainingArguments the trainer gets; TRL stages convert to their config class (see trl_config)."""
        return ctx.args.train

    def fit(
        self,
        ctx: StageContext,
        model: Any,
        data: PreparedData,
        output: OutputFolder,
        resume_from: Path | None,
        stop: GracefulStop,
    ) -> dict[str, Any]:
        """Train, save the final model into OUTPUT_DIR and evaluate; returns {global_step, metrics, ...}."""
        return train_with_trainer(self, ctx, model, data, output, resume_from, stop)

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        """Write stage-specific files beside the weights (generation config, chat template ...)."""

    def after_training(self, ctx: StageContext, trainer: Any, data: PreparedData) -> dict[str, Any]:
        """Work on the final model once it is saved and evaluated (every rank calls it); returns more metrics."""
        return {}

    def manifest_extras(self, ctx: StageContext) -> dict[str, Any]:
        """More fields for run.json (e.g. how to load the output)."""
        return {}

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        return []

    # ----------------------------------------------------------------------------------- the command

    @classmethod
    def option_classes(cls) -> tuple[type, ...]:
        own = (cls.options_class,) if cls.options_class is not None else ()
        return (ModelArguments, cls.data_class, *own, TuningArguments, TrainArguments)

    def parse(self, argv: list[str]) -> StageArgs:
        """The options of `argv`; ConfigError lists every problem."""
        parsed = parse_into(self.option_classes(), argv, prog=f"tunestack {self.name}", description=self.description)
        model, data, *own, tuning, train = parsed
        if tuning.qlora and not (model.load_in_4bit or model.load_in_8bit):
            model.load_in_4bit = True
        if not train.do_train and not train.do_eval:
            train.do_train = True
        method = tuning.resolved_method(model.load_in_4bit, model.load_in_8bit)
        if model.from_scratch and method != "full":
            logger.info("training from scratch: using full tuning (adapters need pretrained weights)")
            method = "full"
        args = StageArgs(model, data, tuning, train, method, own[0] if own else None)
        problems = tuning.problems(model.load_in_4bit, model.load_in_8bit) + self.validate(args)
        if train.output_dir is None:
            problems.append("--output_dir is required")
        if problems:
            raise ConfigError(problems)
        return args

    def main(self, argv: list[str]) -> int:
        """`tunestack <stage>`: --help lists every option, else run."""
        if "-h" in argv or "--help" in argv:
            print_help(self.option_classes(), f"tunestack {self.name}", self.description)
            return 0
        return self.run(argv)

    def run(self, argv: list[str]) -> int:
        from accelerate import PartialState

        started = time.time()
        clock = command_clock()
        with clock("options"):
            check_launch()
            args = self.parse(argv)
            start_deepspeed(args.train)
            state = PartialState()
            output = OutputFolder(args.train.output_dir, self.name, is_main=state.is_main_process)
            train = args.train
            resume_from = main_decides(
                state, lambda: output.plan(train.resume_from_checkpoint, train.overwrite_output_dir)
            )
        try:
            with clock("model resolution"):
                ctx = self._context(args)
            ctx.clock = clock
            with clock("data"), data_first_on_main(state):
                data = self.prepare_data(ctx)
            manifest = self._manifest(ctx, data)
            if resume_from is not None:
                check_resume(resume_from, {"stage": self.name, **manifest})
            with clock("model"):
                model = self.build_model(ctx, data)
        except BaseException:
            output.release()
            raise
        output.begin(manifest)
        if data.rejects and state.is_main_process:
            write_rejects(data.rejects, output.path / "rejects.jsonl")
        stop = GracefulStop()
        stop.install()
        try:
            result = self.fit(ctx, model, data, output, resume_from, stop)
        except KeyboardInterrupt:
            output.finish("interrupted", error="aborted by a second signal")
            raise
        except (ConfigError, DataError, ModelError) as exc:  # bad input found late (e.g. while streaming)
            output.abandon(str(exc))
            raise
        except BaseException as exc:  # the folder is kept: metrics, logs and the error say what happened
            output.fail(exc)
            raise
        finally:
            stop.uninstall()
        if result.get("interrupted"):
            output.finish("interrupted", step=result["global_step"], metrics=result["metrics"])
            saved = "checkpoint saved in" if result["global_step"] else "nothing trained yet in"
            _say(
                state,
                f"stopped by {stop.signal_name} at step {result['global_step']}; {saved} {train.output_dir}. "
                "Resume with --resume_from_checkpoint true",
            )
            return _interrupted_together(state)
        result["seconds"] = round(time.time() - started, 1)
        result["phases"] = clock.take()
        if train.log_level in ("debug", "info"):
            logger.info("time by phase: %s", describe(result["phases"]))
        output.finish("complete", metrics=result["metrics"], summary=result)
        lines = [f"{self.name} finished in {result['seconds']:.0f}s: {result['global_step']} steps"]
        lines += self.summary_lines(ctx, data, result)
        lines.append(f"output: {train.output_dir} (run.json, metrics.jsonl, loss.png, runs/ for TensorBoard)")
        _say(state, "\n".join(lines))
        return _interrupted_together(state) if stop.requested else 0

    # ----------------------------------------------------------------------------------- internals

    def _context(self, args: StageArgs) -> StageContext:
        from transformers import AutoConfig

        m = args.model
        ref = None if m.model_config and m.tokenizer_name_or_path else resolve_model(m.model_name_or_path)
        tokenizer = load_tokenizer(ref, m.tokenizer_name_or_path, m.trust_remote_code, m.use_fast_tokenizer)
        if m.model_config:
            config = AutoConfig.from_pretrained(m.model_config, trust_remote_code=m.trust_remote_code)
        else:
            assert ref is not None
            kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
            config = load_config(ref.base_dir, m.trust_remote_code, **kwargs)
        fit_fast_paths(args.train, config)
        return StageContext(args, ref, tokenizer, config)

    def _manifest(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        args = ctx.args
        base = None
        if ctx.ref is not None:
            base = ctx.ref.reference
            if Path(base).exists():
                base = str(Path(base).resolve())
        options = {
            "model": to_jsonable(args.model),
            "data": to_jsonable(args.data),
            "tuning": to_jsonable(args.tuning),
            "train": args.train.to_dict(),
        }
        if args.options is not None:
            options["stage"] = to_jsonable(args.options)
        return {
            "base_model": base,
            "tuning_method": args.method,
            "options": options,
            "data_fingerprint": data.fingerprint,
            "data_stats": data.stats,
            **self.manifest_extras(ctx),
        }


def main_decides(state: Any, decide: Any) -> Any:
    """`decide()` on the main process only; its result, or its ConfigError, reaches every process."""
    outcome: list[Any] = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except ConfigError as exc:
            outcome[1] = exc.problems
    if state.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise ConfigError(outcome[1])
    return outcome[0]


def planned_steps(train: TrainArguments, dataset: Any) -> int:
    """Optimizer steps the run will take (AdaLoRA needs it up front): the batches the trainer will build."""
    if train.max_steps and train.max_steps > 0:
        return train.max_steps
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError("streaming data has no length: set --max_steps") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(train, "max_tokens_per_batch", None):
        from tunestack.train.fast.batching import TokenBudgetBatchSampler, sample_lengths

        lengths = sample_lengths(dataset)
        budget = max(train.max_tokens_per_batch, max(lengths, default=1))
        sampler = TokenBudgetBatchSampler(lengths, budget, packed=train.padding_free, seed=train.seed, num_replicas=world)
        batches = len(sampler)
    else:
        batches = math.ceil(n / (train.per_device_train_batch_size * world))
    return max(1, math.ceil(batches / train.gradient_accumulation_steps) * math.ceil(train.num_train_epochs))


def trl_config(config_class: type, train: TrainArguments, **extra: Any) -> Any:
    """A TRL config (DPOConfig, GRPOConfig ...) carrying every TrainingArguments value the user set.

    TRL configs subclass TrainingArguments, so every flag keeps its meaning; tunestack-only fields
    (legacy aliases) were already folded into the standard ones by TrainArguments.__post_init__.
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {
        f.name: getattr(train, f.name) for f in dataclasses.fields(TrainingArguments) if f.init and f.name in names
    }
    values.update(extra)
    return config_class(**values)


def cache_root(args: StageArgs) -> Path:
    return Path(args.model.cache_dir).expanduser() if args.model.cache_dir else tunestack_home() / "datasets"


def _say(state: Any, text: str) -> None:
    if state.is_main_process:
        print(text, flush=True)  # noqa: T201 - the user-facing summary
