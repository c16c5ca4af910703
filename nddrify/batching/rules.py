"""Deciding what runs batched and what per task: the analysis of aligned task nodes.

The K tasks' nodes at one position of a segment are *aligned* when they have the same structure
(op, target relative to the task, module type, argument layout): ``aligned_count`` says how many
leading positions are. Aligned nodes run once for all tasks when ``node_difference`` finds them
identical (inputs from the same places, same shapes, same module configuration) and
``batched_rule`` finds a way to run them on what their inputs are (one shared value, a
task-stacked value, or per-task values: their :data:`Placement`); ``fusion_reason`` says why a
fusion layer runs per task. :mod:`~nddrify.batching.emission` asks these questions while it
builds the batched graph and emits the answer.

Example:
    >>> import nddrify
    >>> from torch import nn
    >>> from nddrify.batching.rules import batched_rule, called_module, node_difference
    >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> b = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> fused = nddrify.fuse([a, b, a], points=["1"])
    >>> nodes = {str(node.target): node for node in fused.graph.nodes}
    >>> node_difference([nodes["task0.0"], nodes["task1.0"]], ("task0", "task1"), fused, {})
    'Conv2d: kernel_size (3, 3) in task0 vs (5, 5) in task1'
    >>> first = [nodes["task0.0"], nodes["task2.0"]]  # both read the image
    >>> batched_rule(first, called_module(fused, first[0]), lambda group: "shared")
    ('module', '')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..meta import is_inplace
from .analysis import (
    fusion_difference,
    is_plain_function,
    is_random,
    is_size_query,
    meta_signature,
    module_difference,
    operation_kind,
    same_value,
    tensor_meta,
)
from .modules import has_state

__all__ = [
    "Placement",
    "relative_target",
    "called_module",
    "node_structure",
    "aligned_count",
    "node_difference",
    "arg_groups",
    "batched_rule",
    "fusion_reason",
]

#: Where the K tasks' values of one argument are in the batched graph: ``"shared"`` (one value
#: for all tasks), ``"stacked"`` (the K slices of one task-stacked value) or ``"per_task"``.
Placement = Literal["shared", "stacked", "per_task"]


def relative_target(node: fx.Node, task: str) -> str:
    """A task node's module or attribute path inside its task model (``seg.layer1`` → ``layer1``)."""
    return str(node.target)[len(task) + 1 :]


def called_module(fused: nn.Module, node: fx.Node) -> nn.Module | None:
    """The fused model's module a call_module node calls (None for other nodes)."""
    return fused.get_submodule(str(node.target)) if node.op == "call_module" else None


def node_structure(node: fx.Node, task: str, fused: nn.Module) -> Any:
    """What must match for the K tasks' nodes at one position to be aligned: the op, the target
    relative to the task, the module type, and where the node arguments are."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    target: Any = node.target
    kind = None
    if node.op in ("call_module", "get_attr"):
        target = relative_target(node, task)
        if node.op == "call_module":
            kind = type(fused.get_submodule(str(node.target)))
    nodes = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node))
    return (node.op, target, kind, spec, nodes)


def aligned_count(
    node_lists: Sequence[Sequence[fx.Node]], tasks: Sequence[str], fused: nn.Module
) -> int:
    """How many leading positions of the K tasks' node lists (one segment) are aligned."""
    count = min(len(nodes) for nodes in node_lists)
    aligned = 0
    while aligned < count:
        signatures = {
            repr(node_structure(nodes[aligned], t, fused)) for nodes, t in zip(node_lists, tasks)
        }
        if len(signatures) != 1:
            break
        aligned += 1
    return aligned


