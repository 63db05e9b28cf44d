"""SFT data formats -> one conversation schema, with every bad record reported at once.

Accepted record formats (detected per record, or forced with `data_format`):

* ``sharegpt``: ``{"conversations": [{"from": "system|human|gpt", "value": ...}, ...]}``; ``from`` may also
  be ``user`` / ``assistant``, and ``function_call`` / ``observation`` for tool calls and their results; an
  optional top-level ``system_prompt`` or ``system``, and ``tools`` (see tunestack.data.tools).
* ``messages`` (OpenAI): ``{"messages": [{"role": ..., "content": ...}, ...]}``, assistant messages with
  ``tool_calls``, ``tool`` messages with results, and ``tools``.
* ``alpaca``: ``instruction``, ``input`` (optional), ``output``, optional ``system`` and ``history`` ([[q, a], ...]).
* ``prompt_response``: ``prompt``, ``response``, optional ``history`` and ``system``.

Every format becomes a `Conversation`: an optional system prompt, the tools it may call, and turns that
alternate user/assistant, starting with a user turn and ending with an assistant answer; an assistant turn may
call tools, and the results (``tool`` turns) follow the call before the assistant speaks again.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunestack.data.records import Loaded, RecordProblem, RecordTable, load_records
from tunestack.data.tools import Tool, ToolCall, calls_from_dicts, parse_calls, parse_tools
from tunestack.errors import DataError

Role = Literal["user", "assistant", "tool"]
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
    "tools",
)
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


@dataclass(frozen=True)
class Message:
    """One turn. An assistant turn may carry `tool_calls` (its `content` is then any text before the calls);
    a `tool` turn holds a tool's result."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """A validated chat sample: user/assistant exchanges (with tool calls and results), ending with an answer."""

    system: str | None
    messages: tuple[Message, ...]
    origin: str = ""
    tools: tuple[Tool, ...] = ()

    def __post_init__(self) -> None:
        problem = turn_order_problem(self.messages)
        if problem:
            raise ValueError(f"{self.origin or 'conversation'}: {problem}")

    @property
    def exchanges(self) -> int:
        """How many user turns (each opens an exchange: the question, its answers, calls and results)."""
        return sum(1 for m in self.messages if m.role == "user")

    def drop_pairs(self, n: int) -> Conversation:
        """The same conversation without its `n` earliest exchanges (the system prompt and tools stay)."""
        starts = [i for i, m in enumerate(self.messages) if m.role == "user"]
        return Conversation(self.system, self.messages[starts[n] :], self.origin, self.tools)

    def with_last_user(self, content: str) -> Conversation:
        msgs = list(self.messages)
        last = max(i for i, m in enumerate(msgs) if m.role == "user")
        msgs[last] = Message("user", content)
        return Conversation(self.system, tuple(msgs), self.origin, self.tools)


def as_message(m: Message | Mapping[str, Any]) -> Message:
    """A Message from a message dict: role, content (None for a call without text) and optional `tool_calls`
    (ToolCall objects, OpenAI's shape or {"name", "arguments"}); DataError when the calls are not well formed."""
    if isinstance(m, Message):
        return m
    return Message(m["role"], m.get("content") or "", calls_from_dicts(m.get("tool_calls")))


def has_tool_content(messages: Sequence[Message], tools: Sequence[Tool] = ()) -> bool:
    """Whether rendering needs a tool format: tools offered, a call made or a result given."""
    return bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)


