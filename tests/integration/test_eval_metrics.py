"""Eval metrics on fixed predictions equal hand-computed values (English words, Chinese characters and words)."""

from __future__ import annotations

import json
import math

import pytest

from tunestack.eval.metrics import answer_scores, bleu4, exact_match, has_jieba, rouge_l, score_answers, tokenize


def test_tokenize_english_words_and_punctuation():
    assert tokenize("The heart pumps BLOOD, doesn't it?") == [
        "the", "heart", "pumps", "blood", ",", "doesn", "'", "t", "it", "?",
    ]  # fmt: skip


def test_tokenize_chinese_by_characters_and_mixed_text():
    assert tokenize("心脏泵血", "char") == ["心", "脏", "泵", "血"]
    assert tokenize("我是TuneDoc，由Tunestack Labs开发。", "char") == [
        "我", "是", "tunedoc", ",", "由", "tunestack", "labs", "开", "发", "。",
    ]  # fmt: skip


@pytest.mark.skipif(not has_jieba(), reason="jieba not installed")
def test_tokenize_chinese_words_with_jieba():
    assert tokenize("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert tokenize("我爱北京天安门", "jieba") == ["我", "爱", "北京", "天安门"]


def test_exact_match_ignores_case_space_and_final_punctuation():
    assert exact_match("  Paris. ", "paris") == 1.0
    assert exact_match("The capital is Paris.", "Paris") == 0.0
    assert exact_match("巴黎。", "巴黎") == 1.0


def test_bleu4_english_by_hand():
    hyp, ref = tokenize("the cat sat on the mat"), tokenize("the cat is on the mat")
    # clipped precisions: p1 = 5/6; add-one smoothed p2 = (3+1)/(5+1), p3 = (1+1)/(4+1), p4 = (0+1)/(3+1);
    # same length, so no brevity penalty.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu4(hyp, ref) == pytest.approx(expected)
    assert expected == pytest.approx(0.485492, abs=1e-6)
    assert bleu4(ref, ref) == pytest.approx(1.0)
    assert bleu4(tokenize("dog"), ref) == 0.0  # no unigram in common
    assert bleu4([], ref) == 0.0


def test_bleu4_brevity_penalty_chinese_characters():
    hyp, ref = tokenize("心脏把血泵到全身", "char"), tokenize("心脏把血液泵到全身", "char")
    # 8 vs 9 characters: p1 = 8/8, p2 = (6+1)/(7+1), p3 = (4+1)/(6+1), p4 = (2+1)/(5+1); BP = exp(1 - 9/8).
    expected = math.exp(1 - 9 / 8) * (1 * 7 / 8 * 5 / 7 * 3 / 6) ** 0.25
    assert bleu4(hyp, ref) == pytest.approx(expected)
    assert expected == pytest.approx(0.659820, abs=1e-6)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat (5): P = R = 5/6.
    assert rouge_l(tokenize("the cat sat on the mat"), tokenize("the cat is on the mat")) == pytest.approx(5 / 6)
    # One character missing: P = 8/8, R = 8/9, F = 16/17.
    hyp, ref = tokenize("心脏把血泵到全身", "char"), tokenize("心脏把血液泵到全身", "char")
    assert rouge_l(hyp, ref) == pytest.approx(16 / 17)
    assert rouge_l(tokenize("a b"), tokenize("c d")) == 0.0
    # Word order matters: LCS of (a b c d) and (d c b a) is 1, so P = R = F = 1/4.
    assert rouge_l(list("abcd"), list("dcba")) == pytest.approx(0.25)


@pytest.mark.skipif(not has_jieba(), reason="jieba not installed")
def test_rouge_l_chinese_words():
    # jieba: 我 / 爱 / 北京 vs 我 / 爱 / 北京 / 天安门 -> P = 1, R = 3/4, F = 6/7.
    assert answer_scores("我爱北京", "我爱北京天安门")["rouge_l"] == pytest.approx(6 / 7)
    # by characters the same pair is 4/4 against 7: F = 2 * (4/7) / (1 + 4/7) = 8/11.
    assert answer_scores("我爱北京", "我爱北京天安门", "char")["rouge_l"] == pytest.approx(8 / 11)


def test_score_answers_averages_in_percent():
    scores = score_answers(["Paris.", "the cat sat on the mat"], ["paris", "the cat is on the mat"])
    assert scores["exact_match"] == pytest.approx(50.0)
    # "Paris." is [paris, .] against [paris]: ROUGE-L P = 1/2, R = 1, F = 2/3; BLEU p1 = 1/2, smoothed
    # p2 = (0+1)/(1+1), p3 = p4 = (0+1)/(0+1), no brevity penalty (longer than the reference).
    assert scores["rouge_l"] == pytest.approx(round(100 * (2 / 3 + 5 / 6) / 2, 2))
    assert scores["bleu4"] == pytest.approx(round(100 * ((1 / 4) ** 0.25 + 0.485492) / 2, 2), abs=0.01)
    assert scores["scored_answers"] == 2
    assert score_answers([], []) == {}


def test_eval_reads_references_from_prompt_files_and_sft_conversations(tmp_path):
    from tunestack.eval.prompts import DEFAULT_PROBES, probe_items, read_items

    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Who are you?", "reference": "I am TuneDoc."},
        {"prompt": "Capital of France?", "answer": "Paris."},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "你是谁？"}, {"from": "gpt", "value": "我是TuneDoc。"}]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    items = read_items(path, "--eval_file")
    assert [(i.prompt, i.reference) for i in items] == [
        ("Who are you?", "I am TuneDoc."),
        ("Capital of France?", "Paris."),
        ("你是谁？", "我是TuneDoc。"),
    ]
    assert len(items[2].messages) == 3  # the earlier turns are the history
    assert [p.prompt for p in probe_items(None)] == list(DEFAULT_PROBES)
    assert probe_items("none") == []
