"""The default `fit` of a stage: a transformers / TRL trainer with tunestack's callbacks, staged checkpoints,
the final save and its check, and the before/after evaluation."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from tunestack.model.tuning import is_adalora
from tunestack.rundir import verify_saved_model
from tunestack.train.callbacks import AdaLoraBudget, GracefulStop, MetricsFileCallback
from tunestack.train.plots import plot_curves
from tunestack.train.trainer import drop_pickled_arguments, with_tunestack

logger = logging.getLogger("tunestack")


def train_with_trainer(
    stage: Any, ctx: Any, model: Any, data: Any, resume_from: Path | None, stop: GracefulStop
) -> dict[str, Any]:
    """The default `fit`: a transformers/TRL trainer with tunestack's callbacks and checkpoints."""
    from transformers import EarlyStoppingCallback

    args = ctx.args
    out_dir = Path(args.train.output_dir)
    callbacks: list[Any] = [MetricsFileCallback(out_dir), stop]
    if args.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.train.early_stopping_patience))
    if is_adalora(model):
        callbacks.append(AdaLoraBudget(model))
    with tensorboard_dir(args.train.logging_dir or str(out_dir / "runs")):
        trainer = with_tunestack(stage.trainer_class(ctx), stage.trainer_mixins(ctx, model))(
            model=model,
            args=stage.trainer_args(ctx),
            train_dataset=data.train if args.train.do_train else None,
            eval_dataset=data.eval if args.train.do_eval else None,
            callbacks=callbacks,
            **stage.trainer_kwargs(ctx, data),
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
            stage.save_extras(ctx, out_dir)
            drop_pickled_arguments(out_dir)
            verify_saved_model(out_dir, trained=trainer.state.global_step > 0)
    if run_eval:
        history = trainer.state.log_history
        done = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        if done and not args.train.load_best_model_at_end:
            # The Trainer already evaluated this model at the last step (eval_strategy steps/epoch).
            metrics.update({k: v for k, v in done[-1].items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())
    metrics.update(stage.after_training(ctx, trainer, data))
    if trainer.is_world_process_zero():
        plot_curves(out_dir, "loss.png", ("loss", "eval_loss"), f"{stage.name} loss")
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
