"""Score multiple-choice questions with a model: letter (MMLU's way) or cloze.

letter: the prompt lists the lettered choices and ends with the answer cue ("Answer:"); a choice's score is the
  log-probability of its letter as the next token, summed (logsumexp) over the letter's tokens with and without a
  leading space (" A" and "A"), so the score does not depend on how the tokenizer splits "Answer: A". This is what
  MMLU's original code and LLaMA-Factory's evaluator compare (the next-token logits of the letters).
cloze: the prompt ends with the answer cue without the choices; a choice's score is the log-likelihood of its text
  as the continuation divided by the text's length in characters (lm-evaluation-harness's acc_norm).

Prompts are plain text (no chat template) unless `chat_template` is set: then the whole k-shot prompt is the user
turn of the model's own template and the answer is the first thing the assistant says. A prompt longer than the
context drops its last shots first, then keeps its end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunestack.eval.benchmarks import LETTERS, Benchmark, Question, Subject, answer_text, build_prompt
from tunestack.eval.scoring import continuation_logprobs, next_token_logprobs, pad_id_of


@dataclass
class Scored:
    benchmark: str
    subject: str
    where: str
    answer: int
    predicted: int
    scores: list[float]

    @property
    def correct(self) -> bool:
        return self.answer == self.predicted


def letter_token_ids(tokenizer: Any, n: int) -> list[list[int]]:
    """For each of the first `n` letters, the ids of its token with and without a leading space (deduplicated)."""
    out = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for letter in LETTERS[:n]:
        candidates = [tokenizer.encode(v, add_special_tokens=False)[-1] for v in (letter, " " + letter)]
        direct = tokenizer.convert_tokens_to_ids(letter)  # the bare letter where encode adds a prefix space (SP)
        if isinstance(direct, int) and direct != unk:
            candidates.append(direct)
        ids = [i for i in dict.fromkeys(candidates) if tokenizer.decode([i]).strip() == letter]
        if not ids:
            raise ValueError(f"the tokenizer has no token for the answer letter {letter!r}")
        out.append(ids)
    return out


class PromptEncoder:
    """Prompt text -> ids as the model reads it: plain (the tokenizer's automatic BOS once) or chat-wrapped."""

    def __init__(self, chat: Any, chat_template: bool, max_length: int | None):
        self.chat = chat
        self.chat_template = chat_template
        self.max_length = max_length or chat.context_length or 2048
        self.truncated = 0

    def text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        return self.chat.render([{"role": "user", "content": prompt}], None)

    def encode(self, text: str) -> list[int]:
        return self.chat.encode(text)

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as lm-evaluation-harness splits them: trailing white space of the context
        moves to the continuation, the two are encoded together and split after the context's tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head) :]

    def fitted(self, subject: Subject, q: Question, n_shot: int, lang: str, method: str, reserve: int) -> str:
        """The prompt text with as many of the `n_shot` shots as fit the context (`reserve` tokens kept free)."""
        for k in range(min(n_shot, len(subject.shots)), -1, -1):
            text = self.text(build_prompt(subject, q, k, lang, method))
            if k == 0 or len(self.encode(text)) + reserve <= self.max_length:
                return text
        raise AssertionError("unreachable")

    def cut(self, ids: list[int], reserve: int) -> list[int]:
        limit = self.max_length - reserve
        if len(ids) <= limit:
            return ids
        self.truncated += 1
        return ids[-limit:]


def _questions(benchmarks: Sequence[Benchmark]) -> list[tuple[Benchmark, Subject, Question]]:
    return [(b, s, q) for b in benchmarks for s in b.subjects for q in s.questions]


def score_benchmarks(
    chat: Any,
    benchmarks: Sequence[Benchmark],
    method: str = "letter",
    n_shot: int = 5,
    batch_size: int = 8,
    chat_template: bool = False,
    max_length: int | None = None,
    label: str = "",
) -> tuple[list[Scored], PromptEncoder]:
    """Every question of `benchmarks` scored by `chat.model`; the encoder tells how many prompts were cut."""
    from tqdm import tqdm

    items = _questions(benchmarks)
    encoder = PromptEncoder(chat, chat_template, max_length)
    pad = pad_id_of(chat.tokenizer, chat.stop_ids)
    if method == "letter":
        n_choices = max(len(q.choices) for _, _, q in items)
        variants = letter_token_ids(chat.tokenizer, n_choices)
        flat = [i for ids in variants for i in ids]
        prompts = [encoder.cut(encoder.encode(encoder.fitted(s, q, n_shot, b.lang, method, 1)), 1) for b, s, q in items]
        with tqdm(total=len(prompts), desc=f"scoring {label}".strip(), unit="q", file=sys.stderr) as bar:
            logprobs = next_token_logprobs(chat.model, prompts, flat, batch_size, pad, bar.update)
        all_scores = []
        for (_, _, q), row in zip(items, logprobs, strict=True):
            by_id = dict(zip(flat, row, strict=True))
            all_scores.append([_logsumexp([by_id[i] for i in variants[c]]) for c in range(len(q.choices))])
    else:
        contexts: list[list[int]] = []
        continuations: list[list[int]] = []
        for b, s, q in items:
            longest = max(len(encoder.encode(c)) for c in q.choices) + 1
            text = encoder.fitted(s, q, n_shot, b.lang, method, longest)
            for c in range(len(q.choices)):
                cue = answer_text(q, c, b.lang, method)
                head, tail = encoder.pair(text, cue if not chat_template else cue.lstrip())
                contexts.append(encoder.cut(head, len(tail)))
                continuations.append(tail)
        with tqdm(total=len(contexts), desc=f"scoring {label}".strip(), unit="choice", file=sys.stderr) as bar:
            lls = continuation_logprobs(chat.model, contexts, continuations, batch_size, pad, bar.update)
        all_scores, pos = [], 0
        for _, _, q in items:
            n = len(q.choices)
            all_scores.append([sum(lls[pos + c]) / max(1, len(q.choices[c])) for c in range(n)])
            pos += n
    scored = []
    for (b, s, q), scores in zip(items, all_scores, strict=True):
        assert q.answer is not None
        best = max(range(len(scores)), key=lambda c: scores[c])
        scored.append(Scored(b.name, s.name, q.where, q.answer, best, [round(x, 4) for x in scores]))
    return scored, encoder


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def accuracy_rows(label: str, benchmarks: Sequence[Benchmark], scored: Sequence[Scored]) -> list[dict[str, Any]]:
    """eval.json rows {model, benchmark, subject, correct, n, accuracy}: each subject, then "overall" (micro)."""
    rows = []
    for bench in benchmarks:
        mine = [s for s in scored if s.benchmark == bench.name]
        for subject in bench.subjects:
            hits = [s.correct for s in mine if s.subject == subject.name]
            rows.append(_row(label, bench.name, subject.name, sum(hits), len(hits)))
        rows.append(_row(label, bench.name, "overall", sum(s.correct for s in mine), len(mine)))
    return rows


def _row(model: str, benchmark: str, subject: str, correct: int, n: int) -> dict[str, Any]:
    accuracy = round(correct / n, 4) if n else 0.0
    return {
        "model": model,
        "benchmark": benchmark,
        "subject": subject,
        "correct": correct,
        "n": n,
        "accuracy": accuracy,
    }


def macro_average(rows: Sequence[dict[str, Any]], model: str, benchmark: str) -> float | None:
    """Mean of the per-subject accuracies (each subject counts once)."""
    values = [
        r["correct"] / r["n"]
        for r in rows
        if r["model"] == model and r["benchmark"] == benchmark and r["subject"] != "overall" and r["n"]
    ]
    return sum(values) / len(values) if values else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """model × (benchmark, subject) accuracy in percent, with micro (overall) and macro averages."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    keys = list(dict.fromkeys((r["benchmark"], r["subject"]) for r in rows))
    cell = {(r["model"], r["benchmark"], r["subject"]): r for r in rows}
    width = max([len(f"{b} / {s}") for b, s in keys] + [12])
    lines = ["  " + " " * width + "".join(f"  {m[:14]:>14}" for m in models)]
    for bench, subject in keys:
        line = f"  {bench + ' / ' + subject:<{width}}"
        for m in models:
            r = cell.get((m, bench, subject))
            line += f"  {100 * r['accuracy']:>13.1f}%" if r and r["n"] else f"  {'-':>14}"
        lines.append(line)
        if subject == "overall":
            macro = [macro_average(rows, m, bench) for m in models]
            lines.append(
                f"  {bench + ' / macro':<{width}}"
                + "".join(f"  {100 * v:>13.1f}%" if v is not None else "" for v in macro)
            )
    return "\n".join(lines)
