"""Prompts for RL: the prompt side of SFT-format conversations, or plain prompt records / lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.data.formats import Message, parse_record
from tunestack.data.sources import find_data_files, iter_records, read_text
from tunestack.data.supervised import SegmentTokenizer
from tunestack.errors import DataError

PROMPT_KEYS = ("prompt", "question", "query", "instruction")


@dataclass(frozen=True)
class Prompt:
    system: str | None
    messages: tuple[Message, ...]  # ends with a user turn
    origin: str


def _plain_prompt(data: dict) -> tuple[str | None, str] | None:
    for key in PROMPT_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            if key == "instruction" and isinstance(data.get("input"), str) and data["input"].strip():
                value = f"{value}\n{data['input']}"
            system = data.get("system") if isinstance(data.get("system"), str) else None
            return system, value
    return None


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
            plain = _plain_prompt(record.data)
            if plain is not None and not any(k in record.data for k in ("conversations", "messages")):
                system, text = plain
                prompts.append(Prompt(system or system_prompt, (Message("user", text),), record.where))
                continue
            try:
                conv = parse_record(record.data, data_format)
            except DataError as exc:
                problems.append(f"{record.where}: {exc}")
                continue
            # The prompt side: every turn before the last answer.
            prompts.append(Prompt(conv.system or system_prompt, tuple(conv.messages[:-1]), record.where))
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
        ids = self.encoder.encode_prompt(list(prompt.messages), prompt.system)
        return ids[-self.max_length :]
