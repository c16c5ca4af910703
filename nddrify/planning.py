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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import FusionConfigError, ModelsError, PointError, ShapeMismatchError
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
from .layers import NDDR, Shortcut, as_shortcut
from .specs import is_spec, load_spec
from .tracing import QUALNAME, TracedModel, trace_model

__all__ = [
    "Candidate",
    "FusionPoint",
    "FusionLevel",
    "Overhead",
    "Plan",
    "plan",
    "get_fusion_candidates",
    "Points",
]

#: ``"auto"`` (stage ends from the graph), ``"declared"`` (timm's ``feature_info``), an int N (the
#: last N auto points), names shared by all tasks, or one list per task.
Points = str | int | Sequence[str] | Sequence[Sequence[str]] | Mapping[str, Sequence[str]]

_RESERVED = {"x", "shortcut", "shared", "self", "torch"}


@dataclass(frozen=True)
class Candidate:
    """A node of one model that can be fused: a spine feature map.

    Attributes:
        name: the readable name (the stage module ending there, else the node name).
        node: the torchvision-style node name.
        shape: the feature map's (N, C, H, W) on the example input, whatever its layout.
        auto: whether ``points="auto"`` picks it.
    """

    name: str
    node: str
    shape: tuple[int, ...]
    auto: bool

    def __repr__(self) -> str:
        mark = "*" if self.auto else " "
        return f"{mark} {self.name:<28} {self.node:<32} {'×'.join(map(str, self.shape[1:]))}"


@dataclass(frozen=True)
class FusionPoint:
    """One task's feature map at one fusion level.

    ``shape`` is (N, C, H, W) whatever the layout; ``layout`` says how the tensor is stored
    (``"NHWC"`` for channels-last stages such as Swin's).
    """

    task: str
    name: str
    node: str
    shape: tuple[int, ...]
    nonnegative: bool
    layout: str = "NCHW"

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3])

    def describe_shape(self) -> str:
        """``"512×7×7"`` (C×H×W), with ``" NHWC"`` appended for channels-last maps."""
        text = "×".join(map(str, self.shape[1:]))
        return text if self.layout == "NCHW" else f"{text} {self.layout}"


@dataclass(frozen=True)
class FusionLevel:
    """The K points fused by one layer, and the parameters that layer adds."""

    index: int
    points: tuple[FusionPoint, ...]
    weights: int
    norm_params: int

    @property
    def parameters(self) -> int:
        return self.weights + self.norm_params


@dataclass(frozen=True)
class Overhead:
    """Parameters the fusion adds, absolute and relative to the original models.

    Attributes:
        fusion_weights: 1×1 conv weights of all fusion layers (and the shortcut).
        fusion_norm_params: affine parameters of their norms.
        model_params: parameters of each original model, in task order.
    """

    fusion_weights: int
    fusion_norm_params: int
    model_params: tuple[int, ...]
    kind: str = "NDDR"

    @property
    def fusion_params(self) -> int:
        return self.fusion_weights + self.fusion_norm_params

    @property
    def weights_per_task(self) -> float:
        return self.fusion_weights / len(self.model_params)

    @property
    def relative_per_task(self) -> float:
        """Fusion weights per task over the mean size of one original model."""
        return self.weights_per_task / (sum(self.model_params) / len(self.model_params))

    def __str__(self) -> str:
        what = "fusion 1×1 weights" if self.kind == "NDDR" else f"{self.kind} weights"
        return (
            f"{self.fusion_weights:,} {what} ({self.weights_per_task:,.0f} per task = "
            f"{100 * self.relative_per_task:.2f}% of one model's "
            f"{sum(self.model_params) // len(self.model_params):,}) + "
            f"{self.fusion_norm_params:,} norm parameters"
        )


