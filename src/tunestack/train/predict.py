"""`--predict_with_generate`: answer the held-out conversations with the model just trained and score the
answers against the references (BLEU-4, ROUGE-L, exact match) into OUTPUT_DIR/predictions.jsonl.

The prompt of a conversation is everything before its last answer, rendered with the training template
and tokenized the way training tokenizes it; decoding is greedy so that the scores repeat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunestack.atomic import write_jsonl_atomic
from tunestack.config.infer import GenerationArguments
from tunestack.data.formats import Conversation
from tunestack.eval.metrics import answer_scores, score_answers
from tunestack.infer.batch import PromptItem, generate_all
from tunestack.infer.generate import ChatModel

PREDICTIONS_FILE = "predictions.jsonl"


def prediction_items(conversations: list[Conversation]) -> list[PromptItem]:
    """One item per conversation: its turns up to the last user message, and the last answer as reference."""
    items = []
    for conv in conversations:
        turns = [{"role": m.role, "content": m.content} for m in conv.messages[:-1]]
        items.append(PromptItem(turns, conv.system, conv.origin, conv.messages[-1].content))
    return items


def predict_with_generate(
    model: Any,
    tokenizer: Any,
    template: Any,
    stop_ids: list[int],
    conversations: list[Conversation],
    output_file: Path,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Write predictions.jsonl rows (prompt, reference, prediction, scores) and return `predict_*` metrics."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True  # off while training; generation without a KV cache is quadratic
    try:
        chat = ChatModel(model, tokenizer, stop_ids, template, name="the trained model")
        options = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0.0)
        items = prediction_items(conversations)
        answers = generate_all(chat, items, options, batch_size, default_system=None)
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)
    rows = []
    for item, answer in zip(items, answers, strict=True):
        assert item.reference is not None
        scores = answer_scores(answer, item.reference)
        rows.append(
            {
                "origin": item.where,
                "prompt": item.prompt,
                "reference": item.reference,
                "prediction": answer,
                **{k: round(100 * v, 2) for k, v in scores.items()},
            }
        )
    write_jsonl_atomic(output_file, rows)
    means = score_answers(answers, [item.reference or "" for item in items])
    return {
        "predict_bleu4": means["bleu4"],
        "predict_rouge_l": means["rouge_l"],
        "predict_exact_match": means["exact_match"],
        "predict_samples": len(rows),
    }
