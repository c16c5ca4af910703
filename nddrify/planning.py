"""Stage 2 of 3: choose the fusion points of every task and describe the plan.

A :class:`Plan` says, per fusion level, which node of each task is fused, its shape, and how many
parameters the fusion layer adds. Points come from ``points="auto"`` (the stage ends found by
:func:`nddrify.graph_analysis.stage_ends`), from module or node names, or from an int (the last N
automatic levels).

When the models differ, ``"auto"`` and an int pair the tasks' stage ends by resolution (output
stride on each task's own example input, :mod:`nddrify.pairing`) rather than by position: a
detector backbone ending stages at strides 4/8/16/32 and a segmenter at 2/4/8/16 fuse at strides
4, 8 and 16; the points left out are listed in ``plan.unpaired`` (and a ``UserWarning`` names
them).

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
import warnings
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
    auto_points,
    enclosing_block,
    is_fusable,
    point_shape,
    shape_of,
    spine,
    stage_module,
    token_grid,
    token_spine,
)
from .graph_analysis.nodes import reached_from
from .kinds import fusion_factory, kind_record, shortcut_record
from .layers import Shortcut, as_shortcut
from .meta import QUALNAME
from .pairing import UnpairedPoint, pair_points
from .plans import Candidate, FusionLevel, FusionPoint, Plan
from .protocol import FusionKind, kind_name, spanning
from .tasks import ExampleInputs, TaskOptions, TracedSet, trace
from .tracing import TracedModel, TraceOptions, trace_model

__all__ = ["plan", "get_fusion_candidates", "candidate_list", "Points"]

#: ``"auto"`` (stage ends from the graph), ``"declared"`` (timm's ``feature_info``), an int N (the
#: last N auto levels, paired by output stride), names shared by all tasks, or one list per task.
Points = str | int | Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]]


def _candidates(traced: TracedModel, token_levels: int = 4) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes that can be fused (spine maps and trunk token sequences, in execution order)
    and the automatic points among them."""
    graph = annotate(traced.graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    fusable = sorted(set(spine(graph)) | set(token_spine(graph)), key=order.__getitem__)
    return fusable, auto_points(graph, token_levels)


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
            shape=point_shape(n),
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
    return reached_from(next(n for n in reversed(graph.nodes) if n.op == "output"), upstream=True)


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
        if not is_fusable(node):
            shape = shape_of(node)
            what = f"a tensor of shape {shape}" if shape is not None else "not a tensor"
            raise PointError(
                f"task {traced.task!r}: point {name!r} resolves to node {node.meta[QUALNAME]!r}, "
                f"which is {what}; fusion points must be image feature maps (N×C×H×W, or "
                "N×H×W×C with a known channel axis) or token sequences (N×L×C, a transformer "
                "block's output). The automatic points of this model are "
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


Chosen = list[list[tuple[fx.Node, str]]]


def _auto(
    points: str | int, traced: Sequence[TracedModel], *, resize: bool
) -> tuple[Chosen, tuple[UnpairedPoint, ...]]:
    """The automatic points of every task, paired into levels by output stride (the position
    when every task has the same strides), and the points no other task can pair with."""
    # points=N on a plain ViT: N evenly spaced blocks (not the last N of four).
    token_levels = points if isinstance(points, int) else 4
    auto = [_candidates(t, token_levels)[1] for t in traced]
    for t, chosen in zip(traced, auto):
        if not chosen:
            raise PointError(
                f"task {t.task!r}: found no N×C×H×W feature maps or N×L×C token sequences to "
                "fuse automatically; "
                "give points by name (see nddrify.get_fusion_candidates(model))."
            )
    labels = [{n: stage_module(n, c, t.graph) for n in c} for t, c in zip(traced, auto)]
    last = points if isinstance(points, int) else None
    per_task, unpaired = pair_points(auto, traced, labels, last=last, resize=resize)
    return [[(n, labels[k][n]) for n in c] for k, c in enumerate(per_task)], unpaired


def _select(
    points: Points, traced: Sequence[TracedModel], *, resize: bool = False
) -> tuple[Chosen, tuple[UnpairedPoint, ...]]:
    """Per task, the chosen nodes and their labels (the name the user gave, or the stage
    module), and the automatic points left out because no other task has a map at their output
    stride.

    ``"auto"`` and an int N pair the tasks' automatic points by resolution (output stride on
    each task's own example input, :func:`nddrify.pairing.pair_by_stride`): N takes the last N
    paired levels. Tasks with the same strides pair by position, as do tasks with a point
    whose stride is unknown (with a warning). Names are taken as given, level by level.
    """
    names = [t.task for t in traced]
    if isinstance(points, bool):
        raise PointError(f"points={points!r} is not valid; use 'auto', an int, or a list of names.")
    if points == "declared":
        points = [_declared_points(t) for t in traced]
    elif points == "auto" or isinstance(points, int):
        return _auto(points, traced, resize=resize)
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
    return [list(zip(_resolve(p, t), p)) for p, t in zip(lists, traced)], ()


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


def _warn_about(points: Points, traced: Sequence[TracedModel], chosen: Chosen) -> None:
    """A ``UserWarning`` naming the reason when automatic points give fewer than 3 levels, or
    when a point the user named lies inside a block (between its fork and its merge)."""
    automatic = points in ("auto", "declared")
    if automatic and chosen and len(chosen[0]) < 3:
        found = ", ".join(f"{t.task}: {[label for _, label in c]}" for t, c in zip(traced, chosen))
        warnings.warn(
            f"nddrify: points={points!r} found only {len(chosen[0])} fusion level(s) ({found}); "
            "the tasks exchange features at few depths. Check the candidates with "
            "nddrify.get_fusion_candidates(model) and name points if the model has more stages.",
            UserWarning,
            stacklevel=3,
        )
    if automatic or isinstance(points, int):
        return
    for t, nodes in zip(traced, chosen):
        for node, label in nodes:
            block = enclosing_block(node, t.graph)
            if block is not None:
                warnings.warn(
                    f"nddrify: task {t.task!r}: point {label!r} (node {node.meta[QUALNAME]!r}) "
                    f"lies inside the block {block!r}, between its branches; fusing there "
                    "changes one branch only. A block's output is usually the better point.",
                    UserWarning,
                    stacklevel=3,
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
    example_input: ExampleInputs = None,
    trace_options: TaskOptions = None,
) -> Plan:
    """Decide where to fuse the tasks and what it costs, without building anything.

    Args:
        models: a :class:`~nddrify.tasks.TracedSet` from :func:`nddrify.trace`, or the models
            themselves (traced first, with ``example_input`` and ``trace_options``; spec
            strings are built on the meta device, without weights). Models built on the meta
            device (``with torch.device("meta"): model = ...``) plan like real ones.
        points: ``"auto"`` (stage ends found from the graph), ``"declared"`` (the stage modules
            a timm model declares in ``feature_info``), an int N (the last N auto levels), a
            list of module or node names shared by every task, a list of per-task lists, or a
            dict task → list. Points are checked on the train- and the eval-mode graph.
            ``"auto"`` and N pair the tasks' stage ends by output stride (the same as by
            position when every task has the same strides); stage ends with no partner at their
            stride in every task are left out, listed in ``plan.unpaired`` and named in a
            ``UserWarning``.
        fusion: the fusion kind (``"nddr"`` default, ``"cross_stitch"``, ``"sluice"``, or an
            object such as ``nddrify.NDDR(rank=64)``); the plan records a built-in kind's options.
        shortcut: include an NDDR-Shortcut (``True`` or :class:`~nddrify.Shortcut` options).
        resize: allow points whose H×W differ across tasks (the fusion layer resizes): maps
            paired at one stride still differ when the input size is not a multiple of it, or
            when the tasks' example inputs differ in size.
        example_input: one tensor for every task, or one per task (a list, or a dict task →
            tensor) when the models need different sizes; strides are computed on each task's
            own input.

    Example:
        >>> import torchvision, nddrify
        >>> p = nddrify.plan([torchvision.models.resnet18(), torchvision.models.resnet34()], points=2)
        >>> [lv.points[1].name for lv in p.levels]
        ['layer3', 'layer4']
    """
    # a plan needs shapes only: models given as specs are built on the meta device
    traced = trace(models, example_input=example_input, options=trace_options, spec_device="meta")
    kind = fusion if isinstance(fusion, FusionKind) else fusion_factory(fusion)
    shortcut_options = as_shortcut(shortcut)
    resize = resize or getattr(kind, "resize", None) is not None
    chosen, unpaired = _select(points, traced.traced, resize=resize)
    levels = []
    for index, level_points in enumerate(zip(*chosen)):
        fusion_points = tuple(
            FusionPoint(
                task=t.task,
                name=label,
                node=n.meta[QUALNAME],
                shape=point_shape(n),
                nonnegative=bool(n.meta.get(NONNEGATIVE)),
                layout=n.meta[LAYOUT],
                tokens=token_grid(n),
            )
            for t, (n, label) in zip(traced, level_points)
        )
        sizes = {p.spatial for p in fusion_points}
        if len(sizes) > 1 and not resize:
            detail = ", ".join(f"{p.task} {p.name!r} {p.describe_shape()}" for p in fusion_points)
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
    _warn_about(points, traced.traced, chosen)
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
        unpaired=unpaired,
    )
