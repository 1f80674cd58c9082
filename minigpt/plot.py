"""The loss curve PNG, drawn without pyplot so no global matplotlib backend is chosen for the caller."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> None:
    """Train loss (every logged step) and train/val eval loss against step, written atomically to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="tab:blue", alpha=0.35, lw=1,
                label="train (batch)")
    if evals:
        x = [r["step"] for r in evals]
        ax.plot(x, [r["train_loss"] for r in evals], "o-", color="tab:blue", ms=3, label="train (eval)")
        ax.plot(x, [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
