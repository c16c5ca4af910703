"""Facts about a traced graph that the planner reads: layouts, the spine, stage ends.

Everything here is derived from the graph alone (node ops, module types, shapes from ShapeProp and
torchvision-style node names); no model-specific metadata is consulted.

* **Layout**: which 4-D values are image maps, NCHW or NHWC (channels last). Convolutions, norms
  and pools produce NCHW; constant ``permute`` calls are followed exactly (the NHWC maps of
  ConvNeXt blocks, Swin or MambaOut stages). Token values derived from an image map are tracked
  internally (``x.flatten(2).transpose(1, 2)``, Swin windows, NesT blocks), so a reshape back to
  the map's exact (N, H, W, C) or (N, C, H, W) recovers the layout (PVT-v2, CAFormer, Swin stage
  ends); patch merging through higher-rank reshapes is recognised as space-to-depth.
* **Spine**: the nodes every path from the input to the deepest feature map passes through
  (dominators, via networkx). Skip connections that bypass later stages on their way to the output
  do not remove a node from the spine.
* **Stage ends**: where one stage of the backbone hands over to the next: before a block that
  reduces the resolution, after a pooling op, and before a projection block that widens the network
  without striding (dilated ResNets).

Example:
    >>> import torchvision, nddrify
    >>> from nddrify.graph_analysis import stage_ends
    >>> traced = nddrify.trace_model(torchvision.models.resnet18())
    >>> [n.meta["qualname"] for n in stage_ends(traced.graph)]
    ['maxpool', 'layer1.1.relu_1', 'layer2.1.relu_1', 'layer3.1.relu_1', 'layer4.1.relu_1']
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .tracing import QUALNAME

__all__ = [
    "LAYOUT",
    "NONNEGATIVE",
    "annotate",
    "shape_of",
    "is_feature_map",
    "feature_shape",
    "spine",
    "stage_ends",
    "stage_module",
]

#: ``node.meta`` key: ``"NCHW"`` or ``"NHWC"`` for image feature maps, else ``None``.
LAYOUT = "nddrify_layout"
#: ``node.meta`` key: ``True`` when the node's value is known to be ≥ 0 (after a ReLU, say).
NONNEGATIVE = "nddrify_nonnegative"

_NCHW = (0, 1, 2, 3)
_NHWC = (0, 2, 3, 1)  # the actual dims of a channels-last map, as logical (N, C, H, W) indices
_LAYOUT_NAMES = {_NCHW: "NCHW", _NHWC: "NHWC"}

_NCHW_MODULES: tuple[type, ...] = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Upsample,
    nn.UpsamplingBilinear2d,
    nn.UpsamplingNearest2d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_NCHW_FUNCTIONS = {
    F.conv2d,
    torch.conv2d,
    F.conv_transpose2d,
    F.batch_norm,
    F.group_norm,
    F.instance_norm,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    F.pixel_shuffle,
    F.pixel_unshuffle,
}
_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
)
_POOL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_NONNEG_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Softmax,
    nn.Softplus,
)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, F.softplus}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax", "abs"}
# Ops that keep non-negativity of their (first) input.
_KEEPS_SIGN_MODULES: tuple[type, ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Upsample,
)
_KEEPS_SIGN_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    F.interpolate,
    torch.flatten,
}
_IDENTITY_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for ``node``, or None when its value is not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _module(node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    root = node.graph.owning_module
    return root.get_submodule(node.target) if root is not None else None


def _is_op(node: fx.Node, modules: tuple[type, ...], functions: set) -> bool:
    if node.op == "call_module":
        return isinstance(_module(node), modules)
    return node.op == "call_function" and node.target in functions


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if shape_of(n) is not None]


def _leads_with_nchw_op(module: nn.Module | None) -> bool:
    """A leaf container (torchvision's ``Conv2dNormActivation``, say) whose first op is a conv,
    norm or pool and that holds nothing that could leave N×C×H×W (linear layers, layer norms,
    permutes): it maps an N×C×H×W input to an N×C×H×W output."""
    if module is None:
        return False
    leaves = [m for m in module.modules() if m is not module and not any(m.children())]
    if not leaves or not isinstance(leaves[0], _NCHW_MODULES):
        return False
    return not any(
        isinstance(m, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)) or hasattr(m, "dims")
        for m in leaves
    )


# Internal layouts of token values derived from an H×W image map. They never reach
# ``meta[LAYOUT]``; they only let a reshape back to 4-D recover NCHW or NHWC when the sizes make it
# unambiguous (the exact (N, H, W, C) or (N, C, H, W) of the map the tokens came from):
# ("CL", positions, H, W): channels last, the leading dims enumerate the N·H·W positions in some
# order (Swin windows, NesT blocks, (B, H·W, C) sequences); ("BCN", H, W): a (B, C, H·W) sequence.
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "transpose", "swapaxes", "movedim"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.transpose, torch.movedim}
_MOVES = {"permute", "contiguous"}


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def _is_movement(node: fx.Node) -> bool:
    """Ops that only rearrange the values (reshape, permute, transpose, contiguous)."""
    return (
        _is_reshape(node)
        or (node.op == "call_method" and node.target in _MOVES)
        or (node.op == "call_function" and node.target is torch.permute)
    )


def _moved_dims(node: fx.Node, rank: int) -> tuple[int, ...] | None:
    """The dims a constant ``permute``/``transpose`` applies to a ``rank``-D value, else None."""
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif (node.op == "call_method" and node.target in {"transpose", "swapaxes"}) or (
        node.op == "call_function" and node.target is torch.transpose
    ):
        pair = node.args[1:3]
        if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
            return None
        order = list(range(rank))
        i, j = (d % rank for d in pair)
        order[i], order[j] = order[j], order[i]
        return tuple(order)
    else:
        return None
    if dims is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % rank for d in dims)


def _channels_last_tokens(layout, shape: tuple[int, ...]) -> tuple | None:
    if layout == _NHWC:
        return ("CL", shape[0] * shape[1] * shape[2], shape[1], shape[2])
    if isinstance(layout, tuple) and layout and layout[0] == "CL":
        return layout
    return None


def _token_layout(node: fx.Node, shape: tuple[int, ...], layouts: dict) -> tuple | None:
    """Layout of a value that is not an image map: tokens of a known image map, else None."""
    inputs = _tensor_inputs(node)
    if not inputs:
        return None
    src = shape_of(inputs[0])
    # A helper fx could not see into (NesT's ``deblockify``) that only rearranges one tensor.
    opaque = node.op == "call_function" and len(inputs) == 1 and math.prod(src) == math.prod(shape)
    if _is_movement(node) or opaque:
        source = layouts.get(inputs[0])
        if source == _NCHW and shape == (src[0], src[1], src[2] * src[3]):
            return ("BCN", src[2], src[3])
        if isinstance(source, tuple) and source and source[0] == "BCN":
            if src == shape and _moved_dims(node, len(src)) is None:
                return source
            if len(src) == 3 and shape == (src[0], src[1], source[1], source[2]):
                return source  # (B, C, H, W) again: _from_tokens makes it NCHW
            if len(src) == 3 and _moved_dims(node, 3) == (0, 2, 1):
                return ("CL", src[0] * src[2], source[1], source[2])
            return None
        tokens = _channels_last_tokens(source, src)
        if tokens is not None and len(src) == 3 and _moved_dims(node, 3) == (0, 2, 1):
            _, positions, h, w = tokens
            return ("BCN", h, w) if src[1] == h * w and positions == src[0] * h * w else None
        if tokens is None or shape[-1] != src[-1] or math.prod(shape[:-1]) != tokens[1]:
            return None
        dims = _moved_dims(node, len(src))
        keeps_last = dims is None or dims[-1] == len(src) - 1
        return tokens if keeps_last else None
    for source in inputs:
        layout, src = layouts.get(source), shape_of(source)
        if len(src) != len(shape):
            continue
        tokens = _channels_last_tokens(layout, src)
        # A channel-mixing op (linear, norm, activation, sum) keeps the positions.
        if tokens is not None and src[:-1] == shape[:-1]:
            return tokens
        is_bcn = isinstance(layout, tuple) and bool(layout) and layout[0] == "BCN"
        if is_bcn and src[0] == shape[0] and src[2] == shape[2]:
            return layout
    return None


def _from_tokens(shape: tuple[int, ...], layout) -> tuple[int, ...] | None:
    """NCHW/NHWC of a value whose token layout matches its image map's sizes exactly."""
    if not isinstance(layout, tuple) or not layout or not isinstance(layout[0], str):
        return None
    if layout[0] == "CL":
        _, positions, h, w = layout
        if shape[1:3] == (h, w) and shape[0] * h * w == positions:
            return _NHWC
    if layout[0] == "BCN" and shape[2:] == layout[1:]:
        return _NCHW
    return None


def _space_to_depth(node: fx.Node, shape: tuple[int, ...], layouts: dict):
    """NCHW/NHWC of patch merging done through higher-rank reshapes and permutes: walking back
    through data-movement ops reaches an image map with the same values per sample, whose spatial
    area is traded for channels by the same factor."""
    current = node
    for _ in range(6):
        inputs = _tensor_inputs(current)
        if not _is_movement(current) or len(inputs) != 1:
            return None
        current = inputs[0]
        layout = layouts.get(current)
        if layout in (_NCHW, _NHWC):
            src = shape_of(current)
            if src[0] != shape[0] or math.prod(src) != math.prod(shape):
                return None
            c_in, c_out = src[layout.index(1)], shape[layout.index(1)]
            return layout if c_out > c_in and c_out % c_in == 0 else None
    return None


def _layout(node: fx.Node, layouts: dict[fx.Node, tuple | None]):
    shape = shape_of(node)
    if shape is None or not shape:
        return None
    if len(shape) != 4:
        return _token_layout(node, shape, layouts)
    image = _image_layout(node, shape, layouts)
    if image is not None:
        return image
    tokens = _token_layout(node, shape, layouts)
    return _from_tokens(shape, tokens) or tokens


def _image_layout(node: fx.Node, shape: tuple[int, ...], layouts: dict):
    if node.op == "placeholder":
        return _NCHW
    if _is_op(node, _NCHW_MODULES, _NCHW_FUNCTIONS):
        return _NCHW
    inputs = [n for n in _tensor_inputs(node) if len(shape_of(n)) == 4]
    dims = _moved_dims(node, 4)  # a constant permute or transpose of a 4-D value
    if dims is not None:
        source = layouts.get(inputs[0]) if inputs else None
        return tuple(source[d] for d in dims) if source in (_NCHW, _NHWC) else None
    for source in inputs:
        if shape_of(source) == shape and layouts.get(source) in (_NCHW, _NHWC):
            return layouts[source]
    if _is_reshape(node):
        return _space_to_depth(node, shape, layouts)
    if node.op == "call_module":
        module = _module(node)
        dims = getattr(module, "dims", None)  # torchvision.ops.Permute
        if isinstance(dims, (list, tuple)) and len(dims) == 4 and inputs:
            source = layouts.get(inputs[0])
            return tuple(source[d] for d in dims) if source in (_NCHW, _NHWC) else None
        if _leads_with_nchw_op(module) and any(layouts.get(n) == _NCHW for n in inputs):
            return _NCHW
    for source in inputs:
        src = shape_of(source)
        # A channel-mixing op keeps H×W; a spatial op (pool, slice, pad) keeps C. Anything else
        # is unknown.
        if src[0] != shape[0]:
            continue
        if layouts.get(source) == _NCHW and (src[2:] == shape[2:] or src[1] == shape[1]):
            return _NCHW
        if layouts.get(source) == _NHWC and (src[1:3] == shape[1:3] or src[3] == shape[3]):
            return _NHWC
        # Space-to-depth (patch merging): the same values per sample, spatial area traded for
        # channels by the same factor.
        layout = layouts.get(source)
        if layout in (_NCHW, _NHWC) and math.prod(src) == math.prod(shape):
            c_in, c_out = src[layout.index(1)], shape[layout.index(1)]
            if c_out > c_in and c_out % c_in == 0:
                return layout
    return None


def _nonnegative(node: fx.Node, nonneg: dict[fx.Node, bool]) -> bool:
    if node.op == "call_method" and node.target in _NONNEG_METHODS:
        return True
    if _is_op(node, _NONNEG_MODULES, _NONNEG_FUNCTIONS):
        return True
    keeps = _is_op(node, _KEEPS_SIGN_MODULES, _KEEPS_SIGN_FUNCTIONS) or (
        node.op == "call_method" and node.target in {"contiguous", "flatten", "view", "reshape"}
    )
    if keeps and node.args and isinstance(node.args[0], fx.Node):
        return nonneg.get(node.args[0], False)
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return bool(tensors) and all(nonneg.get(t, False) for t in tensors)
    return False


def annotate(graph: fx.Graph) -> fx.Graph:
    """Record ``meta[LAYOUT]`` and ``meta[NONNEGATIVE]`` on every node (idempotent)."""
    layouts: dict[fx.Node, tuple | None] = {}
    nonneg: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        layouts[node] = _layout(node, layouts)
        nonneg[node] = _nonnegative(node, nonneg)
        node.meta[LAYOUT] = _LAYOUT_NAMES.get(layouts[node])
        node.meta[NONNEGATIVE] = nonneg[node]
    return graph


def feature_shape(node: fx.Node) -> tuple[int, int, int, int] | None:
    """(N, C, H, W) of an image feature map whatever its memory layout (NCHW or NHWC), else None.

    Needs :func:`annotate` to have run on the graph.
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


def _has_parameters(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    module = _module(node)
    return module is not None and any(True for _ in module.parameters())


def _is_noop(node: fx.Node) -> bool:
    """Ops that return their input unchanged (identity, dropout at eval, same-size adaptive pool)."""
    module = _module(node)
    if isinstance(module, _IDENTITY_MODULES):
        return True
    if _is_op(node, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), set()) or (
        node.op == "call_method" and node.target in {"contiguous", "clone"}
    ):
        inputs = _tensor_inputs(node)
        return bool(inputs) and shape_of(inputs[0]) == shape_of(node)
    return False


def _is_pool(node: fx.Node) -> bool:
    return _is_op(node, _POOL_MODULES, _POOL_FUNCTIONS) and not _is_noop(node)


class _Modules:
    """Which module each node ran in, and which modules end at which node."""

    def __init__(self, graph: fx.Graph) -> None:
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.first: dict[str, fx.Node] = {}
        self.last: dict[str, fx.Node] = {}
        self.size: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # how often each leaf module is called
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
            if node.op in ("placeholder", "output"):
                continue
            for module in self.ancestors(node):
                self.first.setdefault(module, node)
                self.last[module] = node
                self.size[module] = self.size.get(module, 0) + 1

    @staticmethod
    def ancestors(node: fx.Node) -> list[str]:
        """Module paths containing ``node``, outermost first (a leaf module call included)."""
        qualname = node.meta.get(QUALNAME, "")
        parts = qualname.split(".")
        if node.op != "call_module":
            parts = parts[:-1]
        return [".".join(parts[: i + 1]) for i in range(len(parts))]

    def ending_at(self, node: fx.Node) -> list[str]:
        return [m for m in self.ancestors(node) if self.last.get(m) is node]


def _stage_end(run: Sequence[fx.Node], transition: fx.Node | None, modules: _Modules) -> fx.Node:
    """The node in ``run`` (spine nodes at one resolution) where the stage before ``transition``
    ends: the end of the largest module that finishes in the run and does not contain the
    transition. ``transition=None`` means the end of the network."""
    around = set(modules.ancestors(transition)) if transition is not None else set()
    limit = modules.order[transition] if transition is not None else None
    best, best_size = run[-1], 0
    for node in run:
        if limit is not None and modules.order[node] >= limit:
            break
        ended = [m for m in modules.ending_at(node) if m not in around]
        size = max((modules.size[m] for m in ended), default=0)
        if size >= best_size and size > 0:
            best, best_size = node, size
    return _skip_noops_backwards(best)


def _skip_noops_backwards(node: fx.Node) -> fx.Node:
    while _is_noop(node) and node.args and isinstance(node.args[0], fx.Node):
        if not is_feature_map(node.args[0]):
            break
        node = node.args[0]
    return node


def _parent(module: str) -> str:
    return module.rpartition(".")[0]


def _stage_parent(points: Sequence[fx.Node], modules: _Modules) -> str | None:
    """The module whose children most of the points end (``"features"``, ``"backbone"``, ``""``)."""
    votes: dict[str, int] = {}
    for node in points:
        for parent in {_parent(m) for m in modules.ending_at(node)}:
            votes[parent] = votes.get(parent, 0) + 1
    if not votes:
        return None
    return max(votes, key=lambda p: (votes[p], p.count(".")))


def _final_stage_end(
    run: Sequence[fx.Node], points: Sequence[fx.Node], modules: _Modules
) -> fx.Node:
    """End of the deepest stage: the last module in ``run`` that is a sibling of the earlier
    stages (so a segmentation head after the backbone is not taken for a stage)."""
    parent = _stage_parent(points, modules)
    if parent is not None:
        for node in reversed(run):
            if any(_parent(m) == parent for m in modules.ending_at(node)):
                return _skip_noops_backwards(node)
    return _stage_end(run, None, modules)


def stage_module(node: fx.Node, points: Sequence[fx.Node], graph: fx.Graph) -> str:
    """A readable name for a stage end: the stage module that ends at ``node`` (``"layer1"`` for
    ``layer1.2.relu_2``), or the node's own name when no module ends there."""
    modules = _Modules(graph)
    ended = modules.ending_at(node)
    parent = _stage_parent(points, modules)
    for module in ended:
        if _parent(module) == parent:
            return module
    return ended[0] if ended else node.meta[QUALNAME]


def _region(start: fx.Node, end: fx.Node, modules: _Modules) -> list[fx.Node]:
    """Nodes strictly between two spine nodes in execution order that depend on ``start``."""
    lo, hi = modules.order[start], modules.order[end]
    inside: set[fx.Node] = {start}
    out = []
    for node in start.graph.nodes:
        i = modules.order[node]
        if i <= lo:
            continue
        if i > hi:
            break
        if any(n in inside for n in node.all_input_nodes):
            inside.add(node)
            out.append(node)
    return out


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function" and node.target in {operator.add, operator.iadd, torch.add}
    ) or (node.op == "call_method" and node.target in {"add", "add_"})


