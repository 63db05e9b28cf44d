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
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunestack.data.sources import Record, iter_records, read_text
from tunestack.errors import ConfigError, DataError

Role = Literal["user", "assistant"]
FORMATS = ("sharegpt", "messages", "alpaca", "prompt_response")
DATA_FORMATS = ("auto",) + FORMATS
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


@dataclass
class LoadedConversations:
    conversations: list[Conversation]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    reason_counts: Counter[str] = field(default_factory=Counter)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format

    def summary(self) -> str:
        text = f"{len(self.conversations)} conversations"
        if self.rejects:
            reasons = ", ".join(f"{n} {r}" for r, n in self.reason_counts.most_common())
            text += f", {len(self.rejects)} skipped ({reasons})"
        return text


class _Bad(Exception):
    """One bad record: `kind` is a short category for counting, `message` the full reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _BadLine:
    file: str
    line: int
    text: str
    reason: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _iter_file(path: Path) -> Iterator[Record | _BadLine]:
    """Records of one file; a malformed JSON line is yielded as a `_BadLine` so later lines are still checked."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        yield from iter_records(path)
        return
    text = read_text(path)
    if text.lstrip().startswith("["):  # a JSON array cannot be resumed after a syntax error
        yield from iter_records(path)
        return
    # Split on newlines only: str.splitlines() also breaks at U+2028/U+0085 inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _BadLine(str(path), lineno, line, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield _BadLine(str(path), lineno, line, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield Record(obj, str(path), lineno)


# ---------------------------------------------------------------------------------------------
# Format detection


def detect_format(data: dict[str, Any]) -> str | None:
    for fmt, key in _FORMAT_KEYS.items():
        if _present(data.get(key)):
            return fmt
    return None


def _present(value: Any) -> bool:
    return value is not None and value != ""


def _key_hints(data: dict[str, Any]) -> str:
    """'; did you mean 'conversations' instead of 'conversation'?' for near-miss keys, else ''."""
    hints = []
    for key in sorted(data):
        close = difflib.get_close_matches(str(key).lower(), _KNOWN_KEYS, n=1, cutoff=0.75)
        if close and close[0] != key:
            hints.append(f"'{close[0]}' instead of '{key}'")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _unrecognised(data: dict[str, Any]) -> _Bad:
    expected = ", ".join(_FORMAT_LABELS.values())
    return _Bad(
        "unrecognised format", f"unrecognised record: keys {sorted(data)}; expected {expected}{_key_hints(data)}"
    )


def _missing_key(data: dict[str, Any], fmt: str) -> _Bad:
    key = _FORMAT_KEYS[fmt]
    found = detect_format(data)
    looks = f"; it looks like {found}" if found and found != fmt else ""
    return _Bad("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)}){looks}{_key_hints(data)}")


# ---------------------------------------------------------------------------------------------
# Per-format parsing


