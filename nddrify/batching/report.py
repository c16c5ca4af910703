"""The report of :func:`~nddrify.batching.batch_tasks`: what runs batched and what per task.

:class:`BatchingReport` holds one :class:`StageReport` per segment of the task graphs (with a
:class:`PerTaskOperation` for every operation that runs once per task, and why) and one
:class:`FusionReport` per fusion layer. They are plain frozen dataclasses, built by
:mod:`nddrify.batching.emission`.

Example:
    >>> from nddrify.batching.report import (
    ...     BatchingReport, FusionReport, PerTaskOperation, StageReport)
    >>> head = PerTaskOperation("8", "Linear: out_features 40 in seg vs 3 in normal", True)
    >>> stages = (StageReport(0, "x", "nddr1", 3, 3, ()),
    ...           StageReport(1, "nddr1", "output", 6, 5, (head,)))
    >>> report = BatchingReport(("seg", "normal"), stages, (FusionReport("nddr1", True, "", 0),))
    >>> report.batched_operations, report.operations, [s.identical for s in report.stages]
    (8, 9, [True, False])
    >>> print(report)
    BatchingReport(2 tasks: seg, normal; 8 of 9 operations batched, 1 of 1 fusion layers)
      stage 0  x → nddr1           3/3 batched
      nddr1    batched
      stage 1  nddr1 → output      5/6 batched; per task: 8 (Linear: out_features 40 in seg vs 3 in normal)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchingReport", "StageReport", "PerTaskOperation", "FusionReport"]


@dataclass(frozen=True)
class PerTaskOperation:
    """An operation that runs once per task, and why.

    ``differs`` is True when the tasks' nodes differ (module hyper-parameters, shapes, structure)
    and False when they are identical but have no batched form.
    """

    node: str
    reason: str
    differs: bool

    def __str__(self) -> str:
        return f"{self.node} ({self.reason})"


@dataclass(frozen=True)
class StageReport:
    """One segment of the task graphs: from ``start`` (``x`` or a fusion layer) to ``end``.

    Attributes:
        operations: node positions in the segment (the K tasks' nodes at one position count
            once; where the task graphs diverge, the longest remainder counts).
        batched: how many of them run once for all tasks.
        per_task: the others, each with its reason.
    """

    index: int
    start: str
    end: str
    operations: int
    batched: int
    per_task: tuple[PerTaskOperation, ...]

    @property
    def identical(self) -> bool:
        """Whether the K tasks' segments are identical in structure, modules and shapes."""
        return not any(op.differs for op in self.per_task)

    def __str__(self) -> str:
        where = f"{self.start} → {self.end}"
        text = f"  stage {self.index:<2} {where:<19} {self.batched}/{self.operations} batched"
        if self.per_task:
            shown = "; ".join(str(op) for op in self.per_task[:3])
            more = f"; … {len(self.per_task) - 3} more" if len(self.per_task) > 3 else ""
            text += f"; per task: {shown}{more}"
        return text


@dataclass(frozen=True)
class FusionReport:
    """A fusion layer: batched (one call on the stacked maps) or called with the K maps."""

    name: str
    batched: bool
    reason: str = ""
    after_stage: int = -1

    def __str__(self) -> str:
        return f"  {self.name:<8} " + ("batched" if self.batched else f"per task: {self.reason}")


@dataclass(frozen=True)
class BatchingReport:
    """What :func:`batch_tasks` runs batched and what per task, segment by segment.

    ``print(report)`` gives one line per segment and fusion layer; ``batched_operations`` /
    ``operations`` count task-graph nodes (task 0's), ``batchable`` says whether anything runs
    batched at all.
    """

    tasks: tuple[str, ...]
    stages: tuple[StageReport, ...]
    fusions: tuple[FusionReport, ...]

    @property
    def operations(self) -> int:
        return sum(s.operations for s in self.stages)

    @property
    def batched_operations(self) -> int:
        return sum(s.batched for s in self.stages)

    @property
    def batchable(self) -> bool:
        return self.batched_operations > 0 or any(f.batched for f in self.fusions)

    def __str__(self) -> str:
        fused = sum(f.batched for f in self.fusions)
        lines = [
            f"BatchingReport({len(self.tasks)} tasks: {', '.join(self.tasks)}; "
            f"{self.batched_operations} of {self.operations} operations batched, "
            f"{fused} of {len(self.fusions)} fusion layers)"
        ]
        if not self.batchable:
            lines.append("  nothing runs batched: the tasks share no identical operation")
        lines += [str(f) for f in self.fusions if f.after_stage < 0]
        for stage in self.stages:
            lines.append(str(stage))
            lines += [str(f) for f in self.fusions if f.after_stage == stage.index]
        return "\n".join(lines)

    __repr__ = __str__
