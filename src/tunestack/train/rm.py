"""Reward modeling: a scalar head on the SFT model trained with the pairwise loss -log sigmoid(r_chosen - r_rejected).

TRL's RewardTrainer does the training on our pre-tokenized pairs. The head is transformers' sequence
classifier where the architecture has one, else `ValueHeadModel` (any causal LM). Held-out evaluation reports
pairwise accuracy (chosen scored above rejected) and the mean margin, never MSE between the two scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tunestack.config.rm import RewardModelArguments
from tunestack.model.reward import SEQUENCE_CLASSIFICATION, VALUE_HEAD, build_reward_model, reward_head_for
from tunestack.model.value_head import VALUE_HEAD_FILE, ValueHeadModel
from tunestack.train.base import PreparedData, StageContext, trl_config
from tunestack.train.preference import PreferenceStage, pretokenized

logger = logging.getLogger("tunestack")


def pairwise_metrics(eval_pred: Any) -> dict[str, float]:
    """Held-out pairwise accuracy and mean margin from (n, 2) [score_chosen, score_rejected] predictions."""
    scores = torch.as_tensor(eval_pred.predictions).reshape(-1, 2).float()
    margin = scores[:, 0] - scores[:, 1]
    return {"pairwise_accuracy": float((margin > 0).float().mean()), "mean_margin": float(margin.mean())}


def _value_head(model: Any) -> tuple[ValueHeadModel, torch.nn.Linear] | None:
    """The ValueHeadModel inside `model` (bare or under PEFT) and its trained head, or None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, ValueHeadModel):
        return None
    head = inner.score
    trained = getattr(head, "modules_to_save", None)  # PEFT keeps the trained copy of a modules_to_save layer
    if trained is not None:
        head = trained[getattr(model, "active_adapter", "default")]
    return inner, head


def _reward_trainer_class() -> type:
    from safetensors.torch import save_file
    from trl import RewardTrainer

    class PairwiseRewardTrainer(RewardTrainer):
        """RewardTrainer that evaluates per pair and saves value-head models in their own format."""

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            chosen, rejected = outputs.logits.squeeze(-1).detach().chunk(2)
            scores = torch.stack([chosen, rejected], dim=-1)
            return loss.detach(), scores, torch.ones(len(chosen), device=scores.device)

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            output_dir = output_dir or self.args.output_dir
            found = _value_head(self.accelerator.unwrap_model(self.model))
            if found is None:
                return super()._save(output_dir, state_dict)
            inner, head = found
            if self.args.should_save:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                if inner is self.accelerator.unwrap_model(self.model):
                    inner.save_pretrained(output_dir)  # full tuning: the LM + value_head.safetensors
                else:
                    super()._save(output_dir, state_dict)  # the adapter (with the head as modules_to_save)
                weight = head.weight.detach().to("cpu", torch.float32).contiguous()
                save_file({"weight": weight}, str(Path(output_dir) / VALUE_HEAD_FILE))
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            target = model if model is not None else self.model
            if isinstance(target, ValueHeadModel):
                target.load_weights(resume_from_checkpoint)
                return
            super()._load_from_checkpoint(resume_from_checkpoint, model)

        def _load_best_model(self) -> None:
            if isinstance(self.model, ValueHeadModel) and self.state.best_model_checkpoint:
                self.model.load_weights(self.state.best_model_checkpoint)
                return
            super()._load_best_model()

    return PairwiseRewardTrainer


class RewardModelStage(PreferenceStage):
    name = "rm"
    description = "Reward modeling on preference pairs (MedicalGPT reward_modeling.py flags)."
    task_type = "SEQ_CLS"
    kind = "pairs"

    options_class = RewardModelArguments

    def _head(self, ctx: StageContext) -> str:
        m = ctx.args.model
        return reward_head_for(ctx.model_config, ctx.args.options.reward_head, m.trust_remote_code)

    def model_class(self, ctx: StageContext) -> Any:
        from transformers import AutoModelForSequenceClassification

        return ValueHeadModel if self._head(ctx) == VALUE_HEAD else AutoModelForSequenceClassification

    def load_model(self, ctx: StageContext) -> Any:
        head = self._head(ctx)
        logger.info("reward head: %s", head)
        model = build_reward_model(ctx.ref, ctx.args.model, ctx.tokenizer, head)
        model.config.pad_token_id = ctx.tokenizer.pad_token_id
        return model

    def shape(self, dataset: Any, ctx: StageContext) -> Any:
        """Whole sequences for the scorer: prompt + chosen answer, prompt + rejected answer."""
        if dataset is None or not pretokenized(dataset, "prompt_ids"):
            return dataset

        def join(row: dict[str, Any]) -> dict[str, Any]:
            return {
                "chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                "rejected_ids": row["prompt_ids"] + row["rejected_ids"],
            }

        return dataset.map(join, remove_columns=["prompt_ids"], desc="joining prompts and answers")

    def trainer_class(self, ctx: StageContext) -> type:
        return _reward_trainer_class()

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        train = ctx.args.train
        from tunestack.train.fast import head_outside_forward, packed_row_mixins

        if self._head(ctx) == VALUE_HEAD or not train.padding_free:
            return ()
        if not head_outside_forward(train, "--padding_free (packed reward scores)", head_trains=True):
            return ()
        from tunestack.train.fast.packed_scores import PackedRewardMixin

        return (PackedRewardMixin, *packed_row_mixins(train))

    def trainer_args(self, ctx: StageContext) -> Any:
        from trl import RewardConfig

        return trl_config(RewardConfig, ctx.args.train, max_length=None, disable_dropout=True)

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"processing_class": ctx.tokenizer, "compute_metrics": pairwise_metrics}

    def manifest_extras(self, ctx: StageContext) -> dict[str, Any]:
        return {"reward_head": self._head(ctx), "load_with": "tunestack.model.reward.load_reward_model"}

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        lines = super().summary_lines(ctx, data, result)
        m = result["metrics"]
        if "eval_pairwise_accuracy" in m:
            before = m.get("before_eval_pairwise_accuracy")
            arrow = f"{before:.3f} -> " if before is not None else ""
            lines.append(
                f"held-out pairwise accuracy: {arrow}{m['eval_pairwise_accuracy']:.3f} "
                f"(mean margin {m['eval_mean_margin']:+.3f}); reward head: {self._head(ctx)}"
            )
        else:
            head = "sequence classification" if self._head(ctx) == SEQUENCE_CLASSIFICATION else "value head"
            lines.append(f"reward head: {head}")
        return lines


def main(argv: list[str]) -> int:
    return RewardModelStage().main(argv)
