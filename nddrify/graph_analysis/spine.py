"""Feature maps and the spine: the nodes every path from the input to the deepest map passes.

The spine is computed with networkx dominators, so skip connections that bypass later stages on
their way to the output do not remove a node from it.
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .annotation import LAYOUT, annotate
from .nodes import shape_of

__all__ = ["feature_shape", "is_feature_map", "spine"]


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


def _image_input(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder")


def _deepest_feature_map(graph: fx.Graph, reachable: set[fx.Node]) -> fx.Node | None:
    best, best_area = None, None
    for node in graph.nodes:
        if node in reachable and node.op != "placeholder" and is_feature_map(node):
            shape = feature_shape(node)
            area = shape[2] * shape[3]
            if best_area is None or area <= best_area:
                best, best_area = node, area
    return best


def _digraph(graph: fx.Graph) -> nx.DiGraph:
    dg = nx.DiGraph()
    for node in graph.nodes:
        dg.add_node(node)
        for user in node.users:
            dg.add_edge(node, user)
    return dg


def spine(graph: fx.Graph) -> list[fx.Node]:
    """Feature-map nodes every path from the input to the deepest feature map passes through.

    Returned in execution order, ending with the deepest feature map itself (the last node at the
    lowest resolution on a path from the input to the output; a side branch the output does not
    use is never the target). Empty when the graph has no image feature maps.
    """
    annotate(graph)
    source = _image_input(graph)
    dg = _digraph(graph)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    reachable = nx.descendants(dg, source) & nx.ancestors(dg, output)
    target = _deepest_feature_map(graph, reachable)
    if target is None:
        return []
    idom = nx.immediate_dominators(dg, source)
    chain = [target]
    while chain[-1] is not source:
        chain.append(idom[chain[-1]])
    return [n for n in reversed(chain) if n is not source and is_feature_map(n)]