def _projection(start: fx.Node, end: fx.Node, modules: _Modules) -> fx.Node | None:
    """The first parametrised node of a residual block whose shortcut is a projection (two or more
    parametrised paths from ``start`` summed into ``end``) and that changes the width, else None."""
    if feature_shape(start)[1] == feature_shape(end)[1] or not _is_add(end):
        return None
    region = _region(start, end, modules)
    users = [u for u in start.users if u in set(region)]
    parametrised_paths = 0
    for user in users:
        reach = {user}
        for node in region:
            if node in reach or any(n in reach for n in node.all_input_nodes):
                reach.add(node)
        if any(_has_parameters(n) for n in reach if n is not end):
            parametrised_paths += 1
    if parametrised_paths < 2:
        return None
    return next((n for n in region if _has_parameters(n)), None)


def _first_downsampling(start: fx.Node, end: fx.Node, modules: _Modules) -> fx.Node:
    area = feature_shape(start)[2] * feature_shape(start)[3]
    for node in _region(start, end, modules):
        shape = feature_shape(node)
        if shape is not None and shape[2] * shape[3] < area:
            return node
    return end


def _pool_chain_end(node: fx.Node, spine_nodes: Sequence[fx.Node]) -> fx.Node:
    index = spine_nodes.index(node)
    while index + 1 < len(spine_nodes):
        nxt = spine_nodes[index + 1]
        if _is_pool(nxt) and nxt.args and nxt.args[0] is spine_nodes[index]:
            index += 1
        else:
            break
    return spine_nodes[index]


