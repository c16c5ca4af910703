"""Hard parameter sharing, the paper's multi-task baseline ("Mul."), from the same models.

``share(models, split=...)`` runs ONE trunk (task 0's weights, or the tasks' average) up to the
split point, then every task's own copy of the rest of its model. The paper's Mul. shares all
conv layers and splits after the last one (fc6 onwards task-specific); ``split="auto"`` takes the
last automatic fusion point, which is that place on VGG-16 (``features.30``, pool5).

The single-task baseline needs no code: it is the original models, unchanged.

Example:
    >>> import torch, torchvision, nddrify
    >>> shared = nddrify.share({"seg": torchvision.models.vgg11(), "depth": torchvision.models.vgg11()})
    >>> sorted(name for name, _ in shared.named_children())
    ['depth', 'seg', 'shared']
    >>> out = shared(torch.randn(1, 3, 64, 64))
    >>> sorted(out)
    ['depth', 'seg']
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _copy_attr

from .errors import ModelsError
from .planning import Plan, build_plan, resolve_models, trace_all
from .rewriting import (
    PLAN_META_KEY,
    FusedGraphModule,
    copy_nodes,
    finish_graph,
    split_at_points,
    start_graph,
)
from .tracing import QUALNAME

__all__ = ["share", "SHARED"]

#: Name of the trunk module in a hard-sharing model.
SHARED = "shared"


class _NoFusion:
    """Plans a split point: nothing is inserted there, so nothing is added."""

    def num_parameters(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
        return (0, 0)


def _signature(node: fx.Node, module: nn.Module) -> tuple[Any, ...]:
    kind = type(module.get_submodule(node.target)) if node.op == "call_module" else None
    return (node.meta.get(QUALNAME), node.op, str(node.target), kind)


def _check_same_trunk(plan: Plan, trunks: Sequence[Sequence[fx.Node]]) -> None:
    reference = [_signature(n, plan._traced[0].module) for n in trunks[0]]
    for traced, trunk in zip(plan._traced[1:], trunks[1:]):
        mine = [_signature(n, traced.module) for n in trunk]
        if mine != reference:
            first = next(
                (i for i, (a, b) in enumerate(zip(mine, reference)) if a != b),
                min(len(mine), len(reference)),
            )
            where = (mine if first < len(mine) else reference)[first][0]
            raise ModelsError(
                f"hard sharing needs the same architecture up to the split point; task "
                f"{traced.task!r} differs from task {plan.tasks[0]!r} at node {where!r}. Choose "
                "an earlier split, or fuse the models with nddrify.fuse instead."
            )


def _trunk_weights(plan: Plan, trunk_nodes: Sequence[fx.Node], mode: str) -> nn.Module:
    shared = copy.deepcopy(plan._traced[0].module)
    if mode == "first":
        return shared
    if mode != "average":
        raise ModelsError(f"trunk={mode!r} is not valid; use 'first' or 'average'.")
    prefixes = [str(n.target) for n in trunk_nodes if n.op in ("call_module", "get_attr")]
    states = [t.module.state_dict() for t in plan._traced]
    averaged = {}
    for key, value in states[0].items():
        inside = any(key == p or key.startswith(p + ".") for p in prefixes)
        if inside and value.is_floating_point():
            averaged[key] = sum(s[key] for s in states) / len(states)
    shared.load_state_dict(averaged, strict=False)
    return shared


def _graph(plan: Plan, as_dict: bool, train: bool) -> fx.Graph:
    def task_graph(k: int) -> fx.Graph:
        traced = plan._traced[k]
        if train and traced.train_graph_module is not None:
            return traced.train_graph_module.graph
        return traced.graph

    graphs = [task_graph(k) for k in range(len(plan.tasks))]
    graph, image = start_graph(graphs[0])
    segments = [split_at_points(g, plan.points(t)) for g, t in zip(graphs, plan.tasks)]
    trunk_env: dict[fx.Node, Any] = {n: image for n in graphs[0].nodes if n.op == "placeholder"}
    copy_nodes(graph, segments[0][0], SHARED, trunk_env)
    envs = []
    for k, task in enumerate(plan.tasks):
        env: dict[fx.Node, Any] = {n: image for n in graphs[k].nodes if n.op == "placeholder"}
        for own, reference in zip(segments[k][0], segments[0][0]):
            env[own] = trunk_env[reference]  # every task reads the one trunk
        copy_nodes(graph, segments[k][1], task, env)
        envs.append(env)
    return finish_graph(graph, graphs, envs, plan.tasks, as_dict)


def share(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    split: str | int | Sequence[str] = "auto",
    *,
    trunk: Literal["first", "average"] = "first",
    example_input: torch.Tensor | None = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> FusedGraphModule:
    """Hard parameter sharing: one trunk up to ``split``, then each task's own layers.

    Args:
        models: two or more models with the same architecture up to the split (heads may differ).
        split: ``"auto"`` (the last automatic fusion point), a module or node name, or an int N
            (the N-th automatic point from the end).
        trunk: ``"first"`` (task 0's weights) or ``"average"`` (the mean of the tasks' trunks).
        example_input, leaf_modules, autowrap_functions, concrete_args: as for ``nddrify.fuse``.

    Returns:
        A GraphModule with the same output convention as ``fuse`` (tuple, or dict for a dict);
        ``.shared`` is the trunk, ``.<task>`` each task's remaining layers.
    """
    resolved = resolve_models(models)
    traced, _ = trace_all(
        resolved,
        example_input=example_input,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        concrete_args=concrete_args,
    )
    if split == "auto":
        split = 1
    if isinstance(split, int):
        last = build_plan(traced, split, fusion=_NoFusion())  # the last N automatic points
        points: Any = [[last.levels[0].points[k].node] for k in range(len(traced))]
    else:
        points = [split] if isinstance(split, str) else list(split)
    plan = build_plan(
        traced,
        points,
        fusion=_NoFusion(),
        model_params=[sum(p.numel() for p in m.parameters()) for m in resolved.modules],
    )
    if len(plan.levels) != 1:
        raise ModelsError(f"split must name one point, got {len(plan.levels)}: {split!r}.")
    segments = [split_at_points(t.graph, plan.points(t.task)) for t in traced]
    _check_same_trunk(plan, [s[0] for s in segments])

    root = nn.Module()
    root.add_module(SHARED, _trunk_weights(plan, segments[0][0], trunk))
    for task, t in zip(plan.tasks, traced):
        root.add_module(task, copy.deepcopy(t.module))
    eval_graph = _graph(plan, resolved.as_dict, train=False)
    graphs = [eval_graph]
    if any(t.train_graph_module is not None for t in traced):
        graphs = [_graph(plan, resolved.as_dict, train=True), eval_graph]
    # Keep only the modules the graphs call: each task's trunk copy is not part of the model.
    used = fx.GraphModule(root, graphs[0])
    for graph in graphs[1:]:
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                _copy_attr(root, used, node.target)
    shared = FusedGraphModule(used, *graphs)
    shared.meta[PLAN_META_KEY] = dataclasses.replace(plan, _traced=())
    training = traced[0].module.training
    shared.training = training
    shared._select_graph(training)
    return shared
