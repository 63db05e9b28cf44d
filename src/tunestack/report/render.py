"""One self-contained HTML page (curves embedded as base64 PNG, no external asset) and its markdown twin."""

from __future__ import annotations

import base64
import html
import os
import time
from pathlib import Path
from typing import Any

from tunestack.report.collect import (
    StageReport,
    benchmark_table,
    drift_table,
    eval_table,
    key_metrics,
    probe_table,
    seconds,
    tokens_per_second,
)

STYLE = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", sans-serif; margin: 2em auto;
       max-width: 1150px; color: #1d2330; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d8dde6; padding-bottom: .2em; }
.meta { color: #5b6575; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
th, td { border: 1px solid #d8dde6; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f1f4f9; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.curves { display: flex; flex-wrap: wrap; gap: 1em; }
.curves figure { margin: 0; } .curves img { width: 520px; max-width: 100%; border: 1px solid #e4e8ef; }
figcaption { color: #5b6575; font-size: .85em; }
.probes td { max-width: 320px; white-space: pre-wrap; }
.side { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.status-complete { color: #1a7f37; } .status-failed, .status-missing { color: #cf222e; }
.status-running, .status-interrupted { color: #9a6700; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _duration(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}s" if value < 120 else f"{value / 60:.1f} min"


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "–"


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _stage_metrics(stage: StageReport) -> list[list[str]]:
    """The per-stage metric table (an eval stage's models have their own table)."""
    return [[k, v] for k, v in key_metrics(stage) if not k.startswith("eval: ")]


def _overview(stages: list[StageReport]) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "kind", "status", "this run", "time", "tokens/s", "key metrics"]
    rows = []
    for s in stages:
        metrics = "; ".join(f"{k}: {v}" for k, v in key_metrics(s) if k != "steps" and not k.startswith("eval: "))
        if s.eval is not None:
            labels = [m["label"] for m in s.eval.get("models", [])]
            metrics = f"{len(labels)} models compared ({', '.join(labels)}): see its section"
        rows.append(
            [s.name, s.kind, s.status, s.action or "–", _duration(seconds(s)), _rate(tokens_per_second(s)), metrics]
        )
    return header, rows


def _general_ability(stage: StageReport) -> list[tuple[str, tuple[list[str], list[list[str]]], str]]:
    """The benchmark table and, beside it, the drift probe's."""
    return [
        ("Benchmarks: accuracy %, change from base", benchmark_table(stage), "benchmarks"),
        ("Drift from base on held-out general prompts", drift_table(stage), "drift"),
    ]


def _title(state: dict[str, Any], root: Path) -> tuple[str, str]:
    title = f"tunestack report: {state.get('recipe') or root}"
    meta = f"output: {root.resolve()} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    if state.get("status"):
        meta += f" · pipeline {state['status']}"
    return title, meta


def render_html(state: dict[str, Any], stages: list[StageReport], root: Path) -> str:
    title, meta = _title(state, root)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1><p class='meta'>{_e(meta)}</p>",
        "<h2>Stages</h2>",
        _html_table(*_overview(stages), cls="overview"),
    ]
    for s in stages:
        parts.append(f'<section id="stage-{_e(s.name)}"><h2>{_e(s.name)} <small>({_e(s.kind)})</small></h2>')
        parts.append(
            f"<p>status <b class='status-{_e(s.status)}'>{_e(s.status)}</b> · time {_duration(seconds(s))} · "
            f"tokens/s {_rate(tokens_per_second(s))} · <code>{_e(s.folder)}</code></p>"
        )
        metrics = _stage_metrics(s)
        if metrics:
            parts.append(_html_table(["metric", "value"], metrics, cls="metrics"))
        if s.curves:
            parts.append('<div class="curves">')
            for png in s.curves:
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                parts.append(
                    f'<figure><img alt="{_e(s.name)} {_e(png.stem)} curve" src="data:image/png;base64,{data}">'
                    f"<figcaption>{_e(s.name)}/{_e(png.name)}</figcaption></figure>"
                )
            parts.append("</div>")
        if s.eval is not None:
            parts.append("<h3>Evaluation</h3>")
            parts.append(_html_table(*eval_table(s), cls="eval"))
            side = [
                f"<div><h3>{_e(title)}</h3>{_html_table(header, rows, cls=cls)}</div>"
                for title, (header, rows), cls in _general_ability(s)
                if rows
            ]
            if side:
                parts.append('<div class="side">' + "".join(side) + "</div>")
            labels, rows = probe_table(s)
            if rows:
                parts.append("<h3>Probe prompts, answered by each model</h3>")
                parts.append(_html_table(["prompt", *labels], rows, cls="probes"))
            for note in s.eval.get("notes", []):
                parts.append(f"<p class='meta'>{_e(note)}</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(state: dict[str, Any], stages: list[StageReport], root: Path, report_dir: Path) -> str:
    title, meta = _title(state, root)
    lines = [f"# {title}", "", meta, "", "## Stages", "", _md_table(*_overview(stages)), ""]
    for s in stages:
        lines += [
            f"## {s.name} ({s.kind})",
            "",
            f"status **{s.status}** · time {_duration(seconds(s))} · "
            f"tokens/s {_rate(tokens_per_second(s))} · `{s.folder}`",
            "",
        ]
        metrics = _stage_metrics(s)
        if metrics:
            lines += [_md_table(["metric", "value"], metrics), ""]
        for png in s.curves:
            lines += [f"![{s.name} {png.stem}]({Path(os.path.relpath(png, report_dir)).as_posix()})", ""]
        if s.eval is not None:
            lines += ["### Evaluation", "", _md_table(*eval_table(s)), ""]
            for title, (header, rows), _ in _general_ability(s):
                if rows:
                    lines += [f"### {title}", "", _md_table(header, rows), ""]
            labels, rows = probe_table(s)
            if rows:
                lines += ["### Probe prompts, answered by each model", "", _md_table(["prompt", *labels], rows), ""]
            lines += [f"_{note}_" for note in s.eval.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"
