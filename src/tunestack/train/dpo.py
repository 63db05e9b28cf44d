"""Direct preference optimization and its reference-free relatives, through TRL.

--loss_type sigmoid (DPO, default), ipo, hinge, robust ... or a weighted comma list (sigmoid,sft: DPO plus NLL on
the chosen answers, which keeps the model stopping where the chosen answers stop) -> trl.DPOTrainer; orpo ->
ORPOTrainer; simpo -> CPOTrainer(loss_type="simpo") (both in trl.experimental). Under an adapter the reference is the same model
with the adapter switched off (no second copy in memory); with full tuning it is --ref_model or a frozen copy
of the start model. TRL logs rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins, which
land in metrics.jsonl.
"""

from __future__ import annotations

from typing import Any

from tunestack.config.dpo import DPOArguments
from tunestack.model.anatomy import is_native
from tunestack.train.base import PreparedData, StageArgs, StageContext, trl_config
from tunestack.train.preference import (
    ADAPTER_METHODS,
    PreferenceStage,
    drop_fresh_reference_adapter,
    pretokenized,
    reference_model,
)


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on our encoded pairs (prompt_ids, chosen_ids, rejected_ids): TRL tokenizes nothing again."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            drop_fresh_reference_adapter(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if pretokenized(dataset, "prompt_ids", "chosen_ids", "rejected_ids"):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def pair_features(feature: dict[str, Any]) -> dict[str, list[int]]:
    """The columns TRL's ORPO/CPO trainers build in tokenize_row, from our encoded pair."""
    prompt, out = feature["prompt_ids"], {}
    out["prompt_input_ids"], out["prompt_attention_mask"] = list(prompt), [1] * len(prompt)
    for side in ("chosen", "rejected"):
        answer = feature[f"{side}_ids"]
        out[f"{side}_input_ids"] = list(prompt) + list(answer)
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [-100] * len(prompt) + list(answer)
    return out


def _reference_free_trainer_class(loss: str) -> type:
    if loss == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    else:
        from trl.experimental.cpo import CPOTrainer as Base

    class PretokenizedTrainer(Base):
        def tokenize_row(self, feature, model=None):
            if "prompt_ids" in feature:
                return pair_features(feature)
            return super().tokenize_row(feature, model)

    PretokenizedTrainer.__name__ = f"Pretokenized{Base.__name__}"
    return PretokenizedTrainer


class DPOStage(PreferenceStage):
    name = "dpo"
    description = "Direct preference optimization: DPO, IPO, hinge ..., or the reference-free ORPO and SimPO."
    kind = "pairs"

    options_class = DPOArguments

    def validate(self, args: StageArgs) -> list[str]:
        problems = super().validate(args)
        if args.options.ref_model and args.method in ADAPTER_METHODS:
            problems.append(
                f"--ref_model is for full-parameter training; with {args.method} the reference is the model with "
                "its adapter switched off"
            )
        return problems

    def trainer_class(self, ctx: StageContext) -> type:
        options = ctx.args.options
        return _reference_free_trainer_class(options.loss) if options.reference_free else _dpo_trainer_class()

    def manifest_extras(self, ctx: StageContext) -> dict[str, Any]:
        options = ctx.args.options
        return {"loss_type": options.loss, "beta": options.resolved_beta}

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        train = ctx.args.train
        from tunestack.train.fast import head_outside_forward, output_layer_trains, packed_row_mixins

        if ctx.args.options.reference_free:
            return ()
        if not is_native(ctx.model_config):
            from tunestack.train.fast.packed_logps import LogitsPreferenceMixin

            return (LogitsPreferenceMixin,)
        if not (train.padding_free and train.sparse_lm_head):
            return ()
        if not head_outside_forward(train, "--sparse_lm_head (packed DPO log-probs)", output_layer_trains(model)):
            return ()
        from tunestack.train.fast.packed_logps import PackedPreferenceMixin

        return (PackedPreferenceMixin, *packed_row_mixins(train))

    def trainer_args(self, ctx: StageContext) -> Any:
        d, train, o = ctx.args.data, ctx.args.train, ctx.args.options
        longest = d.max_source_length + d.max_target_length  # our encoding already bounds every pair
        if o.loss == "orpo":
            from trl.experimental.orpo import ORPOConfig

            return trl_config(ORPOConfig, train, beta=o.orpo_beta, max_length=longest, disable_dropout=True)
        if o.loss == "simpo":
            from trl.experimental.cpo import CPOConfig

            return trl_config(
                CPOConfig,
                train,
                loss_type="simpo",
                beta=o.resolved_beta,
                simpo_gamma=o.simpo_gamma,
                cpo_alpha=0.0,
                label_smoothing=o.label_smoothing,
                max_length=longest,
                disable_dropout=True,
            )
        from trl import DPOConfig

        return trl_config(
            DPOConfig,
            train,
            loss_type=o.losses,
            loss_weights=o.weights,
            beta=o.resolved_beta,
            label_smoothing=o.label_smoothing,
            max_length=None,
            precompute_ref_log_probs=o.precompute_ref_log_probs,
            disable_dropout=True,
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"processing_class": ctx.tokenizer}
        if not ctx.args.options.reference_free:
            kwargs["ref_model"] = reference_model(ctx)
        return kwargs


def main(argv: list[str]) -> int:
    return DPOStage().main(argv)