def _text(value: Any, what: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts
    if not isinstance(value, str):
        raise _Bad("wrong type", f"{what} must be a string, got {type(value).__name__}")
    return value


def _optional_system(data: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if _present(value):
            return _text(value, f"'{key}'")
    return None


def _turn(turn: Any, i: int, role_key: str, content_key: str) -> tuple[str, str]:
    """(normalised role, text) of one turn; accepts from/value and role/content in either format."""
    if not isinstance(turn, dict):
        raise _Bad("wrong type", f"turn {i} must be an object with '{role_key}' and '{content_key}'")
    raw_role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if raw_role is None:
        raise _Bad("missing field", f"turn {i} has no '{role_key}' (keys: {sorted(turn)})")
    if content is None:
        raise _Bad("missing field", f"turn {i} has no '{content_key}' (keys: {sorted(turn)})")
    role = _ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise _Bad("unknown role", f"turn {i} has unknown role '{raw_role}' (accepted: {', '.join(_ROLE_ALIASES)})")
    text = _text(content, f"turn {i} '{content_key}'")
    if role != "system" and not text.strip():
        raise _Bad("empty turn", f"turn {i} ({role}) is empty")
    return role, text


def _parse_turns(data: dict[str, Any], list_key: str, role_key: str, content_key: str) -> Conversation:
    turns = data.get(list_key)
    if not isinstance(turns, list):
        raise _Bad("wrong type", f"'{list_key}' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise _Bad("empty conversation", f"'{list_key}' is empty")
    system = None
    messages: list[Message] = []
    numbers: list[int] = []
    for i, raw in enumerate(turns, start=1):
        role, text = _turn(raw, i, role_key, content_key)
        if role == "system":
            if i != 1:
                raise _Bad("bad turn order", f"turn {i} is a system turn; only the first turn may be a system turn")
            system = text or None
            continue
        messages.append(Message(role, text))  # type: ignore[arg-type]
        numbers.append(i)
    problem = turn_order_problem([m.role for m in messages], numbers)
    if problem:
        raise _Bad("bad turn order", problem)
    if system is None:
        system = _optional_system(data, "system_prompt", "system")
    return Conversation(system, tuple(messages))


def _history(data: dict[str, Any]) -> list[Message]:
    history = data.get("history")
    if not _present(history):
        return []
    if not isinstance(history, list):
        raise _Bad("wrong type", f"'history' must be a list of [question, answer] pairs, got {type(history).__name__}")
    messages: list[Message] = []
    for i, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _Bad("wrong type", f"history[{i}] must be a [question, answer] pair")
        question = _text(pair[0], f"history[{i}] question")
        answer = _text(pair[1], f"history[{i}] answer")
        if not question.strip():
            raise _Bad("empty turn", f"history[{i}] has an empty question")
        if not answer.strip():
            raise _Bad("empty turn", f"history[{i}] has an empty answer")
        messages += [Message("user", question), Message("assistant", answer)]
    return messages


def _required(data: dict[str, Any], key: str, fmt: str) -> str:
    if data.get(key) is None:
        raise _Bad("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)})")
    value = _text(data[key], f"'{key}'")
    if not value.strip():
        raise _Bad("empty turn", f"'{key}' is empty")
    return value


def _parse_alpaca(data: dict[str, Any]) -> Conversation:
    query = _required(data, "instruction", "alpaca")
    extra = data.get("input")
    if _present(extra):
        query += "\n" + _text(extra, "'input'")
    output = _required(data, "output", "alpaca")
    messages = _history(data) + [Message("user", query), Message("assistant", output)]
    return Conversation(_optional_system(data, "system", "system_prompt"), tuple(messages))


def _parse_prompt_response(data: dict[str, Any]) -> Conversation:
    prompt = _required(data, "prompt", "prompt_response")
    response = _required(data, "response", "prompt_response")
    messages = _history(data) + [Message("user", prompt), Message("assistant", response)]
    return Conversation(_optional_system(data, "system", "system_prompt"), tuple(messages))


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


def parse_record(data: dict[str, Any], data_format: str = "auto") -> Conversation:
    """One record -> Conversation; raises `DataError` (without a location) when it is not valid."""
    _check_format_name(data_format)
    try:
        return _parse(data, None if data_format == "auto" else data_format)
    except _Bad as bad:
        raise DataError(bad.message) from None


# ---------------------------------------------------------------------------------------------
# Loading files


def _check_format_name(data_format: str) -> None:
    if data_format not in DATA_FORMATS:
        close = difflib.get_close_matches(data_format, DATA_FORMATS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown data_format '{data_format}'{hint}; expected one of {', '.join(DATA_FORMATS)}")


def load_conversations(
    files: Iterable[Path | str], data_format: str = "auto", skip_bad_records: bool = False
) -> LoadedConversations:
    """Read SFT files into conversations.

    Every bad record is collected as ``file:line: reason``. Without `skip_bad_records` any bad
    record raises one `DataError` listing them all; with it the good records are kept and the bad
    ones returned in `rejects`. No valid record at all is always a `DataError`.
    In auto mode each file must use one format (the format of its first recognised record).
    """
    _check_format_name(data_format)
    result = LoadedConversations([])
    problems: list[str] = []
    n_records = 0
    forced = None if data_format == "auto" else data_format
    first_seen: dict[str, tuple[str, int]] = {}  # file -> (format, line of its first record)
    for path in [Path(f) for f in files]:
        for item in _iter_file(path):
            n_records += 1
            if isinstance(item, _BadLine):
                _reject(result, problems, item.where, "malformed JSON", item.reason, item.text)
                continue
            try:
                conv = _parse_in_file(item, forced, first_seen)
            except _Bad as bad:
                _reject(result, problems, item.where, bad.kind, bad.message, item.data)
                continue
            result.conversations.append(Conversation(conv.system, conv.messages, item.where))
        if str(path) in first_seen or forced:
            result.formats[str(path)] = forced or first_seen[str(path)][0]
    if problems and not skip_bad_records:
        raise DataError(problems)
    if not result.conversations:
        _raise_empty(result, n_records)
    return result


def _parse_in_file(record: Record, forced: str | None, first_seen: dict[str, tuple[str, int]]) -> Conversation:
    """Parse one record; in auto mode a file's format is that of its first recognised record."""
    if forced is not None:
        return _parse(record.data, forced)
    fmt = detect_format(record.data)
    known = first_seen.get(record.file)
    if fmt is None:
        # No format key at all: in a file of known format, say which key the record lacks.
        raise _missing_key(record.data, known[0]) if known else _unrecognised(record.data)
    if known is None:
        first_seen[record.file] = (fmt, record.line)
    elif fmt != known[0]:
        raise _Bad(
            "mixed formats",
            f"the file mixes formats: {known[0]} (from line {known[1]}) and {fmt} (this record); "
            "use one format per file",
        )
    return _parse(record.data, fmt)


def _reject(result: LoadedConversations, problems: list[str], where: str, kind: str, reason: str, record: Any) -> None:
    problems.append(f"{where}: {reason}")
    result.rejects.append({"where": where, "reason": reason, "record": record})
    result.reason_counts[kind] += 1


def _raise_empty(result: LoadedConversations, n_records: int) -> None:
    if n_records == 0:
        raise DataError("no SFT records found: the data files are empty")
    shown = [f"{r['where']}: {r['reason']}" for r in result.rejects[:3]]
    raise DataError(
        f"no valid SFT records: all {n_records} records were rejected "
        f"({', '.join(f'{n} {k}' for k, n in result.reason_counts.most_common())}); first: " + "; ".join(shown)
    )


def write_rejects(rejects: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Write rejected records as JSON lines ({"where", "reason", "record"}); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for reject in rejects:
            fh.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path
