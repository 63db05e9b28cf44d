"""The report's benchmark table (accuracy per stage with its change from base) and the drift table beside it."""

from __future__ import annotations

import json
from pathlib import Path

from tunestack.report import write_report


def _row(model: str, benchmark: str, subject: str, correct: int, n: int) -> dict:
    return {"model": model, "benchmark": benchmark, "subject": subject, "correct": correct, "n": n,
            "accuracy": round(correct / n, 4)}  # fmt: skip


def _eval_stage(root: Path) -> Path:
    folder = root / "eval"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"stage": "eval", "status": "complete", "summary": {"seconds": 9}}))
    models = [
        {"label": "base", "reference": "smollm2", "metrics": {"drift_rouge_l": 100.0, "drift_perplexity": 1.8}},
        {"label": "sft", "reference": "out/sft", "metrics": {"drift_rouge_l": 41.3, "drift_perplexity": 6.5}},
        {"label": "dpo", "reference": "out/dpo", "metrics": {"drift_rouge_l": 38.0, "drift_perplexity": 7.25}},
    ]
    rows = []
    for model, (a, b) in {"base": (6, 2), "sft": (8, 1), "dpo": (5, 3)}.items():
        rows += [_row(model, "mmlu", "astronomy", a, 10), _row(model, "mmlu", "cooking", b, 4),
                 _row(model, "mmlu", "overall", a + b, 14)]  # fmt: skip
    report = {"models": models, "probes": [], "benchmarks": rows, "drift": {"reference": "base"}}
    (folder / "eval.json").write_text(json.dumps(report))
    (folder / "predictions.jsonl").write_text("")
    return folder


def test_report_shows_the_benchmark_table_with_changes_from_base(tmp_path):
    folder = _eval_stage(tmp_path / "out")
    html_path, md_path = write_report(folder)
    md = md_path.read_text(encoding="utf-8")
    assert "### Benchmarks: accuracy %, change from base" in md
    assert "| benchmark | subject | questions | base | sft | dpo |" in md
    assert "| mmlu | overall | 14 | 57.1 | 64.3 (+7.1) | 57.1 (+0.0) |" in md
    # macro: mean of the subjects (astronomy 60 / cooking 50 -> 55; sft 80 / 25 -> 52.5; dpo 50 / 75 -> 62.5)
    assert "| mmlu | macro | 14 | 55.0 | 52.5 (-2.5) | 62.5 (+7.5) |" in md
    assert "| mmlu | cooking | 4 | 50.0 | 25.0 (-25.0) | 75.0 (+25.0) |" in md
    assert "### Drift from base on held-out general prompts" in md
    assert "| model | ROUGE-L to base's answers | perplexity of base's answers |" in md
    assert "| sft | 41.3 | 6.50 |" in md
    page = html_path.read_text(encoding="utf-8")
    assert '<div class="side">' in page and "<td>64.3 (+7.1)</td>" in page and "<td>7.25</td>" in page
