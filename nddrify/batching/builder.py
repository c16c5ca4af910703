"""Building the batched model, and the public entry points :func:`batch_tasks` and
:func:`batching_report`.

The fused graph is read as segments (a task graph's stretch between two fusion levels) and
fusion calls; ``_Builder`` emits each segment's aligned task nodes once for all tasks where they
have a batched form and per task otherwise, and :class:`BatchedFusedModel` wraps the result.

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.batching.builder import batch_tasks
    >>> def cnn():
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> fused = nddrify.fuse({"a": cnn(), "b": cnn()}, points=["1"]).eval()
    >>> batched = batch_tasks(fused)
    >>> x = torch.randn(1, 3, 16, 16)
    >>> expected, out = fused(x), batched(x)
    >>> all(bool((out[t] - expected[t]).abs().max() < 1e-5) for t in ("a", "b"))
    True
    >>> batched.report.batched_operations, batched.report.operations
    (3, 3)
"""

from __future__ import annotations

import builtins
import copy
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree

from ..errors import ModelsError, NddrifyError
from ..layers import FusionLayer, NDDRShortcutLayer
from ..rewriting import PLAN_META_KEY, TASK_META_KEY, FusedGraphModule, _rebuild
from ..tracing import QUALNAME
from ..training import fused_plan
from .analysis import (
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _MAX_POOLS,
    _PLAIN_FUNCTIONS,
    _RANDOM,
    _RANDOM_FUNCTIONS,
    _REDUCE_METHODS,
    _SIZE_ATTRIBUTES,
    _SIZE_METHODS,
    _SPATIAL_FUNCTIONS,
    _broadcasts,
    _fusion_difference,
    _is_inplace,
    _meta_signature,
    _module_difference,
    _module_kind,
    _normal_dims,
    _same,
    _shape_text,
    _tensor_meta,
)
from .modules import (
    _CONVS,
    _FUSIONS,
    CONV_MODES,
    _has_state,
    _TaskBatched,
    _wide_module,
    cat_task_channels,
)
from .report import BatchingReport, FusionReport, PerTaskOperation, StageReport

__all__ = [
    "batch_tasks",
    "batching_report",
    "BatchedFusedModel",
    "BatchingError",
    "BATCHED_META_KEY",
]

#: ``batched.meta`` key holding the :class:`BatchingReport`.
BATCHED_META_KEY = "nddrify_batching"

_CLASS_NAME = "NDDRBatchedModel"
_WIDE_ROOT = "batched"  # where the task-batched modules live: batched.<path in the task model>


class BatchingError(NddrifyError, ValueError):
    """``batch_tasks`` got something it cannot batch (not a fused model, a bad option), or
    ``sync`` got a model whose weights do not match."""


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


def _is_fusion_call(node: fx.Node, fused: nn.Module) -> bool:
    if node.op != "call_module" or TASK_META_KEY in node.meta or "." in str(node.target):
        return False
    return isinstance(fused.get_submodule(node.target), FusionLayer)


def _split_graph(graph: fx.Graph, fused: nn.Module, tasks: Sequence[str]) -> list[Any]:
    """The graph's nodes as an ordered list of stages and fusion calls."""
    items: list[Any] = []
    calls: dict[fx.Node, _Fusion] = {}  # fusion call → its fusion
    items_of: dict[fx.Node, _Fusion] = {}  # getitem of a fusion call → its fusion
    stages = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_fusion_call(node, fused):
            fusion = _Fusion(node, [])
            items.append(fusion)
            calls[node] = fusion
            continue
        source = node.args[0] if node.args else None
        is_item = node.op == "call_function" and node.target is operator.getitem
        is_clone = node.op == "call_method" and node.target == "clone"
        if isinstance(source, fx.Node) and (
            (is_item and source in calls) or (is_clone and source in items_of)
        ):
            fusion = calls.get(source) or items_of[source]
            fusion.glue.append(node)
            if is_item:
                items_of[node] = fusion
            continue
        if not items or not isinstance(items[-1], _Stage):
            items.append(_Stage(stages, [], {t: [] for t in tasks}))
            stages += 1
        task = node.meta.get(TASK_META_KEY)
        (items[-1].nodes[task] if task in tasks else items[-1].common).append(node)
    return items


