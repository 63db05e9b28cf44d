"""The shared stage scaffold: parse options, load model and data, tune, train, write the output folder.

A stage (pt, sft, rm, dpo ...) subclasses `Stage` and supplies only its data, its trainer and
its summary; the plumbing (checks before anything is written, callbacks, checkpoints, resume,
run.json, metrics.jsonl, loss.png, TensorBoard, clean stop) lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.config.model import ModelArguments
from tunestack.config.parse import parse_into, to_jsonable
from tunestack.config.train import TrainArguments
from tunestack.config.tuning import TuningArguments
from tunestack.errors import ConfigError, TunestackError
from tunestack.model.adapters import apply_tuning, describe_trainable, is_adalora
from tunestack.model.load import ModelRef, build_from_scratch, load_model, load_tokenizer, resolve_model, tunestack_home
from tunestack.train.callbacks import AdaLoraBudget, GracefulStop, MetricsFileCallback
from tunestack.train.checkpoint import verify_saved_model
from tunestack.train.output import OutputFolder
from tunestack.train.plots import plot_curves

logger = logging.getLogger("tunestack")

EXIT_INTERRUPTED = 143


@dataclass
class StageArgs:
    model: ModelArguments
    data: Any
    tuning: TuningArguments
    train: TrainArguments
    method: str = "lora"


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


class Stage:
    """Override the hooks; `run` does the rest."""

    name = "stage"
    description = ""
    data_class: type = object
    task_type = "CAUSAL_LM"

    def validate(self, args: StageArgs) -> list[str]:
        return []

    def model_class(self, ctx: StageContext) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        raise NotImplementedError

    def trainer_class(self) -> type:
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

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        """Write stage-specific files beside the weights (generation config, chat template ...)."""

    def after_training(self, ctx: StageContext, trainer: Any, data: PreparedData) -> dict[str, Any]:
        """Work on the final model once it is saved and evaluated (every rank calls it); returns more metrics."""
        return {}

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        return []

    # ------------------------------------------------------------------------------------------

    def parse(self, argv: list[str]) -> StageArgs:
        model, data, tuning, train = parse_into(
            stage_argument_classes(self),
            argv,
            prog=f"tunestack {self.name}",
            description=self.description,
        )
        if tuning.qlora and not (model.load_in_4bit or model.load_in_8bit):
            model.load_in_4bit = True
        args = StageArgs(model, data, tuning, train, tuning.resolved_method(model.load_in_4bit, model.load_in_8bit))
        if not train.do_train and not train.do_eval:
            train.do_train = True
        problems = tuning.problems(model.load_in_4bit, model.load_in_8bit) + self.validate(args)
        if train.output_dir is None:
            problems.append("--output_dir is required")
        if problems:
            raise ConfigError(problems)
        return args

    def run(self, argv: list[str]) -> int:
        from accelerate import PartialState

        started = time.time()
        args = self.parse(argv)
        state = PartialState()
        output = OutputFolder(args.train.output_dir, self.name, is_main=state.is_main_process)
        resume_from = output.plan(args.train.resume_from_checkpoint, args.train.overwrite_output_dir)
        state.wait_for_everyone()

        ref, tokenizer, model_config = self._load_references(args)
        ctx = StageContext(args, ref, tokenizer, model_config)
        with state.main_process_first():
            data = self.prepare_data(ctx)
        model = self._build_model(ctx, data)
        output.begin(self._manifest(ctx, data))
        if data.rejects and state.is_main_process:
            from tunestack.data.formats import write_rejects

            write_rejects(data.rejects, output.path / "rejects.jsonl")
        stop = GracefulStop()
        stop.install()
        try:
            result = self._train(ctx, model, data, output, resume_from, stop)
        except TunestackError as exc:
            output.abandon(str(exc))
            raise
        except BaseException as exc:
            output.finish("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            stop.uninstall()
        if stop.requested:
            output.finish("interrupted", step=result["global_step"], metrics=result["metrics"])
            _say(
                state,
                f"stopped by {stop.signal_name} at step {result['global_step']}; checkpoint saved in "
                f"{args.train.output_dir}. Resume with --resume_from_checkpoint true",
            )
            return EXIT_INTERRUPTED
        result["seconds"] = round(time.time() - started, 1)
        output.finish("complete", metrics=result["metrics"], summary=result)
        lines = [f"{self.name} finished in {result['seconds']:.0f}s: {result['global_step']} steps"]
        lines += self.summary_lines(ctx, data, result)
        lines.append(f"output: {args.train.output_dir} (run.json, metrics.jsonl, loss.png, runs/ for TensorBoard)")
        _say(state, "\n".join(lines))
        return 0

    # ------------------------------------------------------------------------------------------

    def _load_references(self, args: StageArgs) -> tuple[ModelRef | None, Any, Any]:
        from transformers import AutoConfig

        m = args.model
        ref = None if m.model_config and m.tokenizer_name_or_path else resolve_model(m.model_name_or_path)
        tokenizer = load_tokenizer(ref, m.tokenizer_name_or_path, m.trust_remote_code, m.use_fast_tokenizer)
        if m.model_config:
            config = AutoConfig.from_pretrained(m.model_config, trust_remote_code=m.trust_remote_code)
        else:
            kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
            config = AutoConfig.from_pretrained(ref.base_dir, trust_remote_code=m.trust_remote_code, **kwargs)
        return ref, tokenizer, config

    def _build_model(self, ctx: StageContext, data: PreparedData) -> Any:
        from transformers import set_seed

        args = ctx.args
        set_seed(args.train.seed)  # adapter and from-scratch initialisation must repeat across runs
        if args.model.from_scratch:
            if args.method != "full":
                logger.info("training from scratch: using full tuning (adapters need pretrained weights)")
                args.method = "full"
            model = build_from_scratch(args.model, ctx.tokenizer, ctx.ref)
        else:
            model = load_model(ctx.ref, args.model, model_class=self.model_class(ctx), tokenizer=ctx.tokenizer)
        if hasattr(model, "config"):
            model.config.use_cache = False
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

    def _manifest(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        args = ctx.args
        base = None
        if ctx.ref is not None:
            base = ctx.ref.reference
            if Path(base).exists():
                base = str(Path(base).resolve())
        return {
            "base_model": base,
            "tuning_method": args.method,
            "options": {
                "model": to_jsonable(args.model),
                "data": to_jsonable(args.data),
                "tuning": to_jsonable(args.tuning),
                "train": {k: v for k, v in args.train.to_dict().items() if "token" not in k},
            },
            "data_fingerprint": data.fingerprint,
            "data_stats": data.stats,
        }

    def _train(
        self,
        ctx: StageContext,
        model: Any,
        data: PreparedData,
        output: OutputFolder,
        resume_from: Path | None,
        stop: GracefulStop,
    ) -> dict[str, Any]:
        from transformers import EarlyStoppingCallback

        from tunestack.train.trainer import with_tunestack

        args = ctx.args
        out_dir = Path(args.train.output_dir)
        callbacks: list[Any] = [MetricsFileCallback(out_dir / "metrics.jsonl"), stop]
        if args.train.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.train.early_stopping_patience))
        if is_adalora(model):
            callbacks.append(AdaLoraBudget(model))
        with tensorboard_dir(args.train.logging_dir or str(out_dir / "runs")):
            trainer = with_tunestack(self.trainer_class(), self.trainer_mixins(ctx, model))(
                model=model,
                args=self.trainer_args(ctx),
                train_dataset=data.train if args.train.do_train else None,
                eval_dataset=data.eval if args.train.do_eval else None,
                callbacks=callbacks,
                **self.trainer_kwargs(ctx, data),
            )
        metrics: dict[str, Any] = {}
        run_eval = args.train.do_eval and data.eval is not None
        if run_eval and resume_from is None:
            metrics.update({f"before_{k}": v for k, v in trainer.evaluate().items()})
        if args.train.do_train:
            if resume_from is not None:
                logger.info("resuming from %s", resume_from)
            train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics.update(train_out.metrics)
        result = {"global_step": trainer.state.global_step, "metrics": metrics}
        if stop.requested:
            return result
        if args.train.do_train:
            config = getattr(trainer.accelerator.unwrap_model(trainer.model), "config", None)
            if config is not None:
                config.use_cache = True  # off for training; saved models should generate with a cache
            trainer.save_model(str(out_dir))
            if trainer.is_world_process_zero():
                ctx.tokenizer.save_pretrained(out_dir)
                self.save_extras(ctx, out_dir)
                (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; run.json has the options
                verify_saved_model(out_dir, trainer.model, trained=trainer.state.global_step > 0)
        if run_eval:
            history = trainer.state.log_history
            done = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
            if done and not args.train.load_best_model_at_end:
                # The Trainer already evaluated this model at the last step (eval_strategy steps/epoch).
                metrics.update({k: v for k, v in done[-1].items() if k.startswith("eval_")})
            else:
                metrics.update(trainer.evaluate())
        metrics.update(self.after_training(ctx, trainer, data))
        if trainer.is_world_process_zero():
            plot_curves(out_dir / "metrics.jsonl", out_dir / "loss.png", ("loss", "eval_loss"), f"{self.name} loss")
        result["tokens_seen"] = trainer.state.num_input_tokens_seen
        return result


@contextlib.contextmanager
def tensorboard_dir(path: str) -> Any:
    """transformers' TensorBoard callback reads its folder from the environment when it is created;
    set it for that moment only, so it never leaks into later stages or child processes."""
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = path
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous


def stage_main(stage: Stage, argv: list[str]) -> int:
    """Entry point of a stage command: `--help` lists every option, else run."""
    if "-h" in argv or "--help" in argv:
        from tunestack.config.parse import print_help

        print_help(stage_argument_classes(stage), f"tunestack {stage.name}", stage.description)
        return 0
    return stage.run(argv)


def stage_argument_classes(stage: Stage) -> tuple[type, ...]:
    return (ModelArguments, stage.data_class, TuningArguments, TrainArguments)


def planned_steps(train: TrainArguments, dataset: Any) -> int:
    """Optimizer steps the run will take (AdaLoRA needs it up front)."""
    if train.max_steps and train.max_steps > 0:
        return train.max_steps
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError("streaming data has no length: set --max_steps") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(train, "max_tokens_per_batch", None):
        from tunestack.train.batching import TokenBudgetBatchSampler, sample_lengths

        lengths = sample_lengths(dataset)
        budget = max(train.max_tokens_per_batch, max(lengths, default=1))
        batches = len(TokenBudgetBatchSampler(lengths, budget, seed=train.seed, num_replicas=world))
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
