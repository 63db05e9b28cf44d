"""Tool-call accuracy: for held-out prompts whose reference answer calls tools, the share of predictions that make
the same calls (the same names, in order, with arguments equal as JSON: key order and spacing do not matter)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tunestack.data.tools import ToolCall


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError:
        return call.arguments


def calls_match(predicted: Sequence[ToolCall], reference: Sequence[ToolCall]) -> bool:
    """Whether `predicted` makes exactly the calls of `reference`."""
    return len(predicted) == len(reference) and all(
        p.name == r.name and _arguments(p) == _arguments(r) for p, r in zip(predicted, reference, strict=True)
    )


def names_match(predicted: Sequence[ToolCall], reference: Sequence[ToolCall]) -> bool:
    return [p.name for p in predicted] == [r.name for r in reference]


def tool_call_scores(pairs: Sequence[tuple[Sequence[ToolCall], Sequence[ToolCall]]]) -> dict[str, float]:
    """Over (predicted calls, reference calls) pairs, in percent: `tool_call_accuracy` (name and arguments),
    `tool_name_accuracy` (names only), and `tool_call_samples`. Empty when there are no pairs."""
    if not pairs:
        return {}
    full = sum(calls_match(p, r) for p, r in pairs)
    names = sum(names_match(p, r) for p, r in pairs)
    return {
        "tool_call_accuracy": round(100 * full / len(pairs), 2),
        "tool_name_accuracy": round(100 * names / len(pairs), 2),
        "tool_call_samples": len(pairs),
    }