def _qualname(node: fx.Node) -> str:
    return str(node.meta.get(QUALNAME, node.name))


def _relative(node: fx.Node, task: str) -> str:
    return str(node.target)[len(task) + 1 :]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


# ----------------------------------------------------------------------------------------------
# Building the batched graph


class _Builder:
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
            name = f"{_WIDE_ROOT}_{_identifier(_qualname(nodes[0]))}"
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

    def module(self, node: fx.Node) -> nn.Module | None:
        """The fused model's module a call_module node calls (None for other nodes)."""
        return self.fused.get_submodule(str(node.target)) if node.op == "call_module" else None

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
        if node.args and isinstance(node.args[0], fx.Node) and _is_inplace(node, self.module(node)):
            # an in-place op changed this value: stacked copies made from it are stale
            changed = node.args[0]
            self.stacked = {key: v for key, v in self.stacked.items() if changed not in key}

    def emit_common(self, node: fx.Node) -> None:
        self.emit_per_task(node)
        self.env[node] = ("shared", self.env[node][1])

    def structure(self, node: fx.Node, task: str) -> Any:
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        target: Any = node.target
        kind = None
        if node.op in ("call_module", "get_attr"):
            target = _relative(node, task)
            if node.op == "call_module":
                kind = type(self.fused.get_submodule(str(node.target)))
        nodes = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node))
        return (node.op, target, kind, spec, nodes)

    def difference(self, nodes: Sequence[fx.Node]) -> str | None:
        """Why the K aligned nodes are not identical, or None."""
        first, task0 = nodes[0], self.tasks[0]
        leaves0 = pytree.tree_leaves((first.args, first.kwargs))
        for k, node in enumerate(nodes[1:], 1):
            task = self.tasks[k]
            leaves = pytree.tree_leaves((node.args, node.kwargs))
            for a, b in zip(leaves0, leaves):
                if isinstance(a, fx.Node):
                    if self.roles.get(a, ("own", a)) != self.roles.get(b, ("own", b)):
                        return f"inputs come from different places in {task0} and {task}"
                    if _meta_signature(_tensor_meta(a)) != _meta_signature(_tensor_meta(b)):
                        return f"input shapes differ between {task0} and {task}"
                elif not _same(a, b):
                    return f"argument {a!r} in {task0} vs {b!r} in {task}"
            module, other = self.module(first), self.module(node)
            if module is not None and other is not None:
                reason = _module_difference(module, other, task0, task)
                if reason:
                    return f"{type(module).__name__}: {reason}"
            out0 = _meta_signature(first.meta.get("tensor_meta"))
            if out0 != _meta_signature(node.meta.get("tensor_meta")):
                return f"output shape differs between {task0} and {task}"
        return None

    def wide_rule(self, nodes: Sequence[fx.Node]) -> tuple[str | None, str]:
        """How the K identical nodes run together: "module", "asis", "cat", "size", "shared",
        or None with the reason they run per task."""
        node = nodes[0]
        module = self.module(node)
        tensor_args = [a for a in node.all_input_nodes if _tensor_meta(a) is not None]
        out = _tensor_meta(node)
        arg_groups = self.arg_groups(nodes)
        all_shared = all(self.is_shared(group) for group in arg_groups)
        inplace = _is_inplace(node, module)
        if node.op == "get_attr":
            return None, "attribute read"
        if (node.op == "call_method" and node.target in _SIZE_METHODS) or (
            node.op == "call_function"
            and node.target is builtins.getattr
            and node.args[1] in _SIZE_ATTRIBUTES
        ):
            return "size", ""
        if any(not self.is_shared(g) for g in arg_groups if _tensor_meta(g[0]) is None):
            return None, "takes a per-task value that is not a tensor"
        kind = self.kind(node, module, tensor_args, out)
        deterministic = not (isinstance(module, _RANDOM) and module.training) and not (
            node.op == "call_function" and node.target in _RANDOM_FUNCTIONS
        )
        if all_shared and not inplace and deterministic:
            if kind in ("asis", "cat") and not (module is not None and _has_state(module)):
                return "shared", ""
            if (
                kind is None
                and not tensor_args
                and (node.op == "call_function" and node.target in _PLAIN_FUNCTIONS)
            ):
                return "shared", ""
        if kind is None:
            return None, self.unsupported(node, module)
        if inplace and not (
            self.is_wide(arg_groups[0]) or all(len(n.users) == 1 for n in arg_groups[0])
        ):
            return None, "in-place on a value other operations read"
        tensor_groups = [g for g in arg_groups if _tensor_meta(g[0]) is not None]
        if kind != "module" and not any(self.is_wide(g) for g in tensor_groups):
            # stacking per-task inputs only pays off for layers with weights
            return None, "its inputs run per task"
        return kind, ""

    def unsupported(self, node: fx.Node, module: nn.Module | None) -> str:
        if module is not None:
            return f"no batched form for {type(module).__name__}"
        name = getattr(node.target, "__name__", str(node.target))
        return f"no batched form for {name}"

    def kind(
        self,
        node: fx.Node,
        module: nn.Module | None,
        tensor_args: Sequence[fx.Node],
        out: TensorMetadata | None,
    ) -> str | None:
        """ "module", "asis", "cat" when the node has a batched form for these shapes, else None."""
        if out is None or len(out.shape) < 2:
            return None
        shapes = [tuple(_tensor_meta(a).shape) for a in tensor_args]  # type: ignore[union-attr]
        if any(len(s) < 2 for s in shapes):
            return None
        ndim = len(shapes[0]) if shapes else len(out.shape)
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs or len(tensor_args) != 1:
                return None
            return _module_kind(module, ndim)
        target = node.target
        if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in _ELEMENTWISE_METHODS
        ):
            return (
                "asis" if tensor_args and all(_broadcasts(s, out.shape) for s in shapes) else None
            )
        if node.op == "call_function" and target in _SPATIAL_FUNCTIONS:
            if node.kwargs.get("return_indices") or len(tensor_args) != 1 or ndim < 3:
                return None
            if target in _MAX_POOLS and len(node.args) > 6:
                return None  # return_indices given by position
            return "asis"
        if (node.op == "call_function" and target is torch.flatten) or (
            node.op == "call_method" and target == "flatten"
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if not isinstance(start, int) or not isinstance(end, int):
                return None
            return "asis" if start % ndim >= 1 and end % ndim == ndim - 1 else None
        if node.op == "call_method" and target in _REDUCE_METHODS:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            normal = _normal_dims(dims, ndim) if dims is not None else None
            return "asis" if normal and min(normal) >= 2 and len(tensor_args) == 1 else None
        if node.op == "call_function" and target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(dim, int) or not isinstance(node.args[0], (list, tuple)):
                return None
            if not all(
                isinstance(a, fx.Node) and _tensor_meta(a) is not None for a in node.args[0]
            ):
                return None
            dim %= ndim
            return "asis" if dim >= 2 else "cat" if dim == 1 else None
        return None

    def arg_groups(self, nodes: Sequence[fx.Node]) -> list[list[fx.Node]]:
        """For every node argument of ``nodes[0]`` the K tasks' corresponding arguments."""
        per_task = [pytree.tree_leaves((n.args, n.kwargs)) for n in nodes]
        groups = []
        for index, leaf in enumerate(per_task[0]):
            if isinstance(leaf, fx.Node):
                groups.append([leaves[index] for leaves in per_task])
        return groups

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

    def wide_module(self, nodes: Sequence[fx.Node]) -> str:
        """Create (once) the batched module for the K nodes' modules; its path."""
        relative = _relative(nodes[0], self.tasks[0])
        path = f"{_WIDE_ROOT}.{relative}"
        if path in self.modules or self.dry_run:
            return path
        sources = [str(n.target) for n in nodes]
        modules = [self.fused.get_submodule(s) for s in sources]
        self.modules[path] = _wide_module(modules, sources, self.conv_mode)
        return path

    def emit_aligned(self, nodes: Sequence[fx.Node]) -> PerTaskOperation | None:
        """Emit the K aligned nodes; None when they run batched, else why not."""
        reason = self.difference(nodes)
        rule, why = (None, reason) if reason else self.wide_rule(nodes)
        if rule is None:
            for node in nodes:
                self.emit_per_task(node)
            return PerTaskOperation(_qualname(nodes[0]), why or "", reason is not None)
        first = nodes[0]
        name = f"{_WIDE_ROOT}_{_identifier(_qualname(first))}"
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
                target = self.wide_module(nodes)
            new = self.graph.create_node(first.op, target, args, kwargs, name=name)
            new.meta = dict(first.meta)
            for node in nodes:
                self.env[node] = ("shared", new)
            return None
        if rule == "cat":
            tensors = [self.to_wide(group) for group in self.arg_groups(nodes)]
            new = self.graph.create_node(
                "call_function", cat_task_channels, (tensors, self.k), name=name
            )
        elif first.op == "call_module":
            path = self.wide_module(nodes)
            groups = self.arg_groups(nodes)
            module_kind = type(self.module(first))
            if module_kind in _CONVS and self.is_shared(groups[0]):
                args, kwargs = (self.env[groups[0][0]][1],), {"shared_input": True}
            else:
                args, kwargs = (self.to_wide(groups[0]),), {}
            new = self.graph.create_node("call_module", path, args, kwargs, name=name)
        else:

            def convert(group: list[fx.Node]) -> Any:
                if _tensor_meta(group[0]) is None:
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
        count = min(len(nodes) for nodes in lists)
        aligned = 0
        while aligned < count:
            signatures = {
                repr(self.structure(nodes[aligned], t)) for nodes, t in zip(lists, self.tasks)
            }
            if len(signatures) != 1:
                break
            aligned += 1
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
        reason = (
            f"{type(layer).__name__} has no batched form"
            if levels is None
            else _fusion_difference(
                layer, [[_meta_signature(_tensor_meta(a)) for a in level] for level in levels]
            )
        )
        if reason is None:
            if not self.dry_run and target not in self.modules:
                self.modules[target] = _FUSIONS[type(layer)](layer, target).train(layer.training)
            if type(layer) is NDDRShortcutLayer:
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
        items = _split_graph(fused_graph, self.fused, self.tasks)
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


# ----------------------------------------------------------------------------------------------
# The batched model


class BatchedFusedModel(FusedGraphModule):
    """A fused model whose tasks run batched; built by :func:`batch_tasks`.

    Calling it gives the fused model's outputs (same structure: a tuple or a dict by task).
    Task-batched modules live under ``.batched`` (paths of the task models), per-task copies
    under ``.<task>``, fusion layers under ``.nddr<l>``. ``report`` says what runs how;
    ``print(batched.code)`` shows the generated forward. Train/eval graphs, deep copies and
    pickles work as for :class:`~nddrify.FusedGraphModule`.

    It holds its own copy of the weights (a snapshot taken by ``batch_tasks``): train it like
    any module, then :meth:`sync` the weights back into the fused model.
    """

    generated_name = _CLASS_NAME

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        *,
        tasks: Sequence[str] = (),
        report: BatchingReport | None = None,
    ) -> None:
        super().__init__(root, graph, eval_graph)
        self.tasks = tuple(tasks)
        self.report = report
        self.meta[BATCHED_META_KEY] = report

    def _init_kwargs(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "report": self.report}

    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the fused model's keys (``seg.layer1.0.conv1.weight``, ...), for
        every module this model holds; load them with ``fused.load_state_dict(sd, strict=False)``
        or use :meth:`sync`."""
        stacked = {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, _TaskBatched)
        }
        state: dict[str, torch.Tensor] = {}
        inside = tuple(f"{name}." for name in stacked)
        for key, value in self.state_dict().items():
            if not key.startswith(inside):
                state[key] = value
        for module in stacked.values():
            for k, source in enumerate(module.sources):
                part = module.task_state(k if len(module.sources) > 1 else 0)
                state.update({f"{source}.{n}": v.detach() for n, v in part.items()})
        return state

    def sync(self, fused: nn.Module) -> nn.Module:
        """Copy this model's weights into ``fused`` (the model it was built from, or one fused
        the same way) and return ``fused``.

        Raises:
            BatchingError: when ``fused`` lacks one of the weights or has it in another shape.
        """
        target = fused.state_dict(keep_vars=True)
        state = self.fused_state_dict()
        order = {key: index for index, key in enumerate(target)}  # report the first mismatch
        for key, value in sorted(state.items(), key=lambda item: order.get(item[0], len(order))):
            if key not in target or target[key].shape != value.shape:
                found = "missing" if key not in target else f"shape {_shape_text(target[key])}"
                raise BatchingError(
                    f"cannot sync into this model: {key!r} is {found}, the batched model has "
                    f"{_shape_text(value)}; pass the fused model batch_tasks was built from."
                )
        with torch.no_grad():
            for key, value in state.items():
                target[key].copy_(value)
        return fused


def _fused_graphs(fused: nn.Module) -> tuple[fx.Graph, fx.Graph | None]:
    """(eval graph, train graph or None when both modes share one graph)."""
    if isinstance(fused, FusedGraphModule) and fused.eval_graph is not None:
        return fused.eval_graph, fused.train_graph
    return fused.graph, None


def _check_fused(fused: Any) -> tuple[str, ...]:
    if isinstance(fused, BatchedFusedModel):
        raise BatchingError("this model is already batched; pass the fused model instead.")
    try:
        return tuple(fused_plan(fused).tasks)
    except ModelsError:
        raise BatchingError(
            f"batch_tasks needs a model returned by nddrify.fuse (or nddrify.share), got "
            f"{type(fused).__name__} without a plan in .meta[{PLAN_META_KEY!r}]; fuse the task "
            "models first: nddrify.batch_tasks(nddrify.fuse([model_a, model_b]))."
        ) from None


def batching_report(fused: nn.Module) -> BatchingReport:
    """What :func:`batch_tasks` would run batched and what per task, and why (no weights are
    copied). ``report.batchable`` is False when the tasks share no identical operation.

    Example:
        >>> import nddrify
        >>> from torch import nn
        >>> from nddrify.batching import batching_report
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> b = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> report = batching_report(nddrify.fuse([a, b], points=["1"]))
        >>> [stage.identical for stage in report.stages], report.batched_operations
        ([False, True], 1)
        >>> print(report.stages[0].per_task[0])
        0 (Conv2d: kernel_size (3, 3) in task0 vs (5, 5) in task1)
    """
    tasks = _check_fused(fused)
    eval_graph, _ = _fused_graphs(fused)
    builder = _Builder(fused, tasks, {}, "auto", dry_run=True)
    builder.build(eval_graph)
    return builder.report()


def batch_tasks(fused: nn.Module, *, conv_mode: str = "auto") -> BatchedFusedModel:
    """Run a fused model's tasks as one batched computation (see the module docstring).

    Args:
        fused: a model returned by :func:`nddrify.fuse` (or :func:`nddrify.share`); it is not
            modified. Its train/eval flags, device and dtype carry over.
        conv_mode: how batched convolutions run: ``"auto"`` (one grouped convolution on CUDA,
            one convolution per task elsewhere), ``"grouped"`` or ``"split"``.

    Returns:
        A :class:`BatchedFusedModel` computing the fused model's outputs (to float rounding:
        grouped kernels sum in another order), with ``.report`` (a :class:`BatchingReport`).
        It works with ``torch.compile`` (CUDA graphs included: ``mode="reduce-overhead"``).

    Raises:
        BatchingError: ``fused`` is not a fused model, or ``conv_mode`` is unknown.
    """
    tasks = _check_fused(fused)
    if conv_mode not in CONV_MODES:
        raise BatchingError(f"conv_mode={conv_mode!r} is unknown; use one of {CONV_MODES}.")
    eval_graph, train_graph = _fused_graphs(fused)
    modules: dict[str, nn.Module] = {}
    builder = _Builder(fused, tasks, modules, conv_mode, dry_run=False)
    graphs = [builder.build(eval_graph)]
    report = builder.report()
    if train_graph is not None:
        trainer = _Builder(fused, tasks, modules, conv_mode, dry_run=False)
        graphs = [trainer.build(train_graph), graphs[0]]
    root = nn.Module()
    for path, value in sorted(modules.items(), key=lambda item: item[0].count(".")):
        owner = root
        *parents, name = path.split(".")
        for parent in parents:
            if not hasattr(owner, parent):
                owner.add_module(parent, nn.Module())
            owner = getattr(owner, parent)
        if isinstance(value, nn.Module):
            owner.add_module(name, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(name, value)
        else:
            setattr(owner, name, value)
    model = _rebuild(
        dict(root.named_children()),
        *graphs,
        meta={BATCHED_META_KEY: report},
        training=fused.training,
        cls=BatchedFusedModel,
        kwargs={"tasks": tasks, "report": report},
    )
    return model
