"""Gather what a report shows from stage output folders: run.json, metrics.jsonl, curves, eval results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunestack.rundir import PIPELINE_STATE, read_json, read_jsonl, read_metrics

CURVES = ("loss.png", "reward.png")
PERPLEXITY_STAGES = ("pt", "sft")  # exp(eval loss) means nothing for a pairwise or DPO loss

# (metric key in run.json, label, format) shown as "before -> after" when a before_ value exists.
KEY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("eval_loss", "eval loss", "{:.4f}"),
    ("eval_perplexity", "perplexity", "{:.2f}"),  # of language-model stages only (see PERPLEXITY_STAGES)
    ("eval_pairwise_accuracy", "RM pairwise accuracy", "{:.3f}"),
    ("eval_mean_margin", "RM mean margin", "{:+.3f}"),
    ("eval_rewards/accuracies", "DPO reward accuracy", "{:.3f}"),
    ("eval_rewards/margins", "DPO reward margin", "{:+.3f}"),
    ("eval_reward", "held-out reward", "{:+.3f}"),
    ("eval_kl", "KL to reference", "{:.4f}"),
    ("predict_bleu4", "held-out BLEU-4", "{:.2f}"),
    ("predict_rouge_l", "held-out ROUGE-L", "{:.2f}"),
)


@dataclass
class StageReport:
    name: str
    folder: Path
    run: dict[str, Any]
    action: str | None = None  # what the last `tunestack run` did with it: run, resume, cached
    curves: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    eval: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.run.get("stage") or "?")

    @property
    def status(self) -> str:
        return str(self.run.get("status") or "missing")


def read_stage(folder: Path, name: str | None = None, action: str | None = None) -> StageReport:
    run = read_json(folder / "run.json") or {}
    stage = StageReport(name or folder.name, folder, run, action)
    stage.curves = [folder / c for c in CURVES if (folder / c).is_file()]
    stage.rows = read_metrics(folder)
    stage.eval = read_json(folder / "eval.json")
    if stage.eval is not None:
        stage.predictions = read_jsonl(folder / "predictions.jsonl")
    return stage


def collect(path: Path) -> tuple[dict[str, Any], list[StageReport]]:
    """(pipeline state or {}, stages) of a pipeline output root, or of one stage output folder."""
    if (path / "run.json").is_file():
        return {}, [read_stage(path)]
    state = read_json(path / PIPELINE_STATE) or {}
    if isinstance(state.get("stages"), list):
        stages = [
            read_stage(Path(row["output_dir"]), row.get("name"), row.get("action"))
            for row in state["stages"]
            if isinstance(row, dict) and row.get("output_dir")
        ]
        return state, stages
    folders = [p for p in sorted(path.iterdir()) if (p / "run.json").is_file()] if path.is_dir() else []
    stages = [read_stage(p) for p in folders]
    stages.sort(key=lambda s: str(s.run.get("started", "")))
    return {}, stages


# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, fmt: str) -> str:
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def last_value(rows: list[dict[str, Any]], key: str) -> Any:
    for row in reversed(rows):
        if isinstance(row.get(key), (int, float)):
            return row[key]
    return None


def seconds(stage: StageReport) -> float | None:
    summary = stage.run.get("summary") or {}
    metrics = stage.run.get("metrics") or {}
    for value in (summary.get("seconds"), stage.run.get("seconds"), metrics.get("train_runtime")):
        if isinstance(value, (int, float)):
            return float(value)
    return None


def tokens_per_second(stage: StageReport) -> float | None:
    summary = stage.run.get("summary") or {}
    metrics = stage.run.get("metrics") or {}
    tokens = summary.get("tokens_seen") or metrics.get("num_input_tokens_seen")
    runtime = metrics.get("train_runtime")
    if isinstance(tokens, (int, float)) and tokens > 0 and isinstance(runtime, (int, float)) and runtime > 0:
        return tokens / runtime
    return None


def key_metrics(stage: StageReport) -> list[tuple[str, str]]:
    """(label, value) pairs worth a glance: final loss, before -> after of held-out metrics, reward and KL."""
    metrics = stage.run.get("metrics") or {}
    summary = stage.run.get("summary") or {}
    out: list[tuple[str, str]] = []
    loss = last_value(stage.rows, "loss")
    if loss is None:
        loss = metrics.get("train_loss")
    if isinstance(loss, (int, float)):
        out.append(("final loss", f"{loss:.4f}"))
    for key, label, fmt in KEY_METRICS:
        if key not in metrics or (key == "eval_perplexity" and stage.kind not in PERPLEXITY_STAGES):
            continue
        after = _fmt(metrics[key], fmt)
        before = metrics.get(f"before_{key}")
        out.append((label, f"{_fmt(before, fmt)} → {after}" if before is not None else after))
    for key, label in (("reward_mean", "last rollout reward"), ("kl", "last rollout KL")):
        value = last_value(stage.rows, key)
        if value is not None:
            out.append((label, f"{value:.4f}"))
    if isinstance(summary.get("global_step"), int):
        out.append(("steps", str(summary["global_step"])))
    for model in (stage.eval or {}).get("models", []):
        values = model.get("metrics", {})
        shown = [f"{label} {_fmt(values[k], fmt)}" for k, label, fmt in EVAL_COLUMNS[:-1] if k in values]
        if shown:
            out.append((f"eval: {model['label']}", ", ".join(shown)))
    check = stage.run.get("check") or {}
    if "max_abs_logit_diff" in check:
        out.append(("merge check: max |logit diff|", f"{check['max_abs_logit_diff']:.2e}"))
    if stage.run.get("error"):
        out.append(("error", str(stage.run["error"])[:200]))
    return out


def probe_table(stage: StageReport) -> tuple[list[str], list[list[str]]]:
    """(model labels, rows of [prompt, answer per model]) of an eval stage's probe answers."""
    if not stage.eval:
        return [], []
    labels = [m["label"] for m in stage.eval.get("models", [])]
    answers: dict[str, dict[str, str]] = {}
    for row in stage.predictions:
        if row.get("set") == "probe":
            answers.setdefault(row["prompt"], {})[row["model"]] = row.get("response", "")
    prompts = [p for p in stage.eval.get("probes", []) if p in answers]
    return labels, [[p, *(answers[p].get(label, "") for label in labels)] for p in prompts]


