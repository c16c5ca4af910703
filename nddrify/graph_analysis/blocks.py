"""Blocks: where a node lies strictly inside a residual, branch-merging or gating block.

A **block region** is found from every merge node ``J`` (a sum, difference, product or concat of
two or more values computed from the input): its fork ``F`` is ``J``'s immediate dominator (from
the image input), and the region is every node on a path from ``F`` to ``J``, ``F`` and ``J``
excluded: a residual block's branch and shortcut, an SE or attention gate's branch, the branches
of an Inception block or of a pyramid. A region that holds a node of the spine is not a block
(the trunk runs through it: a U-Net's outer skip connection spans the whole encoder). The block's
name is the innermost module holding the region and ``J``.

:func:`enclosing_block` names the outermost block a node lies strictly inside; nodes on the trunk
between blocks (a block's output, a stage end) lie inside none.

Example:
    >>> import torchvision
    >>> from nddrify.graph_analysis import enclosing_block
    >>> from nddrify.tracing import trace_model
    >>> traced = trace_model(torchvision.models.resnet18())
    >>> enclosing_block(traced.node("layer1.0.conv2"), traced.graph)
    'layer1.0'
    >>> print(enclosing_block(traced.node("layer1"), traced.graph))
    None
"""

from __future__ import annotations

import weakref

import torch.fx as fx

from ..meta import QUALNAME
from .annotation import annotate
from .nodes import is_merge, reached_from, tensor_digraph, tensor_inputs
from .spine import image_input, spine, trunk_target
from .tokens import token_spine

__all__ = ["enclosing_block", "block_regions"]

# graph -> (number of nodes when computed, node -> outermost enclosing block)
_CACHE: weakref.WeakKeyDictionary[fx.Graph, tuple[int, dict[fx.Node, str]]] = (
    weakref.WeakKeyDictionary()
)


def _module_path(node: fx.Node) -> list[str]:
    parts = node.meta.get(QUALNAME, "").split(".")
    return parts if node.op == "call_module" else parts[:-1]


def _common_module(nodes: list[fx.Node]) -> str:
    paths = [_module_path(n) for n in nodes]
    common = paths[0]
    for path in paths[1:]:
        size = 0
        while size < min(len(common), len(path)) and common[size] == path[size]:
            size += 1
        common = common[:size]
    return ".".join(common)


def block_regions(graph: fx.Graph) -> list[tuple[str, fx.Node, set[fx.Node]]]:
    """Every block region of ``graph`` as ``(block name, merge node, nodes strictly inside)``.

    The name is the innermost module holding the region and its merge node, or the merge node's
    own name when that module is the root (a block written inline in the model's ``forward``)."""
    import networkx as nx

    annotate(graph)
    source = image_input(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    reached = reached_from(source)
    trunk = set(spine(graph)) | set(token_spine(graph))
    target = trunk_target(graph)
    if target is not None:
        trunk.add(target)
    idom = nx.immediate_dominators(tensor_digraph(graph), source)
    regions = []
    for join in graph.nodes:
        if join not in reached or not is_merge(join):
            continue
        inputs = {n for n in tensor_inputs(join) if n in reached}
        if len(inputs) < 2 or join not in idom:
            continue
        fork = idom[join]
        low = order[fork]
        region: set[fx.Node] = set()
        stack = [n for n in inputs if order[n] > low]
        while stack:
            node = stack.pop()
            if node in region:
                continue
            region.add(node)
            stack.extend(
                n
                for n in node.all_input_nodes
                if n in reached and order[n] > low and n not in region
            )
        if not region or region & trunk:
            continue
        name = _common_module([*region, join]) or join.meta.get(QUALNAME, join.name)
        regions.append((name, join, region))
    return regions


def _block_map(graph: fx.Graph) -> dict[fx.Node, str]:
    size = len(graph.nodes)
    cached = _CACHE.get(graph)
    if cached is not None and cached[0] == size:
        return cached[1]
    inside: dict[fx.Node, str] = {}
    for name, _, region in block_regions(graph):
        for node in region:
            known = inside.get(node)
            if known is None or name.count(".") < known.count("."):
                inside[node] = name
    _CACHE[graph] = (size, inside)
    return inside


def enclosing_block(node: fx.Node, graph: fx.Graph) -> str | None:
    """The qualified name of the outermost block ``node`` lies strictly inside, else None.

    A block is a residual block, a block merging parallel branches (Inception, dense or pyramid
    blocks) or an attention / gating branch (SE, spatial attention): see :func:`block_regions`.
    A node lies strictly inside a block when it is on a path from the block's fork to its merge
    and is neither of them; so a block's output (the merge, or any node after it) and the nodes
    between blocks lie inside none. Computed once per graph and cached (recomputed when the graph
    gains or loses nodes).
    """
    return _block_map(graph).get(node)
