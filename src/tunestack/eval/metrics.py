"""Text-overlap metrics of generated answers against reference answers: exact match, BLEU-4, ROUGE-L.

Written here (no evaluate / nltk / rouge dependency) so that the numbers are exactly these:

* tokens: English and other space-delimited text is split into lower-cased words and single punctuation
  marks; Chinese, Japanese and Korean runs are segmented into words with jieba when it is installed (as the
  Chinese BLEU/ROUGE scripts of MedicalGPT-style tutorials do), else into single characters.
* exact match: the two answers are equal after lower-casing, collapsing white space and dropping
  trailing sentence punctuation.
* BLEU-4 (sentence level, Lin & Och "BLEU+1" smoothing): clipped n-gram precisions p1..p4, where p2..p4 add
  one to matches and totals so that a missing 4-gram does not zero a good answer; geometric mean times the
  brevity penalty exp(1 - r/c) when the answer is shorter than the reference.
* ROUGE-L: F1 of precision LCS/len(answer) and recall LCS/len(reference), LCS = longest common subsequence.

Every function returns a value in [0, 1]; `score_answers` averages them and reports percentages.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import cache

from tunestack.config.eval import SEGMENTATION

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002a6df"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_WORD = re.compile(r"\w+|[^\w\s]")
_TRAILING = "。．.！!？?；;，,、 \t\n"


@cache
def _jieba():
    try:
        import logging

        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)
    return jieba


def has_jieba() -> bool:
    return _jieba() is not None


def _segment_cjk(run: str, segmentation: str) -> list[str]:
    if segmentation != "char":
        jieba = _jieba()
        if jieba is not None:
            return [w for w in jieba.lcut(run) if w.strip()]
        if segmentation == "jieba":
            raise RuntimeError("segmentation 'jieba' asked for but jieba is not installed (pip install jieba)")
    return list(run)


def tokenize(text: str, segmentation: str = "auto") -> list[str]:
    """Words of `text` for BLEU/ROUGE: lower-cased words and punctuation; CJK runs as jieba words or characters."""
    if segmentation not in SEGMENTATION:
        raise ValueError(f"segmentation must be one of {SEGMENTATION}, got {segmentation!r}")
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    pos = 0
    for match in _CJK_RUN.finditer(text):
        tokens += _WORD.findall(text[pos : match.start()])
        tokens += _segment_cjk(match.group(), segmentation)
        pos = match.end()
    tokens += _WORD.findall(text[pos:])
    return tokens


def normalize_answer(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return text.rstrip(_TRAILING)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Sentence BLEU-4 of token lists, add-one smoothing for the 2- to 4-gram precisions."""
    if not prediction or not reference:
        return 0.0
    log_sum = 0.0
    for n in range(1, 5):
        hyp, ref = _ngrams(prediction, n), _ngrams(reference, n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = sum(hyp.values())
        if n > 1:
            matches, total = matches + 1, total + 1
        if matches == 0:
            return 0.0
        log_sum += math.log(matches / total)
    c, r = len(prediction), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_sum / 4)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of token lists."""
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, reference: str, segmentation: str = "auto") -> dict[str, float]:
    """Per-answer scores in [0, 1]."""
    hyp, ref = tokenize(prediction, segmentation), tokenize(reference, segmentation)
    return {
        "exact_match": exact_match(prediction, reference),
        "bleu4": bleu4(hyp, ref),
        "rouge_l": rouge_l(hyp, ref),
    }


def score_answers(
    predictions: Sequence[str], references: Sequence[str], segmentation: str = "auto"
) -> dict[str, float]:
    """Mean scores over answer/reference pairs, in percent (0-100), plus the number of pairs."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {}
    rows = [answer_scores(p, r, segmentation) for p, r in zip(predictions, references, strict=True)]
    out = {key: round(100 * sum(row[key] for row in rows) / len(rows), 2) for key in rows[0]}
    out["scored_answers"] = len(rows)
    return out
