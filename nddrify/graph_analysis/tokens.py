"""Token sequences: the N × L × C values a transformer's blocks work on, and their stage ends.

:func:`annotate_tokens` (run by :func:`~nddrify.graph_analysis.annotate`) marks 3-D values with
the batch size in front as ``meta[LAYOUT] = "NLC"`` and records a :class:`TokenGrid` under
``meta[TOKENS]``. A sequence is recognised where it starts and followed from there:

* a patch embedding's ``x.flatten(2).transpose(1, 2)`` (or the NHWC equivalent) starts a
  sequence of H·W patch tokens in raster order (grid known);
* ``torch.cat`` of extra tokens (class, distillation, register tokens) in front of it adds a
  prefix; slicing the prefix off again recovers the grid;
* any op whose value keeps the (N, L) of a token input keeps its tokens (norms, linear layers,
  residual sums, attention blocks, positional embeddings);
* a ``LayerNorm`` or ``Linear`` over the last dim of any other N × L × C value starts a sequence
  whose grid is unknown (token pooling in Hiera and MViTv2, unrolled orders).

:func:`token_stage_ends` picks fusion points on the token trunk: the blocks of the model (the
children of the container whose children end on the trunk) grouped by token count; a model with
one token count (a plain ViT) gets ``levels`` evenly spaced blocks ending at the last one, a
hierarchical one the last block of every token stage.

Example:
    >>> import timm
    >>> from nddrify.graph_analysis import annotate, token_stage_ends
    >>> from nddrify.tracing import trace_model
    >>> vit = trace_model(timm.create_model("vit_tiny_patch16_224", depth=8))
    >>> [n.meta["qualname"] for n in token_stage_ends(annotate(vit.graph))]
    ['blocks.1.add_1', 'blocks.3.add_1', 'blocks.5.add_1', 'blocks.7.add_1']
    >>> vit.graph_module.graph.find_nodes(op="call_function", target=__import__("torch").cat)[0].meta["nddrify_tokens"]
    TokenGrid(prefix=1, height=14, width=14)
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import LAYOUT, TOKENS
from .layout import (
    NHWC,
    ChannelsFirstTokens,
    ChannelsLastTokens,
    Layout,
    _is_movement,
    _moved_dims,
)
from .nodes import is_op, module_ancestors, shape_of, tensor_digraph, tensor_inputs

__all__ = [
    "TokenGrid",
    "annotate_tokens",
    "is_token_sequence",
    "token_shape",
    "token_spine",
    "token_blocks",
    "evenly_spaced",
    "token_stage_ends",
    "token_area",
]


@dataclass(frozen=True)
class TokenGrid:
    """What is known about a token sequence's order: ``prefix`` extra tokens (class,
    distillation, registers) followed, when ``height`` and ``width`` are known, by the
    height×width patch tokens in raster order."""

    prefix: int = 0
    height: int | None = None
    width: int | None = None

    @property
    def known(self) -> bool:
        """Whether the patch grid is known (the sequence can be reshaped to an image map)."""
        return self.height is not None and self.width is not None


_PER_TOKEN_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.Linear)
_PER_TOKEN_FUNCTIONS = {F.layer_norm, F.linear}


def is_token_sequence(node: fx.Node) -> bool:
    """True for values annotated as token sequences (``meta[LAYOUT] == "NLC"``) with ≥ 2 tokens."""
    shape = shape_of(node)
    return node.meta.get(LAYOUT) == "NLC" and shape is not None and shape[1] > 1


def token_shape(node: fx.Node) -> tuple[int, int, int] | None:
    """(N, L, C) of a token sequence, else None."""
    return shape_of(node) if node.meta.get(LAYOUT) == "NLC" else None  # type: ignore[return-value]


def token_area(node: fx.Node) -> int:
    """The number of patch positions of a token sequence: H·W of its grid when known, else its
    token count less the extra tokens."""
    grid = node.meta.get(TOKENS) or TokenGrid()
    if grid.known:
        return grid.height * grid.width
    return shape_of(node)[1] - grid.prefix


def _slice_on_tokens(node: fx.Node) -> tuple[int, int | None] | None:
    """(start, stop) of ``x[:, start:stop]`` (a slice on dim 1 only), else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1] if len(node.args) > 1 else None
    if not (isinstance(index, tuple) and len(index) >= 2 and isinstance(index[1], slice)):
        return None
    if index[0] != slice(None) or any(i not in (slice(None), Ellipsis) for i in index[2:]):
        return None
    part = index[1]
    if part.step not in (None, 1) or not isinstance(part.start or 0, int):
        return None
    return (part.start or 0, part.stop)


