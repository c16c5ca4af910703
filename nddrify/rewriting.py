"""Stage 3 of 3: copy the K traced graphs into one GraphModule with fusion calls between them.

Each task's nodes are copied under a task prefix (``seg_features_4`` calls ``self.seg.features[4]``)
and interleaved level by level: every task runs up to its level-l point, one call to the level's
fusion layer takes the K feature maps, and each task continues from its own fused map. The fused
value replaces the original for all of the point's users, skip connections included.

When a model's train- and eval-mode graphs differ (``self.training`` branches), both fused graphs
are built and :class:`FusedGraphModule` switches between them in ``.train()`` / ``.eval()``.

Example:
    >>> import torch, torchvision, nddrify
    >>> models = {"seg": torchvision.models.vgg11(), "depth": torchvision.models.vgg11()}
    >>> fused = nddrify.fuse(models, points=["features.2"])
    >>> "nddr1 = self.nddr1(seg_features_2, depth_features_2)" in fused.code
    True
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import re
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from .planning import Plan
from .tracing import QUALNAME

__all__ = [
    "rewrite",
    "FusedGraphModule",
    "split_at_points",
    "copy_nodes",
    "start_graph",
    "finish_graph",
    "PLAN_META_KEY",
    "TASK_META_KEY",
]

#: ``fused.meta`` key holding the :class:`~nddrify.Plan` (without traces).
PLAN_META_KEY = "nddrify_plan"
#: ``node.meta`` key naming the task a copied node belongs to.
TASK_META_KEY = "nddrify_task"

_CLASS_NAME = "NDDRFusedModel"


class FusedGraphModule(fx.GraphModule):
    """The fused model: a GraphModule that keeps each task's whole model and its plan.

    When a task's train- and eval-mode graphs differ (``self.training`` branches), it holds both
    (``train_graph``, ``eval_graph``) and ``train()`` / ``eval()`` switch between them; otherwise
    both attributes are ``None`` and ``graph`` is the only graph. Deep copies and pickles keep the
    weights, both graphs, the mode and ``meta`` (the plan).
    """

    #: the class name of the generated code (``print(fused.code)``)
    generated_name = _CLASS_NAME

    def __init__(
        self, root: nn.Module, graph: fx.Graph, eval_graph: fx.Graph | None = None
    ) -> None:
        super().__init__(root, graph, self.generated_name)
        # GraphModule copies only the modules the graph calls, into plain containers; keep the
        # whole modules instead (fused.seg is the seg model's own class; fused.seg(x) runs it
        # alone, and modules only the eval graph calls are there too).
        for name, child in root.named_children():
            setattr(self, name, child)
        self.train_graph = graph if eval_graph is not None else None
        self.eval_graph = eval_graph

    def train(self, mode: bool = True) -> FusedGraphModule:
        super().train(mode)
        self._select_graph(mode)
        return self

    def _select_graph(self, mode: bool) -> None:
        if self.eval_graph is not None:
            wanted = self.train_graph if mode else self.eval_graph
            if self.graph is not wanted:
                self.graph = wanted

    def _graphs(self) -> tuple[fx.Graph, ...]:
        """The constructor's graphs: ``(train, eval)`` when they differ, else ``(graph,)``."""
        if self.eval_graph is not None:
            return (self.train_graph, self.eval_graph)
        return (self.graph,)

    def _init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beyond the root and the graphs (for subclasses)."""
        return {}

    def _own_class(self) -> type[FusedGraphModule]:
        # fx instantiates a per-instance subclass (qualname ...GraphModuleImpl, renamed to the
        # generated name); rebuild the class it wraps.
        return next(c for c in type(self).__mro__ if not c.__qualname__.endswith("GraphModuleImpl"))

    def __deepcopy__(self, memo: dict[int, Any]) -> FusedGraphModule:
        return _rebuild(
            copy.deepcopy(dict(self.named_children()), memo),
            *copy.deepcopy(self._graphs(), memo),
            meta=copy.deepcopy(self.meta, memo),
            training=self.training,
            cls=self._own_class(),
            kwargs=copy.deepcopy(self._init_kwargs(), memo),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_from_pickle,
            (
                dict(self.named_children()),
                tuple(_portable(g) for g in self._graphs()),
                self.meta,
                self.training,
                self._own_class(),
                self._init_kwargs(),
            ),
        )


def _portable(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose node meta holds plain values only (ShapeProp's TensorMetadata does
    not survive torch.save's pickler)."""
    copied = copy.deepcopy(graph)
    for node in copied.nodes:
        node.meta = {k: v for k, v in node.meta.items() if isinstance(v, (str, bool, int, float))}
    return copied


