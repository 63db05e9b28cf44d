"""The loader every record format shares: files -> parsed items, every bad record collected as `file:line: reason`.

A format module (formats.py for chat data, preference.py for preference data) supplies a `RecordTable`: how to
detect a record's format and how to parse it. `load_records` does the rest the same way for all of them: one
format per file (that of its first recognised record) in auto mode, malformed lines reported with the others,
all problems raised as one `DataError` unless `skip_bad_records` (then the bad ones are returned as rejects),
and no valid record at all is always an error. Held-out splits and default system prompts live here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunestack.atomic import write_jsonl_atomic
from tunestack.data.sources import RECORD_SUFFIXES, BadLine, Record, find_data_files, read_records
from tunestack.errors import ConfigError, DataError

T = TypeVar("T")


class RecordProblem(Exception):
    """One bad record: `kind` is a short category for counting, `message` the full reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class RecordTable(Generic[T]):
    """The formats of one kind of data. `parse(data, fmt)` raises RecordProblem; `undetected(data, known)` is the
    problem of a record whose format is not recognised (`known`: the format of its file so far, if any)."""

    noun: str  # "SFT", "preference": for messages
    items_noun: str  # what the parsed items are called in summaries: "conversations", "pairs"
    formats: tuple[str, ...]
    detect: Callable[[dict[str, Any]], str | None]
    parse: Callable[[dict[str, Any], str], T]
    undetected: Callable[[dict[str, Any], str | None], RecordProblem]

    def check_format_name(self, data_format: str) -> None:
        choices = ("auto", *self.formats)
        if data_format not in choices:
            close = difflib.get_close_matches(data_format, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown {self.noun} data_format '{data_format}'{hint}; expected one of {', '.join(choices)}"
            )


@dataclass
class Loaded(Generic[T]):
    items: list[T]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    reason_counts: Counter[str] = field(default_factory=Counter)
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format
    noun: str = "records"

    def reject(self, where: str, kind: str, reason: str, record: Any) -> None:
        self.rejects.append({"where": where, "reason": reason, "record": record})
        self.reason_counts[kind] += 1

    def summary(self) -> str:
        text = f"{len(self.items)} {self.noun}"
        if self.rejects:
            reasons = ", ".join(f"{n} {r}" for r, n in self.reason_counts.most_common())
            text += f", {len(self.rejects)} skipped ({reasons})"
        return text


def load_records(
    files: Iterable[Path | str],
    table: RecordTable[T],
    data_format: str = "auto",
    skip_bad_records: bool = False,
    accept: Callable[[str], RecordProblem | None] | None = None,
) -> Loaded[T]:
    """Parse every record of `files`; `accept(fmt)` may refuse a whole format (e.g. unpaired records for DPO)."""
    table.check_format_name(data_format)
    forced = None if data_format == "auto" else data_format
    result: Loaded[T] = Loaded([], noun=table.items_noun)
    n_records = 0
    first_seen: dict[str, tuple[str, int]] = {}  # file -> (format, line of its first record)
    for path in [Path(f) for f in files]:
        for item in read_records(path):
            n_records += 1
            if isinstance(item, BadLine):
                result.reject(item.where, "malformed JSON", item.reason, item.text)
                continue
            try:
                fmt = forced or _file_format(item, table, first_seen)
                refused = accept(fmt) if accept is not None else None
                if refused is not None:
                    raise refused
                parsed = table.parse(item.data, fmt)
            except RecordProblem as bad:
                result.reject(item.where, bad.kind, bad.message, item.data)
                continue
            result.items.append(dataclasses.replace(parsed, origin=item.where))  # type: ignore[type-var]
        if forced or str(path) in first_seen:
            result.formats[str(path)] = forced or first_seen[str(path)][0]
    if result.rejects and not skip_bad_records:
        raise DataError([f"{r['where']}: {r['reason']}" for r in result.rejects])
    if not result.items:
        _raise_empty(result, n_records, table.noun)
    return result