def node_difference(
    nodes: Sequence[fx.Node], tasks: Sequence[str], fused: nn.Module, roles: dict[fx.Node, Any]
) -> str | None:
    """Why the K aligned nodes are not identical, or None. ``roles`` maps the fused nodes
    already read to where they stand (nodes of the same role in every task are the same place;
    a node without a role is its own)."""
    first, task0 = nodes[0], tasks[0]
    leaves0 = pytree.tree_leaves((first.args, first.kwargs))
    for k, node in enumerate(nodes[1:], 1):
        task = tasks[k]
        leaves = pytree.tree_leaves((node.args, node.kwargs))
        for a, b in zip(leaves0, leaves):
            if isinstance(a, fx.Node):
                if roles.get(a, ("own", a)) != roles.get(b, ("own", b)):
                    return f"inputs come from different places in {task0} and {task}"
                if meta_signature(tensor_meta(a)) != meta_signature(tensor_meta(b)):
                    return f"input shapes differ between {task0} and {task}"
            elif not same_value(a, b):
                return f"argument {a!r} in {task0} vs {b!r} in {task}"
        module, other = called_module(fused, first), called_module(fused, node)
        if module is not None and other is not None:
            reason = module_difference(module, other, task0, task)
            if reason:
                return f"{type(module).__name__}: {reason}"
        out0 = meta_signature(first.meta.get("tensor_meta"))
        if out0 != meta_signature(node.meta.get("tensor_meta")):
            return f"output shape differs between {task0} and {task}"
    return None


def arg_groups(nodes: Sequence[fx.Node]) -> list[list[fx.Node]]:
    """For every node argument of ``nodes[0]`` the K tasks' corresponding arguments."""
    per_task = [pytree.tree_leaves((n.args, n.kwargs)) for n in nodes]
    groups = []
    for index, leaf in enumerate(per_task[0]):
        if isinstance(leaf, fx.Node):
            groups.append([leaves[index] for leaves in per_task])
    return groups


def batched_rule(
    nodes: Sequence[fx.Node],
    module: nn.Module | None,
    placement: Callable[[Sequence[fx.Node]], Placement],
) -> tuple[str | None, str]:
    """How the K identical nodes run together: "module", "asis", "cat", "size", "shared", or
    None with the reason they run per task. ``module`` is the module ``nodes[0]`` calls (or
    None), ``placement`` says where the K values of each argument group are."""
    node = nodes[0]
    tensor_args = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
    out = tensor_meta(node)
    groups = arg_groups(nodes)
    all_shared = all(placement(group) == "shared" for group in groups)
    inplace = is_inplace(node, module)
    if node.op == "get_attr":
        return None, "attribute read"
    if is_size_query(node):
        return "size", ""
    if any(placement(g) != "shared" for g in groups if tensor_meta(g[0]) is None):
        return None, "takes a per-task value that is not a tensor"
    kind = operation_kind(node, module, tensor_args, out)
    if all_shared and not inplace and not is_random(node, module):
        if kind in ("asis", "cat") and not (module is not None and has_state(module)):
            return "shared", ""
        if kind is None and not tensor_args and is_plain_function(node):
            return "shared", ""
    if kind is None:
        return None, _unsupported(node, module)
    if inplace and not (
        placement(groups[0]) == "stacked" or all(len(n.users) == 1 for n in groups[0])
    ):
        return None, "in-place on a value other operations read"
    tensor_groups = [g for g in groups if tensor_meta(g[0]) is not None]
    if kind != "module" and not any(placement(g) == "stacked" for g in tensor_groups):
        # stacking per-task inputs only pays off for layers with weights
        return None, "its inputs run per task"
    return kind, ""


def _unsupported(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"no batched form for {type(module).__name__}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"no batched form for {name}"


def fusion_reason(layer: nn.Module, levels: Sequence[Sequence[fx.Node]] | None) -> str | None:
    """Why a fusion layer runs per task, or None when it runs batched; ``levels`` are its inputs
    as levels × tasks (None when they are not laid out so)."""
    if levels is None:
        return f"{type(layer).__name__} has no batched form"
    signatures = [[meta_signature(tensor_meta(a)) for a in level] for level in levels]
    return fusion_difference(layer, signatures)
