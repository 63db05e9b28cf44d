"""What tunestack adds to any transformers/TRL trainer: atomic checkpoints, a NaN guard, perplexity.

`with_tunestack(TrainerClass)` returns a subclass, so TRL's trainers get the same behaviour.
"""

from __future__ import annotations

import math
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from tunestack.checkpoints import STAGING_DIR, commit_checkpoint, latest_complete_checkpoint, saving, verify_saved_model
from tunestack.errors import TrainingDiverged
from tunestack.model.tuning import is_adalora, load_adalora_state, save_adalora_state
from tunestack.train.distributed import enable_fsdp_on_cpu


class TunestackTrainerMixin:
    """Mixed in before a transformers.Trainer subclass."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging_root = run_dir / STAGING_DIR
        staging = staging_root / f"checkpoint-{step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging_root.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        # The parent writes model, optimizer, scheduler, RNG and trainer state under staging_root.
        self._get_output_dir = lambda trial=None: str(staging_root)
        try:
            with saving(staging, f"checkpoint-{step}"):
                super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._commit_checkpoint(run_dir, staging, step)
        self.accelerator.wait_for_everyone()

    def _commit_checkpoint(self, run_dir: Path, staging: Path, step: int) -> None:
        with saving(staging, f"checkpoint-{step}"):
            drop_pickled_arguments(staging)
            if is_adalora(self.model):
                save_adalora_state(self.accelerator.unwrap_model(self.model), staging)
            verify_saved_model(staging, trained=step > 0)
            if self.state.best_global_step:
                best = run_dir / f"checkpoint-{self.state.best_global_step}"
                if best.exists() or self.state.best_global_step == step:
                    self.state.best_model_checkpoint = str(best)
                    self.state.save_to_json(str(staging / "trainer_state.json"))
            commit_checkpoint(staging, run_dir / f"checkpoint-{step}", step, getattr(self, "run_record", None))
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self.model
        if is_adalora(target) and load_adalora_state(target, Path(resume_from_checkpoint)):
            return  # full-rank matrices restored; the pruned adapter file would not fit them
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = latest_complete_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"the loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before "
                f"the optimizer step, so no weights changed. Last good checkpoint: {last or 'none'}. "
                "Try a lower --learning_rate, --max_grad_norm 1.0, or bf16/fp32 instead of fp16"
            )
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Runs after backward and clipping, before the optimizer step: the last moment to keep
        # non-finite gradients (possible with a finite loss) out of the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        value = grad_norm.item() if hasattr(grad_norm, "item") else grad_norm
        if value is not None and not math.isfinite(value):
            last = latest_complete_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"the gradients became {value} at step {self.state.global_step + 1} (loss was finite); training "
                f"stopped before the optimizer step, so no weights changed. Last good checkpoint: {last or 'none'}. "
                "Try a lower --learning_rate or bf16/fp32 instead of fp16"
            )
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs and "eval_perplexity" not in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def drop_pickled_arguments(folder: Path) -> None:
    """The Trainer pickles its arguments (hub token included) into every save; run.json records them instead,
    and nothing reads the pickle back."""
    (Path(folder) / TRAINING_ARGS_NAME).unlink(missing_ok=True)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@cache
def with_tunestack(trainer_class: type, mixins: tuple[type, ...] = ()) -> type:
    return type(f"Tunestack{trainer_class.__name__}", (TunestackTrainerMixin, *mixins, trainer_class), {})
