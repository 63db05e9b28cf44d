"""Show SFT samples as the model will see them, with the trained span marked, and length statistics."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from typing import Any

from tunestack.data.formats import Conversation
from tunestack.data.supervised import Encoded, Limits, SegmentTokenizer
from tunestack.data.templates import Template

OPEN, CLOSE = "⟦", "⟧"
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


def preview(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    template: Template,
    max_length: int,
    n: int = 3,
    color: bool | None = None,
) -> str:
    """The first `n` samples with trained tokens wrapped in ⟦ ⟧ (green on a terminal), then the token
    lengths of all samples (min / median / p95 / max) and how many `max_length` truncates or drops."""
    if color is None:
        color = sys.stdout.isatty()
    encoder = SegmentTokenizer(tokenizer, template)
    limits = Limits(max_length)
    lines: list[str] = []
    for conv in conversations[:n]:
        encoded = encoder.fit(conv, limits)
        if encoded is None:
            lines.append(f"--- {conv.origin}: dropped (its last answer does not fit in {max_length} tokens)")
            continue
        note = ", truncated" if encoded.truncated else ""
        lines.append(f"--- {conv.origin}: {len(encoded.ids)} tokens, {sum(encoded.answer)} trained{note}")
        lines.append(render_marked(encoded, tokenizer, color))
    lines.append(length_report(conversations, encoder, limits))
    return "\n".join(lines)


def render_marked(encoded: Encoded, tokenizer: Any, color: bool = False) -> str:
    """Decoded tokens, runs of trained tokens wrapped in ⟦ ⟧ (or colored)."""
    out: list[str] = []
    start = 0
    for i in range(1, len(encoded.ids) + 1):
        if i == len(encoded.ids) or encoded.answer[i] != encoded.answer[start]:
            text = tokenizer.decode(encoded.ids[start:i], skip_special_tokens=False)
            if encoded.answer[start]:
                text = f"{_GREEN}{text}{_RESET}" if color else f"{OPEN}{text}{CLOSE}"
            out.append(text)
            start = i
    return "".join(out)


def length_report(conversations: Sequence[Conversation], encoder: SegmentTokenizer, limits: Limits) -> str:
    lengths = [len(encoder.encode(conv).ids) for conv in conversations]
    if not lengths:
        return "no samples"
    over = [conv for conv, n in zip(conversations, lengths, strict=True) if n > limits.max_length]
    dropped = sum(1 for conv in over if encoder.fit(conv, limits) is None)
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"token lengths of {len(lengths)} samples: min {ordered[0]}, median {statistics.median(ordered):g}, "
        f"p95 {p95}, max {ordered[-1]}\n"
        f"at max_length {limits.max_length}: {len(over) - dropped} truncated (oldest turns or the question cut), "
        f"{dropped} dropped (the answer does not fit)"
    )
