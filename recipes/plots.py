"""Training curves from a run's ``metrics.jsonl`` as a PNG (matplotlib, Agg backend).

One panel per unit: the training losses (log scale when they span more than a decade), the
learning rate, and the evaluation metrics grouped by unit (:func:`metric_unit`): percent (mIoU,
pixel accuracy, accuracy, within-t° fractions), degrees (normal angle errors), years (age errors),
the evaluation loss of your own tasks, and one panel per task for metrics of unknown unit (your
own tasks' MAE, RMSE). Evaluations over steps are lines with markers; a metric evaluated once is
one marker with its value written beside it.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> records = [{"kind": "train", "step": s, "loss": 2.0 / s, "loss/seg": 1.0 / s, "lr": 0.01}
    ...            for s in range(1, 6)]
    >>> records.append({"kind": "eval", "step": 5, "metrics": {"seg": {"mIoU": 20.0}}})
    >>> list(metric_panels(records))
    ['loss', 'learning rate', 'evaluation (%)']
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
    >>> plot_curves(run / "metrics.jsonl", run / "curves.png").stat().st_size > 1000
    True
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "Series",
    "read_records",
    "metric_unit",
    "metric_panels",
    "panel_ylabel",
    "draw_curves",
    "plot_curves",
]

#: Metrics in percent, whatever the task.
PERCENT_METRICS = frozenset({"mIoU", "pixel_acc", "accuracy"})

_UNIT_PANELS = {
    "%": "evaluation (%)",
    "degrees": "evaluation (degrees)",
    "years": "evaluation (years)",
    "loss": "evaluation loss",
}
_YLABELS = {
    "loss": "training loss",
    "learning rate": "base learning rate",
    **{title: unit for unit, title in _UNIT_PANELS.items()},
}


class Series(NamedTuple):
    """One curve: its legend label and its points."""

    label: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON record of a JSONL file (blank lines skipped)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def metric_unit(task: str, name: str) -> str | None:
    """The unit of evaluation metric ``name`` of ``task``: ``"%"``, ``"degrees"``, ``"years"``,
    ``"loss"``, or None when unknown (your own tasks' ``mae``, ``rmse``: the target's unit).

    Example:
        >>> [metric_unit("normal", "within_22.5"), metric_unit("normal", "median"),
        ...  metric_unit("age", "mean_ae"), metric_unit("depth", "rmse")]
        ['%', 'degrees', 'years', None]
    """
    if name in PERCENT_METRICS or name.startswith("within_"):
        return "%"
    if (task == "normal" and name in ("mean", "median", "rmse")) or name.endswith("_angle"):
        return "degrees"
    if task == "age" and name in ("mean_ae", "median_ae"):
        return "years"
    if name == "loss":
        return "loss"
    return None


def panel_ylabel(title: str) -> str:
    """The y-axis label of the panel ``title`` of :func:`metric_panels`."""
    return _YLABELS.get(title, "value")


def metric_panels(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Series]]:
    """Group a run's records into panels, in drawing order: ``"loss"`` (``loss`` then
    ``loss/<task>``), ``"learning rate"``, then one evaluation panel per unit present —
    ``"evaluation (%)"``, ``"evaluation (degrees)"``, ``"evaluation (years)"``,
    ``"evaluation loss"``, then ``"evaluation: <task>"`` for metrics of unknown unit. Evaluation
    series are labelled ``<task>/<metric>`` in the order first seen; empty panels are left out.

    Example:
        >>> records = [
        ...     {"kind": "train", "step": 1, "loss": 3.0, "loss/seg": 2.0, "lr": 0.1},
        ...     {"kind": "eval", "step": 1, "metrics": {"seg": {"mIoU": 10.0},
        ...                                         "normal": {"mean": 40.0}}},
        ...     {"kind": "eval", "step": 2, "metrics": {"seg": {"mIoU": 20.0}}}]
        >>> for title, series in metric_panels(records).items():
        ...     print(title, [(s.label, s.steps, s.values) for s in series])
        loss [('loss', (1,), (3.0,)), ('loss/seg', (1,), (2.0,))]
        learning rate [('lr', (1,), (0.1,))]
        evaluation (%) [('seg/mIoU', (1, 2), (10.0, 20.0))]
        evaluation (degrees) [('normal/mean', (1,), (40.0,))]
    """
    records = list(records)
    train = [r for r in records if r.get("kind") == "train"]
    panels: dict[str, list[Series]] = {}
    keys = ["loss", *sorted({k for r in train for k in r if k.startswith("loss/")})]
    panels["loss"] = [s for s in (_series(train, key, key) for key in keys) if s.steps]
    panels["learning rate"] = [s for s in [_series(train, "lr", "lr")] if s.steps]
    points: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for record in records:
        if record.get("kind") != "eval":
            continue
        for task, values in record.get("metrics", {}).items():
            for name, value in values.items():
                points.setdefault((task, name), []).append((int(record["step"]), float(value)))
    by_title: dict[str, list[Series]] = {}
    for (task, name), pairs in points.items():
        unit = metric_unit(task, name)
        title = _UNIT_PANELS[unit] if unit else f"evaluation: {task}"
        steps, values = zip(*pairs)
        by_title.setdefault(title, []).append(Series(f"{task}/{name}", steps, values))
    known = [t for t in _UNIT_PANELS.values() if t in by_title]
    panels |= {t: by_title[t] for t in [*known, *(t for t in by_title if t not in known)]}
    return {title: series for title, series in panels.items() if series}


def _series(records: list[Mapping[str, Any]], key: str, label: str) -> Series:
    kept = [(int(r["step"]), float(r[key])) for r in records if key in r]
    steps, values = (tuple(x) for x in zip(*kept)) if kept else ((), ())
    return Series(label, steps, values)  # type: ignore[arg-type]


def _smooth(values: tuple[float, ...], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _spans_decades(series: list[Series]) -> bool:
    """Every value positive and max / min > 10."""
    values = [v for s in series for v in s.values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def draw_curves(records: Iterable[Mapping[str, Any]], *, smooth: int = 5) -> Any:
    """A matplotlib figure with one axes per panel of :func:`metric_panels` (title, ``step`` on
    x, :func:`panel_ylabel` on y). Training losses: moving average over ``smooth`` records, raw
    values faint. The caller closes it (``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = metric_panels(records)
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    axes = [axis for row in grid for axis in row]
    for axis in axes[len(panels) :]:
        figure.delaxes(axis)
    for axis, (title, series) in zip(axes, panels.items()):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(panel_ylabel(title))
        if title == "loss":
            for s in series:
                (line,) = axis.plot(s.steps, _smooth(s.values, smooth), label=s.label)
                axis.plot(s.steps, s.values, color=line.get_color(), alpha=0.25, linewidth=0.8)
            if _spans_decades(series):
                axis.set_yscale("log")
        elif title == "learning rate":
            for s in series:
                axis.plot(s.steps, s.values, color="tab:gray", label=s.label)
        else:
            for s in series:
                _draw_evaluation(axis, s)
        if len(series) > 1 or title.startswith("evaluation"):
            axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _draw_evaluation(axis: Any, series: Series) -> None:
    if len(series.steps) > 1:
        axis.plot(series.steps, series.values, marker="o", markersize=4, label=series.label)
        return
    (point,) = axis.plot(series.steps, series.values, marker="o", linestyle="none")
    point.set_label(series.label)
    value = series.values[0]
    if math.isfinite(value):
        axis.annotate(
            f"{value:.4g}",
            (series.steps[0], value),
            textcoords="offset points",
            xytext=(7, 0),
            va="center",
            fontsize=8,
            color=point.get_color(),
        )


def plot_curves(
    jsonl: str | os.PathLike[str], png: str | os.PathLike[str], *, smooth: int = 5
) -> Path:
    """Draw :func:`draw_curves` of the records in ``jsonl`` into ``png``; returns ``png``."""
    figure = draw_curves(read_records(jsonl), smooth=smooth)
    import matplotlib.pyplot as plt  # after draw_curves chose the Agg backend

    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(out, dpi=100)
    finally:
        plt.close(figure)
    return out
