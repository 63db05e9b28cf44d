"""`tunestack report PATH`: report.html (self-contained) and report.md of a pipeline output root or a stage folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from tunestack.atomic import write_text_atomic
from tunestack.errors import ConfigError

DESCRIPTION = (
    "Write report.html (one self-contained page: metrics, loss/reward curves, probe answers side by side) and "
    "report.md of a `tunestack run` output root or of one stage output folder."
)


def write_report(path: str | Path, output_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.md for `path`; returns their paths."""
    from tunestack.report.collect import collect
    from tunestack.report.render import render_html, render_markdown

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder: give a tunestack run output root or a stage output folder")
    state, stages = collect(root)
    if not stages:
        raise ConfigError(f"{root}: no stage outputs (folders with run.json) to report on")
    target = Path(output_dir) if output_dir else root
    target.mkdir(parents=True, exist_ok=True)
    html_path, md_path = target / "report.html", target / "report.md"
    write_text_atomic(html_path, render_html(state, stages, root))
    write_text_atomic(md_path, render_markdown(state, stages, root, target))
    return html_path, md_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tunestack report", description=DESCRIPTION)
    parser.add_argument("path", help="a tunestack run output root (OUTPUT_ROOT) or one stage output folder")
    parser.add_argument("--output_dir", default=None, help="where the report goes (default: PATH)")
    args = parser.parse_args(argv)
    html_path, md_path = write_report(args.path, args.output_dir)
    print(f"report: {html_path} (and {md_path.name})")  # noqa: T201
    return 0
