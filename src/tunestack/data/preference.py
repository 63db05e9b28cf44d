"""Preference data -> `PreferencePair` / `KTOSample`, every bad record reported at once, and their encoding.

Accepted record formats (detected per file, or forced with `data_format`):

* ``medicalgpt``: ``{"system", "history": [[q, a], ...], "question", "response_chosen", "response_rejected"}``.
* ``chosen_rejected``: ``{"prompt", "chosen", "rejected"}`` strings, optional ``system`` and ``history``.
* ``messages``: ``chosen`` and ``rejected`` are conversations (lists of ``{role, content}`` or ``{from, value}``)
  that share their prompt turns; the prompt is everything before the final assistant turn. With a
  ``prompt`` list of turns beside them, ``chosen``/``rejected`` hold only the answer turn.
* ``kto`` (unpaired): ``{"prompt", "completion", "label": true|false}``; prompt and completion may also be turns.

Pairs are encoded with the SFT machinery (templates.py + SegmentTokenizer): the prompt exactly as the model
sees it at inference (ending with the assistant header), each answer as the span SFT trains (answer + stop token).
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunestack.config.preference import PREFERENCE_FORMATS
from tunestack.data.formats import (
    Conversation,
    Message,
    _Bad,
    _BadLine,
    _history,
    _iter_file,
    _optional_system,
    _text,
    _turn,
    turn_order_problem,
)
from tunestack.data.sources import Record
from tunestack.data.supervised import SegmentTokenizer
from tunestack.data.templates import Template, conversation_segments
from tunestack.errors import ConfigError, DataError

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


@dataclass
class LoadedPreferences:
    items: list[Item]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    reason_counts: Counter[str] = field(default_factory=Counter)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format

    @property
    def pairs(self) -> list[PreferencePair]:
        return [i for i in self.items if isinstance(i, PreferencePair)]

    def unpaired(self) -> list[KTOSample]:
        """KTO samples; a pair gives two (its chosen answer desirable, its rejected one undesirable)."""
        out: list[KTOSample] = []
        for item in self.items:
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
        raise _Bad("missing field", f"{fmt} record has no '{key}' (keys: {sorted(data)}){_key_hints(data)}")
    value = _text(data[key], f"'{key}'")
    if not value.strip():
        raise _Bad("empty turn", f"'{key}' is empty")
    return value


def _key_hints(data: dict[str, Any]) -> str:
    hints = []
    for key in sorted(data):
        close = difflib.get_close_matches(str(key).lower(), _KNOWN_KEYS, n=1, cutoff=0.75)
        if close and close[0] != key:
            hints.append(f"'{close[0]}' instead of '{key}'")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


def _check_answers(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise _Bad("identical answers", "chosen and rejected answers are identical")


def _prompt_turns(history: list[Message], question: str) -> tuple[Message, ...]:
    return tuple(history) + (Message("user", question),)


def _parse_medicalgpt(data: dict[str, Any]) -> PreferencePair:
    question = _required(data, "question", "medicalgpt")
    chosen = _required(data, "response_chosen", "medicalgpt")
    rejected = _required(data, "response_rejected", "medicalgpt")
    _check_answers(chosen, rejected)
    system = _optional_system(data, "system", "system_prompt")
    return PreferencePair(system, _prompt_turns(_history(data), question), chosen, rejected)


def _parse_chosen_rejected(data: dict[str, Any]) -> PreferencePair:
    prompt = _required(data, "prompt", "chosen_rejected")
    chosen = _required(data, "chosen", "chosen_rejected")
    rejected = _required(data, "rejected", "chosen_rejected")
    _check_answers(chosen, rejected)
    system = _optional_system(data, "system", "system_prompt")
    return PreferencePair(system, _prompt_turns(_history(data), prompt), chosen, rejected)


def _turns(value: Any, key: str) -> tuple[str | None, list[Message]]:
    """(system, messages) of a list of turns in `key`; a system turn may only come first."""
    if not isinstance(value, list):
        raise _Bad("wrong type", f"'{key}' must be a list of turns, got {type(value).__name__}")
    if not value:
        raise _Bad("empty conversation", f"'{key}' is empty")
    system = None
    messages: list[Message] = []
    for i, raw in enumerate(value, start=1):
        try:
            role, text = _turn(raw, i, "role", "content")
        except _Bad as bad:
            raise _Bad(bad.kind, f"'{key}' {bad.message}") from None
        if role == "system":
            if i != 1:
                raise _Bad("bad turn order", f"'{key}' turn {i} is a system turn; only the first turn may be one")
            system = text or None
            continue
        messages.append(Message(role, text))  # type: ignore[arg-type]
    return system, messages


def _conversation(data: dict[str, Any], key: str) -> tuple[str | None, tuple[Message, ...], str]:
    """(system, prompt turns, final answer) of the conversation in `key`."""
    if data.get(key) is None:
        raise _Bad("missing field", f"messages record has no '{key}' (keys: {sorted(data)}){_key_hints(data)}")
    system, messages = _turns(data[key], key)
    problem = turn_order_problem([m.role for m in messages])
    if problem:
        raise _Bad("bad turn order", f"'{key}': {problem}")
    return system, tuple(messages[:-1]), messages[-1].content


def _parse_messages(data: dict[str, Any]) -> PreferencePair:
    if data.get("prompt") is not None:
        return _parse_prompt_and_answer_turns(data)
    c_system, c_prompt, chosen = _conversation(data, "chosen")
    r_system, r_prompt, rejected = _conversation(data, "rejected")
    if c_system != r_system:
        raise _Bad("different prompts", "chosen and rejected have different system prompts")
    if c_prompt != r_prompt:
        if len(c_prompt) != len(r_prompt):
            detail = f"chosen has {len(c_prompt)} prompt turns, rejected {len(r_prompt)}"
        else:
            turn = next(i for i, (a, b) in enumerate(zip(c_prompt, r_prompt, strict=True), start=1) if a != b)
            detail = f"turn {turn} differs"
        raise _Bad("different prompts", f"chosen and rejected have different prompts ({detail})")
    _check_answers(chosen, rejected)
    system = c_system if c_system is not None else _optional_system(data, "system", "system_prompt")
    return PreferencePair(system, c_prompt, chosen, rejected)


def _answer_turn(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        raise _Bad("missing field", f"messages record has no '{key}' (keys: {sorted(data)})")
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty turn", f"'{key}' is empty")
        return value
    _, messages = _turns(value, key)
    if not messages or messages[-1].role != "assistant" or any(m.role != "assistant" for m in messages):
        raise _Bad("bad turn order", f"'{key}' must hold the assistant answer turn")
    return messages[-1].content


def _prompt_from_turns(data: dict[str, Any]) -> tuple[str | None, tuple[Message, ...]]:
    system, messages = _turns(data["prompt"], "prompt")
    roles = [m.role for m in messages] + ["assistant"]
    problem = turn_order_problem(roles)
    if problem:
        raise _Bad("bad turn order", f"'prompt': {problem.replace('the last turn', 'the prompt')}")
    if system is None:
        system = _optional_system(data, "system", "system_prompt")
    return system, tuple(messages)


def _parse_prompt_and_answer_turns(data: dict[str, Any]) -> PreferencePair:
    """A separate prompt (turns, or a string with an optional history) and answer turns in chosen/rejected."""
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "messages")
        system, prompt = _optional_system(data, "system", "system_prompt"), _prompt_turns(_history(data), question)
    chosen, rejected = _answer_turn(data, "chosen"), _answer_turn(data, "rejected")
    _check_answers(chosen, rejected)
    return PreferencePair(system, prompt, chosen, rejected)


def _parse_kto(data: dict[str, Any]) -> KTOSample:
    if data.get("prompt") is None:
        raise _Bad("missing field", f"kto record has no 'prompt' (keys: {sorted(data)}){_key_hints(data)}")
    if isinstance(data["prompt"], list):
        system, prompt = _prompt_from_turns(data)
    else:
        question = _required(data, "prompt", "kto")
        system, prompt = _optional_system(data, "system", "system_prompt"), _prompt_turns(_history(data), question)
    completion = data.get("completion")
    if completion is None:
        raise _Bad("missing field", f"kto record has no 'completion' (keys: {sorted(data)}){_key_hints(data)}")
    text = _answer_turn(data, "completion")
    label = data.get("label")
    if label is None:
        raise _Bad("missing field", f"kto record has no 'label' (keys: {sorted(data)})")
    if not isinstance(label, bool):
        raise _Bad("wrong type", f"'label' must be true or false, got {label!r}")
    return KTOSample(system, prompt, text, label)


_PARSERS = {
    "medicalgpt": _parse_medicalgpt,
    "chosen_rejected": _parse_chosen_rejected,
    "messages": _parse_messages,
    "kto": _parse_kto,
}


def parse_preference(data: dict[str, Any], data_format: str = "auto") -> Item:
    """One record -> PreferencePair or KTOSample; raises `DataError` (without a location) when it is not valid."""
    _check_format_name(data_format)
    fmt = detect_preference_format(data) if data_format == "auto" else data_format
    try:
        if fmt is None:
            raise _unrecognised(data)
        return _PARSERS[fmt](data)
    except _Bad as bad:
        raise DataError(bad.message) from None


def _unrecognised(data: dict[str, Any]) -> _Bad:
    expected = ", ".join(_FORMAT_LABELS.values())
    return _Bad(
        "unrecognised format",
        f"unrecognised preference record: keys {sorted(data)}; expected {expected}{_key_hints(data)}",
    )


# ---------------------------------------------------------------------------------------------
# Loading files


def _check_format_name(data_format: str) -> None:
    if data_format != "auto" and data_format not in PREFERENCE_FORMATS:
        known = ", ".join(("auto",) + PREFERENCE_FORMATS)
        raise ConfigError(f"unknown preference data_format '{data_format}'; expected one of {known}")


def load_preferences(
    files: Iterable[Path | str], data_format: str = "auto", skip_bad_records: bool = False, kind: Kind = "pairs"
) -> LoadedPreferences:
    """Read preference files. Every bad record is collected as ``file:line: reason``; without
    `skip_bad_records` any bad record raises one `DataError` listing them all, with it the bad ones are
    returned in `rejects`. `kind` "pairs" rejects unpaired (kto) records; "unpaired" and "any" keep both.
    In auto mode each file must use one format (that of its first recognised record)."""
    _check_format_name(data_format)
    result = LoadedPreferences([])
    problems: list[str] = []
    n_records = 0
    first_seen: dict[str, tuple[str, int]] = {}
    for path in [Path(f) for f in files]:
        for item in _iter_file(path):
            n_records += 1
            if isinstance(item, _BadLine):
                _reject(result, problems, item.where, "malformed JSON", item.reason, item.text)
                continue
            try:
                fmt = _record_format(item, data_format, first_seen)
                if fmt == "kto" and kind == "pairs":
                    raise _Bad(
                        "unpaired record",
                        "a kto record (prompt/completion/label) has no chosen/rejected pair; train it with tunestack kto",
                    )
                parsed = _PARSERS[fmt](item.data)
            except _Bad as bad:
                _reject(result, problems, item.where, bad.kind, bad.message, item.data)
                continue
            result.items.append(_with_origin(parsed, item.where))
        if str(path) in first_seen:
            result.formats[str(path)] = first_seen[str(path)][0]
    if problems and not skip_bad_records:
        raise DataError(problems)
    if not result.items:
        _raise_empty(result, n_records)
    return result


def _record_format(record: Record, data_format: str, first_seen: dict[str, tuple[str, int]]) -> str:
    if data_format != "auto":
        first_seen.setdefault(record.file, (data_format, record.line))
        return data_format
    fmt = detect_preference_format(record.data)
    if fmt is None:
        raise _unrecognised(record.data)
    known = first_seen.get(record.file)
    if known is None:
        first_seen[record.file] = (fmt, record.line)
    elif fmt != known[0]:
        raise _Bad(
            "mixed formats",
            f"the file mixes formats: {known[0]} (from line {known[1]}) and {fmt} (this record); use one format per file",
        )
    return fmt


def _with_origin(item: Item, where: str) -> Item:
    from dataclasses import replace

    return replace(item, origin=where)


def _reject(result: LoadedPreferences, problems: list[str], where: str, kind: str, reason: str, record: Any) -> None:
    problems.append(f"{where}: {reason}")
    result.rejects.append({"where": where, "reason": reason, "record": record})
    result.reason_counts[kind] += 1


def _raise_empty(result: LoadedPreferences, n_records: int) -> None:
    if n_records == 0:
        raise DataError("no preference records found: the data files are empty")
    shown = [f"{r['where']}: {r['reason']}" for r in result.rejects[:3]]
    counts = ", ".join(f"{n} {k}" for k, n in result.reason_counts.most_common())
    raise DataError(
        f"no valid preference records: all {n_records} were rejected ({counts}); first: " + "; ".join(shown)
    )


def with_default_system(items: list[Item], system: str | None) -> list[Item]:
    if not system:
        return items
    from dataclasses import replace

    return [i if i.system else replace(i, system=system) for i in items]


def split_held_out(items: list[Any], percentage: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): `percentage` percent (at least one) chosen at random with `seed`."""
    if percentage <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(len(items) * percentage / 100))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# ---------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class PreferenceLimits:
    max_source_length: int = 2048
    max_target_length: int = 512
    min_target_length: int = 0


