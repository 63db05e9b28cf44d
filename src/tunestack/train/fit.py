"""The default `fit` of a stage: a transformers / TRL trainer with tunestack's callbacks, staged checkpoints,
the final save and its check, and the before/after evaluation."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from tunestack.checkpoints import STAGING_DIR, saving, verify_saved_model
from tunestack.model.tuning import is_adalora
from tunestack.rundir import OutputFolder, promote_final
from tunestack.train.callbacks import AdaLoraBudget, GracefulStop, MetricsFileCallback, StopRequested
from tunestack.train.plots import plot_curves
from tunestack.train.resume import resume_record
from tunestack.train.trainer import drop_pickled_arguments, with_tunestack

logger = logging.getLogger("tunestack")


def train_with_trainer(
    stage: Any, ctx: Any, model: Any, data: Any, output: OutputFolder, resume_from: Path | None, stop: GracefulStop
) -> dict[str, Any]:
    """The default `fit`: a transformers/TRL trainer with tunestack's callbacks and checkpoints.

    Returns {global_step, metrics, tokens_seen, interrupted}; `interrupted` means a signal stopped training (a
    checkpoint of the last step was saved) or came before it began (nothing trained)."""
    from transformers import EarlyStoppingCallback

    args, clock = ctx.args, ctx.clock
    out_dir = Path(args.train.output_dir)
    callbacks: list[Any] = [MetricsFileCallback(out_dir), stop]
    if args.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.train.early_stopping_patience))
    if is_adalora(model):
        callbacks.append(AdaLoraBudget(model))
    with clock("trainer"), tensorboard_dir(args.train.logging_dir or str(out_dir / "runs")):
        trainer = with_tunestack(stage.trainer_class(ctx), stage.trainer_mixins(ctx, model))(
            model=model,
            args=stage.trainer_args(ctx),
            train_dataset=data.train if args.train.do_train else None,
            eval_dataset=data.eval if args.train.do_eval else None,
            callbacks=callbacks,
            **stage.trainer_kwargs(ctx, data),
        )
    trainer.run_record = resume_record(output.manifest)  # written into every checkpoint's marker
    metrics: dict[str, Any] = {}
    run_eval = args.train.do_eval and data.eval is not None
    try:
        if run_eval and resume_from is None:
            with clock("evaluation"):
                metrics.update({f"before_{k}": v for k, v in trainer.evaluate().items()})
        if args.train.do_train:
            if resume_from is not None:
                logger.info("resuming from %s", resume_from)
            with clock("training"):
                train_out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            metrics.update(train_out.metrics)
    except StopRequested:
        # During an evaluation: a checkpoint of the last completed step (none before training began).
        if trainer.state.global_step > 0:
            trainer._save_checkpoint(trainer.model, trial=None)
        return {"global_step": trainer.state.global_step, "metrics": metrics, "interrupted": True}
    result = {"global_step": trainer.state.global_step, "metrics": metrics, "interrupted": stop.stopped_training}
    if stop.stopped_training:
        return result  # the Trainer saved the checkpoint of this step
    if args.train.do_train:
        with clock("saving"):
            _save_final(stage, ctx, trainer, out_dir)
    stop.immediate = True  # the model is saved: a signal now stops the evaluations that follow
    try:
        if stop.requested:
            raise StopRequested(stop.signal_name)
        if run_eval:
            with clock("evaluation"):
                metrics.update(_final_eval(trainer, args.train))
        with clock("after training"):
            metrics.update(stage.after_training(ctx, trainer, data))
    except StopRequested:
        logger.warning("the final evaluation was stopped by %s; the trained model is saved", stop.signal_name)
        metrics["evaluation_stopped"] = stop.signal_name
    if trainer.is_world_process_zero():
        with clock("plots"):
            plot_curves(out_dir, "loss.png", ("loss", "eval_loss"), f"{stage.name} loss")
    result["tokens_seen"] = trainer.state.num_input_tokens_seen
    return result


def _save_final(stage: Any, ctx: Any, trainer: Any, out_dir: Path) -> None:
    """The final model, staged and checked like a checkpoint before its files move into OUTPUT_DIR."""
    staging = out_dir / STAGING_DIR / "final"
    config = getattr(trainer.accelerator.unwrap_model(trainer.model), "config", None)
    if config is not None:
        config.use_cache = True  # off for training; saved models should generate with a cache
    with saving(staging, "the final model"):
        trainer.save_model(str(staging))
        if trainer.is_world_process_zero():
            ctx.tokenizer.save_pretrained(staging)
            stage.save_extras(ctx, staging)
            drop_pickled_arguments(staging)
            verify_saved_model(staging, trained=trainer.state.global_step > 0)
            promote_final(staging, out_dir)
    trainer.accelerator.wait_for_everyone()


def _final_eval(trainer: Any, train_args: Any) -> dict[str, Any]:
    history = trainer.state.log_history
    done = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    if done and not train_args.load_best_model_at_end:
        # The Trainer already evaluated this model at the last step (eval_strategy steps/epoch).
        return {k: v for k, v in done[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()


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
