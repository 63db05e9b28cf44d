"""KTO: preference optimization from unpaired answers marked desirable or undesirable, through trl.KTOTrainer.

Takes kto records ({prompt, completion, label}) and preference pairs (each split into a desirable and an
undesirable sample). The reference is handled as in DPO (adapter switched off, or a frozen copy).
"""

from __future__ import annotations

from typing import Any

from tunestack.config.kto import KTOArguments
from tunestack.model.anatomy import is_native
from tunestack.train.base import PreparedData, StageArgs, StageContext, trl_config
from tunestack.train.preference import PreferenceStage, drop_fresh_reference_adapter, pretokenized, reference_model


def _kto_trainer_class() -> type:
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """KTOTrainer on our encoded samples (prompt_ids, completion_ids, label)."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            drop_fresh_reference_adapter(self.model)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not pretokenized(dataset, "prompt_ids", "completion_ids", "label"):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if self.calculate_KL and "KL_completion_ids" not in dataset.column_names:
                # The KL term pairs each prompt with another sample's answer: rotate answers within a batch.
                def rotate(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

    return PretokenizedKTOTrainer


class KTOStage(PreferenceStage):
    name = "kto"
    description = "KTO on answers marked desirable/undesirable (kto records or preference pairs)."
    kind = "unpaired"

    options_class = KTOArguments

    def validate(self, args: StageArgs) -> list[str]:
        problems = super().validate(args)
        if args.train.per_device_train_batch_size < 2 and args.options.loss == "kto":
            problems.append("KTO estimates its KL term within a batch: --per_device_train_batch_size must be >= 2")
        return problems

    def shape(self, dataset: Any, ctx: StageContext) -> Any:
        # KTO reads batches in order (its KL pairs are built per batch): mix desirable and undesirable once here.
        return None if dataset is None else dataset.shuffle(seed=ctx.args.train.seed).flatten_indices()

    def manifest_extras(self, ctx: StageContext) -> dict[str, Any]:
        options = ctx.args.options
        return {"loss_type": options.loss, "beta": options.resolved_beta}

    def trainer_class(self, ctx: StageContext) -> type:
        return _kto_trainer_class()

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        if is_native(ctx.model_config):
            return ()
        from tunestack.train.fast.packed_logps import LogitsPreferenceMixin

        return (LogitsPreferenceMixin,)

    def trainer_args(self, ctx: StageContext) -> Any:
        from trl import KTOConfig

        o = ctx.args.options
        return trl_config(
            KTOConfig,
            ctx.args.train,
            loss_type=o.loss,
            beta=o.resolved_beta,
            desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight,
            max_length=None,
            precompute_ref_log_probs=o.precompute_ref_log_probs,
            train_sampling_strategy="sequential",
            disable_dropout=True,
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"processing_class": ctx.tokenizer, "ref_model": reference_model(ctx)}


def main(argv: list[str]) -> int:
    return KTOStage().main(argv)
