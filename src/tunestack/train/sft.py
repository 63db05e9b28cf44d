"""Supervised fine-tuning: loss on exactly the assistant tokens (and their stop token) of chat data."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from tunestack.config.sft import SupervisedDataArguments
from tunestack.data.formats import Conversation, load_conversations
from tunestack.data.sources import find_data_files, fingerprint_files
from tunestack.data.supervised import build_sft_dataset, collator_for
from tunestack.data.templates import TokenizerTemplate, get_template, jinja_chat_template, stop_token_ids
from tunestack.train.base import PreparedData, Stage, StageArgs, StageContext, stage_main
from tunestack.train.efficient import PackedCollator
from tunestack.train.metrics import lm_metric_kwargs, lm_trainer_mixins, perplexity_line


def load_chat_split(paths: str, data_args: Any) -> Any:
    files = find_data_files(paths, suffixes=(".json", ".jsonl", ".csv", ".parquet"), what="chat data")
    return files, load_conversations(files, data_args.data_format, data_args.skip_bad_records)


def with_default_system(conversations: list[Conversation], system: str | None) -> list[Conversation]:
    if not system:
        return conversations
    return [c if c.system else dataclasses.replace(c, system=system) for c in conversations]


def save_chat_files(ctx: StageContext, template: Any, output_dir: Path) -> None:
    """Chat template into the tokenizer files and the template's stop tokens into generation_config.json,
    so every later consumer (merge, chat, serve, vLLM) stops where training taught the model to stop."""
    from transformers import GenerationConfig

    tokenizer = ctx.tokenizer
    if not isinstance(template, TokenizerTemplate):
        tokenizer.chat_template = jinja_chat_template(template)
        tokenizer.save_pretrained(output_dir)
    try:
        gen = GenerationConfig.from_pretrained(ctx.ref.base_dir) if ctx.ref else GenerationConfig()
    except OSError:
        gen = GenerationConfig()
    stops = stop_token_ids(template, tokenizer)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.save_pretrained(output_dir)


class SupervisedStage(Stage):
    name = "sft"
    description = "Supervised fine-tuning on chat data (MedicalGPT supervised_finetuning.py flags)."
    data_class = SupervisedDataArguments

    def validate(self, args: StageArgs) -> list[str]:
        if args.train.padding_free and args.train.include_num_input_tokens_seen == "non_padding":
            # Packed rows have no padding and no attention mask; counting ids != pad would skip real EOS tokens.
            args.train.include_num_input_tokens_seen = "all"
        d, problems = args.data, []
        budget = args.train.max_tokens_per_batch
        if budget is not None and budget < d.model_max_length:
            problems.append(
                f"--max_tokens_per_batch {budget} is less than --model_max_length {d.model_max_length}: "
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
        return get_template(ctx.args.data.template_name, ctx.tokenizer)

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        d = ctx.args.data
        template = self._template(ctx)
        train_files, train_loaded = load_chat_split(d.train_file_dir, d)
        rejects = list(train_loaded.rejects)
        train_convs = with_default_system(train_loaded.conversations, d.system_prompt)
        eval_convs: list[Conversation] = []
        eval_files: list[Path] = []
        if d.validation_file_dir:
            eval_files, eval_loaded = load_chat_split(d.validation_file_dir, d)
            rejects += eval_loaded.rejects
            eval_convs = with_default_system(eval_loaded.conversations, d.system_prompt)
        elif ctx.args.train.do_eval and d.validation_split_percentage > 0 and len(train_convs) > 1:
            import random

            order = list(range(len(train_convs)))
            random.Random(ctx.args.train.seed).shuffle(order)
            n_eval = max(1, int(len(train_convs) * d.validation_split_percentage / 100))
            held = set(order[:n_eval])
            eval_convs = [c for i, c in enumerate(train_convs) if i in held]
            train_convs = [c for i, c in enumerate(train_convs) if i not in held]
        if d.max_train_samples and d.max_train_samples > 0:
            train_convs = train_convs[: d.max_train_samples]
        if d.max_eval_samples and d.max_eval_samples > 0:
            eval_convs = eval_convs[: d.max_eval_samples]
        replay_stats: dict[str, Any] = {}
        if d.replay_ratio > 0:  # the forgetting guard: the starting model's own answers to general prompts
            from tunestack.train.replay import mix_replay

            train_convs, replay_stats = mix_replay(ctx, train_convs)
        build = dict(
            tokenizer=ctx.tokenizer,
            template=template,
            max_length=d.model_max_length,
            train_on_inputs=d.train_on_inputs,
            max_source_length=d.max_source_length,
            max_target_length=d.max_target_length,
        )
        train, stats = build_sft_dataset(train_convs, **build)
        evaluation = None
        if eval_convs:
            evaluation, eval_stats = build_sft_dataset(eval_convs, **build)
            stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
        stats.update(replay_stats)
        stats["skipped_bad_records"] = len(rejects)
        stats["skip_reasons"] = dict(train_loaded.reason_counts)
        key = f"{fingerprint_files(train_files + eval_files)}|{d}|{jinja_chat_template(template)}"
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        collator = PackedCollator() if ctx.args.train.padding_free else collator_for(ctx.tokenizer)
        return PreparedData(
            train, evaluation, collator, fingerprint, stats, rejects, {"eval_conversations": eval_convs}
        )

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"data_collator": data.collator, "processing_class": ctx.tokenizer, **lm_metric_kwargs()}

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        from tunestack.train.batching import TokenBudgetMixin

        return (TokenBudgetMixin, *lm_trainer_mixins(ctx.args.train, model, packed=ctx.args.train.padding_free))

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        save_chat_files(ctx, self._template(ctx), output_dir)

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
    return stage_main(SupervisedStage(), argv)
