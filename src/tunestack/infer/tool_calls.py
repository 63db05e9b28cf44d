"""A model's answer back into tool calls, whole or while it streams, for chat, infer, eval and serve.

The tool format is the one the model was trained with: the named format saved in front of its chat template, or,
for a template that writes tools itself, the named format that reads back what it writes
(tunestack.data.templates.call_format). An answer whose call is malformed (not JSON, no name) is plain text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tunestack.data.tool_formats import ToolFormat
from tunestack.data.tools import ToolCall


@dataclass(frozen=True)
class Answer:
    """An answer: its text (what comes before any calls) and the calls it makes."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()


def read_answer(fmt: ToolFormat | None, text: str) -> Answer:
    """`text` as an Answer; with no tool format (tools not offered) it is all content."""
    parsed = fmt.parse(text) if fmt is not None else None
    if parsed is None:
        return Answer(text)
    return Answer(parsed[0], parsed[1])


def openai_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` (arguments as a JSON string), each with a fresh id."""
    return [
        {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


@dataclass
class CallStream:
    """Streams the text part of an answer: text that may be the start of a call is held back until the answer
    ends; then `finish` gives the rest of the text and the calls. The pieces joined equal `finish`'s content."""

    fmt: ToolFormat
    text: str = ""
    sent: str = field(default="")

    def feed(self, piece: str) -> str:
        """Take new answer text; return the text that may be shown now."""
        self.text += piece
        safe = self.text[: self.fmt.hold_from(self.text)].rstrip()
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        out, self.sent = safe[len(self.sent) :], safe
        return out

    def finish(self, final: str | None = None) -> tuple[str, Answer]:
        """(text still to show, the whole answer) once the answer is complete (`final`: its whole text)."""
        answer = read_answer(self.fmt, self.text if final is None else final)
        rest = answer.content[len(self.sent) :] if answer.content.startswith(self.sent) else ""
        self.sent = answer.content if answer.content.startswith(self.sent) else self.sent
        return rest, answer
