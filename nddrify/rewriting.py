"""Stage 3 of 3: copy the K traced graphs into one GraphModule with fusion calls between them.

Each task's nodes are copied under a task prefix (``seg_features_4`` calls ``self.seg.features[4]``)
and interleaved level by level: every task runs up to its level-l point, one call to the level's
fusion layer takes the K feature maps, and each task continues from its own fused map. The fused
value replaces the original for all of the point's users, skip connections included.

When a model's train- and eval-mode graphs differ (``self.training`` branches), both fused graphs
are built and :class:`DualModeGraphModule` switches between them in ``.train()`` / ``.eval()``.

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
from torch.fx.graph_module import _copy_attr

from .planning import Plan
from .tracing import QUALNAME

__all__ = ["rewrite", "DualModeGraphModule", "PLAN_META_KEY", "TASK_META_KEY"]

#: ``fused.meta`` key holding the :class:`~nddrify.Plan` (without traces).
PLAN_META_KEY = "nddrify_plan"
#: ``node.meta`` key naming the task a copied node belongs to.
TASK_META_KEY = "nddrify_task"

_CLASS_NAME = "NDDRFusedModel"


class DualModeGraphModule(fx.GraphModule):
    """A GraphModule with one graph for training and one for evaluation, switched by ``train()``."""

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph) -> None:
        super().__init__(root, train_graph, _CLASS_NAME)
        for node in eval_graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _copy_attr(root, self, node.target)
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def __deepcopy__(self, memo: dict[int, Any]) -> DualModeGraphModule:
        root = nn.Module()
        for name, child in self.named_children():
            root.add_module(name, copy.deepcopy(child, memo))
        copied = DualModeGraphModule(
            root, copy.deepcopy(self.train_graph, memo), copy.deepcopy(self.eval_graph, memo)
        )
        copied.meta = copy.deepcopy(self.meta, memo)
        return copied.train(self.training)

    def train(self, mode: bool = True) -> DualModeGraphModule:
        super().train(mode)
        wanted = self.train_graph if mode else self.eval_graph
        if self.graph is not wanted:
            self.graph = wanted
        return self


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _task_graph(plan: Plan, task: int, train: bool) -> fx.Graph:
    traced = plan._traced[task]
    if train and traced.train_graph_module is not None:
        return traced.train_graph_module.graph
    return traced.graph


def _build_graph(plan: Plan, shortcut: bool, as_dict: bool, train: bool) -> fx.Graph:
    graph = fx.Graph()
    graphs = [_task_graph(plan, k, train) for k in range(len(plan.tasks))]
    first_input = next(n for n in graphs[0].nodes if n.op == "placeholder")
    image = graph.placeholder("x")
    image.meta = dict(first_input.meta)

    envs: list[dict[fx.Node, object]] = [{} for _ in plan.tasks]
    segments: list[list[list[fx.Node]]] = []
    points: list[list[fx.Node]] = []
    for k, (task, task_graph) in enumerate(zip(plan.tasks, graphs)):
        by_name = {n.meta.get(QUALNAME): n for n in task_graph.nodes}
        task_points = [by_name[name] for name in plan.points(task)]
        points.append(task_points)
        split: list[list[fx.Node]] = [[] for _ in range(len(task_points) + 1)]
        level = 0
        for node in task_graph.nodes:
            if node.op == "placeholder":
                envs[k][node] = image
            elif node.op != "output":
                split[level].append(node)
            if level < len(task_points) and node is task_points[level]:
                level += 1
        segments.append(split)

    fused_levels: list[list[fx.Node]] = []
    for level in range(len(plan.levels) + 1):
        for k, task in enumerate(plan.tasks):
            env = envs[k]
            for node in segments[k][level]:
                target = node.target
                if node.op in ("call_module", "get_attr"):
                    target = f"{task}.{node.target}"
                new = graph.create_node(
                    node.op,
                    target,
                    fx.map_arg(node.args, env.__getitem__),
                    fx.map_arg(node.kwargs, env.__getitem__),
                    name=f"{task}_{_identifier(node.meta.get(QUALNAME, node.name))}",
                    type_expr=node.type,
                )
                new.meta = {**node.meta, TASK_META_KEY: task}
                env[node] = new
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
            envs[k][points[k][level]] = item
            outputs.append(item)
        fused_levels.append(outputs)
        if shortcut and level == len(plan.levels) - 1:
            call = graph.call_module("shortcut", (tuple(tuple(lv) for lv in fused_levels),))
            for k, task in enumerate(plan.tasks):
                item = graph.create_node(
                    "call_function", operator.getitem, (call, k), name=f"{task}_shortcut"
                )
                item.meta = dict(outputs[k].meta)
                envs[k][points[k][level]] = item

    results = []
    for k, task_graph in enumerate(graphs):
        output = next(n for n in task_graph.nodes if n.op == "output")
        results.append(fx.map_arg(output.args[0], envs[k].__getitem__))
    graph.output(dict(zip(plan.tasks, results)) if as_dict else tuple(results))
    graph.lint()
    return graph


def rewrite(
    plan: Plan,
    fusion_layers: Sequence[nn.Module],
    shortcut_layer: nn.Module | None = None,
    *,
    as_dict: bool = False,
) -> fx.GraphModule:
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
    if any(t.train_graph_module is not None for t in plan._traced):
        train_graph = _build_graph(plan, has_shortcut, as_dict, train=True)
        fused: fx.GraphModule = DualModeGraphModule(root, train_graph, eval_graph)
    else:
        fused = fx.GraphModule(root, eval_graph, _CLASS_NAME)
    for task in plan.tasks:
        # GraphModule copies only the modules the graph calls, into plain containers; keep each
        # task's whole model instead (fused.seg is the seg model's class, fused.seg(x) runs it).
        setattr(fused, task, getattr(root, task))
    fused.meta[PLAN_META_KEY] = dataclasses.replace(plan, _traced=())
    fused.training = mode  # not .train(mode): that would overwrite the tasks' own submodule flags
    if isinstance(fused, DualModeGraphModule):
        fused.graph = fused.train_graph if mode else fused.eval_graph
    return fused
