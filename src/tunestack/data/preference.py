"""Preference data -> `PreferencePair` / `KTOSample`, every bad record reported at once.

Accepted record formats (detected per file, or forced with `data_format`):

* ``medicalgpt``: ``{"system", "history": [[q, a], ...], "question", "response_chosen", "response_rejected"}``.
* ``chosen_rejected``: ``{"prompt", "chosen", "rejected"}`` strings, optional ``system`` and ``history``.
* ``messages``: ``chosen`` and ``rejected`` are conversations (lists of ``{role, content}`` or ``{from, value}``)
  that share their prompt turns; the prompt is everything before the final assistant turn. With a
  ``prompt`` list of turns beside them, ``chosen``/``rejected`` hold only the answer turn.
* ``kto`` (unpaired): ``{"prompt", "completion", "label": true|false}``; prompt and completion may also be turns.

Encoding into token ids is in preference_encoding.py.
"""

from __future__ import annotations

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
    parse_turn,
    text_value,
    turn_order_problem,
)
from tunestack.data.records import Loaded, RecordProblem, RecordTable, load_records
from tunestack.errors import DataError

Kind = Literal["pairs", "unpaired", "any"]
_FORMAT_LABELS = {
    "medicalgpt": "'question' + 'response_chosen' + 'response_rejected' (medicalgpt)",
    "chosen_rejected": "'prompt' + 'chosen' + 'rejected'",
    "messages": "'chosen' + 'rejected' conversations",
    "kto": "'prompt' + 'completion' + 'label' (kto)",
}
_KNOWN_KEYS = ("system", "history", "question", "response_chosen", "response_rejected", "prompt", "chosen")
_KNOWN_KEYS += ("rejected", "completion", "label")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (system + alternating turns ending with a user turn) with a preferred and a dispreferred answer."""

    system: str | None
    prompt_messages: tuple[Message, ...]
    chosen: str
    rejected: str
    origin: str = ""


@dataclass(frozen=True)
class KTOSample:
    """A prompt with one answer marked desirable or undesirable."""

    system: str | None
    prompt_messages: tuple[Message, ...]
    completion: str
    desirable: bool
    origin: str = ""


Item = PreferencePair | KTOSample


def unpaired(items: list[Item]) -> list[KTOSample]:
    """KTO samples; a pair gives two (its chosen answer desirable, its rejected one undesirable)."""
    out: list[KTOSample] = []
    for item in items:
        if isinstance(item, KTOSample):
            out.append(item)
        else:
            out.append(KTOSample(item.system, item.prompt_messages, item.chosen, True, item.origin))
            out.append(KTOSample(item.system, item.prompt_messages, item.rejected, False, item.origin))
    return out


# ---------------------------------------------------------------------------------------------
# Parsing one record


def detect_preference_format(data: dict[str, Any]) -> str | None:
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


def _check_answers(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise RecordProblem("identical answers", "chosen and rejected answers are identical")


def _prompt_turns(history: list[Message], question: str) -> tuple[Message, ...]:
    return tuple(history) + (Message("user", question),)


def _parse_medicalgpt(data: dict[str, Any]) -> PreferencePair:
    question = _required(data, "question", "medicalgpt")
    chosen = _required(data, "response_chosen", "medicalgpt")
    rejected = _required(data, "response_rejected", "medicalgpt")
    _check_answers(chosen, rejected)
    system = optional_system(data, "system", "system_prompt")
    return PreferencePair(system, _prompt_turns(parse_history(data), question), chosen, rejected)


def _parse_chosen_rejected(data: dict[str, Any]) -> PreferencePair:
    prompt = _required(data, "prompt", "chosen_rejected")
    chosen = _required(data, "chosen", "chosen_rejected")
    rejected = _required(data, "rejected", "chosen_rejected")
    _check_answers(chosen, rejected)
    system = optional_system(data, "system", "system_prompt")
    return PreferencePair(system, _prompt_turns(parse_history(data), prompt), chosen, rejected)


def _turns(value: Any, key: str) -> tuple[str | None, list[Message]]:
    """(system, messages) of a list of turns in `key`; a system turn may only come first."""
    if not isinstance(value, list):
        raise RecordProblem("wrong type", f"'{key}' must be a list of turns, got {type(value).__name__}")
    if not value:
        raise RecordProblem("empty conversation", f"'{key}' is empty")
    system = None
    messages: list[Message] = []
    for i, raw in enumerate(value, start=1):
        try:
            role, text = parse_turn(raw, i, "role", "content")
        except RecordProblem as bad:
            raise RecordProblem(bad.kind, f"'{key}' {bad.message}") from None
        if role == "system":
            if i != 1:
                raise RecordProblem("bad turn order", f"'{key}' turn {i} is a system turn; only the first turn may be one")
            system = text or None
            continue
        messages.append(Message(role, text))  # type: ignore[arg-type]
    return system, messages


def _conversation(data: dict[str, Any], key: str) -> tuple[str | None, tuple[Message, ...], str]:
    """(system, prompt turns, final answer) of the conversation in `key`."""
    if data.get(key) is None:
        raise RecordProblem("missing field", f"messages record has no '{key}' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    system, messages = _turns(data[key], key)
    problem = turn_order_problem([m.role for m in messages])
    if problem:
        raise RecordProblem("bad turn order", f"'{key}': {problem}")
    return system, tuple(messages[:-1]), messages[-1].content


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
    _check_answers(chosen, rejected)
    system = c_system if c_system is not None else optional_system(data, "system", "system_prompt")
    return PreferencePair(system, c_prompt, chosen, rejected)


def _answer_turn(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        raise RecordProblem("missing field", f"messages record has no '{key}' (keys: {sorted(data)})")
    if isinstance(value, str):
        if not value.strip():
            raise RecordProblem("empty turn", f"'{key}' is empty")
        return value
    _, messages = _turns(value, key)
    if not messages or messages[-1].role != "assistant" or any(m.role != "assistant" for m in messages):
        raise RecordProblem("bad turn order", f"'{key}' must hold the assistant answer turn")
    return messages[-1].content


def _prompt_from_turns(data: dict[str, Any]) -> tuple[str | None, tuple[Message, ...]]:
    system, messages = _turns(data["prompt"], "prompt")
    roles = [m.role for m in messages] + ["assistant"]
    problem = turn_order_problem(roles)
    if problem:
        raise RecordProblem("bad turn order", f"'prompt': {problem.replace('the last turn', 'the prompt')}")
    if system is None:
        system = optional_system(data, "system", "system_prompt")
    return system, tuple(messages)


def _parse_prompt_and_answer_turns(data: dict[str, Any]) -> PreferencePair:
    """A separate prompt (turns, or a string with an optional history) and answer turns in chosen/rejected."""
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "messages")
        system, prompt = optional_system(data, "system", "system_prompt"), _prompt_turns(parse_history(data), question)
    chosen, rejected = _answer_turn(data, "chosen"), _answer_turn(data, "rejected")
    _check_answers(chosen, rejected)
    return PreferencePair(system, prompt, chosen, rejected)


def _parse_kto(data: dict[str, Any]) -> KTOSample:
    if data.get("prompt") is None:
        raise RecordProblem("missing field", f"kto record has no 'prompt' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "kto")
        system, prompt = optional_system(data, "system", "system_prompt"), _prompt_turns(parse_history(data), question)
    completion = data.get("completion")
    if completion is None:
        raise RecordProblem("missing field", f"kto record has no 'completion' (keys: {sorted(data)}){key_hints(data, _KNOWN_KEYS)}")
    text = _answer_turn(data, "completion")
    label = data.get("label")
    if label is None:
        raise RecordProblem("missing field", f"kto record has no 'label' (keys: {sorted(data)})")
    if not isinstance(label, bool):
        raise RecordProblem("wrong type", f"'label' must be true or false, got {label!r}")
    return KTOSample(system, prompt, text, label)


_PARSERS = {
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
