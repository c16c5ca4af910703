"""Stage 2 of 3: choose the fusion points of every task and describe the plan.

A :class:`Plan` says, per fusion level, which node of each task is fused, its shape, and how many
parameters the fusion layer adds. Points come from ``points="auto"`` (the stage ends found by
:func:`nddrify.graph_analysis.stage_ends`), from module or node names, or from an int (the last N
automatic points).

Example:
    >>> import torchvision, nddrify
    >>> plan = nddrify.plan(models=[torchvision.models.vgg16(), torchvision.models.vgg16()])
    >>> [level.points[0].name for level in plan.levels]
    ['features.4', 'features.9', 'features.16', 'features.23', 'features.30']
    >>> plan.overhead.fusion_weights
    2441216
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import FusionConfigError, PointError, ShapeMismatchError
from .graph_analysis import (
    LAYOUT,
    NONNEGATIVE,
    annotate,
    feature_shape,
    is_feature_map,
    shape_of,
    spine,
    stage_ends,
    stage_module,
)
from .kinds import fusion_factory, kind_record, shortcut_record
from .layers import Shortcut, as_shortcut
from .meta import QUALNAME
from .plans import Candidate, FusionLevel, FusionPoint, Plan
from .protocol import FusionKind, kind_name, spanning
from .tasks import TaskOptions, TracedSet, trace
from .tracing import TracedModel, TraceOptions, trace_model

__all__ = ["plan", "get_fusion_candidates", "candidate_list", "Points"]

#: ``"auto"`` (stage ends from the graph), ``"declared"`` (timm's ``feature_info``), an int N (the
#: last N auto points), names shared by all tasks, or one list per task.
Points = str | int | Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]]


def _candidates(traced: TracedModel) -> tuple[list[fx.Node], list[fx.Node]]:
    graph = annotate(traced.graph)
    return spine(graph), stage_ends(graph)


def get_fusion_candidates(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    trace_options: TraceOptions | None = None,
) -> list[Candidate]:
    """Every node of ``model`` that can be a fusion point (its spine feature maps), marking those
    ``points="auto"`` picks. The discovery helper beside :func:`plan`, like torchvision's
    ``get_graph_node_names`` beside ``create_feature_extractor``.

    Example:
        >>> import torchvision, nddrify
        >>> cands = nddrify.get_fusion_candidates(torchvision.models.resnet18())
        >>> [c.name for c in cands if c.auto]
        ['maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    traced = trace_model(model, example_input=example_input, options=trace_options)
    return candidate_list(traced)


def candidate_list(traced: TracedModel) -> list[Candidate]:
    """The :class:`Candidate` list of an already traced model."""
    spine_nodes, auto = _candidates(traced)
    auto_set = set(auto)
    return [
        Candidate(
            name=stage_module(n, auto, traced.graph) if n in auto_set else n.meta[QUALNAME],
            node=n.meta[QUALNAME],
            shape=feature_shape(n),
            auto=n in auto_set,
        )
        for n in spine_nodes
    ]


def _close_names(name: str, traced: TracedModel) -> str:
    names = traced.node_names
    modules = sorted(
        {".".join(q.split(".")[:i]) for q in names for i in range(1, q.count(".") + 1)}
    )
    close = difflib.get_close_matches(name, modules + names, n=5, cutoff=0.5)
    if not close:
        close = [c.name for c in candidate_list(traced) if c.auto]
        return f"the automatic points of this model are {close}"
    return f"did you mean one of {close}?"


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the output depends on."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live, stack = {output}, [output]
    while stack:
        for source in stack.pop().all_input_nodes:
            if source not in live:
                live.add(source)
                stack.append(source)
    return live


def _resolve(names: Sequence[str], traced: TracedModel) -> list[fx.Node]:
    annotate(traced.graph)
    live = _live_nodes(traced.graph)
    nodes = []
    for name in names:
        if not isinstance(name, str):
            raise PointError(
                f"task {traced.task!r}: fusion point {name!r} is a {type(name).__name__}; give "
                "module or node names as strings (e.g. 'layer1' or 'features.4')."
            )
        try:
            node = traced.node(name)
        except KeyError:
            raise PointError(
                f"task {traced.task!r}: no node or module called {name!r}; "
                f"{_close_names(name, traced)} (list them with nddrify.get_fusion_candidates(model))."
            ) from None
        if not is_feature_map(node):
            shape = shape_of(node)
            what = f"a tensor of shape {shape}" if shape is not None else "not a tensor"
            raise PointError(
                f"task {traced.task!r}: point {name!r} resolves to node {node.meta[QUALNAME]!r}, "
                f"which is {what}; fusion points must be image feature maps (N×C×H×W, or "
                "N×H×W×C with a known channel axis). The automatic points of this model are "
                f"{[c.name for c in candidate_list(traced) if c.auto]}."
            )
        if node not in live:
            raise PointError(
                f"task {traced.task!r}: point {name!r} (node {node.meta[QUALNAME]!r}) does not "
                "feed the model's output, so fusing it would change nothing; choose a node the "
                "output depends on."
            )
        nodes.append(node)
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    for (prev_name, prev), (name, node) in zip(zip(names, nodes), zip(names[1:], nodes[1:])):
        if node is prev:
            raise PointError(
                f"task {traced.task!r}: points {prev_name!r} and {name!r} are the same node "
                f"{node.meta[QUALNAME]!r}; remove the duplicate."
            )
        if order[node] < order[prev]:
            raise PointError(
                f"task {traced.task!r}: point {name!r} runs before {prev_name!r}; list points in "
                "the order the model executes them."
            )
    return nodes


def _declared_points(traced: TracedModel) -> list[str]:
    """The stage modules a model declares in timm's ``feature_info`` metadata."""
    info = getattr(traced.module, "feature_info", None)
    if hasattr(info, "module_name"):  # timm's FeatureInfo
        info = [{"module": info.module_name(i)} for i in range(len(info))]
    if not isinstance(info, (list, tuple)) or not all(
        isinstance(d, Mapping) and "module" in d for d in info
    ):
        raise PointError(
            f"task {traced.task!r}: {type(traced.module).__name__} declares no feature_info "
            "(timm models do); use points='auto' to find the stage ends from the graph."
        )
    return [str(d["module"]) for d in info]


def _select(points: Points, traced: Sequence[TracedModel]) -> list[list[tuple[fx.Node, str]]]:
    """Per task, the chosen nodes and their labels (the name the user gave, or the stage module)."""
    names = [t.task for t in traced]
    if isinstance(points, bool):
        raise PointError(f"points={points!r} is not valid; use 'auto', an int, or a list of names.")
    if points == "declared":
        points = [_declared_points(t) for t in traced]
    elif points == "auto" or isinstance(points, int):
        auto = [_candidates(t)[1] for t in traced]
        per_task = auto
        for t, chosen in zip(traced, per_task):
            if not chosen:
                raise PointError(
                    f"task {t.task!r}: found no N×C×H×W feature maps to fuse automatically; "
                    "give points by name (see nddrify.get_fusion_candidates(model))."
                )
        if isinstance(points, int):
            shortest = min(len(c) for c in per_task)
            if not 1 <= points <= shortest:
                raise PointError(
                    f"points={points} must be between 1 and {shortest}, the number of automatic "
                    "points every task has."
                )
            per_task = [c[-points:] for c in per_task]
        else:
            counts = {t.task: len(c) for t, c in zip(traced, per_task)}
            if len(set(counts.values())) > 1:
                raise PointError(
                    f"the tasks have different numbers of automatic points {counts}; pass "
                    "points=N to fuse the last N of each, or one list of names per task."
                )
        return [
            [(n, stage_module(n, points_of_task, t.graph)) for n in chosen]
            for t, chosen, points_of_task in zip(traced, per_task, auto)
        ]
    if isinstance(points, str):
        points = [p.strip() for p in points.split(",") if p.strip()]
    if isinstance(points, Mapping):
        missing = [n for n in names if n not in points]
        unknown = [k for k in points if k not in names]
        if missing or unknown:
            extra = f"; it names unknown task(s) {unknown}" if unknown else ""
            raise PointError(
                f"points is a dict but has no entry for task(s) {missing}{extra}; the tasks are "
                f"{names}."
            )
        lists = [list(points[n]) for n in names]
    elif points and all(isinstance(p, (list, tuple)) for p in points):
        if len(points) != len(names):
            raise PointError(
                f"points has {len(points)} per-task lists but there are {len(names)} tasks "
                f"({names}); give one list per task."
            )
        lists = [list(p) for p in points]
    else:
        lists = [list(points)] * len(names)
    if not any(lists):
        raise PointError("points is empty; give at least one point, or points='auto'.")
    lengths = {n: len(p) for n, p in zip(names, lists)}
    if len(set(lengths.values())) > 1:
        raise PointError(
            f"every task needs the same number of fusion points, got {lengths}; one NDDR layer "
            "fuses one point of each task."
        )
    return [list(zip(_resolve(p, t), p)) for p, t in zip(lists, traced)]


def _check_train_graph(traced: TracedModel, nodes: Sequence[fx.Node]) -> None:
    """Every point must exist in the train-mode graph too (it is rewritten the same way)."""
    if traced.train_graph_module is None:
        return
    train_names = {n.meta.get(QUALNAME) for n in traced.train_graph_module.graph.nodes}
    for node in nodes:
        if node.meta[QUALNAME] not in train_names:
            raise PointError(
                f"task {traced.task!r}: point node {node.meta[QUALNAME]!r} exists in the "
                "eval-mode graph but not in the train-mode one (a self.training branch); choose "
                "a point that runs in both modes."
            )


def _spanning_cost(
    fusion: FusionKind, shortcut: Shortcut | None, levels: Sequence[FusionLevel]
) -> tuple[int, int]:
    hook = spanning(fusion, shortcut)
    if hook is None or not levels:
        return (0, 0)
    return hook.across_parameters(levels)


def plan(
    models: TracedSet | Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    points: Points = "auto",
    *,
    fusion: Any = None,
    shortcut: bool | Shortcut = False,
    resize: bool = False,
    example_input: torch.Tensor | None = None,
    trace_options: TaskOptions = None,
) -> Plan:
    """Decide where to fuse the tasks and what it costs, without building anything.

    Args:
        models: a :class:`~nddrify.tasks.TracedSet` from :func:`nddrify.trace`, or the models
            themselves (traced first, with ``example_input`` and ``trace_options``).
        points: ``"auto"`` (stage ends found from the graph), ``"declared"`` (the stage modules
            a timm model declares in ``feature_info``), an int N (the last N auto points), a list
            of module or node names shared by every task, a list of per-task lists, or a dict
            task → list. Points are checked on the train- and the eval-mode graph.
        fusion: the fusion kind (``"nddr"`` default, ``"cross_stitch"``, ``"sluice"``, or an
            object such as ``nddrify.NDDR(rank=64)``); the plan records a built-in kind's options.
        shortcut: include an NDDR-Shortcut (``True`` or :class:`~nddrify.Shortcut` options).
        resize: allow points whose H×W differ across tasks (the fusion layer resizes).

    Example:
        >>> import torchvision, nddrify
        >>> p = nddrify.plan([torchvision.models.resnet18(), torchvision.models.resnet34()], points=2)
        >>> [lv.points[1].name for lv in p.levels]
        ['layer3', 'layer4']
    """
    traced = trace(models, example_input=example_input, options=trace_options)
    kind = fusion if isinstance(fusion, FusionKind) else fusion_factory(fusion)
    shortcut_options = as_shortcut(shortcut)
    resize = resize or getattr(kind, "resize", None) is not None
    chosen = _select(points, traced.traced)
    levels = []
    for index, level_points in enumerate(zip(*chosen)):
        fusion_points = tuple(
            FusionPoint(
                task=t.task,
                name=label,
                node=n.meta[QUALNAME],
                shape=feature_shape(n),
                nonnegative=bool(n.meta.get(NONNEGATIVE)),
                layout=n.meta[LAYOUT],
            )
            for t, (n, label) in zip(traced, level_points)
        )
        sizes = {p.spatial for p in fusion_points}
        if len(sizes) > 1 and not resize:
            detail = ", ".join(
                f"{p.task} {p.name!r} {p.channels}×{p.spatial[0]}×{p.spatial[1]}"
                for p in fusion_points
            )
            raise ShapeMismatchError(
                f"fusion level {index + 1}: the tasks' feature maps differ in H×W ({detail}); "
                "choose points of equal resolution, or pass resize=True to resize each "
                "task's inputs to its own H×W inside the fusion layer."
            )
        level = FusionLevel(index, fusion_points)
        try:
            weights, norm_params = kind.num_parameters(level)
        except FusionConfigError as err:
            if str(err).startswith(f"fusion {level.describe()}"):
                raise
            raise FusionConfigError(f"fusion {level.describe()}: {err}") from None
        levels.append(FusionLevel(index, fusion_points, weights, norm_params))
    for t, nodes in zip(traced, chosen):
        _check_train_graph(t, [n for n, _ in nodes])
    across_weights, across_norms = _spanning_cost(kind, shortcut_options, levels)
    return Plan(
        tasks=traced.tasks,
        levels=tuple(levels),
        model_params=traced.model_params,
        shortcut_weights=across_weights,
        shortcut_norm_params=across_norms,
        fusion_kind=kind_name(kind),
        fusion=kind_record(kind),
        shortcut=shortcut_record(shortcut_options),
    )
