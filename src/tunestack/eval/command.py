"""`tunestack eval`: perplexity, answers scored against references, reward-model scores, probe answers.

Several models can be evaluated side by side (`--model_name_or_path a,b,c`; by default the base model under the
first one is added in front, labelled `base`), so one eval shows the before/after of a whole pipeline.
OUTPUT_DIR gets eval.json (per-model metrics, benchmark accuracies), predictions.jsonl (every answer, with its
scores), benchmark_predictions.jsonl (every benchmark question's choice scores) and run.json.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunestack.atomic import write_json_atomic, write_jsonl_atomic
from tunestack.config.eval import BenchmarkArguments, EvalArguments, option_classes
from tunestack.config.infer import GenerationArguments, ModelSelection
from tunestack.data.sources import fingerprint_files
from tunestack.errors import ConfigError
from tunestack.eval.metrics import answer_scores, has_jieba, score_answers
from tunestack.eval.suite import BenchmarkSuite
from tunestack.eval.tool_calls import calls_match, tool_call_scores
from tunestack.infer.batch import PromptItem, generate_all
from tunestack.infer.generate import ChatModel
from tunestack.infer.tool_calls import read_answer
from tunestack.model.ref import root_base
from tunestack.rundir import OutputFolder

logger = logging.getLogger("tunestack")
DRIFT_KEYS = ("drift_rouge_l", "drift_perplexity")

DESCRIPTION = (
    "Evaluate one or more models: perplexity on text, answers scored against references (exact match, BLEU-4, "
    "ROUGE-L), reward-model scores, multiple-choice benchmarks from local folders (MMLU, C-Eval, CMMLU, generic), "
    "a drift probe against the base model, and a fixed set of probe prompts kept for before/after comparison."
)


# ---------------------------------------------------------------------------------------------


def model_label(reference: str) -> str:
    path = Path(reference).expanduser()
    return path.name if path.exists() else reference


def models_to_evaluate(args: EvalArguments) -> list[tuple[str, str]]:
    """(label, reference) pairs, base first when asked; the same model is evaluated once."""
    pairs = [(model_label(m), m) for m in args.models]
    if args.include_base:
        base = root_base(args.models[0])
        pairs.insert(0, ("base", base))
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    labels: set[str] = set()
    for label, ref in pairs:
        key = str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().exists() else ref
        if key in seen:
            continue
        seen.add(key)
        while label in labels:
            label += "'"
        labels.add(label)
        out.append((label, ref))
    return out


class RewardScorer:
    """Scores answers with a tunestack reward model, tokenized as the reward model was trained."""

    def __init__(self, reference: str, torch_dtype: str, trust_remote_code: bool):
        from tunestack.model.reward import load_reward_model

        self.model, self.tokenizer, self.template = load_reward_model(reference, torch_dtype, trust_remote_code)

    def __call__(self, items: list[PromptItem], answers: list[str], batch_size: int) -> list[float]:
        from tunestack.data.formats import as_message
        from tunestack.model.reward import score_responses

        prompts = [(item.system, tuple(as_message(m) for m in item.messages), item.tools) for item in items]
        return score_responses(self.model, self.tokenizer, self.template, prompts, answers, batch_size=batch_size)


def evaluate_model(
    label: str,
    reference: str,
    args: EvalArguments,
    gen: GenerationArguments,
    docs: list[str],
    items: list[PromptItem],
    probes: list[PromptItem],
    scorer: RewardScorer | None,
    suite: BenchmarkSuite | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, prediction rows) of one model."""
    from tunestack.eval.perplexity import perplexity, token_blocks

    started = time.time()
    selection = ModelSelection(
        model=reference,
        template_name=args.template_name,
        torch_dtype=args.torch_dtype,
        trust_remote_code=args.trust_remote_code,
    )
    chat = ChatModel.load(selection)
    metrics: dict[str, Any] = {}
    if docs:
        blocks = token_blocks(chat.tokenizer, docs, args.block_size, args.max_eval_blocks)
        ppl = perplexity(chat.model, blocks, batch_size=min(args.eval_batch_size, 4))
        metrics.update(perplexity=ppl["perplexity"], perplexity_tokens=ppl["tokens"])
    suite_metrics, suite_rows = suite.measure(label, chat) if suite is not None else ({}, [])
    metrics.update(suite_metrics)
    asked = items + probes
    texts = generate_all(chat, asked, gen, args.eval_batch_size, chat.system_for(gen)) if asked else []
    read = [read_answer(chat.call_format if item.tools else None, text) for item, text in zip(asked, texts, strict=True)]
    answers = [r.content for r in read]
    rewards = scorer(asked, answers, args.eval_batch_size) if scorer is not None and asked else None
    rows: list[dict[str, Any]] = []
    called: list[tuple[Any, Any]] = []  # (predicted calls, reference calls) of prompts whose reference calls tools
    for i, (item, answer, got) in enumerate(zip(asked, answers, read, strict=True)):
        row: dict[str, Any] = {"model": label, "set": "eval" if i < len(items) else "probe", "prompt": item.prompt}
        row["response"] = answer
        if got.tool_calls:
            row["tool_calls"] = [c.as_dict() for c in got.tool_calls]
        if item.reference_calls:
            row["reference_tool_calls"] = [c.as_dict() for c in item.reference_calls]
            row["tool_call_match"] = calls_match(got.tool_calls, item.reference_calls)
            called.append((got.tool_calls, item.reference_calls))
        elif item.reference is not None:
            row["reference"] = item.reference
            row.update(answer_scores(answer, item.reference, args.segmentation))
        if rewards is not None:
            row["reward"] = round(rewards[i], 4)
        rows.append(row)
    rows += suite_rows
    metrics.update(tool_call_scores(called))
    scored = [
        (a, it.reference) for a, it in zip(answers[: len(items)], items, strict=True) if it.reference and not it.reference_calls
    ]
    if scored:
        preds, refs = zip(*scored, strict=True)
        metrics.update(score_answers(list(preds), list(refs), args.segmentation))
    if rewards is not None and items:
        metrics["reward_mean"] = round(sum(rewards[: len(items)]) / len(items), 4)
    if rewards is not None and probes:
        metrics["probe_reward_mean"] = round(sum(rewards[len(items) :]) / len(probes), 4)
    metrics["seconds"] = round(time.time() - started, 1)
    del chat
    gc.collect()
    return metrics, rows


