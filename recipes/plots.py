"""Training curves from a run's ``metrics.jsonl`` as a PNG (matplotlib, Agg backend).

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> records = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss/seg": 1.0 / s, "lr": 0.01}
    ...            for s in range(1, 6)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
    >>> plot_curves(run / "metrics.jsonl", run / "curves.png").stat().st_size > 1000
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_records", "plot_curves"]


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON record of a JSONL file (blank lines skipped)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    jsonl: str | os.PathLike[str], png: str | os.PathLike[str], *, smooth: int = 5
) -> Path:
    """Draw the total and per-task training losses (log scale, moving average over ``smooth``
    records, raw values faint), the learning rate, and any evaluation metrics; returns ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(jsonl)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    loss_keys = ["loss", *sorted({k for r in train for k in r if k.startswith("loss/")})]
    panels = 2 + bool(evals)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    loss_axis, lr_axis = axes[0][0], axes[0][1]
    steps = [r["step"] for r in train]
    for key in loss_keys:
        values = [float(r[key]) for r in train if key in r]
        if not values:
            continue
        xs = [r["step"] for r in train if key in r]
        (line,) = loss_axis.plot(xs, _smooth(values, smooth), label=key)
        loss_axis.plot(xs, values, color=line.get_color(), alpha=0.25, linewidth=0.8)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    if any(float(r.get("loss", 0)) > 0 for r in train):
        loss_axis.set_yscale("log")
    loss_axis.legend(fontsize=8)
    lr_axis.plot(steps, [r.get("lr", float("nan")) for r in train], color="tab:gray")
    lr_axis.set_xlabel("step")
    lr_axis.set_ylabel("base learning rate")
    if evals:
        eval_axis = axes[0][2]
        series: dict[str, list[tuple[int, float]]] = {}
        for record in evals:
            for task, metrics in record.get("metrics", {}).items():
                for name, value in metrics.items():
                    series.setdefault(f"{task}/{name}", []).append((record["step"], value))
        for name, points in sorted(series.items()):
            xs, ys = zip(*points)
            eval_axis.plot(xs, ys, marker="o", label=name)
        eval_axis.set_xlabel("step")
        eval_axis.set_ylabel("evaluation")
        eval_axis.legend(fontsize=7)
    figure.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