@dataclass(frozen=True)
class Plan:
    """Where the tasks are fused and what it costs. Build it with :func:`plan`.

    Attributes:
        tasks: task names in order.
        levels: one :class:`FusionLevel` per fusion point.
        shortcut_weights, shortcut_norm_params: parameters of the NDDR-Shortcut (0 without it).
        model_params: parameter count of each original model.
    """

    tasks: tuple[str, ...]
    levels: tuple[FusionLevel, ...]
    model_params: tuple[int, ...]
    shortcut_weights: int = 0
    shortcut_norm_params: int = 0
    fusion_kind: str = "NDDR"
    _traced: tuple[TracedModel, ...] = field(default=(), repr=False, compare=False)

    def points(self, task: str) -> list[str]:
        """The node names fused in ``task``, in level order."""
        return [level.points[self.tasks.index(task)].node for level in self.levels]

    @property
    def overhead(self) -> Overhead:
        return Overhead(
            fusion_weights=sum(lv.weights for lv in self.levels) + self.shortcut_weights,
            fusion_norm_params=sum(lv.norm_params for lv in self.levels)
            + self.shortcut_norm_params,
            model_params=self.model_params,
            kind=self.fusion_kind,
        )

    def __repr__(self) -> str:
        lines = [
            f"Plan({len(self.tasks)} tasks: {', '.join(self.tasks)}; {len(self.levels)} levels)"
        ]
        for level in self.levels:
            for point in level.points:
                added = f"+{level.parameters:,} params" if point is level.points[0] else ""
                lines.append(
                    f"  level {level.index + 1}  {point.task:<10} {point.name:<24} "
                    f"{point.node:<32} {point.describe_shape():<19}{added}".rstrip()
                )
        if self.shortcut_weights:
            lines.append(
                f"  shortcut   +{self.shortcut_weights + self.shortcut_norm_params:,} params"
            )
        lines.append(f"  overhead: {self.overhead}")
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=f"NDDR fusion plan: {', '.join(self.tasks)}")
        table.add_column("level", justify="right")
        table.add_column("task")
        table.add_column("point")
        table.add_column("node")
        table.add_column("shape (C×H×W)")
        table.add_column("params added", justify="right")
        for level in self.levels:
            for point in level.points:
                first = point is level.points[0]
                table.add_row(
                    str(level.index + 1) if first else "",
                    point.task,
                    point.name,
                    point.node,
                    point.describe_shape(),
                    f"{level.parameters:,}" if first else "",
                    end_section=point is level.points[-1],
                )
        if self.shortcut_weights:
            params = self.shortcut_weights + self.shortcut_norm_params
            table.add_row("", "all", "shortcut", "", "", f"{params:,}")
        table.caption = str(self.overhead)
        return table


