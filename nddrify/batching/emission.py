"""Building the batched fx graph from the fused graph.

The fused graph is read as an ordered list of *stages* (a segment of the task graphs between two
fusion levels: the nodes every task shares, and each task's own nodes) and *fusions* (a fusion
layer's call, with the ``getitem`` nodes that unpack its outputs). :class:`BatchedGraphBuilder`
then emits, stage by stage, each position's K aligned task nodes once for all tasks where
:mod:`~nddrify.batching.rules` finds a batched form and once per task otherwise, and each fusion
layer as one call on task-stacked maps where it can; it copies the modules the new graph calls
and records a :class:`~nddrify.batching.report.BatchingReport`. :func:`~nddrify.batching.batch_tasks`
wraps its graphs in a :class:`~nddrify.batching.BatchedFusedModel`.

Example:
    >>> import nddrify
    >>> from torch import nn
    >>> from nddrify.batching.emission import BatchedGraphBuilder
    >>> def cnn():
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> fused = nddrify.fuse({"a": cnn(), "b": cnn()}, points=["1"]).eval()
    >>> builder = BatchedGraphBuilder(fused, ("a", "b"), {}, "auto", dry_run=True)
    >>> graph = builder.build(fused.graph)
    >>> [node.name for node in graph.nodes if node.op == "call_module"]
    ['batched_0', 'batched_1', 'nddr1', 'batched_2']
    >>> builder.report().batched_operations
    3
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..meta import JUNCTION_META_KEY, QUALNAME, TASK_META_KEY, is_inplace
from ..rewriting.emit import identifier
from .analysis import tensor_meta
from .modules import cat_task_channels, wide_module
from .registry import batched_form
from .report import BatchingReport, FusionReport, PerTaskOperation, StageReport
from .rules import (
    Placement,
    aligned_count,
    arg_groups,
    batched_rule,
    called_module,
    fusion_reason,
    node_difference,
    relative_target,
)

__all__ = ["BatchedGraphBuilder"]

_WIDE_ROOT = "batched"  # where the task-batched modules live: batched.<path in the task model>


# ----------------------------------------------------------------------------------------------
# Reading the fused graph


@dataclass
class _Stage:
    index: int
    common: list[fx.Node]
    nodes: dict[str, list[fx.Node]]


@dataclass
class _Fusion:
    call: fx.Node
    glue: list[fx.Node]  # getitem of the call (and clones of those), in graph order


def _split_graph(graph: fx.Graph, tasks: Sequence[str]) -> list[Any]:
    """The fused graph's nodes as an ordered list of stages and junctions, read from the marks
    the rewriter leaves (``meta[JUNCTION_META_KEY]`` on a junction's call and the items and
    guards after it; ``meta[TASK_META_KEY]`` on every task node)."""
    items: list[Any] = []
    stages = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if JUNCTION_META_KEY in node.meta:
            if node.op == "call_module":
                items.append(_Fusion(node, []))
            else:
                items[-1].glue.append(node)
            continue
        if not items or not isinstance(items[-1], _Stage):
            items.append(_Stage(stages, [], {t: [] for t in tasks}))
            stages += 1
        task = node.meta.get(TASK_META_KEY)
        (items[-1].nodes[task] if task in tasks else items[-1].common).append(node)
    return items


def _qualname(node: fx.Node) -> str:
    return str(node.meta.get(QUALNAME, node.name))


# ----------------------------------------------------------------------------------------------
# Building the batched graph


class BatchedGraphBuilder:
    """Builds one batched graph from one fused graph; module copies are shared between the
    train- and eval-mode graphs through ``modules``."""

    def __init__(
        self,
        fused: nn.Module,
        tasks: Sequence[str],
        modules: dict[str, nn.Module],
        conv_mode: str,
        dry_run: bool,
    ) -> None:
        self.fused = fused
        self.tasks = tuple(tasks)
        self.k = len(tasks)
        self.modules = modules  # path in the batched model → module
        self.conv_mode = conv_mode
        self.dry_run = dry_run
        self.graph = fx.Graph()
        # fused node → its value here: ("shared", g) the same for all tasks, ("task", g) its
        # task's own, ("wide", g, k) slice k of the task-stacked value g
        self.env: dict[fx.Node, tuple[Any, ...]] = {}
        self.roles: dict[fx.Node, Any] = {}
        self.views: dict[tuple[fx.Node, int], fx.Node] = {}
        self.unflattened: dict[fx.Node, fx.Node] = {}
        self.stacked: dict[tuple[fx.Node, ...], fx.Node] = {}
        self.stage_reports: list[StageReport] = []
        self.fusion_reports: list[FusionReport] = []

    # values ----------------------------------------------------------------------------------

    def to_task(self, node: Any) -> Any:
        """The graph value of one fused node for its own task."""
        if not isinstance(node, fx.Node):
            return node
        value = self.env[node]
        if value[0] != "wide":
            return value[1]
        wide, index = value[1], value[2]
        if (wide, index) not in self.views:
            if wide not in self.unflattened:
                self.unflattened[wide] = self.graph.create_node(
                    "call_method", "unflatten", (wide, 1, (self.k, -1)), name=f"{wide.name}_tasks"
                )
            self.views[(wide, index)] = self.graph.create_node(
                "call_function", torch.select, (self.unflattened[wide], 1, index), name=node.name
            )
        return self.views[(wide, index)]

    def to_wide(self, nodes: Sequence[fx.Node]) -> fx.Node:
        """One task-stacked graph value for the K tasks' nodes."""
        if self.is_wide(nodes):
            return self.env[nodes[0]][1]
        key = tuple(nodes)
        if key not in self.stacked:
            name = f"{_WIDE_ROOT}_{identifier(_qualname(nodes[0]))}"
            self.stacked[key] = self.graph.create_node(
                "call_function", torch.cat, ([self.to_task(n) for n in nodes], 1), name=name
            )
        return self.stacked[key]

    def is_wide(self, nodes: Sequence[fx.Node]) -> bool:
        """Whether the K nodes are the K slices of one task-stacked value."""
        first = self.env[nodes[0]]
        return all(
            self.env[n][0] == "wide" and self.env[n][1] is first[1] and self.env[n][2] == k
            for k, n in enumerate(nodes)
        )

    def is_shared(self, nodes: Sequence[fx.Node]) -> bool:
        return all(
            self.env[n][0] == "shared" and self.env[n][1] is self.env[nodes[0]][1] for n in nodes
        )

    # modules ---------------------------------------------------------------------------------

    def copy_module(self, path: str) -> None:
        """Copy the fused model's module or attribute at ``path`` (per-task and common nodes)."""
        if path in self.modules or self.dry_run:
            return
        self.modules[path] = copy.deepcopy(self.fused.get_submodule(path))

    def copy_attribute(self, path: str) -> None:
        if path in self.modules or self.dry_run:
            return
        owner, _, name = path.rpartition(".")
        value = getattr(self.fused.get_submodule(owner) if owner else self.fused, name)
        self.modules[path] = copy.deepcopy(value)

    # nodes -----------------------------------------------------------------------------------

    def emit_per_task(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self.copy_module(str(node.target))
        elif node.op == "get_attr":
            self.copy_attribute(str(node.target))
        args = fx.map_arg(node.args, self.to_task)
        kwargs = fx.map_arg(node.kwargs, self.to_task)
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        new.meta = dict(node.meta)
        self.env[node] = ("task", new)
        if (
            node.args
            and isinstance(node.args[0], fx.Node)
            and is_inplace(node, called_module(self.fused, node))
        ):
            # an in-place op changed this value: stacked copies made from it are stale
            changed = node.args[0]
            self.stacked = {key: v for key, v in self.stacked.items() if changed not in key}

    def emit_common(self, node: fx.Node) -> None:
        self.emit_per_task(node)
        self.env[node] = ("shared", self.env[node][1])

    def placement(self, nodes: Sequence[fx.Node]) -> Placement:
        """Where the K nodes' values are: one shared value, one task-stacked value, per task."""
        if self.is_shared(nodes):
            return "shared"
        return "stacked" if self.is_wide(nodes) else "per_task"

    def rule(self, nodes: Sequence[fx.Node]) -> tuple[str | None, str]:
        """How the K identical nodes run together (see :func:`~.rules.batched_rule`)."""
        return batched_rule(nodes, called_module(self.fused, nodes[0]), self.placement)

    # batched nodes ---------------------------------------------------------------------------

    def map_args(self, nodes: Sequence[fx.Node], convert: Callable[[list[fx.Node]], Any]) -> Any:
        """``nodes[0]``'s (args, kwargs) with each node argument replaced by ``convert`` of the
        K tasks' corresponding arguments."""
        per_task = [pytree.tree_flatten((n.args, n.kwargs)) for n in nodes]
        leaves, spec = per_task[0]
        mapped = [
            convert([p[0][i] for p in per_task]) if isinstance(leaf, fx.Node) else leaf
            for i, leaf in enumerate(leaves)
        ]
        return pytree.tree_unflatten(mapped, spec)

    def wide_module_path(self, nodes: Sequence[fx.Node]) -> str:
        """Create (once) the batched module for the K nodes' modules; its path."""
        relative = relative_target(nodes[0], self.tasks[0])
        path = f"{_WIDE_ROOT}.{relative}"
        if path in self.modules or self.dry_run:
            return path
        sources = [str(n.target) for n in nodes]
        modules = [self.fused.get_submodule(s) for s in sources]
        self.modules[path] = wide_module(modules, sources, self.conv_mode)
        return path

    def emit_aligned(self, nodes: Sequence[fx.Node]) -> PerTaskOperation | None:
        """Emit the K aligned nodes; None when they run batched, else why not."""
        reason = node_difference(nodes, self.tasks, self.fused, self.roles)
        rule, why = (None, reason) if reason else self.rule(nodes)
        if rule is None:
            for node in nodes:
                self.emit_per_task(node)
            return PerTaskOperation(_qualname(nodes[0]), why or "", reason is not None)
        first = nodes[0]
        name = f"{_WIDE_ROOT}_{identifier(_qualname(first))}"
        if rule == "size":
            args, kwargs = self.map_args(nodes, lambda group: self.to_task(group[0]))
            new = self.graph.create_node(first.op, first.target, args, kwargs, name=name)
            new.meta = dict(first.meta)
            for node in nodes:
                self.env[node] = ("shared", new)
            return None
        if rule == "shared":
            args, kwargs = self.map_args(nodes, lambda group: self.env[group[0]][1])
            target = first.target
            if first.op == "call_module":
                target = self.wide_module_path(nodes)
            new = self.graph.create_node(first.op, target, args, kwargs, name=name)
            new.meta = dict(first.meta)
            for node in nodes:
                self.env[node] = ("shared", new)
            return None
        if rule == "cat":
            tensors = [self.to_wide(group) for group in arg_groups(nodes)]
            new = self.graph.create_node(
                "call_function", cat_task_channels, (tensors, self.k), name=name
            )
        elif first.op == "call_module":
            path = self.wide_module_path(nodes)
            groups = arg_groups(nodes)
            form = batched_form(type(called_module(self.fused, first)))
            if form is not None and form.kind == "conv" and self.is_shared(groups[0]):
                args, kwargs = (self.env[groups[0][0]][1],), {"shared_input": True}
            else:
                args, kwargs = (self.to_wide(groups[0]),), {}
            new = self.graph.create_node("call_module", path, args, kwargs, name=name)
        else:

            def convert(group: list[fx.Node]) -> Any:
                if tensor_meta(group[0]) is None:
                    return self.env[group[0]][1]  # a shared plain value
                return self.to_wide(group)

            args, kwargs = self.map_args(nodes, convert)
            new = self.graph.create_node(first.op, first.target, args, kwargs, name=name)
        new.meta = dict(first.meta)
        for k, node in enumerate(nodes):
            self.env[node] = ("wide", new, k)
        return None

    def emit_stage(self, stage: _Stage, start: str, end: str) -> None:
        for node in stage.common:
            self.emit_common(node)
            self.roles[node] = ("common", node)
        lists = [stage.nodes[t] for t in self.tasks]
        aligned = aligned_count(lists, self.tasks, self.fused)
        per_task: list[PerTaskOperation] = []
        batched = 0
        for index in range(aligned):
            nodes = [task_nodes[index] for task_nodes in lists]
            for node in nodes:
                self.roles[node] = ("node", stage.index, index)
            why_not = self.emit_aligned(nodes)
            if why_not is None:
                batched += 1
            else:
                per_task.append(why_not)
        remaining = [nodes[aligned:] for nodes in lists]
        if any(remaining):
            lengths = ", ".join(f"{len(r)} in {t}" for r, t in zip(remaining, self.tasks))
            where = next(r[0] for r in remaining if r)
            reason = f"the task graphs diverge here ({lengths} operations left)"
            per_task.append(PerTaskOperation(_qualname(where), reason, True))
            for rest in remaining:
                for node in rest:
                    self.roles[node] = ("own", node)
                    self.emit_per_task(node)
        operations = aligned + max(len(rest) for rest in remaining)
        self.stage_reports.append(
            StageReport(stage.index, start, end, operations, batched, tuple(per_task))
        )

    def emit_fusion(self, fusion: _Fusion) -> None:
        call, target = fusion.call, str(fusion.call.target)
        layer = self.fused.get_submodule(target)
        levels = self.fusion_inputs(call)
        reason = fusion_reason(layer, levels)
        if reason is None:
            form = batched_form(type(layer))
            if not self.dry_run and target not in self.modules:
                self.modules[target] = form.factory(layer, target).train(layer.training)
            if form.kind == "shortcut":
                wide_args: tuple[Any, ...] = ([self.to_wide(level) for level in levels],)
            else:
                wide_args = (self.to_wide(levels[0]),)
            new = self.graph.create_node("call_module", target, wide_args, {}, name=call.name)
            clones: dict[fx.Node, fx.Node] = {}
            for node in fusion.glue:
                if node.target is operator.getitem:
                    self.env[node] = ("wide", new, int(node.args[1]))
                else:  # a clone guarding an in-place user: clone the stacked maps once
                    source = self.env[node.args[0]][1]
                    if source not in clones:
                        clones[source] = self.graph.create_node(
                            "call_method", "clone", (source,), name=f"{call.name}_clone"
                        )
                    self.env[node] = ("wide", clones[source], self.env[node.args[0]][2])
                self.roles[node] = ("glue", target, node.op)
        else:
            self.copy_module(target)
            args = fx.map_arg(call.args, self.to_task)
            new = self.graph.create_node("call_module", target, args, {}, name=call.name)
            self.env[call] = ("shared", new)
            for node in fusion.glue:
                self.emit_per_task(node)
                self.roles[node] = ("glue", target, node.op)
        stage = len(self.stage_reports) - 1
        self.fusion_reports.append(FusionReport(target, reason is None, reason or "", stage))

    def fusion_inputs(self, call: fx.Node) -> list[list[fx.Node]] | None:
        """A fusion call's inputs as levels × tasks (one level for a per-level layer)."""
        args = call.args

        def is_level(level: Any) -> bool:
            return (
                isinstance(level, (tuple, list))
                and len(level) == self.k
                and all(isinstance(a, fx.Node) for a in level)
            )

        if is_level(args):
            return [list(args)]
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and all(map(is_level, args[0])):
            return [list(level) for level in args[0]]
        return None

    def build(self, fused_graph: fx.Graph) -> fx.Graph:
        items = _split_graph(fused_graph, self.tasks)
        for node in fused_graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta = dict(node.meta)
                self.env[node] = ("shared", new)
                self.roles[node] = ("common", node)
        for index, item in enumerate(items):
            if isinstance(item, _Fusion):
                self.emit_fusion(item)
                continue
            first_before = index
            while first_before > 0 and isinstance(items[first_before - 1], _Fusion):
                first_before -= 1  # a level's layer, then the shortcut: name the level's
            after = [i for i in items[index + 1 :] if isinstance(i, _Fusion)]
            start = str(items[first_before].call.target) if first_before < index else "x"
            end = str(after[0].call.target) if after else "output"
            self.emit_stage(item, start, end)
        output = next(n for n in fused_graph.nodes if n.op == "output")
        self.graph.output(fx.map_arg(output.args[0], self.to_task))
        self.graph.lint()
        return self.graph

    def report(self) -> BatchingReport:
        return BatchingReport(self.tasks, tuple(self.stage_reports), tuple(self.fusion_reports))
