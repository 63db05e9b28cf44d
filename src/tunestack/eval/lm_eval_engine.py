"""`--benchmark_engine lm_eval`: the same local benchmark folders scored by lm-evaluation-harness.

Each subject becomes an lm-evaluation-harness task built from a dict (no task files, no download): its questions
and dev shots are written as local JSON Lines files read through the `json` dataset builder, the prompt text is
tunestack's own (the same header, shots and answer cue, the first k dev questions as shots: sampler `first_n`), and
the choices are the letters (letter) or the choice texts (cloze). The harness scores each choice by the
log-likelihood of " A" / " Paris" after the prompt; accuracy is its `acc` for letter and `acc_norm` (divided by
the choice's length in characters) for cloze, so cloze numbers equal tunestack's, and letter numbers differ only
where a letter's token without a leading space carries probability (tunestack sums both forms).
The loaded model (adapters merged) is handed to the harness's HFLM as is.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunestack.errors import ConfigError
from tunestack.eval.benchmarks import ANSWER_SEP, HEADER, LETTERS, Benchmark, Question, format_question
from tunestack.eval.mcq import Scored


def available() -> bool:
    from importlib.util import find_spec

    return find_spec("lm_eval") is not None


def _docs(questions: Sequence[Question], lang: str, method: str) -> list[dict[str, Any]]:
    return [
        {
            "prompt": format_question(q, lang, method),
            "options": list(LETTERS[: len(q.choices)]) if method == "letter" else list(q.choices),
            "answer": q.answer,
            "where": q.where,
        }
        for q in questions
    ]


def _write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def task_configs(benchmarks: Sequence[Benchmark], method: str, n_shot: int, folder: Path) -> dict[str, tuple]:
    """{task name: (config dict, benchmark, subject)} of every subject."""
    out: dict[str, tuple] = {}
    for b in benchmarks:
        for s in b.subjects:
            name = re.sub(r"[^0-9A-Za-z_]+", "_", f"tunestack_{b.name}_{s.name}")
            while name in out:
                name += "_"
            files = {"test": _write(folder / f"{name}.test.jsonl", _docs(s.questions, b.lang, method))}
            shots = min(n_shot, len(s.shots))
            if shots:
                files["dev"] = _write(folder / f"{name}.dev.jsonl", _docs(s.shots, b.lang, method))
            config: dict[str, Any] = {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": files, "cache_dir": str(folder / "datasets")},
                "test_split": "test",
                "output_type": "multiple_choice",
                "description": HEADER[b.lang].format(subject=s.display),
                "doc_to_text": "prompt",
                "doc_to_choice": "options",
                "doc_to_target": "answer",
                "target_delimiter": ANSWER_SEP[b.lang],
                "fewshot_delimiter": "\n\n",
                "num_fewshot": shots,
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
            if shots:
                config.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
            out[name] = (config, b, s)
    return out


def score_with_lm_eval(
    chat: Any, benchmarks: Sequence[Benchmark], method: str, n_shot: int, batch_size: int, max_length: int | None
) -> list[Scored]:
    """Every question scored by lm-evaluation-harness on `chat.model`, as tunestack's Scored rows."""
    if not available():
        raise ConfigError("--benchmark_engine lm_eval needs lm-evaluation-harness: pip install 'tunestack[eval]'")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(
        pretrained=chat.model,
        tokenizer=chat.tokenizer,
        batch_size=batch_size,
        max_length=max_length or chat.context_length or 2048,
        add_bos_token=chat.bos_id is not None,
    )
    metric = "acc" if method == "letter" else "acc_norm"
    with tempfile.TemporaryDirectory(prefix="tunestack-lm-eval-") as tmp:
        tasks = task_configs(benchmarks, method, n_shot, Path(tmp))
        result = simple_evaluate(
            model=lm,
            tasks=[config for config, _, _ in tasks.values()],
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0,
            fewshot_random_seed=0,
        )
    if result is None:
        raise RuntimeError("lm-evaluation-harness returned no results")
    scored: list[Scored] = []
    for name, (_, bench, subject) in tasks.items():
        for sample in sorted(result["samples"][name], key=lambda s: s["doc_id"]):
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            doc = sample["doc"]
            scores = (
                lls if method == "letter" else [ll / max(1, len(c)) for ll, c in zip(lls, doc["options"], strict=True)]
            )
            best = max(range(len(scores)), key=lambda c: scores[c])
            if bool(sample[metric]):  # the harness's own verdict decides ties
                best = doc["answer"]
            elif best == doc["answer"]:
                best = next(c for c in range(len(scores)) if c != best and scores[c] == scores[best])
            scored.append(
                Scored(bench.name, subject.name, doc["where"], doc["answer"], best, [round(x, 4) for x in scores])
            )
    return scored
