"""Loss curves as a PNG, drawn from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from tunestack.rundir import read_metrics


def plot_curves(
    folder: Path, png_name: str, keys: tuple[str, ...] = ("loss", "eval_loss"), title: str = ""
) -> bool:
    """Draw one line per key present in FOLDER/metrics.jsonl into FOLDER/PNG_NAME; False when there is nothing."""
    rows = read_metrics(folder)
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
    fig.savefig(Path(folder) / png_name)
    plt.close(fig)
    return True