def _is_dilated(node: fx.Node) -> bool:
    module = _module(node)
    if isinstance(module, nn.Conv2d):
        return any(d > 1 for d in module.dilation)
    if node.op == "call_function" and node.target in {F.conv2d, torch.conv2d}:
        dilation = node.args[5] if len(node.args) > 5 else node.kwargs.get("dilation", 1)
        return any(d > 1 for d in (dilation if isinstance(dilation, (tuple, list)) else [dilation]))
    return False


def _outermost_ended(node: fx.Node, modules: _Modules) -> str | None:
    """The outermost module that ends at ``node`` or at the no-ops right after it."""
    ended = list(modules.ending_at(node))
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_noop(user) or _tensor_inputs(user) != [node]:
            break
        ended += modules.ending_at(user)
        node = user
    return min(ended, key=lambda m: m.count(".")) if ended else None


def _has_skip_merge(module: str, modules: _Modules) -> bool:
    """True when ``module`` holds a block with a skip connection: a sum, product or concat of
    feature maps one of which feeds the other (a residual or dense block), as opposed to a plain
    conv chain or parallel conv branches summed together."""
    lo, hi = modules.order[modules.first[module]], modules.order[modules.last[module]]
    for node in modules.first[module].graph.nodes:
        i = modules.order[node]
        if i < lo:
            continue
        if i > hi:
            break
        inputs = [n for n in _tensor_inputs(node) if is_feature_map(n)]
        if len(inputs) < 2 or not (_is_add(node) or _is_merge(node)):
            continue
        for later in inputs:
            seen, stack = set(), [later]
            while stack:
                current = stack.pop()
                if current in seen or modules.order.get(current, -1) < lo - 1:
                    continue
                seen.add(current)
                if current is not later and current in inputs:
                    return True
                stack.extend(current.all_input_nodes)
    return False