def _file_format(record: Record, table: RecordTable[Any], first_seen: dict[str, tuple[str, int]]) -> str:
    """In auto mode a file's format is that of its first recognised record."""
    fmt = table.detect(record.data)
    known = first_seen.get(record.file)
    if fmt is None:
        raise table.undetected(record.data, known[0] if known else None)
    if known is None:
        first_seen[record.file] = (fmt, record.line)
    elif fmt != known[0]:
        raise RecordProblem(
            "mixed formats",
            f"the file mixes formats: {known[0]} (from line {known[1]}) and {fmt} (this record); "
            "use one format per file",
        )
    return fmt


def _raise_empty(result: Loaded[Any], n_records: int, noun: str) -> None:
    if n_records == 0:
        raise DataError(f"no {noun} records found: the data files are empty")
    shown = [f"{r['where']}: {r['reason']}" for r in result.rejects[:3]]
    counts = ", ".join(f"{n} {k}" for k, n in result.reason_counts.most_common())
    raise DataError(f"no valid {noun} records: all {n_records} records were rejected ({counts}); first: " + "; ".join(shown))


def load_files(
    paths: str,
    table: RecordTable[T],
    data_format: str = "auto",
    skip_bad_records: bool = False,
    accept: Callable[[str], RecordProblem | None] | None = None,
) -> tuple[list[Path], Loaded[T]]:
    """The record files under `paths` (files or folders, comma separated) and what they hold."""
    files = find_data_files(paths, suffixes=RECORD_SUFFIXES, what=f"{table.noun} data")
    return files, load_records(files, table, data_format, skip_bad_records, accept)


def write_rejects(rejects: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """Rejected records as JSON lines ({"where", "reason", "record"})."""
    return write_jsonl_atomic(path, rejects)


# ---------------------------------------------------------------------------------------------
# Shared data preparation


def held_out_indices(n: int, percentage: float, seed: int) -> set[int]:
    """`percentage` percent of range(n) (at least one), chosen at random with `seed`; none for n < 2."""
    if percentage <= 0 or n < 2:
        return set()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[: max(1, int(n * percentage / 100))])


def split_held_out(items: list[T], percentage: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out) of `items`, see held_out_indices."""
    held = held_out_indices(len(items), percentage, seed)
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def with_default_system(items: list[T], system: str | None) -> list[T]:
    """Items (conversations, pairs, prompts) with `system` as their system prompt where they have none."""
    if not system:
        return items
    return [i if i.system else dataclasses.replace(i, system=system) for i in items]  # type: ignore[attr-defined]


def first_n(items: list[T], n: int | None) -> list[T]:
    """`--max_train_samples`-style limits: the first n items (all when n is None or not positive)."""
    return items[:n] if n and n > 0 else items


@dataclass
class Splits(Generic[T]):
    """Training and held-out items of a stage, with where they came from and what was skipped."""

    train: list[T]
    eval: list[T]
    files: list[Path]
    rejects: list[dict[str, Any]]
    loaded: Loaded[T]  # of the training files: reason counts and formats for the summary

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "skipped_bad_records": len(self.rejects),
            "skip_reasons": dict(self.loaded.reason_counts),
            "formats": dict(self.loaded.formats),
        }


def load_splits(
    data_args: Any, table: RecordTable[T], do_eval: bool, seed: int, accept: Callable[[str], RecordProblem | None] | None = None
) -> Splits[T]:
    """--train_file_dir, and --validation_file_dir or (with --do_eval) a --validation_split_percentage held out;
    --system_prompt for items without one; --max_train_samples / --max_eval_samples."""
    d = data_args
    files, loaded = load_files(d.train_file_dir, table, d.data_format, d.skip_bad_records, accept)
    rejects = list(loaded.rejects)
    train = with_default_system(loaded.items, d.system_prompt)
    held: list[T] = []
    if d.validation_file_dir:
        eval_files, eval_loaded = load_files(d.validation_file_dir, table, d.data_format, d.skip_bad_records, accept)
        files, rejects = files + eval_files, rejects + eval_loaded.rejects
        held = with_default_system(eval_loaded.items, d.system_prompt)
    elif do_eval:
        train, held = split_held_out(train, d.validation_split_percentage, seed)
    return Splits(first_n(train, d.max_train_samples), first_n(held, d.max_eval_samples), files, rejects, loaded)
