"""The report: one self-contained HTML page (curves as data: URIs, tables of metrics and probe answers) and a
markdown twin, checked in the DOM a real browser builds (headless chromium, skipped when it is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tunestack.train.plots import plot_curves

PROBES = ["Who are you?", "你是谁？"]
ANSWERS = {
    "base": ["I am SmolLM, an AI assistant.", "我是一个人工智能助手。"],
    "sft": [
        "I am TuneDoc, a medical assistant created by Tunestack Labs.",
        "我是TuneDoc，由Tunestack Labs开发的医疗助手。",
    ],
}


def _stage(folder: Path, run: dict, rows: list[dict], curves: dict[str, tuple[str, ...]]) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for png, keys in curves.items():
        assert plot_curves(folder, png, keys, f"{folder.name} {png}")


@pytest.fixture
def pipeline_output(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    losses = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 11)]
    _stage(
        root / "pt",
        {
            "stage": "pt",
            "status": "complete",
            "started": "2026-01-01T10:00:00",
            "metrics": {"before_eval_perplexity": 31.5, "eval_perplexity": 12.25, "train_runtime": 50.0},
            "summary": {"global_step": 10, "seconds": 61.0, "tokens_seen": 20000},
        },
        losses,
        {"loss.png": ("loss",)},
    )
    _stage(
        root / "rm",
        {
            "stage": "rm",
            "status": "complete",
            "started": "2026-01-01T10:05:00",
            "metrics": {"before_eval_pairwise_accuracy": 0.4, "eval_pairwise_accuracy": 0.9, "eval_mean_margin": 1.5},
            "summary": {"global_step": 10, "seconds": 30.0},
        },
        losses,
        {"loss.png": ("loss",)},
    )
    ppo_rows = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "policy_loss": 0.5} for s in range(1, 6)]
    _stage(
        root / "ppo",
        {
            "stage": "rl",
            "status": "complete",
            "started": "2026-01-01T10:06:00",
            "metrics": {"before_eval_reward": -0.2, "eval_reward": 0.4, "before_eval_kl": 0.0, "eval_kl": 0.03},
            "summary": {"global_step": 5, "seconds": 90.0},
        },
        ppo_rows,
        {"loss.png": ("policy_loss",), "reward.png": ("reward_mean",)},
    )
    eval_dir = root / "eval"
    eval_dir.mkdir()
    (eval_dir / "run.json").write_text(
        json.dumps(
            {"stage": "eval", "status": "complete", "started": "2026-01-01T10:09:00", "summary": {"seconds": 20}}
        ),
        encoding="utf-8",
    )
    models = [
        {"label": "base", "reference": "smollm2", "metrics": {"perplexity": 30.1, "rouge_l": 10.0, "exact_match": 0.0}},
        {"label": "sft", "reference": str(root / "sft"), "metrics": {"perplexity": 12.5, "rouge_l": 80.0, "exact_match": 50.0}},
    ]  # fmt: skip
    (eval_dir / "eval.json").write_text(json.dumps({"models": models, "probes": PROBES}), encoding="utf-8")
    rows = [
        {"model": label, "set": "probe", "prompt": p, "response": a}
        for label, answers in ANSWERS.items()
        for p, a in zip(PROBES, answers, strict=True)
    ]
    (eval_dir / "predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return root


def test_report_html_and_markdown(pipeline_output: Path, cli) -> None:
    code, out, err = cli("report", pipeline_output)
    assert code == 0, err
    assert "report.html" in out
    page = (pipeline_output / "report.html").read_text(encoding="utf-8")
    # self-contained: every image inline, nothing fetched
    assert page.count('src="data:image/png;base64,') == 4  # pt, rm loss; ppo loss and reward
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in page
    assert "31.50 → 12.25" in page  # perplexity before -> after
    assert "0.400 → 0.900" in page  # RM accuracy
    assert "-0.200 → +0.400" in page  # PPO held-out reward
    assert "tokens/s 400 ·" in page  # 20000 tokens in a train_runtime of 50 s
    for answer in ANSWERS["base"] + ANSWERS["sft"]:
        assert answer in page

    md = (pipeline_output / "report.md").read_text(encoding="utf-8")
    assert "![ppo reward](ppo/reward.png)" in md
    assert "| Who are you? | I am SmolLM, an AI assistant. | I am TuneDoc" in md
    assert "| pt | pt | complete |" in md


def test_report_of_one_stage_folder(pipeline_output: Path, tmp_path: Path) -> None:
    from tunestack.report import write_report

    html_path, md_path = write_report(pipeline_output / "pt", tmp_path / "elsewhere")
    assert html_path.parent == tmp_path / "elsewhere"
    assert "12.25" in html_path.read_text(encoding="utf-8")
    assert "../out/pt/loss.png" in md_path.read_text(encoding="utf-8")  # relative to the report


def test_report_of_a_folder_without_stages_is_a_clear_error(tmp_path: Path, cli) -> None:
    code, _, err = cli("report", tmp_path)
    assert code == 2
    assert "no stage outputs" in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(pipeline_output: Path, cli, tmp_path: Path) -> None:
    assert cli("report", pipeline_output)[0] == 0
    url = (pipeline_output / "report.html").resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="chromium-")
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    try:
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = tmp_path / "report.png"
        proc = subprocess.run(
            [*flags, f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    html = dom.stdout
    assert html.count('<img alt="') == 4 and html.count('src="data:image/png;base64,') == 4
    assert html.count("<table") >= 6  # overview, 3 stage metric tables, eval metrics, probes
    assert '<table class="probes">' in html and "I am TuneDoc" in html
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a drawn page, not a blank one