def turn_order_problem(
    turns: Sequence[Message], numbers: Sequence[int] | None = None, prompt: bool = False
) -> str | None:
    """Why `turns` is not a conversation (None when it is): user and assistant alternate from a user turn; an
    assistant turn that calls tools may be followed by their results (tool turns), then the assistant goes on.
    A conversation ends with an assistant turn; a prompt (`prompt=True`) with a user or tool turn.

    `numbers` are the turn numbers to report (as the turns are numbered in the file).
    """
    numbers = list(numbers) if numbers is not None else list(range(1, len(turns) + 1))
    if not turns:
        return "the conversation has no user/assistant turns"
    for i, turn in enumerate(turns):
        before = turns[i - 1] if i else None
        if turn.role == "tool":
            if before is None or not (before.tool_calls or before.role == "tool"):
                return f"turn {numbers[i]} is a tool result (observation) with no tool call (function_call) before it"
            continue
        expected = "user" if before is None or before.role == "assistant" else "assistant"
        if turn.role != expected:
            return (
                f"turn {numbers[i]} is {turn.role} but should be {expected} "
                "(turns must alternate user/assistant, starting with user)"
            )
        if turn.role == "user" and before is not None and before.tool_calls:
            return f"turn {numbers[i]} is user but the tool call of turn {numbers[i - 1]} has no result before it"
    last = turns[-1]
    if prompt and last.role == "assistant":
        return f"the last turn ({numbers[-1]}) is an assistant turn; a prompt ends with a user turn or a tool result"
    if not prompt and last.role != "assistant":
        kind = "a user turn" if last.role == "user" else "a tool result"
        return f"the last turn ({numbers[-1]}) is {kind}; a conversation must end with an assistant answer"
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
    message = parse_message(turn, i, role_key, content_key)
    return message.role, message.content


def parse_message(turn: Any, i: int, role_key: str, content_key: str) -> Message:
    """One turn as a Message (role "system" for a system turn); from/value and role/content in either format,
    function_call / observation turns and OpenAI tool_calls / tool messages included."""
    if not isinstance(turn, dict):
        raise RecordProblem("wrong type", f"turn {i} must be an object with '{role_key}' and '{content_key}'")
    raw_role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if raw_role is None:
        raise RecordProblem("missing field", f"turn {i} has no '{role_key}' (keys: {sorted(turn)})")
    role = _ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise RecordProblem("unknown role", f"turn {i} has unknown role '{raw_role}' (accepted: {', '.join(_ROLE_ALIASES)})")
    if role == "function_call":
        if content is None:
            raise RecordProblem("missing field", f"turn {i} has no '{content_key}' (keys: {sorted(turn)})")
        return Message("assistant", "", parse_calls(content, f"turn {i} (function_call)"))
    calls = parse_calls(turn["tool_calls"], f"turn {i} 'tool_calls'") if role == "assistant" and turn.get("tool_calls") else ()
    if content is None and not calls:
        raise RecordProblem("missing field", f"turn {i} has no '{content_key}' (keys: {sorted(turn)})")
    text = "" if content is None else text_value(content, f"turn {i} '{content_key}'")
    if role != "system" and not text.strip() and not calls:
        raise RecordProblem("empty turn", f"turn {i} ({role}) is empty")
    return Message(role, text, calls)  # type: ignore[arg-type]


def parse_messages(turns: Any, list_key: str, role_key: str = "role", content_key: str = "content") -> tuple[str | None, list[Message], list[int]]:
    """(system, messages, their turn numbers) of a list of turns; a system turn may only come first."""
    if not isinstance(turns, list):
        raise RecordProblem("wrong type", f"'{list_key}' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise RecordProblem("empty conversation", f"'{list_key}' is empty")
    system = None
    messages: list[Message] = []
    numbers: list[int] = []
    for i, raw in enumerate(turns, start=1):
        message = parse_message(raw, i, role_key, content_key)
        if message.role == "system":  # type: ignore[comparison-overlap]
            if i != 1:
                raise RecordProblem("bad turn order", f"turn {i} is a system turn; only the first turn may be a system turn")
            system = message.content or None
            continue
        messages.append(message)
        numbers.append(i)
    return system, messages, numbers


def _parse_turns(data: dict[str, Any], list_key: str, role_key: str, content_key: str) -> Conversation:
    system, messages, numbers = parse_messages(data.get(list_key), list_key, role_key, content_key)
    problem = turn_order_problem(messages, numbers)
    if problem:
        raise RecordProblem("bad turn order", problem)
    if system is None:
        system = optional_system(data, "system_prompt", "system")
    return Conversation(system, tuple(messages), tools=parse_tools(data.get("tools")))


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
