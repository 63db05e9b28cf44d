"""Find data files and read them into records that remember where they came from.

Every record carries its file and line so that any later validation error can say
`file:line: reason`. Supported: .txt, .json (array or one object per line), .jsonl, .csv,
.parquet. Reading is strict: undecodable bytes and malformed JSON are `DataError`s.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.errors import DataError

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
KNOWN_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES


@dataclass(frozen=True)
class Record:
    """One raw sample and its origin."""

    data: dict[str, Any]
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class BadLine:
    """A line of a JSON-lines file that is not a JSON object, kept so that later lines are still read."""

    file: str
    line: int
    text: str
    reason: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def find_data_files(
    paths: str | Path | Iterable[str | Path], suffixes: tuple[str, ...] = KNOWN_SUFFIXES, what: str = "data"
) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of data files.

    Raises DataError for a path that does not exist, or when nothing of a known type is found.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            path = Path(part).expanduser()
            if not path.exists():
                raise DataError(f"{what} path does not exist: {path}")
            if path.is_file():
                if path.suffix.lower() not in suffixes:
                    raise DataError(
                        f"{path}: unsupported file type '{path.suffix}' (expected one of {', '.join(suffixes)})"
                    )
                found.append(path)
                continue
            _refuse_output_folders(path, what)
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in suffixes and not any(s.startswith(".") for s in p.parts[-1:])
            )
            if not files:
                present = sorted({p.suffix or p.name for p in path.rglob("*") if p.is_file()})
                detail = f" (found: {', '.join(present[:8])})" if present else " (the folder is empty)"
                raise DataError(f"{path}: no {what} files of a known type {'/'.join(suffixes)}{detail}")
            found.extend(files)
    if not found:
        raise DataError(f"no {what} files given")
    return found


def _refuse_output_folders(folder: Path, what: str) -> None:
    """A tunestack output folder is not data (its config, tokenizer and run files would be read as records)."""
    for manifest in [folder / "run.json", *folder.rglob("*/run.json")]:
        try:
            stage = json.loads(manifest.read_text(encoding="utf-8")).get("stage") if manifest.is_file() else None
        except (OSError, ValueError, AttributeError):
            stage = None
        if stage:
            raise DataError(
                f"{manifest.parent} is a tunestack output folder (a {stage} run), not {what}: point the option at "
                "the data files or the folder that holds them"
            )


def read_text(path: Path) -> str:
    """Decode a file as UTF-8 (a BOM is dropped); undecodable bytes name the byte offset and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 at byte offset {exc.start} "
            f"(byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8"
        ) from None


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where `value` holds a string with half of a UTF-16 surrogate pair (a JSON escape like \\ud83d alone):
    no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            return f"field '{where or 'text'}' holds a lone surrogate escape \\u{ord(bad):04x}, which is not text"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _json_lines(path: Path, text: str) -> Iterator[Record | BadLine]:
    # Lines end at "\n" only: str.splitlines would also split at U+2028, U+0085, form feed ..., which
    # json.dumps(ensure_ascii=False) leaves raw inside strings. A trailing "\r" is JSON whitespace.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadLine(str(path), lineno, line, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield BadLine(str(path), lineno, line, f"expected a JSON object, got {type(obj).__name__}")
            continue
        surrogate = _lone_surrogate(obj) if "\\ud" in line.lower() else None
        if surrogate:
            yield BadLine(str(path), lineno, line, surrogate)
            continue
        yield Record(obj, str(path), lineno)


def _json_array_records(path: Path, text: str) -> Iterator[Record]:
    """Walk a top-level JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise DataError(f"{path}: malformed JSON (the array is not closed)")
        if text[pos] == "]":
            return
        lineno = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        surrogate = _lone_surrogate(obj)
        if surrogate:
            raise DataError(f"{path}:{lineno}: {surrogate}")
        yield Record(obj, str(path), lineno)


def read_records(path: Path) -> Iterator[Record | BadLine]:
    """Records of one file, a malformed JSON line yielded as a `BadLine` (a JSON array or a CSV/parquet file
    cannot be read past a syntax error: that is a DataError). Line numbers are 1-based; CSV rows count the
    header as line 1."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = read_text(path)
        yield from _json_array_records(path, text) if text.lstrip().startswith("[") else _json_lines(path, text)
    elif suffix == ".csv":
        # newline="" lets quoted fields keep their line breaks; a record's line is where its row starts.
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        if reader.fieldnames is None:
            return
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            yield Record(dict(row), str(path), start)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise DataError(f"{path}: cannot read parquet ({exc})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield Record(row, str(path), i)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'")


def iter_records(path: Path) -> Iterator[Record]:
    """Records of one file; the first malformed line is a DataError."""
    for item in read_records(path):
        if isinstance(item, BadLine):
            raise DataError(f"{item.where}: {item.reason}")
        yield item


def fingerprint_files(files: Iterable[Path]) -> str:
    """Content hash of files (names and bytes), stable across machines and mtimes."""
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.name).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
