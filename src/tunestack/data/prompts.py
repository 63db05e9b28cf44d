"""Prompts for RL, as users write prompt files: every record or line is one prompt.

* a ShareGPT / OpenAI `messages` record that ends with a user turn (or a tool result) is a prompt as it stands,
  system turn, earlier exchanges, tool calls and `tools` included;
* a full conversation (ending with an answer) is the prompt of its last answer; that answer is the prompt's
  reference `answer` (for rewards that need one, e.g. accuracy);
* ``{"prompt": ...}``, ``{"question": ...}``, ``{"query": ...}`` or ``{"instruction", "input"}`` records, with an
  optional ``answer`` (MedicalGPT's GRPO data: ``{"question", "answer"}``), ``system`` and ``history``; a
  ``prompt`` may also be a list of turns;
* ``.txt`` files: one prompt per non-empty line.

Bad records are reported together as ``file:line: reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.data.formats import (
    Message,
    optional_system,
    parse_history,
    parse_messages,
    parse_record,
    turn_order_problem,
)
from tunestack.data.records import RecordProblem
from tunestack.data.sources import find_data_files, iter_records, read_text
from tunestack.data.supervised import SegmentTokenizer
from tunestack.data.tools import Tool, parse_tools
from tunestack.errors import DataError

PROMPT_KEYS = ("prompt", "question", "query", "instruction")
ANSWER_KEYS = ("answer", "response", "output", "reference")
TURN_KEYS = ("conversations", "messages")


@dataclass(frozen=True)
class Prompt:
    system: str | None
    messages: tuple[Message, ...]  # ends with a user turn or a tool result
    origin: str
    tools: tuple[Tool, ...] = ()
    answer: str | None = None  # the reference answer, when the record has one


def _answer(data: dict[str, Any]) -> str | None:
    for key in ANSWER_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return None


def _from_turns(data: dict[str, Any], key: str, origin: str, default_system: str | None) -> Prompt:
    system, messages, numbers = parse_messages(data[key], key)
    system = system or optional_system(data, "system", "system_prompt") or default_system
    tools = parse_tools(data.get("tools"))
    answer = _answer(data)
    if messages and messages[-1].role == "assistant":  # a full conversation: the prompt of its last answer
        last = messages.pop()
        numbers.pop()
        answer = answer or (last.content.strip() if last.content.strip() and not last.tool_calls else None)
    problem = turn_order_problem(messages, numbers, prompt=True)
    if problem:
        raise RecordProblem("bad turn order", problem)
    return Prompt(system, tuple(messages), origin, tools, answer)


def _from_fields(data: dict[str, Any], origin: str, default_system: str | None) -> Prompt | None:
    for key in PROMPT_KEYS:
        value = data.get(key)
        if isinstance(value, list) and key == "prompt":
            return _from_turns(data, key, origin, default_system)
        if not isinstance(value, str) or not value.strip():
            continue
        if key == "instruction" and isinstance(data.get("input"), str) and data["input"].strip():
            value = f"{value}\n{data['input']}"
        system = optional_system(data, "system", "system_prompt") or default_system
        messages = (*parse_history(data), Message("user", value))
        return Prompt(system, messages, origin, parse_tools(data.get("tools")), _answer(data))
    return None


def prompt_of_record(data: dict[str, Any], origin: str, data_format: str = "auto", system: str | None = None) -> Prompt:
    """The prompt of one record; RecordProblem or DataError says what is wrong with it."""
    key = next((k for k in TURN_KEYS if data.get(k) is not None), None)
    if key is not None and data_format in ("auto", "sharegpt", "messages"):
        return _from_turns(data, key, origin, system)
    plain = _from_fields(data, origin, system)
    if plain is not None:
        return plain
    conv = parse_record(data, data_format)  # any other SFT record: the prompt side of its last answer
    last = conv.messages[-1]
    answer = last.content if last.content.strip() and not last.tool_calls else None
    return Prompt(conv.system or system, conv.messages[:-1], origin, conv.tools, answer)


def load_prompts(paths: str, data_format: str = "auto", system_prompt: str | None = None) -> list[Prompt]:
    files = find_data_files(paths, what="prompt")
    prompts: list[Prompt] = []
    problems: list[str] = []
    for path in files:
        if Path(path).suffix.lower() == ".txt":
            for i, line in enumerate(read_text(path).splitlines(), start=1):
                if line.strip():
                    prompts.append(Prompt(system_prompt, (Message("user", line.strip()),), f"{path}:{i}"))
            continue
        for record in iter_records(path):
            try:
                prompts.append(prompt_of_record(record.data, record.where, data_format, system_prompt))
            except RecordProblem as bad:
                problems.append(f"{record.where}: {bad.message}")
            except DataError as exc:
                problems.append(f"{record.where}: {exc}")
    if problems:
        raise DataError(problems)
    if not prompts:
        raise DataError(f"no prompts found in {paths}")
    return prompts


class PromptEncoder:
    """Prompt -> ids with the SFT template (the policy sees what it was trained on), keeping the end."""

    def __init__(self, tokenizer: Any, template: Any, max_length: int):
        self.encoder = SegmentTokenizer(tokenizer, template)
        self.max_length = max_length

    def __call__(self, prompt: Prompt) -> list[int]:
        ids = self.encoder.encode_prompt(list(prompt.messages), prompt.system, prompt.tools)
        return ids[-self.max_length :]