def _cat_dim(node: fx.Node) -> int | None:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def _token_grid(
    node: fx.Node, shape: tuple[int, ...], layouts: Mapping[fx.Node, Layout | None], batch: int
) -> TokenGrid | None:
    """The :class:`TokenGrid` of a 3-D value with the batch in front, or None (not tokens)."""
    inputs = tensor_inputs(node)
    token_inputs = [n for n in inputs if n.meta.get(LAYOUT) == "NLC"]
    layout = layouts.get(node)
    if isinstance(layout, ChannelsLastTokens) and not token_inputs:
        h, w = layout.height, layout.width
        if shape[1] == h * w and layout.positions == batch * h * w:
            return TokenGrid(0, h, w) if _in_raster_order(node, inputs, layouts) else TokenGrid()
    token_inputs = [n for n in inputs if n.meta.get(LAYOUT) == "NLC"]
    if _cat_dim(node) in (1, -2):
        parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
        shapes = [shape_of(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(s is None or len(s) != 3 or s[2] != shape[2] for s in shapes) or not token_inputs:
            return None
        last = parts[-1]
        if last.meta.get(LAYOUT) == "NLC":
            grid = last.meta[TOKENS]
            return TokenGrid(grid.prefix + sum(s[1] for s in shapes[:-1]), grid.height, grid.width)
        first = parts[0]
        prefix = first.meta[TOKENS].prefix if first.meta.get(LAYOUT) == "NLC" else 0
        return TokenGrid(prefix)
    sliced = _slice_on_tokens(node)
    if sliced is not None and token_inputs and token_inputs[0] is node.args[0]:
        grid: TokenGrid = token_inputs[0].meta[TOKENS]
        start, stop = sliced
        if start == grid.prefix and stop is None and grid.known:
            return TokenGrid(0, grid.height, grid.width)
        return TokenGrid(max(grid.prefix - start, 0)) if start < grid.prefix else TokenGrid()
    if _is_movement(node):
        source = inputs[0] if inputs else None
        dims = _moved_dims(node, 3)
        if source is not None and source.meta.get(LAYOUT) == "NLC" and shape_of(source) == shape:
            return source.meta[TOKENS] if dims in (None, (0, 1, 2)) else None
        return None
    same = [n.meta[TOKENS] for n in token_inputs if shape_of(n)[:2] == shape[:2]]
    if same:
        # A residual sum of the stream (grid known) and an attention output (order unknown).
        return max(same, key=lambda grid: (grid.known, grid.prefix))
    if is_op(node, _PER_TOKEN_MODULES, _PER_TOKEN_FUNCTIONS) and inputs:
        src = shape_of(inputs[0])
        if len(src) == 3 and src[:2] == shape[:2] and not _is_channels_first(inputs[0], layouts):
            return TokenGrid()
    return None


def _in_raster_order(
    node: fx.Node, inputs: Sequence[fx.Node], layouts: Mapping[fx.Node, Layout | None]
) -> bool:
    """Whether a (N, H·W, C) value lists the positions row by row: ``x.flatten(2).transpose(1,
    2)`` of an NCHW map, or an NHWC map reshaped to (N, H·W, C); other routes (Hiera's unrolled
    tokens, windows) leave the order unknown."""
    if not inputs or not _is_movement(node):
        return False
    source = layouts.get(inputs[0])
    if isinstance(source, ChannelsFirstTokens):
        return _moved_dims(node, 3) == (0, 2, 1)
    return source == NHWC and _moved_dims(node, 4) is None


def _is_channels_first(node: fx.Node, layouts: Mapping[fx.Node, Layout | None]) -> bool:
    """A (N, C, L) value: a transposed token sequence (a Mixer's token-mixing MLP input)."""
    if isinstance(layouts.get(node), ChannelsFirstTokens):
        return True
    inputs = tensor_inputs(node)
    return (
        _is_movement(node)
        and _moved_dims(node, 3) == (0, 2, 1)
        and bool(inputs)
        and inputs[0].meta.get(LAYOUT) == "NLC"
    )


def annotate_tokens(graph: fx.Graph, layouts: Mapping[fx.Node, Layout | None]) -> None:
    """Mark token sequences: ``meta[LAYOUT] = "NLC"`` and ``meta[TOKENS]`` (a :class:`TokenGrid`).

    ``layouts`` are the layouts :func:`~nddrify.graph_analysis.layout.infer_layout` found (token
    values derived from image maps start sequences). Runs in graph order; nodes already marked
    as image maps are left alone.
    """
    placeholder = next((n for n in graph.nodes if n.op == "placeholder"), None)
    image = shape_of(placeholder) if placeholder is not None else None
    if not image:
        return
    batch = image[0]
    for node in graph.nodes:
        node.meta.pop(TOKENS, None)
        shape = shape_of(node)
        if shape is None or len(shape) != 3 or shape[0] != batch or node.meta.get(LAYOUT):
            continue
        grid = _token_grid(node, shape, layouts, batch)
        if grid is not None:
            node.meta[LAYOUT] = "NLC"
            node.meta[TOKENS] = grid


def _token_chain(graph: fx.Graph) -> list[fx.Node]:
    """Nodes every path from the input to the trunk's last token sequence passes through (the
    last one the output depends on), that sequence included, in execution order. The target is
    not the output itself: a DPT-style neck reads several blocks, which would leave no block
    that every path to the output passes through."""
    import networkx as nx

    dg = tensor_digraph(graph)
    source = next(n for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live = nx.ancestors(dg, output) & nx.descendants(dg, source) if output in dg else set()
    target = next((n for n in reversed(graph.nodes) if n in live and is_token_sequence(n)), None)
    if target is None:
        return []
    idom = nx.immediate_dominators(dg, source)
    chain = [target]
    while chain[-1] is not source:
        chain.append(idom[chain[-1]])
    return list(reversed(chain[:-1]))


def token_spine(graph: fx.Graph) -> list[fx.Node]:
    """The token sequences every path from the input to the output passes through (the
    transformer's trunk), in execution order. Needs :func:`annotate` to have run."""
    return [n for n in _token_chain(graph) if is_token_sequence(n)]


def _pattern(module: str) -> str:
    """``stages.#.blocks`` for ``stages.2.blocks``, ``serial_blocks#`` for ``serial_blocks3``."""
    return re.sub(r"\d+", "#", module)


def token_blocks(graph: fx.Graph, spine_nodes: Sequence[fx.Node]) -> list[tuple[str, fx.Node]]:
    """The blocks of a token trunk as (module, output node): the children of the container
    (``blocks``, ``encoder.layers``, ``stages.2.blocks``…) whose children most often end on the
    trunk. Several containers at one depth (one per stage) count together."""
    last: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            for module in module_ancestors(node):
                last[module] = node
    on_spine = set(spine_nodes)
    ending = [(m, n) for m, n in last.items() if n in on_spine and "." in m]
    votes: dict[tuple[bool, int, str], int] = {}
    for module, _ in ending:
        parent, _, child = module.rpartition(".")
        # Stage containers (``stages.0.blocks``, ``stages.1.blocks``) vote as one pattern; a
        # list of numbered blocks beats a model's named parts (``embeddings``, ``layernorm``).
        key = (child.isdigit(), parent.count("."), _pattern(parent))
        votes[key] = votes.get(key, 0) + 1
    if not votes:
        return []
    (_, _, pattern), count = max(votes.items(), key=lambda kv: (kv[0][0], kv[1], kv[0][1]))
    if count < 2:
        return []
    blocks = []
    for module, node in ending:
        parent = module.rpartition(".")[0]
        if _pattern(parent) == pattern:
            blocks.append((module, node))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(blocks, key=lambda mn: order[mn[1]])


def evenly_spaced(count: int, levels: int) -> list[int]:
    """Indices of ``levels`` of ``count`` blocks, evenly spaced and ending at the last one.

    Example:
        >>> from nddrify.graph_analysis.tokens import evenly_spaced
        >>> evenly_spaced(12, 4), evenly_spaced(24, 4), evenly_spaced(3, 4)
        ([2, 5, 8, 11], [5, 11, 17, 23], [0, 1, 2])
    """
    if count <= levels:
        return list(range(count))
    return [round((i + 1) * count / levels) - 1 for i in range(levels)]


def token_stage_ends(graph: fx.Graph, levels: int = 4) -> list[fx.Node]:
    """Fusion points on a token trunk (empty when the model has none).

    The blocks are grouped into stages by token count; a model with one stage (a plain ViT)
    gets ``levels`` evenly spaced blocks ending at the last one, a hierarchical model the last
    block of every stage. Needs :func:`annotate` to have run.
    """
    spine_nodes = token_spine(graph)
    blocks = token_blocks(graph, spine_nodes)
    if not blocks:
        return []
    stages: list[list[fx.Node]] = []
    for _, node in blocks:
        if stages and token_area(stages[-1][-1]) == token_area(node):
            stages[-1].append(node)
        else:
            stages.append([node])
    if len(stages) == 1:
        return [stages[0][i] for i in evenly_spaced(len(stages[0]), levels)]
    return [stage[-1] for stage in stages]
