"""Evaluation metrics shared by the language-modelling stages."""

from __future__ import annotations

from typing import Any


def next_token_accuracy(eval_pred: Any) -> dict[str, float]:
    """Share of trained positions whose argmax prediction is the next token (labels -100 ignored)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions = predictions[:, :-1]
    labels = labels[:, 1:]
    mask = labels != -100
    correct = (predictions == labels) & mask
    return {"accuracy": float(correct.sum() / max(mask.sum(), 1))}


def argmax_logits(logits: Any, labels: Any) -> Any:
    """Keep only the argmax so evaluation never accumulates full-vocabulary logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def lm_metric_kwargs() -> dict[str, Any]:
    return {"compute_metrics": next_token_accuracy, "preprocess_logits_for_metrics": argmax_logits}


def perplexity_line(metrics: dict[str, Any], label: str) -> str | None:
    """'LABEL: before -> after (accuracy)' for the run summary, or None without an eval."""
    if "eval_perplexity" not in metrics:
        return None
    before = metrics.get("before_eval_perplexity")
    arrow = f"{before:.2f} -> " if before is not None else ""
    accuracy = metrics.get("eval_accuracy", float("nan"))
    return f"{label}: {arrow}{metrics['eval_perplexity']:.2f}  (next-token accuracy {accuracy:.3f})"
