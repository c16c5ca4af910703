"""The paper's results tables as Markdown: :func:`format_table` in the paper's column order
(:data:`COLUMN_ORDER`) with its headers (:data:`COLUMN_LABELS`); re-exported by
:mod:`recipes.metrics`.

Example:
    >>> COLUMN_LABELS["pixel_acc"]
    'PAcc'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "COLUMN_LABELS", "COLUMN_ORDER"]


#: Column order of the paper's tables (normals, then segmentation; age, then gender).
COLUMN_ORDER: tuple[str, ...] = (
    "mean",
    "median",
    "rmse",
    "within_11.25",
    "within_22.5",
    "within_30",
    "mIoU",
    "pixel_acc",
    "mean_ae",
    "median_ae",
    "accuracy",
)

#: Column headers as printed in the paper.
COLUMN_LABELS: dict[str, str] = {
    "mean": "Mean",
    "median": "Med.",
    "rmse": "RMSE",
    "within_11.25": "11.25",
    "within_22.5": "22.5",
    "within_30": "30",
    "mIoU": "mIoU",
    "pixel_acc": "PAcc",
    "mean_ae": "Mean AE",
    "median_ae": "Median AE",
    "accuracy": "Acc. (%)",
}


def _flat(metrics: Mapping[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value))
        else:
            flat[key] = float(value)
    return flat


def format_table(
    rows: Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping[str, Any]]],
    *,
    columns: Sequence[str] | None = None,
    digits: int = 1,
    first_column: str = "Method",
) -> str:
    """A Markdown table in the paper's layout: one row per method, one column per metric.

    Args:
        rows: method name → metrics, as a dict or a list of pairs. Metrics may be flat
            (``{"mIoU": 36.2, "mean": 13.9}``) or by task (``{"seg": {...}, "normal": {...}}``).
        columns: metric keys to show, in order; default: every key present, in
            :data:`COLUMN_ORDER` (unknown keys last, in order of appearance).
        digits: decimals (the paper prints 1).
        first_column: header of the method column.

    A missing metric prints as ``-``. No trailing newline.

    Example:
        >>> print(format_table({"Ours": {"mIoU": 36.21, "pixel_acc": 66.4}, "Sing.": {"mIoU": 33.5}}))
        | Method | mIoU | PAcc |
        |:---|---:|---:|
        | Ours | 36.2 | 66.4 |
        | Sing. | 33.5 | - |
    """
    pairs = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    flat_rows = [(str(name), _flat(metrics)) for name, metrics in pairs]
    if columns is None:
        present: list[str] = []
        for _, metrics in flat_rows:
            present += [key for key in metrics if key not in present]
        known = [key for key in COLUMN_ORDER if key in present]
        columns = known + [key for key in present if key not in COLUMN_ORDER]
    header = [first_column] + [COLUMN_LABELS.get(key, key) for key in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(columns)) + "|",
    ]
    for name, metrics in flat_rows:
        cells = [name] + [
            f"{metrics[key]:.{digits}f}" if key in metrics else "-" for key in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
