"""Preference data -> `PreferencePair` / `KTOSample`, every bad record reported at once.

Accepted record formats (detected per file, or forced with `data_format`):

* ``sharegpt`` (MedicalGPT since 2026): ``{"conversations": [prompt turns], "chosen", "rejected"}``, optional
  ``tools``; the prompt turns end with a user turn (or a tool result) and may hold earlier exchanges, tool calls
  and results; chosen / rejected are answer strings or an assistant / function_call turn.
* ``medicalgpt``: ``{"system", "history": [[q, a], ...], "question", "response_chosen", "response_rejected"}``.
* ``chosen_rejected``: ``{"prompt", "chosen", "rejected"}`` strings, optional ``system`` and ``history``.
* ``messages``: ``chosen`` and ``rejected`` are conversations (lists of ``{role, content}`` or ``{from, value}``)
  that share their prompt turns; the prompt is everything before the final assistant turn. With a
  ``prompt`` list of turns beside them, ``chosen``/``rejected`` hold only the answer turn.
* ``kto`` (unpaired): ``{"prompt", "completion", "label": true|false}``; prompt and completion may also be turns.

Any format may carry ``tools``; an answer string written as a call in the default tool format (``Action: name`` /
``Action Input: {json}``) in a record with tools is that call. Encoding into token ids is in
preference_encoding.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunestack.config.preference import PREFERENCE_FORMATS
from tunestack.data.formats import (
    Message,
    key_hints,
    optional_system,
    parse_history,
    parse_message,
    parse_messages,
    text_value,
    turn_order_problem,
)
from tunestack.data.records import Loaded, RecordProblem, RecordTable, load_records
from tunestack.data.tool_formats import TOOL_FORMATS
from tunestack.data.tools import Tool, ToolCall, parse_tools
from tunestack.errors import DataError

Kind = Literal["pairs", "unpaired", "any"]
_FORMAT_LABELS = {
    "sharegpt": "'conversations' + 'chosen' + 'rejected' (sharegpt)",
    "medicalgpt": "'question' + 'response_chosen' + 'response_rejected' (medicalgpt)",
    "chosen_rejected": "'prompt' + 'chosen' + 'rejected'",
    "messages": "'chosen' + 'rejected' conversations",
    "kto": "'prompt' + 'completion' + 'label' (kto)",
}
_KNOWN_KEYS = ("system", "history", "question", "response_chosen", "response_rejected", "prompt", "chosen")
_KNOWN_KEYS += ("rejected", "completion", "label", "conversations", "tools")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (system + alternating turns ending with a user turn) with a preferred and a dispreferred answer."""

    system: str | None
    prompt_messages: tuple[Message, ...]
    chosen: str
    rejected: str
    origin: str = ""
    tools: tuple[Tool, ...] = ()
    chosen_calls: tuple[ToolCall, ...] = ()  # an answer that calls tools: its calls (the text is what precedes)
    rejected_calls: tuple[ToolCall, ...] = ()

    @property
    def chosen_message(self) -> Message:
        return Message("assistant", self.chosen, self.chosen_calls)

    @property
    def rejected_message(self) -> Message:
        return Message("assistant", self.rejected, self.rejected_calls)


@dataclass(frozen=True)
class KTOSample:
    """A prompt with one answer marked desirable or undesirable."""

    system: str | None
    prompt_messages: tuple[Message, ...]
    completion: str
    desirable: bool
    origin: str = ""
    tools: tuple[Tool, ...] = ()
    completion_calls: tuple[ToolCall, ...] = ()

    @property
    def completion_message(self) -> Message:
        return Message("assistant", self.completion, self.completion_calls)


Item = PreferencePair | KTOSample


def unpaired(items: list[Item]) -> list[KTOSample]:
    """KTO samples; a pair gives two (its chosen answer desirable, its rejected one undesirable)."""
    out: list[KTOSample] = []
    for item in items:
        if isinstance(item, KTOSample):
            out.append(item)
        else:
            for answer, good in ((item.chosen_message, True), (item.rejected_message, False)):
                sample = KTOSample(item.system, item.prompt_messages, answer.content, good, item.origin, item.tools)
                out.append(dataclasses.replace(sample, completion_calls=answer.tool_calls))
    return out


# ---------------------------------------------------------------------------------------------
# Parsing one record


def detect_preference_format(data: dict[str, Any]) -> str | None:
    if "conversations" in data and ("chosen" in data or "rejected" in data):
        return "sharegpt"
    if "response_chosen" in data or "response_rejected" in data or "question" in data:
        return "medicalgpt"
    if "completion" in data or "label" in data:
        return "kto"
    if "chosen" in data or "rejected" in data:
        value = data.get("chosen", data.get("rejected"))
        return "messages" if isinstance(value, list) else "chosen_rejected"
    return None