def _rebuild(
    children: dict[str, nn.Module],
    graph: fx.Graph,
    eval_graph: fx.Graph | None = None,
    *,
    meta: dict[str, Any],
    training: bool,
    cls: type[FusedGraphModule] = FusedGraphModule,
    kwargs: dict[str, Any] | None = None,
) -> FusedGraphModule:
    root = nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    fused = cls(root, graph, eval_graph, **(kwargs or {}))
    fused.meta = meta
    fused.training = training  # not .train(): keep every submodule's own flag
    fused._select_graph(training)
    return fused


def _rebuild_from_pickle(
    children: dict[str, nn.Module],
    graphs: tuple[fx.Graph, ...],
    meta: dict,
    training: bool,
    cls: type[FusedGraphModule] = FusedGraphModule,
    kwargs: dict[str, Any] | None = None,
) -> FusedGraphModule:
    return _rebuild(children, *graphs, meta=meta, training=training, cls=cls, kwargs=kwargs)


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _task_graph(plan: Plan, task: int, train: bool) -> fx.Graph:
    traced = plan._traced[task]
    if train and traced.train_graph_module is not None:
        return traced.train_graph_module.graph
    return traced.graph


def split_at_points(task_graph: fx.Graph, point_names: Sequence[str]) -> list[list[fx.Node]]:
    """The graph's nodes (placeholders and output excluded) in len(points) + 1 segments: segment l
    ends with point l; the last segment runs to the output."""
    by_name = {n.meta.get(QUALNAME): n for n in task_graph.nodes}
    points = [by_name[name] for name in point_names]
    segments: list[list[fx.Node]] = [[] for _ in range(len(points) + 1)]
    level = 0
    for node in task_graph.nodes:
        if node.op not in ("placeholder", "output"):
            segments[level].append(node)
        if level < len(points) and node is points[level]:
            level += 1
    return segments


def copy_nodes(
    graph: fx.Graph, nodes: Sequence[fx.Node], prefix: str, env: dict[fx.Node, Any]
) -> None:
    """Copy ``nodes`` into ``graph``: module and attribute targets under ``prefix.``, node names
    ``prefix_<torchvision name>``, arguments through ``env`` (which records the copies)."""
    for node in nodes:
        target = node.target
        if node.op in ("call_module", "get_attr"):
            target = f"{prefix}.{node.target}"
        new = graph.create_node(
            node.op,
            target,
            fx.map_arg(node.args, env.__getitem__),
            fx.map_arg(node.kwargs, env.__getitem__),
            name=f"{prefix}_{_identifier(node.meta.get(QUALNAME, node.name))}",
            type_expr=node.type,
        )
        new.meta = {**node.meta, TASK_META_KEY: prefix}
        env[node] = new


def start_graph(first_task_graph: fx.Graph) -> tuple[fx.Graph, fx.Node]:
    """A new graph with the single image input ``x``."""
    graph = fx.Graph()
    first_input = next(n for n in first_task_graph.nodes if n.op == "placeholder")
    image = graph.placeholder("x")
    image.meta = dict(first_input.meta)
    return graph, image


def finish_graph(
    graph: fx.Graph,
    task_graphs: Sequence[fx.Graph],
    envs: Sequence[dict[fx.Node, Any]],
    tasks: Sequence[str],
    as_dict: bool,
) -> fx.Graph:
    """Return every task's original output (through its env): a tuple, or a dict by task."""
    results = []
    for task_graph, env in zip(task_graphs, envs):
        output = next(n for n in task_graph.nodes if n.op == "output")
        results.append(fx.map_arg(output.args[0], env.__getitem__))
    graph.output(dict(zip(tasks, results)) if as_dict else tuple(results))
    graph.lint()
    return graph


def _is_inplace(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(module.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False))
    return (
        node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
    )


