"""Feature maps, the trunk and the spine: the nodes every path from the input to the trunk's
deepest map passes.

The **trunk** is the main path of the network: the nodes the output is computed from, not counting
the gate operand of a product (an SE or attention gate, a spatial-attention map, GhostNetV2's DFC
map, smp PAN's pyramid) and not counting the **head** (the final prediction conv or linear layer
and the upsampling, pooling or flattening after it). The spine's target is the trunk's deepest map
(the last map at the lowest resolution), so a side branch's pooled map is never the target.

The spine is computed with networkx dominators, so skip connections that bypass later stages on
their way to the output do not remove a node from it. Padding ops (explicit or "same" padding
before a strided conv) are left out of it: they only widen the map they pad.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from .annotation import LAYOUT, annotate
from .nodes import (
    is_conv,
    is_gate_activation,
    is_noop,
    is_pad,
    is_pool,
    is_upsample,
    reached_from,
    shape_of,
    tensor_inputs,
)

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "feature_shape",
    "is_feature_map",
    "gate_inputs",
    "context_inputs",
    "head_nodes",
    "pyramid_branches",
    "trunk_nodes",
    "trunk_target",
    "spine",
    "digraph",
    "image_input",
]

_PRODUCTS = {operator.mul, operator.imul, torch.mul}
# Single-input ops that may sit between a layer and the value it feeds without changing what it
# computes: reshapes, no-ops, pools, upsampling, output activations.
_PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "expand",
    "expand_as",
    "squeeze",
    "unsqueeze",
    "softmax",
    "log_softmax",
    "sigmoid",
}
_PASS_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.softmax,
    torch.log_softmax,
    torch.sigmoid,
    torch.nn.functional.softmax,
    torch.nn.functional.log_softmax,
    torch.nn.functional.dropout,
}


def feature_shape(node: fx.Node) -> tuple[int, int, int, int] | None:
    """(N, C, H, W) of an image feature map whatever its memory layout (NCHW or NHWC), else None.

    Needs :func:`~nddrify.graph_analysis.annotate` to have run on the graph.
    """
    layout, shape = node.meta.get(LAYOUT), shape_of(node)
    if layout == "NCHW":
        return shape  # type: ignore[return-value]
    if layout == "NHWC":
        return (shape[0], shape[3], shape[1], shape[2])
    return None


def is_feature_map(node: fx.Node) -> bool:
    """True for image feature maps (NCHW or NHWC) with more than one spatial position."""
    shape = feature_shape(node)
    return shape is not None and shape[2] * shape[3] > 1


def _area(node: fx.Node) -> int:
    shape = feature_shape(node)
    return shape[2] * shape[3]


def _pass_through(node: fx.Node) -> bool:
    """A single-input op that does not compute new features (reshape, pool, upsample, ...)."""
    if len(tensor_inputs(node)) != 1:
        return False
    if is_noop(node) or is_pool(node) or is_upsample(node) or is_gate_activation(node):
        return True
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__ in {
            "Flatten",
            "Dropout",
            "Softmax",
            "LogSoftmax",
            "Sigmoid",
        }
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _squashed(node: fx.Node, steps: int = 4) -> bool:
    """True when ``node`` is (a reshape or upsampling of) a sigmoid-like activation."""
    for _ in range(steps):
        if is_gate_activation(node):
            return True
        inputs = tensor_inputs(node)
        if len(inputs) != 1 or not _pass_through(node):
            return False
        node = inputs[0]
    return is_gate_activation(node)


def gate_inputs(node: fx.Node) -> set[fx.Node]:
    """The gate operands of a product ``a * b``: the operand broadcast over the other (fewer
    elements: an SE vector, a one-channel attention map, a pyramid map), or, for two operands of
    the same size, the only one that comes from a sigmoid-like activation. Empty for any other
    node, and for products of two equal trunk values (StarNet's ``x1 * x2``)."""
    is_product = (node.op == "call_function" and node.target in _PRODUCTS) or (
        node.op == "call_method" and node.target in {"mul", "mul_"}
    )
    if not is_product:
        return set()
    inputs = list(dict.fromkeys(tensor_inputs(node)))
    if len(inputs) != 2:
        return set()
    a, b = inputs
    size_a, size_b = (_numel(shape_of(a)), _numel(shape_of(b)))
    if size_a != size_b:
        return {a if size_a < size_b else b}
    squashed = [n for n in inputs if _squashed(n)]
    return set(squashed) if len(squashed) == 1 else set()


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _output(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def head_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The head: for each value the graph returns, the final prediction layer (a conv or linear
    layer whose output feeds nothing but the output) and the pass-through ops after it
    (upsampling, pooling, flattening, output activations). Empty where the output is not computed
    by such a layer (a backbone returning its last activation)."""
    output = _output(graph)
    head: set[fx.Node] = set()
    for start in output.all_input_nodes:
        node, path = start, []
        while shape_of(node) is not None:
            allowed = set(path[-1:]) | {output}
            if any(user not in allowed for user in node.users):
                break
            if is_conv(node):
                head.update(path)
                head.add(node)
                break
            if not _pass_through(node):
                break
            path.append(node)
            node = tensor_inputs(node)[0]
    return head


_MATMULS = {operator.matmul, torch.matmul, torch.bmm}


def context_inputs(node: fx.Node) -> set[fx.Node]:
    """The context operand of an attention product (``q @ k.T``, ``attn @ v``): the second
    operand of a matrix product, whose keys and values (often a spatially reduced map, as in
    PVT/SegFormer attention) are read by the query but are not the trunk."""
    is_matmul = (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target in {"matmul", "bmm"}
    )
    inputs = tensor_inputs(node)
    return {inputs[1]} if is_matmul and len(inputs) == 2 else set()


def trunk_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the output is computed from when the gate operand of every product and the context
    operand of every matrix product are ignored (SE, attention and pyramid gates, attention
    keys and values are side branches, not the trunk)."""
    output = _output(graph)
    trunk, stack = {output}, [output]
    while stack:
        node = stack.pop()
        gates = gate_inputs(node) | context_inputs(node)
        for source in node.all_input_nodes:
            if source not in trunk and source not in gates:
                trunk.add(source)
                stack.append(source)
    return trunk


def pyramid_branches(graph: fx.Graph) -> set[fx.Node]:
    """Maps of pooling-pyramid branches (PSPNet's pyramid pooling, PPM): a pool that shrinks a
    map, the layers after it at that resolution, up to an upsampling that brings the branch back
    to a larger map to be merged. Such a branch's small map is never the trunk's deepest map."""
    branches: set[fx.Node] = set()
    for node in graph.nodes:
        if not (is_pool(node) and is_feature_map(node)):
            continue
        inputs = tensor_inputs(node)
        if not inputs or not is_feature_map(inputs[0]) or _area(inputs[0]) <= _area(node):
            continue
        path, current = [node], node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if is_upsample(user) and is_feature_map(user) and _area(user) > _area(node):
                branches.update(path)
                break
            if not is_feature_map(user) or _area(user) != _area(node):
                break
            path.append(user)
            current = user
    return branches


def image_input(graph: fx.Graph) -> fx.Node:
    """The graph's first placeholder (the image)."""
    return next(n for n in graph.nodes if n.op == "placeholder")


def digraph(graph: fx.Graph) -> nx.DiGraph:
    """The fx graph as a networkx digraph (an edge from each node to each of its users)."""
    import networkx as nx

    dg = nx.DiGraph()
    for node in graph.nodes:
        dg.add_node(node)
        for user in node.users:
            dg.add_edge(node, user)
    return dg


def trunk_target(graph: fx.Graph) -> fx.Node | None:
    """The trunk's deepest feature map: the last map at the lowest resolution among the maps that
    depend on the input, feed the output through the trunk (:func:`trunk_nodes`) and are not in
    the head (:func:`head_nodes`) or a pooling pyramid (:func:`pyramid_branches`). None when
    there is no such map."""
    annotate(graph)
    source = image_input(graph)
    trunk = trunk_nodes(graph)
    head = head_nodes(graph) | pyramid_branches(graph)
    reached = reached_from(source)
    best, best_area = None, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in head:
            continue
        if node not in reached or node not in trunk:
            continue
        if is_feature_map(node) and not is_pad(node):
            area = _area(node)
            if best_area is None or area <= best_area:
                best, best_area = node, area
    return best


def spine(graph: fx.Graph) -> list[fx.Node]:
    """Feature-map nodes every path from the input to the trunk's deepest map passes through.

    Returned in execution order, ending with the deepest map itself (:func:`trunk_target`; a side
    branch the output does not use, a gate's pooled map or the head's logits are never the
    target). Padding ops are left out. Empty when the graph has no image feature maps.
    """
    import networkx as nx

    annotate(graph)
    target = trunk_target(graph)
    if target is None:
        return []
    source = image_input(graph)
    idom = nx.immediate_dominators(digraph(graph), source)
    chain = [target]
    while chain[-1] is not source:
        chain.append(idom[chain[-1]])
    return [n for n in reversed(chain) if n is not source and is_feature_map(n) and not is_pad(n)]