def _is_merge(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in {operator.mul, torch.mul, torch.cat, torch.concat}
    return node.op == "call_method" and node.target in {"mul", "mul_"}


def _is_inner_part(node: fx.Node, final: fx.Node, modules: _Modules) -> bool:
    """True when ``node`` ends only a piece of a module that stops short of the final stage
    (a conv inside a multi-conv stem, the pool that opens a stage): the outermost module ending
    at ``node`` (for a pool, the pool itself) sits in a parent other than the root that does not
    reach the final stage end, and is not itself a block with a skip connection."""
    outer = _outermost_ended(node, modules)
    if _is_pool(node) and node.op == "call_module":
        outer = str(node.target)
        parent = _parent(outer)
        if parent and modules.first.get(parent) is node and modules.last.get(parent) is not node:
            return True  # the pool that opens a stage (VoVNet's ``stages.1.pool``)
        if modules.calls.get(outer, 0) > 1:
            return True  # a pool module shared by several stages (a U-Net's ``pool``)
    if outer is None:
        return False
    parent = _parent(outer)
    if parent == "" or parent in modules.ancestors(final):
        return False
    return not _has_skip_merge(outer, modules)


def _collect_stage_ends(
    nodes: Sequence[fx.Node], modules: _Modules, final: fx.Node | None, dilated: bool
) -> list[fx.Node]:
    points: list[fx.Node] = []

    def run_before(index: int) -> list[fx.Node]:
        """Spine nodes at the resolution of ``nodes[index]`` since the last stage end."""
        shape = feature_shape(nodes[index])[2:]
        start = index
        while (
            start > 0
            and feature_shape(nodes[start - 1])[2:] == shape
            and nodes[start - 1] not in points
        ):
            start -= 1
        return list(nodes[start : index + 1])

    def accept(node: fx.Node | None) -> bool:
        if node is None or node.op == "placeholder":
            return False
        return final is None or not _is_inner_part(node, final, modules)

    for i in range(len(nodes) - 1):
        a, b = nodes[i], nodes[i + 1]
        area_a = feature_shape(a)[2] * feature_shape(a)[3]
        area_b = feature_shape(b)[2] * feature_shape(b)[3]
        direct_pool = _is_pool(b) and bool(b.args) and b.args[0] is a
        candidate = None
        if direct_pool:
            candidate = _pool_chain_end(b, nodes)
            if not accept(candidate) and area_b < area_a:
                candidate = _stage_end(run_before(i), b, modules)
        elif area_b < area_a:
            transition = _first_downsampling(a, b, modules)
            run = run_before(i)
            candidate = _stage_end(run, transition, modules)
            while not accept(candidate) and candidate in run[:-1]:
                # A piece of a stem won; look for a stage end after it.
                run = run[run.index(candidate) + 1 :]
                candidate = _stage_end(run, transition, modules)
        elif area_b == area_a and dilated:
            projection = _projection(a, b, modules)
            if projection is not None:
                candidate = _stage_end(run_before(i), projection, modules)
        if accept(candidate) and candidate not in points:
            points.append(candidate)
    final_run = list(nodes[nodes.index(points[-1]) :]) if points else list(nodes)
    points.append(_final_stage_end(final_run, points, modules))
    return points


def stage_ends(graph: fx.Graph) -> list[fx.Node]:
    """The automatic fusion points: the end of every backbone stage, in execution order.

    A stage ends (1) before a block that lowers the resolution, or right after the lowering when
    it is a parameter-free pool on the spine (VGG's pools); (2) after any pooling op on the spine,
    even one with stride 1 (DeepLab's pool4 and pool5); (3) in networks with dilated convolutions,
    before a block that changes the width through two or more parametrised paths (the projection
    blocks of dilated ResNets, which replace a stride); (4) at the end of the deepest stage. Where
    a stage end falls inside a run of same-resolution nodes, the end of the largest module that
    finishes there wins (``layer1`` rather than its last ReLU's neighbours; ``stages.0`` rather than
    the next stage's leading norm).

    A candidate is dropped when the outermost module ending there is only a piece of a non-root
    module that stops short of the final stage (the first conv of a two-conv ``stem``, the pool
    that opens ``stages.1``): stages are cut between modules of the backbone's own level, not
    inside a stem or a stage. A dropped pool falls back to the stage end before it.
    """
    nodes = spine(graph)
    if not nodes:
        return []
    modules = _Modules(graph)
    dilated = any(_is_dilated(n) for n in graph.nodes)
    first = _collect_stage_ends(nodes, modules, None, dilated)
    points = _collect_stage_ends(nodes, modules, first[-1], dilated)

    seen: set[fx.Node] = set()
    ordered = []
    for node in sorted(points, key=modules.order.__getitem__):
        if node not in seen and node.op != "placeholder":
            seen.add(node)
            ordered.append(node)
    return ordered
