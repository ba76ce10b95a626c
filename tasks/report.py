"""Report helpers for the tracked artifacts: the loss-curve plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve_png(history: list[dict], out: Path, *, title: str) -> Path:
    """Plot every logged loss part (loss, nll, ut, flagged_fraction) against the step."""
    keys = [k for k in ("loss", "nll", "ut", "flagged_fraction") if any(k in row for row in history)]
    fig, axes = plt.subplots(1, len(keys) or 1, figsize=(4 * max(len(keys), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in history if key in row and "step" in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