def _summary_table(results: list[dict[str, Any]]) -> str:
    keys = [
        k
        for k in (
            "perplexity", "exact_match", "bleu4", "rouge_l", "tool_call_accuracy", "reward_mean", "probe_reward_mean",
            *DRIFT_KEYS,
        )  # fmt: skip
        if any(k in r["metrics"] for r in results)
    ]
    width = max(len(r["label"]) for r in results)
    lines = ["  " + " " * width + "  " + "  ".join(f"{k:>17}" for k in keys)]
    for r in results:
        cells = [f"{r['metrics'][k]:>17.4g}" if k in r["metrics"] else f"{'-':>17}" for k in keys]
        lines.append(f"  {r['label']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run_eval(args: EvalArguments, bench: BenchmarkArguments, gen: GenerationArguments) -> int:
    from tunestack.eval.perplexity import read_documents
    from tunestack.eval.prompts import probe_items, read_items

    started = time.time()
    assert args.output_dir is not None
    if args.segmentation == "jieba" and not has_jieba():
        raise ConfigError("--segmentation jieba: jieba is not installed (pip install jieba)")
    if bench.benchmark_engine == "lm_eval":
        from tunestack.eval.lm_eval_engine import available

        if not available():
            raise ConfigError("--benchmark_engine lm_eval: lm-evaluation-harness is not installed (pip install lm-eval)")
    docs, text_files = read_documents(args.eval_text_dir) if args.eval_text_dir else ([], [])
    items = read_items(Path(args.eval_file).expanduser(), "--eval_file") if args.eval_file else []
    if args.max_eval_samples and args.max_eval_samples > 0:
        items = items[: args.max_eval_samples]
    probes = probe_items(args.probe_prompts)
    suite = BenchmarkSuite(bench, gen, args.eval_batch_size, args.segmentation)
    if not (docs or items or probes or suite.active):
        raise ConfigError("nothing to evaluate: give --eval_text_dir, --eval_file, --benchmark_dir or --probe_prompts")
    models = models_to_evaluate(args)
    data_files = [*text_files, *([Path(args.eval_file)] if args.eval_file else []), *suite.files]
    manifest = {
        "base_model": models[0][1],
        "tuning_method": None,
        "options": {"eval": asdict(args), "benchmarks": asdict(bench), "generation": asdict(gen)},
        "data_fingerprint": fingerprint_files(data_files) if data_files else None,
        "data_stats": {"documents": len(docs), "prompts": len(items), "probes": len(probes)},
    }
    output = OutputFolder(args.output_dir, "eval")  # taken once the inputs are known to be good
    output.plan(None, args.overwrite_output_dir)
    with output.running(manifest):
        scorer = (
            RewardScorer(args.reward_model, args.torch_dtype, args.trust_remote_code) if args.reward_model else None
        )
        results, rows = [], []
        for i, (label, reference) in enumerate(models, start=1):
            print(f"[eval {i}/{len(models)}] {label}: {reference}", flush=True)  # noqa: T201
            metrics, model_rows = evaluate_model(label, reference, args, gen, docs, items, probes, scorer, suite)
            results.append({"label": label, "reference": reference, "metrics": metrics})
            rows += model_rows
    report = {
        "models": results,
        "probes": [p.prompt for p in probes],
        "eval_file": args.eval_file,
        "eval_text_dir": args.eval_text_dir,
        "reward_model": args.reward_model,
        "notes": suite.notes,
        "segmentation": args.segmentation if args.segmentation != "auto" else ("jieba" if has_jieba() else "char"),
    }
    report.update(suite.report())
    write_json_atomic(output.path / "eval.json", report)
    write_jsonl_atomic(output.path / "predictions.jsonl", rows)
    if suite.scored:
        write_jsonl_atomic(output.path / "benchmark_predictions.jsonl", suite.scored)
    seconds = round(time.time() - started, 1)
    output.finish(
        "complete",
        metrics={r["label"]: r["metrics"] for r in results},
        summary={
            "seconds": seconds,
            "models": len(results),
            "prompts": len(items),
            "probes": len(probes),
            "benchmark_questions": suite.questions,
        },
    )
    print(  # noqa: T201
        f"eval finished in {seconds:.0f}s: {len(results)} models, {len(items)} prompts, {len(probes)} probes, "
        f"{len(docs)} documents, {suite.questions} benchmark questions\n{_summary_table(results)}\n"
        + "".join(f"{line}\n" for line in [*suite.describe(), suite.table()] if line)
        + f"output: {args.output_dir} (eval.json, predictions.jsonl"
        + (", benchmark_predictions.jsonl)" if suite.scored else ")")
    )
    return 0


def main(argv: list[str]) -> int:
    from tunestack.config.parse import parse_into, print_help

    if "-h" in argv or "--help" in argv:
        print_help(option_classes(), "tunestack eval", DESCRIPTION)
        return 0
    from tunestack.eval.benchmarks import join_repeated

    argv = join_repeated(argv, "--benchmark_dir")
    args, bench, gen = parse_into(option_classes(), argv, prog="tunestack eval", description=DESCRIPTION)
    return run_eval(args, bench, gen)


def read_eval(folder: Path) -> dict[str, Any] | None:
    """eval.json of an eval output folder, or None."""
    path = folder / "eval.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
