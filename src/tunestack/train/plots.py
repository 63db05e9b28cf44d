"""Loss curves as a PNG, drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(
    metrics_path: Path, out_png: Path, keys: tuple[str, ...] = ("loss", "eval_loss"), title: str = ""
) -> bool:
    """Draw one line per key present in the metrics file; returns False when there is nothing to draw."""
    rows = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_title(title or ", ".join(series))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True
