"""Evaluation: `tunestack eval` (perplexity, reference-answer metrics, reward scores, probe answers)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from tunestack.eval.command import main as run

    return run(argv)
