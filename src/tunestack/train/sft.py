"""Supervised fine-tuning: loss on exactly the assistant tokens (and their stop token) of chat data."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

from tunestack.config.sft import DEFAULT_MAX_LENGTH, SupervisedDataArguments
from tunestack.data.collators import PackedCollator
from tunestack.data.formats import CONVERSATIONS
from tunestack.data.records import load_splits
from tunestack.data.sources import fingerprint_files
from tunestack.data.supervised import build_sft_dataset, collator_for
from tunestack.data.templates import get_template, jinja_chat_template, stop_token_ids
from tunestack.train.base import PreparedData, Stage, StageArgs, StageContext
from tunestack.train.chat_files import save_chat_files
from tunestack.train.fast import lm_trainer_mixins
from tunestack.train.metrics import lm_metric_kwargs, perplexity_line


class SupervisedStage(Stage):
    name = "sft"
    description = "Supervised fine-tuning on chat data (MedicalGPT supervised_finetuning.py flags)."
    data_class = SupervisedDataArguments

    def validate(self, args: StageArgs) -> list[str]:
        d, problems = args.data, []
        budget, length = args.train.max_tokens_per_batch, d.model_max_length or DEFAULT_MAX_LENGTH
        if budget is not None and budget < length:
            problems.append(
                f"--max_tokens_per_batch {budget} is less than --model_max_length {length}: "
                "every sample must fit in a batch"
            )
        if d.predict_with_generate and not (
            d.validation_file_dir or (args.train.do_eval and d.validation_split_percentage > 0)
        ):
            problems.append(
                "--predict_with_generate answers held-out conversations: give --validation_file_dir, "
                "or --do_eval with --validation_split_percentage > 0"
            )
        return problems

    def _template(self, ctx: StageContext) -> Any:
        return get_template(ctx.args.data.template_name, ctx.tokenizer, ctx.args.data.tool_format)

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        d = ctx.args.data
        max_length = d.max_length(getattr(ctx.model_config.get_text_config(), "max_position_embeddings", None))
        template = self._template(ctx)
        splits = load_splits(d, CONVERSATIONS, ctx.args.train.do_eval, ctx.args.train.seed)
        train_convs, replay_stats = splits.train, {}
        if d.replay_ratio > 0:  # the forgetting guard: the starting model's own answers to general prompts
            from tunestack.train.replay import mix_replay

            train_convs, replay_stats = mix_replay(ctx, train_convs)
        build = dict(
            tokenizer=ctx.tokenizer,
            template=template,
            max_length=max_length,
            train_on_inputs=d.train_on_inputs,
            max_source_length=d.max_source_length,
            max_target_length=d.max_target_length,
        )
        train, stats = build_sft_dataset(train_convs, **build)
        evaluation = None
        if splits.eval:
            evaluation, eval_stats = build_sft_dataset(splits.eval, **build)
            stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
        stats.update(replay_stats)
        stats.update(splits.stats)
        key = f"{fingerprint_files(splits.files)}|{d}|{jinja_chat_template(template)}"
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        collator = PackedCollator() if ctx.args.train.padding_free else collator_for(ctx.tokenizer)
        return PreparedData(
            train, evaluation, collator, fingerprint, stats, splits.rejects, {"eval_conversations": splits.eval}
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"data_collator": data.collator, "processing_class": ctx.tokenizer, **lm_metric_kwargs()}

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        from tunestack.train.fast.batching import TokenBudgetMixin

        return (TokenBudgetMixin, *lm_trainer_mixins(ctx.args.train, model, packed=ctx.args.train.padding_free))

    def trainer_args(self, ctx: StageContext) -> Any:
        train = ctx.args.train
        if train.padding_free and train.include_num_input_tokens_seen == "non_padding":
            # Packed rows have no padding and no attention mask; counting ids != pad would skip real EOS tokens.
            train = copy.copy(train)
            train.include_num_input_tokens_seen = "all"
        return train

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        save_chat_files(ctx.tokenizer, self._template(ctx), ctx.ref.base_dir if ctx.ref else None, output_dir)

    def after_training(self, ctx: StageContext, trainer: Any, data: PreparedData) -> dict[str, Any]:
        d = ctx.args.data
        conversations = data.extras.get("eval_conversations") or []
        if not (d.predict_with_generate and conversations):
            return {}
        metrics: dict[str, Any] = {}
        if trainer.is_world_process_zero():
            from tunestack.train.predict import PREDICTIONS_FILE, predict_with_generate

            template = self._template(ctx)
            metrics = predict_with_generate(
                trainer.accelerator.unwrap_model(trainer.model),
                ctx.tokenizer,
                template,
                stop_token_ids(template, ctx.tokenizer),
                conversations,
                Path(ctx.args.train.output_dir) / PREDICTIONS_FILE,
                batch_size=ctx.args.train.per_device_eval_batch_size,
                max_new_tokens=d.max_new_tokens,
            )
        trainer.accelerator.wait_for_everyone()
        return metrics

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        s, m = data.stats, result["metrics"]
        line = (
            f"data: {s['samples']} conversations, {s['trainable_tokens']:,} answer tokens of {s['total_tokens']:,}; "
            f"{s['truncated']} truncated, {s['dropped_too_long']} dropped as too long"
        )
        if s.get("skipped_bad_records"):
            reasons = ", ".join(f"{n} {r}" for r, n in s["skip_reasons"].items())
            line += f", {s['skipped_bad_records']} bad records skipped ({reasons}; see rejects.jsonl)"
        lines = [line]
        if s.get("replay_samples"):
            from tunestack.train.replay import summary_line

            lines.append(summary_line(s) or "")
        ppl = perplexity_line(m, "eval perplexity on answers")
        if ppl:
            lines.append(ppl)
        if "predict_bleu4" in m:
            lines.append(
                f"predictions on {m['predict_samples']} held-out conversations: BLEU-4 {m['predict_bleu4']:.2f}, "
                f"ROUGE-L {m['predict_rouge_l']:.2f}, exact match {m['predict_exact_match']:.1f}% (predictions.jsonl)"
            )
        return lines


def main(argv: list[str]) -> int:
    return SupervisedStage().main(argv)