@dataclass(frozen=True)
class TaskModels:
    """The ``models`` argument resolved: task names, modules, their specs (or None), dict or not."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    specs: tuple[str | None, ...]
    as_dict: bool


def resolve_models(models: Any) -> TaskModels:
    """Validate ``models`` (a list or dict of ``nn.Module`` or spec strings such as
    ``"torchvision:vgg16"``) and name the tasks (``task0, task1, …`` for a list)."""
    if isinstance(models, TaskModels):
        return models
    if isinstance(models, nn.Module):
        raise ModelsError(
            "models must be a list or dict of at least two models, got a single "
            f"{type(models).__name__}; pass models=[model_a, model_b]."
        )
    if isinstance(models, Mapping):
        names, given, as_dict = [str(k) for k in models], list(models.values()), True
    elif isinstance(models, Iterable) and not isinstance(models, (str, bytes)):
        given = list(models)
        names, as_dict = [f"task{i}" for i in range(len(given))], False
    else:
        raise ModelsError(
            f"models must be a list or dict of nn.Module, got {type(models).__name__}."
        )
    if len(given) < 2:
        raise ModelsError(
            f"NDDR fuses at least two tasks, got {len(given)} model(s); pass two or more models."
        )
    specs = [m if is_spec(m) else None for m in given]
    modules = [load_spec(m) if is_spec(m) else m for m in given]
    for name, module in zip(names, modules):
        if not isinstance(module, nn.Module):
            raise ModelsError(
                f"task {name!r} is a {type(module).__name__}, not an nn.Module or a model spec "
                "such as 'torchvision:resnet50'."
            )
        if not name.isidentifier() or name in _RESERVED or name.startswith("nddr"):
            raise ModelsError(
                f"task name {name!r} cannot be used: task names become attribute names of the "
                "fused module, so use a Python identifier that is not 'x', 'shortcut', 'shared' and does "
                "not start with 'nddr' (e.g. 'seg', 'normal')."
            )
    placements = {}
    for name, module in zip(names, modules):
        tensor = next((t for t in (*module.parameters(), *module.buffers())), None)
        if tensor is not None:
            placements[name] = (tensor.device, tensor.dtype)
    if len(set(placements.values())) > 1:
        listing = ", ".join(
            f"{n}: {d}/{str(t).replace('torch.', '')}" for n, (d, t) in placements.items()
        )
        raise ModelsError(
            f"the models live on different devices or dtypes ({listing}); move them to one, "
            "e.g. model.to('cuda', torch.float32), before fusing."
        )
    return TaskModels(tuple(names), tuple(modules), tuple(specs), as_dict)


def _per_task_concrete_args(value: Any, names: Sequence[str]) -> list[Mapping[str, Any] | None]:
    """``concrete_args`` for each task: one dict for all, a list of dicts, or a dict task → dict."""
    if value is None:
        return [None] * len(names)
    if isinstance(value, Mapping):
        per_task = bool(value) and set(value) <= set(names)
        if per_task and all(v is None or isinstance(v, Mapping) for v in value.values()):
            return [value.get(n) for n in names]
        return [value] * len(names)
    if isinstance(value, Sequence) and len(value) == len(names):
        return list(value)
    raise ModelsError(
        f"concrete_args must be a dict (shared by all tasks), one dict per task ({len(names)} "
        f"tasks), or a dict task name → dict; got {type(value).__name__}."
    )


def trace_all(
    models: Any,
    *,
    example_input: torch.Tensor | None = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[TracedModel], bool]:
    """Trace every task (stage 1) after validating ``models``; returns (traced, models-was-a-dict)."""
    resolved = resolve_models(models)
    names, modules = resolved.names, resolved.modules
    concrete = _per_task_concrete_args(concrete_args, names)
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    if example_input is None:
        from .tracing import default_example_input

        example_input = default_example_input(modules[0])
    traced = []
    for name, module, args in zip(names, modules, concrete):
        traced.append(
            trace_model(
                module,
                task=name,
                example_input=example_input,
                leaf_modules=leaf_modules,
                autowrap_functions=autowrap_functions,
                concrete_args=args,
            )
        )
    return traced, resolved.as_dict


def _candidates(traced: TracedModel) -> tuple[list[fx.Node], list[fx.Node]]:
    graph = annotate(traced.graph)
    return spine(graph), stage_ends(graph)


def get_fusion_candidates(
    model: nn.Module, example_input: torch.Tensor | None = None, **trace_options: Any
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
    traced = trace_model(model, example_input=example_input, **trace_options)
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
        if missing:
            raise PointError(f"points is a dict but has no entry for task(s) {missing}.")
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


def _kind_name(fusion: Any) -> str:
    name = type(fusion).__name__.lstrip("_")
    if name == "NDDR" and (getattr(fusion, "rank", None) or getattr(fusion, "groups", 1) != 1):
        return f"NDDR(rank={fusion.rank})" if fusion.rank else f"NDDR(groups={fusion.groups})"
    return name


def build_plan(
    traced: Sequence[TracedModel],
    points: Points = "auto",
    *,
    fusion: Any = None,
    shortcut: Shortcut | None = None,
    resize: bool = False,
    model_params: Sequence[int] = (),
) -> Plan:
    """Make the :class:`Plan` for already traced models (what :func:`plan` does after tracing)."""
    fusion = fusion or NDDR()
    chosen = _select(points, traced)
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
        try:
            weights, norm_params = fusion.num_parameters([p.shape for p in fusion_points])
        except FusionConfigError as err:
            names = ", ".join(f"{p.task} {p.name!r}" for p in fusion_points)
            raise FusionConfigError(f"fusion level {index + 1} ({names}): {err}") from None
        levels.append(FusionLevel(index, fusion_points, weights, norm_params))
    short_w = short_n = 0
    level_shapes = [[p.shape for p in lv.points] for lv in levels]
    if shortcut is not None and levels:
        short_w, short_n = shortcut.num_parameters(level_shapes)
    elif hasattr(fusion, "stitched_levels") and levels:  # sluice's layer-stitch betas
        short_w = len(traced) * len(fusion.stitched_levels(level_shapes))
    return Plan(
        tasks=tuple(t.task for t in traced),
        levels=tuple(levels),
        model_params=tuple(model_params),
        shortcut_weights=short_w,
        shortcut_norm_params=short_n,
        fusion_kind=_kind_name(fusion),
        _traced=tuple(traced),
    )


def plan(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str] | TaskModels,
    points: Points = "auto",
    *,
    example_input: torch.Tensor | None = None,
    fusion: Any = None,
    shortcut: bool | Shortcut = False,
    resize: bool = False,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Plan:
    """Trace the models and decide where to fuse them, without building anything.

    Args:
        models: two or more models, as a list (tasks ``task0, task1, …``) or a dict (named tasks);
            a model may be a spec string such as ``"torchvision:vgg16"`` or ``"timm:resnet50"``.
        points: ``"auto"`` (stage ends found from the graph), ``"declared"`` (the stage modules
            a timm model declares in ``feature_info``), an int N (the last N auto points), a list
            of module or node names shared by every task, a list of per-task lists, or a dict
            task → list.
        example_input: input for shape propagation (default 1×3×224×224 or the model's own size).
        fusion: the fusion layer factory used for the parameter count (default :class:`NDDR`).
        shortcut: include an NDDR-Shortcut (``True`` or :class:`Shortcut` options).
        resize: allow points whose H×W differ across tasks (the fusion layer resizes).
        leaf_modules, autowrap_functions, concrete_args: tracing options, see
            :func:`nddrify.trace_model`; ``concrete_args`` may be one dict per task.

    Example:
        >>> import torchvision, nddrify
        >>> p = nddrify.plan([torchvision.models.resnet18(), torchvision.models.resnet34()], points=2)
        >>> [lv.points[1].name for lv in p.levels]
        ['layer3', 'layer4']
    """
    resolved = resolve_models(models)
    traced, _ = trace_all(
        resolved,
        example_input=example_input,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        concrete_args=concrete_args,
    )
    modules = resolved.modules
    return build_plan(
        traced,
        points,
        fusion=fusion,
        shortcut=as_shortcut(shortcut),
        resize=resize,
        model_params=[sum(p.numel() for p in m.parameters()) for m in modules],
    )
