"""Continued pretraining: causal LM loss on blocks of raw domain text."""

from __future__ import annotations

from typing import Any

from tunestack.config.pretrain import PretrainDataArguments
from tunestack.data.collators import DocumentCollator, PadCollator
from tunestack.data.pretrain import load_pretrain_corpus, resolve_block_size, stream_blocks
from tunestack.data.sources import find_data_files
from tunestack.train.base import PreparedData, Stage, StageArgs, StageContext, cache_root
from tunestack.train.fast import lm_trainer_mixins
from tunestack.train.metrics import lm_metric_kwargs, perplexity_line


class PretrainStage(Stage):
    name = "pt"
    description = "Continued pretraining on raw domain text (MedicalGPT pretraining.py flags)."
    data_class = PretrainDataArguments

    def validate(self, args: StageArgs) -> list[str]:
        problems = []
        if args.data.streaming and not (args.train.max_steps and args.train.max_steps > 0):
            problems.append("--streaming needs --max_steps (a stream has no length)")
        if args.data.streaming and args.train.do_eval and not args.data.validation_file_dir:
            problems.append("--streaming with --do_eval needs --validation_file_dir")
        return problems

    def prepare_data(self, ctx: StageContext) -> PreparedData:
        args = ctx.args
        context = getattr(ctx.model_config, "max_position_embeddings", None)
        block_size = resolve_block_size(args.data.block_size, context)
        tok = ctx.tokenizer
        if _document_attention(args) and tok.eos_token_id is not None:
            collator = DocumentCollator(tok.pad_token_id, tok.eos_token_id)
        else:
            collator = PadCollator(tok.pad_token_id)
        if args.data.streaming:
            import datasets

            files = find_data_files(args.data.train_file_dir, what="training")
            train = datasets.IterableDataset.from_generator(
                stream_blocks,
                gen_kwargs={
                    "files": files,
                    "tokenizer": ctx.tokenizer,
                    "data_args": args.data,
                    "block_size": block_size,
                },
            )
            evaluation = None
            if args.data.validation_file_dir:
                val_args = type(args.data)(
                    **{
                        **vars(args.data),
                        "train_file_dir": args.data.validation_file_dir,
                        "validation_file_dir": None,
                        "streaming": False,
                    }
                )
                evaluation = load_pretrain_corpus(
                    val_args, ctx.tokenizer, block_size, cache_root(args), False, args.train.seed
                ).train
            return PreparedData(train, evaluation, collator, "streaming", {"block_size": block_size, "streaming": True})
        corpus = load_pretrain_corpus(
            args.data, ctx.tokenizer, block_size, cache_root(args), args.train.do_eval, args.train.seed
        )
        return PreparedData(corpus.train, corpus.eval, collator, corpus.fingerprint, corpus.stats)

    def trainer_kwargs(self, ctx: StageContext, data: PreparedData) -> dict[str, Any]:
        return {"data_collator": data.collator, "processing_class": ctx.tokenizer, **lm_metric_kwargs()}

    def trainer_mixins(self, ctx: StageContext, model: Any) -> tuple[type, ...]:
        return lm_trainer_mixins(ctx.args.train, model, packed=_document_attention(ctx.args))

    def summary_lines(self, ctx: StageContext, data: PreparedData, result: dict[str, Any]) -> list[str]:
        s, m = data.stats, result["metrics"]
        lines = []
        if "train_documents" in s:
            cached = " (tokenized data from cache)" if s.get("train_cache_hit") else ""
            lines.append(
                f"data: {s['train_documents']} documents, {s['train_tokens']:,} tokens -> {s['train_blocks']} blocks "
                f"of {s['block_size']}; {s['train_blocks_used']} train / {s['eval_blocks_used']} eval blocks{cached}"
            )
        if result.get("tokens_seen"):
            lines.append(f"tokens trained: {int(result['tokens_seen']):,}")
        ppl = perplexity_line(m, "eval perplexity")
        if ppl:
            lines.append(ppl)
        return lines


def main(argv: list[str]) -> int:
    return PretrainStage().main(argv)


def _document_attention(args: Any) -> bool:
    """--document_attention, or MedicalGPT's --packing False (documents do not see each other)."""
    return bool(args.train.document_attention or not args.data.packing)
