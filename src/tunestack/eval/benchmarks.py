"""Multiple-choice benchmarks from local folders: layout detection, questions, k-shot prompts.

Layouts, detected per folder from its files and their first row:

* MMLU: `dev/{subject}_dev.csv`, `val/{subject}_val.csv`, `test/{subject}_test.csv`, no header:
  `question,A,B,C,D,answer`;
* C-Eval: `{dev,val,test}/{subject}_{split}.csv` with the header `id,question,A,B,C,D,answer[,explanation]`
  (its public test split has no answers: it is skipped with a note and val is scored);
* CMMLU: `dev/{subject}.csv`, `test/{subject}.csv` with the header `,Question,A,B,C,D,Answer`;
* generic: `.jsonl`/`.json`/`.csv` records with `question`, the choices as a list (`choices` / `options`) or as
  `A`, `B` ... columns, and `answer` (a letter, the text of a choice, or a 0-based index, tried in that order); the
  subject is the record's
  `subject` or the file name; files in `dev/` (or named `*_dev.*`) give the k-shot examples.

Prompts follow MMLU's original code: a header naming the subject (C-Eval's Chinese header for Chinese sets), the
first k dev questions with their answers, then the question ending in "Answer:" (Chinese: "答案：").
A `subject_mapping.json` (C-Eval's: subject -> [English name, Chinese name, category]) or `mapping.json`
({subject: {"name": ...}}) in the folder names the subjects in the header.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.data.sources import iter_records, read_text
from tunestack.errors import DataError

LETTERS = "ABCDEFGHIJ"
LAYOUTS = ("mmlu", "ceval", "cmmlu", "generic")
SPLITS = ("dev", "val", "test")
HEADER = {
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
}
ANSWER_CUE = {"en": "\nAnswer:", "zh": "\n答案："}
ANSWER_SEP = {"en": " ", "zh": ""}  # between the cue and the answer, as the shots show it
MAPPING_FILES = ("subject_mapping.json", "mapping.json")
_SUFFIXES = (".csv", ".jsonl", ".json")
_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int | None  # index into choices; None where the split has no answers
    where: str


@dataclass
class Subject:
    name: str
    display: str  # the subject as the prompt header names it
    questions: list[Question] = field(default_factory=list)  # the scored split
    shots: list[Question] = field(default_factory=list)  # dev questions, in file order


@dataclass
class Benchmark:
    name: str
    path: Path
    layout: str
    lang: str
    split: str
    subjects: list[Subject]
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(s.questions) for s in self.subjects)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.layout} layout, {len(self.subjects)} subjects, {self.size} {self.split} questions "
            f"({self.lang})"
        )


# -- reading -----------------------------------------------------------------------------------


def data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _SUFFIXES
        and p.name not in MAPPING_FILES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(read_text(path), newline="")))


def _csv_kind(first: list[str]) -> str:
    cells = [c.strip().lower() for c in first]
    if cells[:7] == ["", "question", "a", "b", "c", "d", "answer"]:
        return "cmmlu"
    if cells[:6] == ["id", "question", "a", "b", "c", "d"]:
        return "ceval"
    if "question" in cells and "answer" in cells:
        return "generic"
    return "mmlu"


def detect_layout(folder: Path) -> str:
    """mmlu, ceval, cmmlu or generic; a folder mixing them is a DataError."""
    files = data_files(folder)
    if not files:
        raise DataError(f"--benchmark_dir {folder}: no .csv/.jsonl/.json question files")
    kinds: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() != ".csv":
            kinds.setdefault("generic", path)
            continue
        rows = _csv_rows(path)
        if rows:
            kinds.setdefault(_csv_kind(rows[0]), path)
    if len(kinds) > 1:
        shown = ", ".join(f"{k} ({p.relative_to(folder)})" for k, p in kinds.items())
        raise DataError(f"--benchmark_dir {folder}: files of different layouts in one folder: {shown}")
    if not kinds:
        raise DataError(f"--benchmark_dir {folder}: every question file is empty")
    return next(iter(kinds))


def _split_and_subject(path: Path, folder: Path) -> tuple[str | None, str]:
    stem = path.stem
    for split in SPLITS:
        if stem.endswith(f"_{split}"):
            return split, stem[: -len(split) - 1]
    parents = [p.lower() for p in path.relative_to(folder).parts[:-1]]
    split = next((s for s in SPLITS if s in parents), None)
    return split, stem


def _answer_index(value: Any, choices: list[str], where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: answer must be a letter, an index or a choice's text, got {value!r}")
    if isinstance(value, int):
        index = value
    else:
        text = str(value).strip()
        if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
            index = LETTERS.index(text.upper())
        elif text in choices:  # before digits: "4" among the choices "3", "4", "5" is that choice
            index = choices.index(text)
        elif text.isdigit():
            index = int(text)
        else:
            raise DataError(f"{where}: answer {text!r} is not a letter {LETTERS[: len(choices)]}, an index or a choice")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: answer {value!r} is out of range for {len(choices)} choices")
    return index


def _question(text: Any, choices: list[Any], answer: Any, where: str) -> Question:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the question is empty")
    if len(choices) < 2 or len(choices) > len(LETTERS):
        raise DataError(f"{where}: expected 2 to {len(LETTERS)} choices, got {len(choices)}")
    texts = ["" if c is None else str(c) for c in choices]
    return Question(text.strip(), texts, _answer_index(answer, texts, where), where)


def _csv_questions(path: Path, layout: str) -> list[Question]:
    rows = _csv_rows(path)
    if layout != "mmlu":
        rows = rows[1:]
    first_line = 1 if layout == "mmlu" else 2
    out = []
    for n, row in enumerate(rows, start=first_line):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{n}"
        if layout == "mmlu":
            if len(row) != 6:
                raise DataError(f"{where}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            out.append(_question(row[0], row[1:5], row[5], where))
        else:  # ceval: id,question,A,B,C,D,answer[,explanation]; cmmlu: ,Question,A,B,C,D,Answer
            if len(row) < 6:
                raise DataError(f"{where}: expected at least 6 columns, got {len(row)}")
            out.append(_question(row[1], row[2:6], row[6] if len(row) > 6 else None, where))
    return out


def _choices_of(data: dict[str, Any]) -> list[Any]:
    for key in ("choices", "options"):
        value = data.get(key)
        if isinstance(value, list):
            return value
        if isinstance(value, dict):  # {"A": ..., "B": ...}
            return [value[k] for k in sorted(value)]
    return [data[k] for k in LETTERS if data.get(k) not in (None, "")]


def _generic_questions(path: Path) -> list[tuple[str | None, Question]]:
    out = []
    for record in iter_records(path):
        data = {str(k).strip(): v for k, v in record.data.items()}
        lowered = {k.lower(): v for k, v in data.items() if k.lower() in ("question", "answer", "subject")}
        question = _question(lowered.get("question"), _choices_of(data), lowered.get("answer"), record.where)
        subject = lowered.get("subject")
        out.append((str(subject) if subject else None, question))
    return out


def _mapping(folder: Path) -> dict[str, Any]:
    for name in MAPPING_FILES:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(read_text(path))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: malformed JSON ({exc.msg})") from None
            return data if isinstance(data, dict) else {}
    return {}


def _display(subject: str, mapping: dict[str, Any], lang: str) -> str:
    entry = mapping.get(subject)
    if isinstance(entry, list) and len(entry) >= 2:  # C-Eval: [English, Chinese, category]
        return str(entry[1] if lang == "zh" else entry[0])
    if isinstance(entry, dict) and entry.get("name"):
        return str(entry["name"])
    return subject.replace("_", " ")


def _is_chinese(subjects: dict[str, dict[str | None, list[Question]]]) -> bool:
    text = "".join(q.question for splits in subjects.values() for qs in splits.values() for q in qs[:20])
    return len(_CJK.findall(text)) > 0.3 * max(1, len(text.replace(" ", "")))


def read_benchmark(
    folder: Path, split: str = "auto", lang: str = "auto", max_questions: int | None = None
) -> Benchmark:
    """The questions of one benchmark folder: the scored split of every subject and its dev shots."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise DataError(f"--benchmark_dir {folder} is not a folder")
    layout = detect_layout(folder)
    by_subject: dict[str, dict[str | None, list[Question]]] = {}
    for path in data_files(folder):
        file_split, subject = _split_and_subject(path, folder)
        if layout == "generic":
            for record_subject, q in _generic_questions(path):
                by_subject.setdefault(record_subject or subject, {}).setdefault(file_split, []).append(q)
        else:
            by_subject.setdefault(subject, {}).setdefault(file_split, []).extend(_csv_questions(path, layout))
    notes: list[str] = []
    chosen = _choose_split(folder, by_subject, split, notes)
    if lang == "auto":
        lang = "zh" if layout in ("ceval", "cmmlu") or (layout == "generic" and _is_chinese(by_subject)) else "en"
    mapping = _mapping(folder)
    missing = [q.where for splits in by_subject.values() for q in splits.get(chosen, []) if q.answer is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataError(f"{folder}: {len(missing)} {chosen or 'test'} questions have no answer: {shown}")
    subjects = []
    for name in sorted(by_subject):
        questions = by_subject[name].get(chosen, [])
        if not questions:
            continue
        if max_questions and max_questions > 0:
            questions = questions[:max_questions]
        shots = [q for q in by_subject[name].get("dev", []) if q.answer is not None]
        subjects.append(Subject(name, _display(name, mapping, lang), questions, shots))
    if not subjects:
        raise DataError(f"--benchmark_dir {folder}: no {chosen} questions")
    return Benchmark(folder.name or str(folder), folder, layout, lang, chosen or "test", subjects, notes)


def _choose_split(
    folder: Path, by_subject: dict[str, dict[str | None, list[Question]]], split: str, notes: list[str]
) -> str | None:
    """The split scored: --benchmark_split, or test (unmarked files of a generic set count as test) where it has
    answers, else val."""

    def answered(name: str | None) -> bool:
        qs = [q for splits in by_subject.values() for q in splits.get(name, [])]
        return bool(qs) and all(q.answer is not None for q in qs)

    def present(name: str | None) -> bool:
        return any(splits.get(name) for splits in by_subject.values())

    if split != "auto":
        if not present(split):
            raise DataError(f"--benchmark_split {split}: {folder} has no {split} questions")
        return split
    for candidate in ("test", None, "val"):
        if present(candidate) and answered(candidate):
            return candidate
        if present(candidate) and candidate == "test":
            notes.append(f"{folder.name}: the test split has no answers (scored elsewhere): skipped")
    if present("dev"):
        notes.append(f"{folder.name}: only a dev split: its questions are scored, without k-shot examples")
        for splits in by_subject.values():
            splits["dev-scored"] = splits.pop("dev", [])
        return "dev-scored"
    raise DataError(f"--benchmark_dir {folder}: no split with answers to score")


# -- prompts ------------------------------------------------------------------------------------


def format_question(q: Question, lang: str, method: str, answer: int | None = None) -> str:
    """One question as the prompt shows it; with `answer`, followed by that answer and a blank line (a shot).

    letter: the question, its lettered choices and the answer cue, answered by a letter;
    cloze: the question and the answer cue, answered by the choice's text.
    """
    text = q.question
    if method == "letter":
        text += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    text += ANSWER_CUE[lang]
    if answer is not None:
        text += answer_text(q, answer, lang, method) + "\n\n"
    return text


def answer_text(q: Question, index: int, lang: str, method: str) -> str:
    """What follows the answer cue: ' A' (English) / 'A' (Chinese), or the choice's text for cloze."""
    return ANSWER_SEP[lang] + (LETTERS[index] if method == "letter" else q.choices[index])


def build_prompt(subject: Subject, q: Question, n_shot: int, lang: str, method: str) -> str:
    """The header naming the subject, the first `n_shot` dev questions answered, then `q` up to its answer cue."""
    shots = "".join(format_question(s, lang, method, s.answer) for s in subject.shots[:n_shot])
    return HEADER[lang].format(subject=subject.display) + shots + format_question(q, lang, method)


def join_repeated(argv: list[str], flag: str) -> list[str]:
    """`--flag a --flag b` -> `--flag a,b` (a repeated flag adds folders instead of replacing them)."""
    spellings = (flag, flag[:2] + flag[2:].replace("_", "-"))
    values, out, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in spellings and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if tok.split("=", 1)[0] in spellings and "=" in tok:
            values.append(tok.split("=", 1)[1])
        else:
            out.append(tok)
        i += 1
    return out + ([flag, ",".join(values)] if values else [])


def read_benchmarks(dirs: str, split: str, lang: str, max_questions: int | None) -> list[Benchmark]:
    """Every folder of a comma-separated --benchmark_dir, each named after its folder (made unique)."""
    out: list[Benchmark] = []
    for part in [p.strip() for p in dirs.split(",") if p.strip()]:
        bench = read_benchmark(Path(part), split, lang, max_questions)
        while any(b.name == bench.name for b in out):
            bench.name += "'"
        out.append(bench)
    return out
