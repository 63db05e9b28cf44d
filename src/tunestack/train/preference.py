"""What the preference stages (rm, dpo, kto) share: reading and encoding preference data, the reference
model of full-parameter runs, TRL trainers fed our pre-tokenized data, and the saved chat files."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from tunestack.config.preference import PreferenceDataArguments
from tunestack.data.preference import PREFERENCES, Item, Kind, pairs_only, unpaired
from tunestack.data.preference_encoding import PreferenceEncoder, PreferenceLimits, build_preference_dataset
from tunestack.data.records import load_splits
from tunestack.data.sources import fingerprint_files
from tunestack.data.templates import get_template, jinja_chat_template
from tunestack.model.load import load_model
from tunestack.model.ref import resolve_model
from tunestack.train.base import PreparedData, Stage, StageArgs, StageContext
from tunestack.train.chat_files import save_chat_files

logger = logging.getLogger("tunestack")

ADAPTER_METHODS = ("lora", "qlora", "adalora", "dora")


class PreferenceStage(Stage):
    """Preference data in, the SFT output-folder contract out; subclasses choose the trainer and loss."""

    data_class = PreferenceDataArguments
    kind: Kind = "pairs"

    def validate(self, args: StageArgs) -> list[str]:
        if args.model.from_scratch:
            return [
                f"tunestack {self.name} starts from a trained model; --model_config/--config_overrides do not apply"
            ]
        return []

    def _template(self, ctx: StageContext) -> Any:
        return get_template(ctx.args.data.template_name, ctx.tokenizer, ctx.args.data.tool_format)

    def _samples(self, items: list[Item]) -> list[Item]:
        """What the trainer gets: pairs (rm, dpo) or, for kto, every pair split into two unpaired samples."""
        return list(unpaired(items)) if self.kind == "unpaired" else items

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        d = ctx.args.data
        template = self._template(ctx)
        accept = pairs_only if self.kind == "pairs" else None
        splits = load_splits(d, PREFERENCES, ctx.args.train.do_eval, ctx.args.train.seed, accept)
        limits = PreferenceLimits(d.max_source_length, d.max_target_length, d.min_target_length)
        encoder = PreferenceEncoder(ctx.tokenizer, template, limits)
        train, stats = build_preference_dataset(self._samples(splits.train), encoder)
        evaluation = None
        if splits.eval:
            evaluation, eval_stats = build_preference_dataset(self._samples(splits.eval), encoder)
            stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
        stats.update(splits.stats)
        key = f"{self.kind}|{fingerprint_files(splits.files)}|{d}|{jinja_chat_template(template)}"
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        return PreparedData(self.shape(train, ctx), self.shape(evaluation, ctx), None, fingerprint, stats, splits.rejects)

    def shape(self, dataset: Any, ctx: StageContext) -> Any:
        """The encoded dataset as this stage's trainer wants it (default: unchanged)."""
        return dataset

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"processing_class": ctx.tokenizer}

    def save_extras(self, ctx: StageContext, output_dir: Path) -> None:
        save_chat_files(ctx.tokenizer, self._template(ctx), ctx.ref.base_dir if ctx.ref else None, output_dir)

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        s = data.stats
        unit = "samples" if self.kind == "unpaired" else "pairs"
        line = (
            f"data: {s['samples']} {unit} ({s['prompt_tokens']:,} prompt and {s['answer_tokens']:,} answer tokens); "
            f"{s['truncated_prompts']} prompts cut to their end, {s['dropped_too_long']} dropped as too long, "
            f"{s['dropped_too_short']} as too short"
        )
        if s.get("skipped_bad_records"):
            reasons = ", ".join(f"{n} {r}" for r, n in s["skip_reasons"].items())
            line += f", {s['skipped_bad_records']} bad records skipped ({reasons}; see rejects.jsonl)"
        if "eval_samples" in s:
            line += f"; {s['eval_samples']} held out"
        lines = [line]
        m = result["metrics"]
        if "eval_rewards/margins" in m:
            before = m.get("before_eval_rewards/margins")
            arrow = f"{before:+.3f} -> " if before is not None else ""
            accuracy = m.get("eval_rewards/accuracies")
            tail = f", accuracy {accuracy:.3f}" if accuracy is not None else ""
            lines.append(f"held-out reward margin (chosen - rejected): {arrow}{m['eval_rewards/margins']:+.3f}{tail}")
        return lines


def reference_model(ctx: StageContext) -> Any:
    """The frozen reference of a DPO/KTO run: None under an adapter (the adapter is switched off instead) or with
    precomputed reference log-probs; else --ref_model, or a second copy of the start model."""
    args = ctx.args
    options = args.options
    if args.method in ADAPTER_METHODS:
        return None
    if options.precompute_ref_log_probs and not options.ref_model:
        return None
    ref = resolve_model(options.ref_model) if options.ref_model else ctx.ref
    logger.info("loading the reference model (%s) for full-parameter training", ref.reference)
    model = load_model(ref, args.model, tokenizer=ctx.tokenizer)
    model.requires_grad_(False)
    return model.eval()


def drop_fresh_reference_adapter(model: Any) -> None:
    """TRL copies the policy's adapter into a frozen "ref" adapter. A fresh adapter (every LoRA B zero) changes
    nothing, so the copy equals the model with adapters disabled: drop it, and the reference is exactly that."""
    import torch

    peft_config = getattr(model, "peft_config", None)
    if not peft_config or "ref" not in peft_config:
        return
    b = [p for n, p in model.named_parameters() if "lora_B" in n and ".default" in n]
    if b and all(not torch.any(p != 0) for p in b):
        model.delete_adapter("ref")
        model.set_adapter("default")


def pretokenized(dataset: Any, *columns: str) -> bool:
    names = getattr(dataset, "column_names", None) or []
    return all(c in names for c in columns)