def _required(data: dict[str, Any], key: str, fmt: str) -> str:
    if data.get(key) is None:
        raise RecordProblem("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    value = text_value(data[key], f"'{key}'")
    if not value.strip():
        raise RecordProblem("empty turn", f"'{key}' is empty")
    return value


def _check_answers(chosen: Message, rejected: Message) -> None:
    if (chosen.content.strip(), chosen.tool_calls) == (rejected.content.strip(), rejected.tool_calls):
        raise RecordProblem("identical answers", "chosen and rejected answers are identical")


def _pair(
    system: str | None, prompt: tuple[Message, ...], chosen: Message, rejected: Message, tools: tuple[Tool, ...]
) -> PreferencePair:
    _check_answers(chosen, rejected)
    return PreferencePair(system, prompt, chosen.content, rejected.content, "", tools, chosen.tool_calls, rejected.tool_calls)


def _as_answer(text: str, tools: tuple[Tool, ...]) -> Message:
    """An answer string; with tools, a call written in the default tool format is that call."""
    parsed = TOOL_FORMATS["default"].parse(text) if tools else None
    return Message("assistant", parsed[0], parsed[1]) if parsed else Message("assistant", text)


def _prompt_turns(history: list[Message], question: str) -> tuple[Message, ...]:
    return tuple(history) + (Message("user", question),)


def _parse_medicalgpt(data: dict[str, Any]) -> PreferencePair:
    question = _required(data, "question", "medicalgpt")
    tools = parse_tools(data.get("tools"))
    chosen = _as_answer(_required(data, "response_chosen", "medicalgpt"), tools)
    rejected = _as_answer(_required(data, "response_rejected", "medicalgpt"), tools)
    system = optional_system(data, "system", "system_prompt")
    return _pair(system, _prompt_turns(parse_history(data), question), chosen, rejected, tools)


def _parse_chosen_rejected(data: dict[str, Any]) -> PreferencePair:
    prompt = _required(data, "prompt", "chosen_rejected")
    tools = parse_tools(data.get("tools"))
    chosen = _as_answer(_required(data, "chosen", "chosen_rejected"), tools)
    rejected = _as_answer(_required(data, "rejected", "chosen_rejected"), tools)
    system = optional_system(data, "system", "system_prompt")
    return _pair(system, _prompt_turns(parse_history(data), prompt), chosen, rejected, tools)


def _turns(value: Any, key: str) -> tuple[str | None, list[Message]]:
    """(system, messages) of a list of turns in `key`; a system turn may only come first."""
    try:
        system, messages, _ = parse_messages(value, key)
    except RecordProblem as bad:
        message = bad.message if bad.message.startswith(f"'{key}'") else f"'{key}' {bad.message}"
        raise RecordProblem(bad.kind, message) from None
    return system, messages


def _conversation(data: dict[str, Any], key: str) -> tuple[str | None, tuple[Message, ...], Message]:
    """(system, prompt turns, final answer) of the conversation in `key`."""
    if data.get(key) is None:
        raise RecordProblem("missing field", f"messages record has no '{key}' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    system, messages = _turns(data[key], key)
    problem = turn_order_problem(messages)
    if problem:
        raise RecordProblem("bad turn order", f"'{key}': {problem}")
    return system, tuple(messages[:-1]), messages[-1]


def _parse_messages(data: dict[str, Any]) -> PreferencePair:
    if data.get("prompt") is not None:
        return _parse_prompt_and_answer_turns(data)
    c_system, c_prompt, chosen = _conversation(data, "chosen")
    r_system, r_prompt, rejected = _conversation(data, "rejected")
    if c_system != r_system:
        raise RecordProblem("different prompts", "chosen and rejected have different system prompts")
    if c_prompt != r_prompt:
        if len(c_prompt) != len(r_prompt):
            detail = f"chosen has {len(c_prompt)} prompt turns, rejected {len(r_prompt)}"
        else:
            turn = next(i for i, (a, b) in enumerate(zip(c_prompt, r_prompt, strict=True), start=1) if a != b)
            detail = f"turn {turn} differs"
        raise RecordProblem("different prompts", f"chosen and rejected have different prompts ({detail})")
    system = c_system if c_system is not None else optional_system(data, "system", "system_prompt")
    return _pair(system, c_prompt, chosen, rejected, parse_tools(data.get("tools")))


def _answer_turn(data: dict[str, Any], key: str, tools: tuple[Tool, ...] = (), fmt: str = "messages") -> Message:
    """The answer in `key`: a string, one assistant (or function_call) turn, or a list of them (the last counts)."""
    value = data.get(key)
    if value is None:
        raise RecordProblem("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)})")
    if isinstance(value, str):
        if not value.strip():
            raise RecordProblem("empty turn", f"'{key}' is empty")
        return _as_answer(value, tools)
    if isinstance(value, dict):
        try:
            messages = [parse_message(value, 1, "role", "content")]
        except RecordProblem as bad:
            raise RecordProblem(bad.kind, f"'{key}' {bad.message}") from None
    else:
        _, messages = _turns(value, key)
    if not messages or any(m.role != "assistant" for m in messages):
        raise RecordProblem("bad turn order", f"'{key}' must hold the assistant answer turn")
    return messages[-1]


def _prompt_from_turns(data: dict[str, Any], key: str = "prompt") -> tuple[str | None, tuple[Message, ...]]:
    system, messages = _turns(data[key], key)
    problem = turn_order_problem(messages, prompt=True)
    if problem:
        raise RecordProblem("bad turn order", f"'{key}': {problem}")
    if system is None:
        system = optional_system(data, "system", "system_prompt")
    return system, tuple(messages)


def _parse_prompt_and_answer_turns(data: dict[str, Any]) -> PreferencePair:
    """A separate prompt (turns, or a string with an optional history) and answer turns in chosen/rejected."""
    tools = parse_tools(data.get("tools"))
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "messages")
        system, prompt = optional_system(data, "system", "system_prompt"), _prompt_turns(parse_history(data), question)
    return _pair(system, prompt, _answer_turn(data, "chosen", tools), _answer_turn(data, "rejected", tools), tools)


def _parse_sharegpt(data: dict[str, Any]) -> PreferencePair:
    """MedicalGPT's preference records: prompt turns in `conversations`, the answers beside them."""
    tools = parse_tools(data.get("tools"))
    system, prompt = _prompt_from_turns(data, "conversations")
    chosen = _answer_turn(data, "chosen", tools, "sharegpt")
    rejected = _answer_turn(data, "rejected", tools, "sharegpt")
    return _pair(system, prompt, chosen, rejected, tools)


def _parse_kto(data: dict[str, Any]) -> KTOSample:
    if data.get("prompt") is None:
        raise RecordProblem("missing field", f"kto record has no 'prompt' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    tools = parse_tools(data.get("tools"))
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "kto")
        system, prompt = optional_system(data, "system", "system_prompt"), _prompt_turns(parse_history(data), question)
    completion = data.get("completion")
    if completion is None:
        raise RecordProblem("missing field", f"kto record has no 'completion' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    answer = _answer_turn(data, "completion", tools)
    label = data.get("label")
    if label is None:
        raise RecordProblem("missing field", f"kto record has no 'label' (keys: {sorted(data)})")
    if not isinstance(label, bool):
        raise RecordProblem("wrong type", f"'label' must be true or false, got {label!r}")
    return KTOSample(system, prompt, answer.content, label, "", tools, answer.tool_calls)


_PARSERS = {
    "sharegpt": _parse_sharegpt,
    "medicalgpt": _parse_medicalgpt,
    "chosen_rejected": _parse_chosen_rejected,
    "messages": _parse_messages,
    "kto": _parse_kto,
}


def parse_preference(data: dict[str, Any], data_format: str = "auto") -> Item:
    """One record -> PreferencePair or KTOSample; raises `DataError` (without a location) when it is not valid."""
    PREFERENCES.check_format_name(data_format)
    fmt = detect_preference_format(data) if data_format == "auto" else data_format
    try:
        if fmt is None:
            raise _unrecognised(data)
        return _PARSERS[fmt](data)
    except RecordProblem as bad:
        raise DataError(bad.message) from None


def _unrecognised(data: dict[str, Any]) -> RecordProblem:
    expected = ", ".join(_FORMAT_LABELS.values())
    return RecordProblem(
        "unrecognised format",
        f"unrecognised preference record: keys {sorted(data)}; expected {expected}{key_hints(data, _KNOWN_KEYS)}",
    )


def _parse_as(data: dict[str, Any], fmt: str) -> Item:
    return _PARSERS[fmt](data)


PREFERENCES: RecordTable[Item] = RecordTable(
    "preference", "preference records", PREFERENCE_FORMATS, detect_preference_format, _parse_as, lambda data, _known: _unrecognised(data)
)


def pairs_only(fmt: str) -> RecordProblem | None:
    """`accept` of the paired stages (rm, dpo): kto records have no pair."""
    if fmt != "kto":
        return None
    return RecordProblem(
        "unpaired record",
        "a kto record (prompt/completion/label) has no chosen/rejected pair; train it with tunestack kto",
    )


def load_preferences(
    files: Iterable[Path | str], data_format: str = "auto", skip_bad_records: bool = False, kind: Kind = "pairs"
) -> Loaded[Item]:
    """Read preference files (see tunestack.data.records.load_records). `kind` "pairs" rejects unpaired (kto)
    records; "unpaired" and "any" keep both."""
    return load_records(files, PREFERENCES, data_format, skip_bad_records, pairs_only if kind == "pairs" else None)