class PreferenceEncoder:
    """Token ids of prompts and answers, exactly as SFT tokenizes them (same template, same segment tokenization)."""

    def __init__(self, tokenizer: Any, template: Template, limits: PreferenceLimits | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.segments = SegmentTokenizer(tokenizer, template)
        self.limits = limits or PreferenceLimits()

    def prompt_ids(self, system: str | None, prompt: Sequence[Message]) -> tuple[list[int], bool]:
        """The generation prompt (ending with the assistant header); the end is kept when it is too long.
        Returns (ids, truncated)."""
        ids = self.segments.encode_prompt(list(prompt), system)
        limit = self.limits.max_source_length
        if len(ids) <= limit:
            return ids, False
        bos = self.segments.bos_id
        if bos is not None and ids and ids[0] == bos and limit > 1:
            return [bos] + ids[len(ids) - limit + 1 :], True
        return ids[len(ids) - limit :], True

    def answer_ids(self, system: str | None, prompt: Sequence[Message], answer: str) -> list[int]:
        """The answer and its stop token: the span SFT trains for this answer."""
        conversation = Conversation(system, tuple(prompt) + (Message("assistant", answer),))
        segments = conversation_segments(self.template, self.tokenizer, conversation)
        last = [s for s in segments if s.trainable][-1]
        return self.tokenizer(last.text, add_special_tokens=False)["input_ids"]

    def _length_problem(self, *answers: list[int]) -> str | None:
        if any(len(a) > self.limits.max_target_length for a in answers):
            return "dropped_too_long"
        if any(len(a) < self.limits.min_target_length for a in answers):
            return "dropped_too_short"
        return None

    def encode_pair(self, pair: PreferencePair) -> tuple[dict[str, list[int]] | None, str | None, bool]:
        """({prompt_ids, chosen_ids, rejected_ids} or None when dropped, drop reason, prompt truncated)."""
        chosen = self.answer_ids(pair.system, pair.prompt_messages, pair.chosen)
        rejected = self.answer_ids(pair.system, pair.prompt_messages, pair.rejected)
        problem = self._length_problem(chosen, rejected)
        if problem:
            return None, problem, False
        prompt, truncated = self.prompt_ids(pair.system, pair.prompt_messages)
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, None, truncated

    def encode_unpaired(self, sample: KTOSample) -> tuple[dict[str, Any] | None, str | None, bool]:
        completion = self.answer_ids(sample.system, sample.prompt_messages, sample.completion)
        problem = self._length_problem(completion)
        if problem:
            return None, problem, False
        prompt, truncated = self.prompt_ids(sample.system, sample.prompt_messages)
        return {"prompt_ids": prompt, "completion_ids": completion, "label": sample.desirable}, None, truncated


def build_preference_dataset(items: Sequence[Item], encoder: PreferenceEncoder) -> tuple[Any, dict[str, int]]:
    """A `datasets.Dataset` of encoded pairs (prompt_ids, chosen_ids, rejected_ids) or, for KTO samples,
    (prompt_ids, completion_ids, label); and stats."""
    import datasets
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    stats = {"samples": 0, "truncated_prompts": 0, "dropped_too_long": 0, "dropped_too_short": 0}
    stats |= {"prompt_tokens": 0, "answer_tokens": 0}
    for item in tqdm(items, desc="tokenizing", unit="sample", disable=None):
        if isinstance(item, PreferencePair):
            row, problem, truncated = encoder.encode_pair(item)
        else:
            row, problem, truncated = encoder.encode_unpaired(item)
        if row is None:
            stats[problem or "dropped_too_long"] += 1
            continue
        rows.append(row)
        stats["samples"] += 1
        stats["truncated_prompts"] += int(truncated)
        stats["prompt_tokens"] += len(row["prompt_ids"])
        stats["answer_tokens"] += sum(len(v) for k, v in row.items() if k.endswith("_ids") and k != "prompt_ids")
    if not rows:
        raise DataError(
            f"no preference sample fits: {stats['dropped_too_long']} have an answer longer than max_target_length="
            f"{encoder.limits.max_target_length} tokens, {stats['dropped_too_short']} one shorter than "
            f"min_target_length={encoder.limits.min_target_length}"
        )
    return datasets.Dataset.from_list(rows), stats
