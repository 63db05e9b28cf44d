"""SFT data formats -> one conversation schema, with every bad record reported at once.

Accepted record formats (detected per record, or forced with `data_format`):

* ``sharegpt``: ``{"conversations": [{"from": "system|human|gpt", "value": ...}, ...]}``; ``from`` may also
  be ``user`` / ``assistant``; an optional top-level ``system_prompt`` or ``system``.
* ``messages`` (OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...]}``.
* ``alpaca``: ``instruction``, ``input`` (optional), ``output``, optional ``system`` and ``history`` ([[q, a], ...]).
* ``prompt_response``: ``prompt``, ``response``, optional ``history`` and ``system``.

Every format becomes a `Conversation`: an optional system prompt and turns that alternate
user/assistant, starting with a user turn and ending with an assistant answer.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunestack.data.records import Loaded, RecordProblem, RecordTable, load_records
from tunestack.errors import DataError

Role = Literal["user", "assistant"]
FORMATS = ("sharegpt", "messages", "alpaca", "prompt_response")
# The key that marks each format, in detection order.
_FORMAT_KEYS = {
    "sharegpt": "conversations",
    "messages": "messages",
    "alpaca": "instruction",
    "prompt_response": "prompt",
}
_FORMAT_LABELS = {
    "sharegpt": "'conversations' (sharegpt)",
    "messages": "'messages' (openai messages)",
    "alpaca": "'instruction' + 'output' (alpaca)",
    "prompt_response": "'prompt' + 'response'",
}
_KNOWN_KEYS = (
    "conversations",
    "messages",
    "instruction",
    "input",
    "output",
    "prompt",
    "response",
    "history",
    "system",
    "system_prompt",
)
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """A validated chat sample: user/assistant turns strictly alternating, ending with an answer."""

    system: str | None
    messages: tuple[Message, ...]
    origin: str = ""

    def __post_init__(self) -> None:
        problem = turn_order_problem([m.role for m in self.messages])
        if problem:
            raise ValueError(f"{self.origin or 'conversation'}: {problem}")

    @property
    def pairs(self) -> list[tuple[Message, Message]]:
        return [(self.messages[i], self.messages[i + 1]) for i in range(0, len(self.messages), 2)]

    def drop_pairs(self, n: int) -> Conversation:
        """The same conversation without its `n` earliest user/assistant pairs (the system prompt stays)."""
        return Conversation(self.system, self.messages[2 * n :], self.origin)

    def with_last_user(self, content: str) -> Conversation:
        msgs = list(self.messages)
        msgs[-2] = Message("user", content)
        return Conversation(self.system, tuple(msgs), self.origin)


def turn_order_problem(roles: Sequence[str], numbers: Sequence[int] | None = None) -> str | None:
    """Why `roles` is not user, assistant, ..., assistant (None when it is).

    `numbers` are the turn numbers to report (as the turns are numbered in the file).
    """
    numbers = list(numbers) if numbers is not None else list(range(1, len(roles) + 1))
    if not roles:
        return "the conversation has no user/assistant turns"
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return (
                f"turn {numbers[i]} is {role} but should be {expected} "
                "(turns must alternate user/assistant, starting with user)"
            )
    if roles[-1] != "assistant":
        return f"the last turn ({numbers[-1]}) is a user turn; a conversation must end with an assistant answer"
    return None


# ---------------------------------------------------------------------------------------------
# Format detection


def detect_format(data: dict[str, Any]) -> str | None:
    for fmt, key in _FORMAT_KEYS.items():
        if _present(data.get(key)):
            return fmt
    return None


def _present(value: Any) -> bool:
    return value is not None and value != ""


def key_hints(data: dict[str, Any], known: Sequence[str] = _KNOWN_KEYS) -> str:
    """'; did you mean 'conversations' instead of 'conversation'?' for near-miss keys, else ''."""
    hints = []
    for key in sorted(data):
        close = difflib.get_close_matches(str(key).lower(), known, n=1, cutoff=0.75)
        if close and close[0] != key:
            hints.append(f"'{close[0]}' instead of '{key}'")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _unrecognised(data: dict[str, Any]) -> RecordProblem:
    expected = ", ".join(_FORMAT_LABELS.values())
    return RecordProblem(
        "unrecognised format", f"unrecognised record: keys {sorted(data)}; expected {expected}{key_hints(data)}"
    )


def _missing_key(data: dict[str, Any], fmt: str) -> RecordProblem:
    key = _FORMAT_KEYS[fmt]
    found = detect_format(data)
    looks = f"; it looks like {found}" if found and found != fmt else ""
    return RecordProblem("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)}){looks}{key_hints(data)}")


# ---------------------------------------------------------------------------------------------
# Per-format parsing


def text_value(value: Any, what: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts
    if not isinstance(value, str):
        raise RecordProblem("wrong type", f"{what} must be a string, got {type(value).__name__}")
    return value


def optional_system(data: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if _present(value):
            return text_value(value, f"'{key}'")
    return None


def parse_turn(turn: Any, i: int, role_key: str, content_key: str) -> tuple[str, str]:
    """(normalised role, text) of one turn; accepts from/value and role/content in either format."""
    if not isinstance(turn, dict):
        raise RecordProblem("wrong type", f"turn {i} must be an object with '{role_key}' and '{content_key}'")
    raw_role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if raw_role is None:
        raise RecordProblem("missing field", f"turn {i} has no '{role_key}' (keys: {sorted(turn)})")
    if content is None:
        raise RecordProblem("missing field", f"turn {i} has no '{content_key}' (keys: {sorted(turn)})")
    role = _ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise RecordProblem("unknown role", f"turn {i} has unknown role '{raw_role}' (accepted: {', '.join(_ROLE_ALIASES)})")
    text = text_value(content, f"turn {i} '{content_key}'")
    if role != "system" and not text.strip():
        raise RecordProblem("empty turn", f"turn {i} ({role}) is empty")
    return role, text


def _parse_turns(data: dict[str, Any], list_key: str, role_key: str, content_key: str) -> Conversation:
    turns = data.get(list_key)
    if not isinstance(turns, list):
        raise RecordProblem("wrong type", f"'{list_key}' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise RecordProblem("empty conversation", f"'{list_key}' is empty")
    system = None
    messages: list[Message] = []
    numbers: list[int] = []
    for i, raw in enumerate(turns, start=1):
        role, text = parse_turn(raw, i, role_key, content_key)
        if role == "system":
            if i != 1:
                raise RecordProblem("bad turn order", f"turn {i} is a system turn; only the first turn may be a system turn")
            system = text or None
            continue
        messages.append(Message(role, text))  # type: ignore[arg-type]
        numbers.append(i)
    problem = turn_order_problem([m.role for m in messages], numbers)
    if problem:
        raise RecordProblem("bad turn order", problem)
    if system is None:
        system = optional_system(data, "system_prompt", "system")
    return Conversation(system, tuple(messages))


def parse_history(data: dict[str, Any]) -> list[Message]:
    history = data.get("history")
    if not _present(history):
        return []
    if not isinstance(history, list):
        raise RecordProblem("wrong type", f"'history' must be a list of [question, answer] pairs, got {type(history).__name__}")
    messages: list[Message] = []
    for i, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordProblem("wrong type", f"history[{i}] must be a [question, answer] pair")
        question = text_value(pair[0], f"history[{i}] question")
        answer = text_value(pair[1], f"history[{i}] answer")
        if not question.strip():
            raise RecordProblem("empty turn", f"history[{i}] has an empty question")
        if not answer.strip():
            raise RecordProblem("empty turn", f"history[{i}] has an empty answer")
        messages += [Message("user", question), Message("assistant", answer)]
    return messages


def _required(data: dict[str, Any], key: str, fmt: str) -> str:
    if data.get(key) is None:
        raise RecordProblem("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)})")
    value = text_value(data[key], f"'{key}'")
    if not value.strip():
        raise RecordProblem("empty turn", f"'{key}' is empty")
    return value


def _parse_alpaca(data: dict[str, Any]) -> Conversation:
    query = _required(data, "instruction", "alpaca")
    extra = data.get("input")
    if _present(extra):
        query += "\n" + text_value(extra, "'input'")
    output = _required(data, "output", "alpaca")
    messages = parse_history(data) + [Message("user", query), Message("assistant", output)]
    return Conversation(optional_system(data, "system", "system_prompt"), tuple(messages))


def _parse_prompt_response(data: dict[str, Any]) -> Conversation:
    prompt = _required(data, "prompt", "prompt_response")
    response = _required(data, "response", "prompt_response")
    messages = parse_history(data) + [Message("user", prompt), Message("assistant", response)]
    return Conversation(optional_system(data, "system", "system_prompt"), tuple(messages))


_PARSERS = {
    "sharegpt": lambda d: _parse_turns(d, "conversations", "from", "value"),
    "messages": lambda d: _parse_turns(d, "messages", "role", "content"),
    "alpaca": _parse_alpaca,
    "prompt_response": _parse_prompt_response,
}


def _parse(data: dict[str, Any], fmt: str | None) -> Conversation:
    """Parse `data` as `fmt` (None: detect it)."""
    if fmt is None:
        fmt = detect_format(data)
        if fmt is None:
            raise _unrecognised(data)
    elif not _present(data.get(_FORMAT_KEYS[fmt])) and _FORMAT_KEYS[fmt] not in data:
        raise _missing_key(data, fmt)
    return _PARSERS[fmt](data)


def _undetected(data: dict[str, Any], known: str | None) -> RecordProblem:
    # No format key at all: in a file of known format, say which key the record lacks.
    return _missing_key(data, known) if known else _unrecognised(data)


CONVERSATIONS: RecordTable[Conversation] = RecordTable("SFT", "conversations", FORMATS, detect_format, _parse, _undetected)


def parse_record(data: dict[str, Any], data_format: str = "auto") -> Conversation:
    """One record -> Conversation; raises `DataError` (without a location) when it is not valid."""
    CONVERSATIONS.check_format_name(data_format)
    try:
        return _parse(data, None if data_format == "auto" else data_format)
    except RecordProblem as bad:
        raise DataError(bad.message) from None


def load_conversations(
    files: Iterable[Path | str], data_format: str = "auto", skip_bad_records: bool = False
) -> Loaded[Conversation]:
    """Read SFT files into conversations (see tunestack.data.records.load_records)."""
    return load_records(files, CONVERSATIONS, data_format, skip_bad_records)
