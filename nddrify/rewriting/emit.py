"""Writing a :class:`~nddrify.rewriting.ir.RewriteIR` as one fx graph: the one place where task
graphs are copied and joined.

Each task's nodes are copied under its prefix (``seg_features_4`` calls ``self.seg.features[4]``)
and interleaved segment by segment; after each level the junctions are inserted and every task
continues from its own fused map, which replaces the original for all of the point's users (skip
connections included). With ``collapse=True`` a run of nodes that is exactly one submodule's
forward becomes one call of that submodule (``seg_layer2 = self.seg.layer2(seg_layer1_nddr)``).

Every copied node carries ``meta[TASK_META_KEY]`` and ``meta[SEGMENT_META_KEY]``, every inserted
node ``meta[JUNCTION_META_KEY]`` (see :mod:`nddrify.meta`).

Example:
    >>> import torchvision, nddrify
    >>> from nddrify.rewriting.emit import GraphWriter
    >>> from nddrify.rewriting.ir import fused_ir
    >>> traced = nddrify.trace([torchvision.models.resnet18(), torchvision.models.resnet18()])
    >>> ir = fused_ir(traced, nddrify.plan(traced, points=1), train=False, across=False)
    >>> graph = GraphWriter(ir, collapse=True).emit()
    >>> [n.name for n in graph.nodes if n.op == "call_module"][:6]
    ['task0_conv1', 'task0_bn1', 'task0_relu', 'task0_maxpool', 'task0_layer1', 'task0_layer2']
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from ..meta import (
    JUNCTION_META_KEY,
    MODULE_CALLS,
    QUALNAME,
    SEGMENT_META_KEY,
    TASK_META_KEY,
    JunctionRef,
    ModuleCall,
    is_inplace,
)
from .ir import RewriteIR, TaskSegments

__all__ = ["GraphWriter", "identifier"]


def identifier(name: str) -> str:
    """``"layer1.0.relu"`` → ``"layer1_0_relu"``."""
    return re.sub(r"\W", "_", name)


def _mutated(node: fx.Node) -> Any:
    """The argument an in-place op writes into: its first (``self`` / ``input``)."""
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("self"))


def _calls_by_first_node(graph: fx.Graph) -> dict[fx.Node, list[ModuleCall]]:
    """The recorded submodule calls of a task graph, by their first node, longest first."""
    calls: dict[fx.Node, list[ModuleCall]] = {}
    for node in graph.nodes:
        for call in node.meta.get(MODULE_CALLS, ()):
            calls.setdefault(call.nodes[0], []).append(call)
    for found in calls.values():
        found.sort(key=lambda c: -len(c.nodes))
    return calls


class GraphWriter:
    """Emits one graph from a :class:`~nddrify.rewriting.ir.RewriteIR`.

    Args:
        ir: the segments and junctions.
        collapse: call a whole submodule where a run of nodes is exactly its forward.
        prefixes: where each task's modules live in the rewritten model (default: its name;
            ``""`` keeps the task model's own paths, for a single network).
    """

    def __init__(
        self, ir: RewriteIR, *, collapse: bool, prefixes: Sequence[str] | None = None
    ) -> None:
        self.ir = ir
        self.collapse = collapse
        self.prefixes = list(prefixes) if prefixes is not None else [t.task for t in ir.tasks]
        self.graph = fx.Graph()
        # One input ``x`` shared by every task; one per task (named after the tasks, in task
        # order) when the tasks were traced on example inputs of different shapes.
        first_inputs = [t.placeholders[0] for t in ir.tasks]
        metas = [n.meta.get("tensor_meta") for n in first_inputs]
        separate = all(m is not None for m in metas) and len({tuple(m.shape) for m in metas}) > 1
        names = [identifier(t.task) for t in ir.tasks] if separate else ["x"]
        self.images = [self.graph.placeholder(name) for name in names]
        for image, node in zip(self.images, first_inputs):
            image.meta = dict(node.meta)
        self.image = self.images[0]
        self.envs: list[dict[fx.Node, Any]] = [
            {n: self.images[k if separate else 0] for n in t.placeholders}
            for k, t in enumerate(ir.tasks)
        ]
        self.calls = [_calls_by_first_node(t.graph) if collapse else {} for t in ir.tasks]
        self.point_sets = [set(t.points) for t in ir.tasks]

    # -- copying -----------------------------------------------------------------------------

    @staticmethod
    def _target(prefix: str, target: str) -> str:
        return f"{prefix}.{target}" if prefix else target

    @staticmethod
    def _name(prefix: str, name: str) -> str:
        return f"{prefix}_{identifier(name)}" if prefix else identifier(name)

    def _meta(self, node: fx.Node, prefix: str, level: int) -> dict[str, Any]:
        meta = {k: v for k, v in node.meta.items() if k != MODULE_CALLS}
        return {**meta, TASK_META_KEY: prefix, SEGMENT_META_KEY: level}

    def _whole_call(self, k: int, nodes: Sequence[fx.Node], start: int) -> ModuleCall | None:
        """The longest recorded submodule call that starts at ``nodes[start]`` and can run as
        one call: its nodes are the next ones of the segment, no fusion point lies inside it
        (its result may be one), and nothing outside it reads its inner nodes."""
        for call in self.calls[k].get(nodes[start], ()):
            end = start + len(call.nodes)
            if end > len(nodes) or tuple(nodes[start:end]) != call.nodes:
                continue
            inner = set(call.nodes[:-1])
            if inner & self.point_sets[k]:
                continue
            members = set(call.nodes)
            if all(set(n.users) <= members for n in inner):
                return call
        return None

    def copy_segment(self, k: int, level: int, prefix: str, env: dict[fx.Node, Any]) -> None:
        """Copy task ``k``'s segment ``level`` under ``prefix`` (``prefix.`` on module and
        attribute targets, ``prefix_`` on node names), mapping arguments through ``env``."""
        nodes = self.ir.tasks[k].segments[level]
        index = 0
        while index < len(nodes):
            call = self._whole_call(k, nodes, index) if self.collapse else None
            if call is not None:
                new = self.graph.create_node(
                    "call_module",
                    self._target(prefix, call.path),
                    fx.map_arg(call.args, env.__getitem__),
                    fx.map_arg(dict(call.kwargs), env.__getitem__),
                    name=self._name(prefix, call.path),
                )
                new.meta = self._meta(call.output, prefix, level)
                env[call.output] = new
                index += len(call.nodes)
                continue
            node = nodes[index]
            target = node.target
            if node.op in ("call_module", "get_attr"):
                target = self._target(prefix, str(node.target))
            new = self.graph.create_node(
                node.op,
                target,
                fx.map_arg(node.args, env.__getitem__),
                fx.map_arg(node.kwargs, env.__getitem__),
                name=self._name(prefix, node.meta.get(QUALNAME, node.name)),
                type_expr=node.type,
            )
            new.meta = self._meta(node, prefix, level)
            env[node] = new
            index += 1

    # -- junctions ---------------------------------------------------------------------------

    def _item(self, call: fx.Node, k: int, name: str, like: fx.Node, ref: JunctionRef) -> fx.Node:
        item = self.graph.create_node("call_function", operator.getitem, (call, k), name=name)
        item.meta = {
            "tensor_meta": like.meta.get("tensor_meta"),
            TASK_META_KEY: self.ir.tasks[k].task,
            JUNCTION_META_KEY: ref,
        }
        return item

    def _continue_from(self, k: int, level: int, value: fx.Node, ref: JunctionRef) -> None:
        """Task ``k`` continues from ``value`` instead of its level point; a clone first when a
        user of the point works in place (the fusion layer may need its output for backward)."""
        task: TaskSegments = self.ir.tasks[k]
        point = task.points[level]
        called = [
            task.module.get_submodule(str(u.target)) if u.op == "call_module" else None
            for u in point.users
        ]
        if any(
            is_inplace(user, module) and _mutated(user) is point
            for user, module in zip(point.users, called)
        ):
            clone = self.graph.call_method("clone", (value,))
            clone.meta = {**value.meta, JUNCTION_META_KEY: ref}
            value = clone
        self.envs[k][point] = value

    def _fusion(self, level: int, module: str) -> list[fx.Node]:
        ref = JunctionRef("fusion", level)
        features = [self.envs[k][t.points[level]] for k, t in enumerate(self.ir.tasks)]
        call = self.graph.call_module(module, tuple(features))
        call.meta = {JUNCTION_META_KEY: ref}
        outputs = []
        for k, task in enumerate(self.ir.tasks):
            name = f"{task.task}_{identifier(task.labels[level])}_nddr"
            item = self._item(call, k, name, features[k], ref)
            outputs.append(item)
            self._continue_from(k, level, item, ref)
        return outputs

    def _across(self, level: int, module: str, fused: Sequence[Sequence[fx.Node]]) -> None:
        """One call over every level's maps (fused, or as they are without a fusion layer)."""
        ref = JunctionRef("across", level)
        call = self.graph.call_module(module, (tuple(tuple(lv) for lv in fused),))
        call.meta = {JUNCTION_META_KEY: ref}
        for k, task in enumerate(self.ir.tasks):
            item = self._item(call, k, f"{task.task}_{module}", fused[-1][k], ref)
            self._continue_from(k, level, item, ref)

    def _level_maps(self, level: int) -> list[fx.Node]:
        return [self.envs[k][t.points[level]] for k, t in enumerate(self.ir.tasks)]

    def _trunk(self, level: int, module: str) -> None:
        """Segment ``level`` of task 0 runs once under ``module``; every task reads it."""
        trunk_env = dict(self.envs[0])
        self.copy_segment(0, level, module, trunk_env)
        for k, task in enumerate(self.ir.tasks):
            reference = self.ir.tasks[0].segments[level]
            for own, ref in zip(task.segments[level], reference):
                if ref in trunk_env:
                    self.envs[k][own] = trunk_env[ref]

    # -- the whole graph ---------------------------------------------------------------------

    def emit(self) -> fx.Graph:
        """The rewritten graph: returns every task's output, a tuple or a dict by task."""
        fused_levels: list[list[fx.Node]] = []
        for level in range(self.ir.num_levels + 1):
            trunk = self.ir.at(level, "trunk")
            if trunk is not None:
                self._trunk(level, trunk.module)
            else:
                for k in range(len(self.ir.tasks)):
                    self.copy_segment(k, level, self.prefixes[k], self.envs[k])
            if level == self.ir.num_levels:
                break
            fusion = self.ir.at(level, "fusion")
            if fusion is not None:
                fused_levels.append(self._fusion(level, fusion.module))
            else:
                fused_levels.append(self._level_maps(level))
            across = self.ir.at(level, "across")
            if across is not None:
                self._across(level, across.module, fused_levels)
        results = [
            fx.map_arg(task.output.args[0], env.__getitem__)
            for task, env in zip(self.ir.tasks, self.envs)
        ]
        names = [t.task for t in self.ir.tasks]
        if self.ir.single:
            self.graph.output(results[0])
        else:
            self.graph.output(dict(zip(names, results)) if self.ir.as_dict else tuple(results))
        self.graph.lint()
        return self.graph
