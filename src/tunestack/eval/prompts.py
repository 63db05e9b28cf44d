"""What `tunestack eval` asks: a prompt set with reference answers, and the probe prompts kept for before/after."""

from __future__ import annotations

from pathlib import Path

from tunestack.errors import DataError
from tunestack.infer.batch import PromptItem, prompt_from_record

# Asked of every evaluated model; their answers are kept side by side in the report.
DEFAULT_PROBES = (
    "Who are you?",
    "你是谁？",
    "What is the capital of France?",
    "What is a normal resting heart rate for adults?",
)

REFERENCE_FIELDS = ("reference", "answer", "output", "response", "chosen", "response_chosen")


def read_items(path: Path, what: str) -> list[PromptItem]:
    """Prompts (and reference answers, when present) of a jsonl/json/csv/parquet or .txt file.

    A record's prompt is `prompt`, `question`, `instruction` (+ `input`) or `query`; its reference is `reference`,
    `answer`, `output` or `response`. SFT conversations (`conversations` / `messages`) ask their last user turn and
    take the answer that follows it as the reference. All bad records are reported together.
    """
    from tunestack.data.sources import iter_records, read_text

    if not path.is_file():
        raise DataError(f"{what} does not exist: {path}")
    if path.suffix.lower() == ".txt":
        lines = read_text(path).splitlines()
        return [
            PromptItem([{"role": "user", "content": line.strip()}], None, f"{path}:{n}")
            for n, line in enumerate(lines, start=1)
            if line.strip()
        ]
    items, problems = [], []
    for record in iter_records(path):
        try:
            item = prompt_from_record(record.data, record.where)
        except ValueError as exc:
            problems.append(f"{record.where}: {exc}")
            continue
        if item.reference is None:
            item.reference = next(
                (v for k in REFERENCE_FIELDS if isinstance(v := record.data.get(k), str) and v.strip()), None
            )
        items.append(item)
    if problems:
        raise DataError(problems)
    if not items:
        raise DataError(f"{path}: no prompts in this file")
    return items


def probe_items(path: str | None) -> list[PromptItem]:
    """The probe prompts: the file given, none for 'none', else the default list."""
    if path is not None and path.strip().lower() in ("none", "no", "false", ""):
        return []
    if path is None:
        return [PromptItem([{"role": "user", "content": p}], None, "default probes") for p in DEFAULT_PROBES]
    return read_items(Path(path).expanduser(), "--probe_prompts")
