"""The benchmark and drift-probe options of `tunestack eval`, and what they add to each evaluated model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunestack.config.eval import BenchmarkArguments
from tunestack.eval.benchmarks import Benchmark, data_files, read_benchmarks
from tunestack.eval.mcq import Scored, accuracy_rows, format_table, score_benchmarks


class BenchmarkSuite:
    """Reads the benchmarks and the drift prompts up front (bad data fails before any model loads), then scores
    each model as `tunestack eval` loads it."""

    def __init__(self, args: BenchmarkArguments, gen: Any, batch_size: int, segmentation: str):
        self.args = args
        self.batch_size = batch_size
        self.benchmarks: list[Benchmark] = []
        if args.benchmark_dir:
            self.benchmarks = read_benchmarks(
                args.benchmark_dir, args.benchmark_split, args.benchmark_lang, args.max_benchmark_questions
            )
        self.drift = None
        if args.drift_probe > 0:
            from tunestack.eval.drift import DriftProbe

            self.drift = DriftProbe(args.drift_probe, args.drift_prompts, gen, batch_size, segmentation)
        self.rows: list[dict[str, Any]] = []
        self.scored: list[dict[str, Any]] = []
        self.notes = [note for b in self.benchmarks for note in b.notes]

    @property
    def files(self) -> list[Path]:
        """The question files read (for the eval's data fingerprint)."""
        return [p for b in self.benchmarks for p in data_files(b.path)]

    @property
    def questions(self) -> int:
        return sum(b.size for b in self.benchmarks)

    @property
    def active(self) -> bool:
        return bool(self.benchmarks or self.drift)

    def describe(self) -> list[str]:
        lines = [b.describe() for b in self.benchmarks]
        if self.drift is not None:
            lines.append(f"drift probe: {len(self.drift.items)} held-out prompts of {self.drift.source}")
        return lines

    def measure(self, label: str, chat: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(metrics, prediction rows) this suite adds for one loaded model."""
        metrics: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        if self.benchmarks:
            a = self.args
            truncated = 0
            if a.benchmark_engine == "lm_eval":
                from tunestack.eval.lm_eval_engine import score_with_lm_eval

                scored = score_with_lm_eval(chat, self.benchmarks, a.mcq_method, a.n_shot, self.batch_size,
                                            a.mcq_max_length)  # fmt: skip
            else:
                scored, encoder = score_benchmarks(chat, self.benchmarks, a.mcq_method, a.n_shot, self.batch_size,
                                                   a.mcq_chat_template, a.mcq_max_length, label)  # fmt: skip
                truncated = encoder.truncated
            if truncated:
                self.notes.append(f"{label}: {truncated} benchmark prompts longer than the context kept their end")
            new_rows = accuracy_rows(label, self.benchmarks, scored)
            self.rows += new_rows
            self.scored += [_scored_row(label, s) for s in scored]
            for r in new_rows:
                if r["subject"] == "overall":
                    metrics[f"mcq_{r['benchmark']}"] = round(100 * r["accuracy"], 2)
        if self.drift is not None:
            drift_metrics, rows = self.drift.measure(label, chat)
            metrics.update(drift_metrics)
        return metrics, rows

    def report(self) -> dict[str, Any]:
        """What eval.json gains."""
        out: dict[str, Any] = {}
        if self.benchmarks:
            a = self.args
            out["benchmarks"] = self.rows
            out["benchmark_settings"] = {
                "engine": a.benchmark_engine,
                "method": a.mcq_method,
                "n_shot": a.n_shot,
                "chat_template": a.mcq_chat_template,
                "folders": [
                    {"name": b.name, "path": str(b.path), "layout": b.layout, "lang": b.lang, "split": b.split,
                     "subjects": len(b.subjects), "questions": b.size}
                    for b in self.benchmarks
                ],
            }  # fmt: skip
        if self.drift is not None:
            out["drift"] = {
                "reference": self.drift.reference_label,
                "prompts": [it.prompt for it in self.drift.items],
                "source": self.drift.source,
            }
        return out

    def table(self) -> str:
        return format_table(self.rows) if self.rows else ""


def _scored_row(label: str, s: Scored) -> dict[str, Any]:
    return {
        "model": label,
        "benchmark": s.benchmark,
        "subject": s.subject,
        "where": s.where,
        "answer": s.answer,
        "predicted": s.predicted,
        "correct": s.correct,
        "scores": s.scores,
    }
