"""What the planner reads of any fusable value, image map or token sequence, and the automatic
points of models whose trunk runs on tokens.

Example:
    >>> import timm
    >>> from nddrify.graph_analysis import annotate, auto_points, point_shape
    >>> from nddrify.tracing import trace_model
    >>> vit = annotate(trace_model(timm.create_model("vit_tiny_patch16_224", depth=4)).graph)
    >>> [(n.meta["qualname"], point_shape(n)) for n in auto_points(vit)]  # doctest: +NORMALIZE_WHITESPACE
    [('blocks.0.add_1', (1, 192, 197)), ('blocks.1.add_1', (1, 192, 197)),
     ('blocks.2.add_1', (1, 192, 197)), ('blocks.3.add_1', (1, 192, 197))]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import LAYOUT, TOKENS
from .nodes import is_op
from .spine import feature_shape, is_feature_map
from .stages import stage_ends
from .tokens import TokenGrid, is_token_sequence, token_area, token_shape, token_stage_ends

__all__ = [
    "is_fusable",
    "point_shape",
    "spatial_size",
    "token_grid",
    "with_token_stages",
    "auto_points",
]


def is_fusable(node: fx.Node) -> bool:
    """An image feature map or a token sequence: a value a fusion layer can take."""
    return is_feature_map(node) or is_token_sequence(node)


def point_shape(node: fx.Node) -> tuple[int, ...] | None:
    """(N, C, H, W) of an image map whatever its layout, (N, C, L) of a token sequence, else
    None."""
    tokens = token_shape(node)
    if tokens is not None:
        return (tokens[0], tokens[2], tokens[1])
    return feature_shape(node)


def spatial_size(node: fx.Node) -> tuple[int, int] | None:
    """(H, W) of an image map, or of a token sequence's patch grid when known; else None."""
    if node.meta.get(LAYOUT) == "NLC":
        grid = node.meta.get(TOKENS) or TokenGrid()
        return (grid.height, grid.width) if grid.known else None
    shape = feature_shape(node)
    return None if shape is None else (shape[2], shape[3])


def token_grid(node: fx.Node) -> tuple[int, ...]:
    """``(prefix, H, W)`` of a token sequence with a known grid, ``(prefix,)`` without one, and
    ``()`` for anything else (what :class:`~nddrify.plans.FusionPoint` records)."""
    if node.meta.get(LAYOUT) != "NLC":
        return ()
    grid = node.meta.get(TOKENS) or TokenGrid()
    return (grid.prefix, grid.height, grid.width) if grid.known else (grid.prefix,)


def with_token_stages(
    map_points: Sequence[fx.Node], graph: fx.Graph, levels: int = 4
) -> list[fx.Node]:
    """Automatic points of a model whose trunk runs (partly) on tokens: the map stage ends and
    the token stage ends (:func:`token_stage_ends`) together; where a map and a token stage have
    the same number of positions, the later one is the stage end (a ViT's patch-embedding map
    gives way to its blocks; CoaT's map after a token stage replaces the stage's last block).
    Maps after the last token stage (a neck reading several blocks, as in DPT) are not stage
    ends."""
    tokens = token_stage_ends(graph, levels)
    if not tokens:
        return list(map_points)
    order = {n: i for i, n in enumerate(graph.nodes)}
    # Maps after the last token stage are its output laid out as a map (Segformer, Twins), or a
    # neck reading the blocks through projections (DPT), which is no stage end.
    map_points = [
        n for n in map_points if order[n] < order[tokens[-1]] or _relaid(tokens[-1], n, order)
    ]
    area = {n: token_area(n) for n in tokens}
    for node in map_points:
        size = spatial_size(node)
        area[node] = size[0] * size[1] if size else -1
    kept = []
    for node in [*map_points, *tokens]:
        later = [
            other
            for other in (tokens if node in map_points else map_points)
            if area[other] == area[node] and order[other] > order[node]
        ]
        if not later:
            kept.append(node)
    return sorted(set(kept), key=order.__getitem__)


def _relaid(tokens: fx.Node, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``node`` is computed from ``tokens`` without a convolution or linear layer (only
    norms, activations and reshapes): the same stage's output in another layout."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is tokens:
            continue
        if current in seen or order[current] < order[tokens]:
            continue
        seen.add(current)
        if is_op(current, (nn.Conv2d, nn.Linear), {F.conv2d, F.linear}):
            return False
        stack.extend(current.all_input_nodes)
    return True


def auto_points(graph: fx.Graph, token_levels: int = 4) -> list[fx.Node]:
    """The automatic fusion points of an annotated graph: its stage ends
    (:func:`~nddrify.graph_analysis.stage_ends`) with the token stages of a transformer trunk
    (:func:`with_token_stages`; ``token_levels`` evenly spaced blocks on a plain ViT)."""
    return with_token_stages(stage_ends(graph), graph, token_levels)
