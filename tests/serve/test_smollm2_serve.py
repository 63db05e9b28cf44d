"""The real SmolLM2 served: at temperature 0 its answer is `tunestack chat --prompt`'s answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import selection, start_server

SRC = str(Path(__file__).resolve().parents[2] / "src")
QUESTIONS = ["What is the capital of France?", "Give me three tips to sleep better."]


@pytest.mark.slow
def test_served_smollm2_answers_as_tunestack_chat(smollm2: Path) -> None:
    live = start_server([("smollm2-135m-instruct", selection("smollm2-135m-instruct"))], max_concurrency=4)
    try:
        client = live.client()
        answers = {}
        for question in QUESTIONS:
            argv = [
                "--model",
                "smollm2-135m-instruct",
                "--prompt",
                question,
                "--temperature",
                "0",
                "--max_new_tokens",
                "48",
            ]
            proc = subprocess.run(
                [sys.executable, "-m", "tunestack", "chat", *argv],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": SRC},
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            reply = client.chat.completions.create(
                model="smollm2-135m-instruct",
                temperature=0,
                max_tokens=48,
                messages=[{"role": "user", "content": question}],
            )
            assert reply.choices[0].message.content + "\n" == proc.stdout
            answers[question] = proc.stdout
        assert "Paris" in answers[QUESTIONS[0]]
        # No sampling option: the model card's sampling (temperature 0.2, top_p 0.9) on the continuous batching engine.
        sampled = client.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=24, n=4, messages=[{"role": "user", "content": QUESTIONS[0]}]
        )
        assert sum("Paris" in c.message.content for c in sampled.choices) >= 1
    finally:
        live.stop()
