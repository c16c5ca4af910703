"""Training progress on the main process: a rich progress bar on a terminal, plain lines otherwise.

:class:`TrainingProgress` picks its display when it starts:

* ``progress=false`` in the config: nothing;
* standard output is a terminal: a live rich bar (on standard error) with the loss, images per
  second, elapsed and remaining time;
* standard output is not a terminal (a pipe, a log file, a batch job): one plain line per logged
  training record, flushed at once, and one line per evaluation, on standard output::

      step 40/200 loss 1.2345 (seg 0.8123, normal 0.0211) lr 9.1e-04 12.3 img/s eta 1m20s
      eval step 40/200 (test): seg mIoU 24.94, pixel_acc 69.48 | normal mean 49.10, median 46.68

Example:
    >>> record = {"kind": "train", "step": 40, "loss": 1.23454, "loss/seg": 0.81234,
    ...           "loss/normal": 0.02114, "lr": 9.1e-4, "images_per_s": 12.34}
    >>> train_line(record, total=200, eta_seconds=80)
    'step 40/200 loss 1.2345 (seg 0.8123, normal 0.0211) lr 9.1e-04 12.3 img/s eta 1m20s'
    >>> eval_line(40, 200, "test", {"seg": {"mIoU": 24.944, "pixel_acc": 69.48}})
    'eval step 40/200 (test): seg mIoU 24.94, pixel_acc 69.48'
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TrainingProgress",
    "make_console",
    "train_line",
    "eval_line",
    "format_duration",
]


def make_console(enabled: bool) -> Any:
    """A rich console on standard error (silent unless ``enabled``); long lines are not
    wrapped, so paths and commands stay copyable."""
    from rich.console import Console

    return Console(quiet=not enabled, stderr=True, soft_wrap=True)


def format_duration(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h05m`` (``?`` when unknown).

    Example:
        >>> format_duration(45.4), format_duration(80), format_duration(7500)
        ('45s', '1m20s', '2h05m')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def train_line(record: Mapping[str, Any], *, total: int, eta_seconds: float) -> str:
    """The plain progress line of one training record (``metrics.jsonl``'s ``kind: "train"``)."""
    tasks = [key[len("loss/") :] for key in record if key.startswith("loss/")]
    parts = ", ".join(f"{task} {record[f'loss/{task}']:.4f}" for task in tasks)
    losses = f"loss {record['loss']:.4f}" + (f" ({parts})" if parts else "")
    return (
        f"step {record['step']}/{total} {losses} lr {record['lr']:.1e} "
        f"{record['images_per_s']:.1f} img/s eta {format_duration(eta_seconds)}"
    )


def eval_line(step: int, total: int, split: str, metrics: Mapping[str, Mapping[str, float]]) -> str:
    """One line summarising an evaluation: task, then each metric with two decimals."""
    tasks = " | ".join(
        f"{task} " + ", ".join(f"{name} {value:.2f}" for name, value in values.items())
        for task, values in metrics.items()
    )
    return f"eval step {step}/{total} ({split}): {tasks}"


class TrainingProgress:
    """Progress display of one :func:`recipes.train.train` call (a context manager).

    Args:
        enabled: show anything at all (``config.progress`` on the main process).
        name: the run's name (the bar's label).
        total: the run's total steps (``config.steps``).
        start: the step this call starts from.
        end: the step this call stops at (the ETA counts to it).
        console: the rich console of the bar (standard error).
        plain: plain lines instead of the bar (default: when standard output is not a terminal).
    """

    def __init__(
        self,
        *,
        enabled: bool,
        name: str,
        total: int,
        start: int,
        end: int,
        console: Any,
        plain: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.name, self.total, self.start, self.end = name, total, start, end
        self.console = console
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self._bar: Any = None
        self._task: Any = None
        self._started = time.perf_counter()

    @property
    def mode(self) -> str:
        """``"off"``, ``"plain"`` or ``"bar"``."""
        if not self.enabled:
            return "off"
        return "plain" if self.plain else "bar"

    def __enter__(self) -> TrainingProgress:
        self._started = time.perf_counter()
        if self.mode == "bar":
            self._bar = _rich_bar(self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task(
                self.name, total=self.total, completed=self.start, loss="", ips=""
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def eta_seconds(self, step: int) -> float:
        """Seconds until ``end`` at this call's mean pace so far."""
        done = step - self.start
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self._started) / done * max(self.end - step, 0)

    def advance(self, step: int) -> None:
        """``step`` steps are complete."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def logged(self, record: Mapping[str, Any]) -> None:
        """A training record was logged."""
        if self.mode == "plain":
            line = train_line(
                record, total=self.total, eta_seconds=self.eta_seconds(record["step"])
            )
            print(line, file=sys.stdout, flush=True)
        elif self._bar is not None:
            self._bar.update(
                self._task,
                loss=f"loss {record['loss']:.4f}",
                ips=f"{record['images_per_s']:.1f} img/s",
            )

    def evaluated(self, step: int, split: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """An evaluation finished."""
        line = eval_line(step, self.total, split, metrics)
        if self.mode == "plain":
            print(line, file=sys.stdout, flush=True)
        elif self.mode == "bar":
            self.console.print(line, markup=False, highlight=False)


def _rich_bar(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[ips]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