EVAL_COLUMNS = (
    ("perplexity", "perplexity", "{:.2f}"),
    ("exact_match", "exact match %", "{:.1f}"),
    ("bleu4", "BLEU-4", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.2f}"),
    ("tool_call_accuracy", "tool-call accuracy %", "{:.1f}"),
    ("reward_mean", "RM score", "{:+.3f}"),
    ("probe_reward_mean", "RM score (probes)", "{:+.3f}"),
    ("seconds", "seconds", "{:.0f}"),
)


def eval_table(stage: StageReport) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of an eval stage's per-model metrics."""
    models = (stage.eval or {}).get("models", [])
    columns = [c for c in EVAL_COLUMNS if any(c[0] in m.get("metrics", {}) for m in models)]
    header = ["model", *(c[1] for c in columns)]
    rows = [
        [m["label"], *(_fmt(m["metrics"][k], f) if k in m["metrics"] else "–" for k, _, f in columns)] for m in models
    ]
    return header, rows


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def benchmark_table(stage: StageReport) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of an eval stage's benchmark accuracies (percent) per model, each with its change from the
    base model (the model labelled base, else the first): per benchmark its overall (micro) and macro averages,
    then every subject."""
    rows = [r for r in (stage.eval or {}).get("benchmarks") or [] if isinstance(r, dict)]
    if not rows:
        return [], []
    labels = [m["label"] for m in (stage.eval or {}).get("models", [])]
    models = [m for m in labels if any(r["model"] == m for r in rows)] or list(dict.fromkeys(r["model"] for r in rows))
    base = "base" if "base" in models else models[0]
    value: dict[tuple[str, str, str], float] = {}
    sizes: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.get("n"):
            value[(r["model"], r["benchmark"], r["subject"])] = r["correct"] / r["n"]
            sizes[(r["benchmark"], r["subject"])] = r["n"]
    out: list[list[str]] = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        subjects = [s for b, s in dict.fromkeys((r["benchmark"], r["subject"]) for r in rows) if b == bench]
        for m in models:
            per_subject = [value[(m, bench, s)] for s in subjects if s != "overall" and (m, bench, s) in value]
            if per_subject:
                value[(m, bench, "macro")] = sum(per_subject) / len(per_subject)
        ordered = ["overall", "macro"] + [s for s in subjects if s != "overall"]
        for subject in ordered:
            n = sizes.get((bench, subject), sum(sizes.get((bench, s), 0) for s in subjects if s != "overall"))
            cells = [bench, subject, str(n)]
            for m in models:
                v, b = value.get((m, bench, subject)), value.get((base, bench, subject))
                if v is None:
                    cells.append("–")
                elif m == base or b is None:
                    cells.append(_pct(v))
                else:
                    cells.append(f"{_pct(v)} ({100 * (v - b):+.1f})")
            out.append(cells)
    return ["benchmark", "subject", "questions", *models], out


def drift_table(stage: StageReport) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the drift probe: each model's ROUGE-L to the base answers and their perplexity under it."""
    models = [m for m in (stage.eval or {}).get("models", []) if "drift_rouge_l" in m.get("metrics", {})]
    if not models:
        return [], []
    reference = ((stage.eval or {}).get("drift") or {}).get("reference") or models[0]["label"]
    header = ["model", f"ROUGE-L to {reference}'s answers", f"perplexity of {reference}'s answers"]
    rows = []
    for m in models:
        metrics = m["metrics"]
        ppl = metrics.get("drift_perplexity")
        rows.append([m["label"], f"{metrics['drift_rouge_l']:.1f}", f"{ppl:.2f}" if ppl is not None else "–"])
    return header, rows
