"""Run-folder files and the paper's tables, shared by :mod:`recipes.train` and
:mod:`recipes.evaluate` (neither of which imports the other).

* :func:`append_jsonl` appends one record to a run's ``metrics.jsonl``;
* :func:`merge_rows` and :func:`format_results` lay results out as the paper's tables;
* :func:`write_results` writes a run's ``results.md`` and ``results.json``.

Example:
    >>> rows = merge_rows([("Sing.", {"seg": {"mIoU": 33.5}}), ("Sing.", {"normal": {"mean": 15.6}}),
    ...                    ("Ours", {"seg": {"mIoU": 36.2}, "normal": {"mean": 13.9}})])
    >>> print(format_results(rows))
    | Method | Mean | mIoU |
    |:---|---:|---:|
    | Sing. | 15.6 | 33.5 |
    | Ours | 13.9 | 36.2 |
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .configs import RecipeConfig

__all__ = ["append_jsonl", "merge_rows", "format_results", "write_results"]

_SEG_COLUMNS = ("mIoU", "pixel_acc")
_NORMAL_COLUMNS = ("mean", "median", "within_11.25", "within_22.5", "within_30")


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON record (one line) to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a") as file:
        file.write(json.dumps(record) + "\n")


def merge_rows(
    results: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Group ``(label, task → metrics)`` by label, merging the tasks of runs that share one
    (the two single-task runs of a "Sing." row), in first-seen order."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, metrics in results:
        row = rows.setdefault(label, {})
        for task, values in metrics.items():
            row.setdefault(task, {}).update(values)
    return rows


#: The metrics of the paper's tasks; any other task or metric (your own tasks, ``recipes.custom``)
#: switches :func:`format_results` to one ``task/metric`` column per pair.
_PAPER_METRICS: dict[str, set[str]] = {
    "seg": set(_SEG_COLUMNS),
    "normal": {*_NORMAL_COLUMNS, "rmse"},
    "age": {"mean_ae", "median_ae"},
    "gender": {"accuracy"},
}


def format_results(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The paper's layout: normals (Mean, Med., 11.25, 22.5, 30) then segmentation (mIoU,
    PAcc); age (Mean AE, Median AE) then gender (Acc.). Only metrics present are shown.

    Your own tasks' metrics (any task or metric the paper has not) get one column per
    ``task/metric``, in order of appearance, with 3 decimals.

    Example:
        >>> print(format_results({"byo": {"seg": {"loss": 0.25, "mIoU": 50.0}, "depth": {"mae": 0.5}}}))
        | Method | seg/loss | seg/mIoU | depth/mae |
        |:---|---:|---:|---:|
        | byo | 0.250 | 50.000 | 0.500 |
    """
    from .metrics import COLUMN_ORDER, format_table

    paper_layout = all(
        task in _PAPER_METRICS and set(metrics) <= _PAPER_METRICS[task]
        for row in rows.values()
        for task, metrics in row.items()
    )
    if not paper_layout:
        flat = {
            label: {f"{task}/{name}": value for task, m in row.items() for name, value in m.items()}
            for label, row in rows.items()
        }
        names = list(dict.fromkeys(key for row in flat.values() for key in row))
        return format_table(flat, columns=names, digits=3)
    present = {k for row in rows.values() for task in row.values() for k in task}
    paper = [*_NORMAL_COLUMNS, *_SEG_COLUMNS, "mean_ae", "median_ae", "accuracy"]
    columns = [c for c in paper if c in present]
    columns += [c for c in COLUMN_ORDER if c in present and c not in columns and c != "rmse"]
    return format_table(rows, columns=columns)


def write_results(run_dir: Path, config: RecipeConfig, metrics: Mapping[str, Any]) -> Path:
    """Write ``results.md`` (the paper's layout, one row labelled with the config's label) and
    ``results.json``; returns the Markdown path."""
    label = config.label or config.name
    table = format_results({label: dict(metrics)})
    title = f"# {config.name}\n\n{config.paper}\n\n" if config.paper else f"# {config.name}\n\n"
    if config.weighting != "fixed" or config.aggregator != "none":
        options = {**config.weighting_options, **config.aggregator_options}
        detail = f" ({', '.join(f'{k}={v:g}' for k, v in options.items())})" if options else ""
        title += (
            f"Tasks balanced by weighting={config.weighting}, "
            f"aggregator={config.aggregator}{detail}.\n\n"
        )
    path = Path(run_dir) / "results.md"
    path.write_text(title + table + "\n")
    (Path(run_dir) / "results.json").write_text(json.dumps(dict(metrics), indent=2) + "\n")
    return path
