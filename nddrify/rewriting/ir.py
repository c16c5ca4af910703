"""The intermediate form every rewriter reads: each task's graph cut into segments between the
fusion levels, and the junctions that join the tasks between segments.

* a **segment** is the stretch of one task's graph that runs before fusion level l (segment l
  ends with the level-l point; the last segment runs to the output);
* a **junction** is what is inserted after a level: a ``"fusion"`` layer taking the K maps and
  returning K maps, an ``"across"`` layer spanning every level (the NDDR-Shortcut, sluice's
  layer-stitch), or a ``"trunk"`` (hard sharing: the segments up to the level run once, as
  task 0's, for every task).

:func:`fused_ir` and :func:`trunk_ir` build it from a :class:`~nddrify.tasks.TracedSet` and a
:class:`~nddrify.Plan`; :class:`~nddrify.rewriting.emit.GraphWriter` turns it into a graph.

Example:
    >>> import torchvision, nddrify
    >>> from nddrify.rewriting.ir import fused_ir
    >>> traced = nddrify.trace([torchvision.models.resnet18(), torchvision.models.resnet18()])
    >>> ir = fused_ir(traced, nddrify.plan(traced, points=2), train=False, across=False)
    >>> ir
    RewriteIR(task0, task1; 2 levels; fusion@0 nddr1, fusion@1 nddr2)
    >>> [len(s) for s in ir.tasks[0].segments], ir.tasks[0].points[0].meta["qualname"]
    ([50, 16, 3], 'layer3.1.relu_1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch.fx as fx
from torch import nn

from ..errors import PlanError
from ..meta import QUALNAME
from ..plans import Plan
from ..tasks import TracedSet
from ..tracing import TracedModel

__all__ = ["TaskSegments", "Junction", "RewriteIR", "task_segments", "fused_ir", "trunk_ir"]

JunctionKind = Literal["fusion", "across", "trunk"]


@dataclass(frozen=True)
class TaskSegments:
    """One task's graph cut at its fusion points.

    Attributes:
        task: the task's name (the prefix of its copied nodes and modules).
        module: the task's model (read for in-place modules; never modified).
        graph: the task graph (train- or eval-mode).
        segments: len(points) + 1 runs of nodes (placeholders and output excluded).
        points: the point node of every level (the last node of segment l).
        labels: the point names the plan gives (``"layer1"``), for the fused maps' names.
    """

    task: str
    module: nn.Module
    graph: fx.Graph
    segments: tuple[tuple[fx.Node, ...], ...]
    points: tuple[fx.Node, ...]
    labels: tuple[str, ...]

    @property
    def output(self) -> fx.Node:
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]


@dataclass(frozen=True)
class Junction:
    """What joins the tasks after fusion level ``level``: ``module`` is its name in the
    rewritten model (``"nddr1"``, ``"shortcut"``, ``"shared"``)."""

    kind: JunctionKind
    level: int
    module: str

    def __repr__(self) -> str:
        return f"{self.kind}@{self.level} {self.module}"


@dataclass(frozen=True)
class RewriteIR:
    """Segments of every task and the junctions between them."""

    tasks: tuple[TaskSegments, ...]
    junctions: tuple[Junction, ...]
    as_dict: bool
    #: one task whose output is returned as it is (a single network with a shortcut)
    single: bool = False

    @property
    def num_levels(self) -> int:
        return len(self.tasks[0].points)

    def at(self, level: int, kind: JunctionKind) -> Junction | None:
        """The junction of this kind after ``level``, if any."""
        return next((j for j in self.junctions if j.level == level and j.kind == kind), None)

    def __repr__(self) -> str:
        tasks = ", ".join(t.task for t in self.tasks)
        junctions = ", ".join(map(repr, self.junctions))
        return f"RewriteIR({tasks}; {self.num_levels} levels; {junctions})"


def _graph_of(traced: TracedModel, train: bool) -> fx.Graph:
    if train and traced.train_graph_module is not None:
        return traced.train_graph_module.graph
    return traced.graph


def task_segments(
    traced: TracedModel, point_names: Sequence[str], labels: Sequence[str], *, train: bool
) -> TaskSegments:
    """Cut ``traced``'s train- or eval-mode graph at the nodes called ``point_names``.

    Raises:
        PlanError: a point is not a node of that graph, or the points are out of order.
    """
    graph = _graph_of(traced, train)
    by_name = {
        n.meta.get(QUALNAME): n for n in graph.nodes if n.op not in ("placeholder", "output")
    }
    mode = "train" if train else "eval"
    missing = [name for name in point_names if name not in by_name]
    if missing:
        raise PlanError(
            f"task {traced.task!r}: the plan's point node(s) {missing} are not in the model's "
            f"{mode}-mode graph; make the plan for these models with nddrify.plan(...), or "
            "fix the node names (nddrify.get_fusion_candidates lists them)."
        )
    points = [by_name[name] for name in point_names]
    segments: list[list[fx.Node]] = [[] for _ in range(len(points) + 1)]
    level = 0
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            segments[level].append(node)
        if level < len(points) and node is points[level]:
            level += 1
    if level < len(points):
        raise PlanError(
            f"task {traced.task!r}: the plan's points {list(point_names)} are not in execution "
            "order; list them in the order the model runs them."
        )
    return TaskSegments(
        task=traced.task,
        module=traced.module,
        graph=graph,
        segments=tuple(tuple(s) for s in segments),
        points=tuple(points),
        labels=tuple(labels),
    )


def _segments(traced: TracedSet, plan: Plan, train: bool) -> tuple[TaskSegments, ...]:
    if tuple(traced.tasks) != tuple(plan.tasks):
        raise PlanError(
            f"the plan is for tasks {list(plan.tasks)}, the traced models are "
            f"{list(traced.tasks)}; trace the same models (a dict keeps task names)."
        )
    return tuple(
        task_segments(
            t,
            plan.points(t.task),
            [level.points[k].name for level in plan.levels],
            train=train,
        )
        for k, t in enumerate(traced)
    )


def fused_ir(traced: TracedSet, plan: Plan, *, train: bool, across: bool) -> RewriteIR:
    """The NDDR-style form: a fusion layer ``nddr<l>`` after every level, and the layer
    spanning the levels (``shortcut``) after the last one when ``across``."""
    junctions = [Junction("fusion", i, f"nddr{i + 1}") for i in range(len(plan.levels))]
    if across and plan.levels:
        junctions.append(Junction("across", len(plan.levels) - 1, "shortcut"))
    return RewriteIR(_segments(traced, plan, train), tuple(junctions), traced.as_dict)


def trunk_ir(traced: TracedSet, plan: Plan, *, train: bool, module: str) -> RewriteIR:
    """The hard-sharing form: segment 0 (up to the plan's one level) runs once as ``module``."""
    return RewriteIR(
        _segments(traced, plan, train), (Junction("trunk", 0, module),), traced.as_dict
    )