def _guard_inplace(
    graph: fx.Graph, item: fx.Node, point: fx.Node, plan: Plan, task: int
) -> fx.Node:
    """The fused map for ``point``'s users: a clone when one of them works in place (the fusion
    layer may need its output for backward, e.g. after its ReLU)."""
    if not any(_is_inplace(user, plan._traced[task].module) for user in point.users):
        return item
    clone = graph.call_method("clone", (item,))
    clone.meta = dict(item.meta)
    return clone


def _build_graph(plan: Plan, shortcut: bool, as_dict: bool, train: bool) -> fx.Graph:
    graphs = [_task_graph(plan, k, train) for k in range(len(plan.tasks))]
    graph, image = start_graph(graphs[0])
    envs: list[dict[fx.Node, Any]] = []
    segments: list[list[list[fx.Node]]] = []
    points: list[list[fx.Node]] = []
    for task, task_graph in zip(plan.tasks, graphs):
        envs.append({n: image for n in task_graph.nodes if n.op == "placeholder"})
        split = split_at_points(task_graph, plan.points(task))
        segments.append(split)
        points.append([segment[-1] for segment in split[:-1]])

    fused_levels: list[list[fx.Node]] = []
    for level in range(len(plan.levels) + 1):
        for k, task in enumerate(plan.tasks):
            copy_nodes(graph, segments[k][level], task, envs[k])
        if level == len(plan.levels):
            break
        features = [envs[k][points[k][level]] for k in range(len(plan.tasks))]
        call = graph.call_module(f"nddr{level + 1}", tuple(features))
        outputs = []
        for k, point in enumerate(plan.levels[level].points):
            item = graph.create_node(
                "call_function",
                operator.getitem,
                (call, k),
                name=f"{point.task}_{_identifier(point.name)}_nddr",
            )
            item.meta = {
                "tensor_meta": features[k].meta.get("tensor_meta"),
                TASK_META_KEY: point.task,
            }
            outputs.append(item)
            envs[k][points[k][level]] = _guard_inplace(graph, item, points[k][level], plan, k)
        fused_levels.append(outputs)
        if shortcut and level == len(plan.levels) - 1:
            call = graph.call_module("shortcut", (tuple(tuple(lv) for lv in fused_levels),))
            for k, task in enumerate(plan.tasks):
                item = graph.create_node(
                    "call_function", operator.getitem, (call, k), name=f"{task}_shortcut"
                )
                item.meta = dict(outputs[k].meta)
                envs[k][points[k][level]] = _guard_inplace(graph, item, points[k][level], plan, k)
    return finish_graph(graph, graphs, envs, plan.tasks, as_dict)


def rewrite(
    plan: Plan,
    fusion_layers: Sequence[nn.Module],
    shortcut_layer: nn.Module | None = None,
    *,
    as_dict: bool = False,
) -> FusedGraphModule:
    """Build the fused GraphModule for a plan made from traced models.

    Args:
        plan: a :class:`~nddrify.Plan` from :func:`nddrify.plan` (it carries the traces).
        fusion_layers: one module per level, called with the K feature maps, returning K maps.
        shortcut_layer: optional module called with all levels' fused maps after the last level.
        as_dict: return ``{task: output}`` instead of a tuple in task order.
    """
    if len(fusion_layers) != len(plan.levels):
        raise ValueError(f"need {len(plan.levels)} fusion layers, got {len(fusion_layers)}")
    root = nn.Module()
    for task, traced in zip(plan.tasks, plan._traced):
        # The fused model owns copies of the weights; submodule train/eval flags come along.
        root.add_module(task, copy.deepcopy(traced.module))
    mode = plan._traced[0].module.training
    for index, layer in enumerate(fusion_layers):
        layer.train(mode)
        root.add_module(f"nddr{index + 1}", layer)
    if shortcut_layer is not None:
        root.add_module("shortcut", shortcut_layer.train(mode))

    has_shortcut = shortcut_layer is not None
    eval_graph = _build_graph(plan, has_shortcut, as_dict, train=False)
    graphs = [eval_graph]
    if any(t.train_graph_module is not None for t in plan._traced):
        graphs = [_build_graph(plan, has_shortcut, as_dict, train=True), eval_graph]
    return _rebuild(
        dict(root.named_children()),
        *graphs,
        meta={PLAN_META_KEY: dataclasses.replace(plan, _traced=())},
        training=mode,
    )
