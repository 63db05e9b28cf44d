"""`tunestack score`: score records with a trained reward model.

Preference pairs (any format `tunestack rm` reads) get score_chosen / score_rejected / margin and a summary
of pairwise accuracy; prompt/response, chat (sharegpt, messages, alpaca) and kto records get one score for
their (last) answer. Output: one JSON object per record, in input order, to --output_file or stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunestack.atomic import jsonl_text, write_text_atomic
from tunestack.config.parse import parse_into, print_help
from tunestack.config.rm import ScoreArguments
from tunestack.data.formats import Message, load_conversations
from tunestack.data.preference import KTOSample, PreferencePair, detect_preference_format, load_preferences
from tunestack.data.sources import RECORD_SUFFIXES, BadLine, find_data_files, read_records
from tunestack.errors import ConfigError, DataError

DESCRIPTION = "Score preference pairs or answers with a reward model trained by tunestack rm."


@dataclass(frozen=True)
class Answer:
    """One answer to score: its prompt, where it came from, and the row field it fills."""

    system: str | None
    prompt: tuple[Message, ...]
    text: str | Message
    row: int
    key: str
    tools: tuple[dict[str, Any], ...] = ()


def _file_is_preference(path: Path, data_format: str) -> bool:
    if data_format != "auto":
        return True
    for item in read_records(path):
        if not isinstance(item, BadLine):
            return detect_preference_format(item.data) is not None
    return True


def collect(files: list[Path], args: ScoreArguments) -> tuple[list[dict[str, Any]], list[Answer], list[str]]:
    """(output rows, answers to score into them, problems) for all files; every bad record is listed."""
    rows: list[dict[str, Any]] = []
    answers: list[Answer] = []
    problems: list[str] = []

    def add(
        system: str | None,
        prompt: tuple[Message, ...],
        where: str,
        texts: dict[str, str | Message],
        extra: dict[str, Any],
        tools: tuple[dict[str, Any], ...] = (),
    ) -> None:
        system = system or args.system_prompt
        rows.append({"where": where, "prompt": prompt[-1].content, **extra})
        answers.extend(Answer(system, prompt, text, len(rows) - 1, key, tools) for key, text in texts.items())

    for path in files:
        try:
            if _file_is_preference(path, args.data_format):
                loaded = load_preferences([path], args.data_format, args.skip_bad_records, kind="any")
                problems += [f"{r['where']}: {r['reason']}" for r in loaded.rejects]
                for item in loaded.items:
                    if isinstance(item, PreferencePair):
                        texts = {"score_chosen": item.chosen_message, "score_rejected": item.rejected_message}
                        add(item.system, item.prompt_messages, item.origin, texts, {}, item.tools)
                    elif isinstance(item, KTOSample):
                        add(
                            item.system,
                            item.prompt_messages,
                            item.origin,
                            {"score": item.completion_message},
                            {"label": item.desirable},
                            item.tools,
                        )
            else:
                convs = load_conversations([path], "auto", args.skip_bad_records)
                problems += [f"{r['where']}: {r['reason']}" for r in convs.rejects]
                for conv in convs.items:
                    add(conv.system, conv.messages[:-1], conv.origin, {"score": conv.messages[-1]}, {}, conv.tools)
        except DataError as exc:
            problems += exc.problems
    return rows, answers, problems


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print_help((ScoreArguments,), "tunestack score", DESCRIPTION)
        return 0
    (args,) = parse_into((ScoreArguments,), argv, prog="tunestack score", description=DESCRIPTION)
    files = find_data_files(args.data_file, suffixes=RECORD_SUFFIXES, what="data")
    rows, answers, problems = collect(files, args)
    if problems and not args.skip_bad_records:
        raise DataError(problems)
    if not answers:
        raise DataError("nothing to score: no valid records in " + ", ".join(str(f) for f in files))

    from tunestack.data.templates import get_template
    from tunestack.model.reward import load_reward_model, score_responses

    model, tokenizer, template = load_reward_model(args.reward_model, args.torch_dtype, args.trust_remote_code)
    if args.template_name:
        template = get_template(args.template_name, tokenizer)
    if template is None:
        raise ConfigError("the reward model's tokenizer has no chat template; pass --template_name")
    scores = score_responses(
        model,
        tokenizer,
        template,
        [(a.system, a.prompt, a.tools) for a in answers],
        [a.text for a in answers],
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    for answer, score in zip(answers, scores, strict=True):
        rows[answer.row][answer.key] = score
    pairs = [r for r in rows if "score_chosen" in r]
    for r in pairs:
        r["margin"] = r["score_chosen"] - r["score_rejected"]
    write_rows(rows, args.output_file)
    print(summary(rows, pairs, len(problems), args.output_file), file=sys.stderr)  # noqa: T201
    return 0


def write_rows(rows: list[dict[str, Any]], output_file: str | None) -> None:
    if output_file is None:
        sys.stdout.write(jsonl_text(rows))
    else:
        write_text_atomic(output_file, jsonl_text(rows))


def summary(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], skipped: int, output_file: str | None) -> str:
    parts = [f"scored {len(rows)} records"]
    if pairs:
        accuracy = sum(r["margin"] > 0 for r in pairs) / len(pairs)
        margin = sum(r["margin"] for r in pairs) / len(pairs)
        parts.append(f"{len(pairs)} pairs: pairwise accuracy {accuracy:.3f}, mean margin {margin:+.3f}")
    singles = [r["score"] for r in rows if "score" in r]
    if singles:
        parts.append(f"{len(singles)} answers: mean score {sum(singles) / len(singles):+.3f}")
    if skipped:
        parts.append(f"{skipped} bad records skipped")
    if output_file:
        parts.append(f"written to {output_file}")
    return "; ".join(parts)
