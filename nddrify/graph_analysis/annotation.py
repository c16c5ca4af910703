"""The facts :func:`annotate` records in ``node.meta``: layout and sign.

The meta keys are :data:`nddrify.meta.LAYOUT` and :data:`nddrify.meta.NONNEGATIVE`; other
modules read them by these constants (:func:`nddrify.graph_analysis.feature_shape`, the planner's fusion points).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import LAYOUT, NONNEGATIVE  # the keys are documented in nddrify.meta
from .layout import ImageLayout, Layout, infer_layout
from .nodes import is_op
from .tokens import annotate_tokens

__all__ = ["LAYOUT", "NONNEGATIVE", "annotate"]

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


def _nonnegative(node: fx.Node, nonneg: dict[fx.Node, bool]) -> bool:
    if node.op == "call_method" and node.target in _NONNEG_METHODS:
        return True
    if is_op(node, _NONNEG_MODULES, _NONNEG_FUNCTIONS):
        return True
    keeps = is_op(node, _KEEPS_SIGN_MODULES, _KEEPS_SIGN_FUNCTIONS) or (
        node.op == "call_method" and node.target in {"contiguous", "flatten", "view", "reshape"}
    )
    if keeps and node.args and isinstance(node.args[0], fx.Node):
        return nonneg.get(node.args[0], False)
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return bool(tensors) and all(nonneg.get(t, False) for t in tensors)
    return False


def annotate(graph: fx.Graph) -> fx.Graph:
    """Record ``meta[LAYOUT]``, ``meta[NONNEGATIVE]`` and, on token sequences,
    ``meta[TOKENS]`` on every node (idempotent)."""
    layouts: dict[fx.Node, Layout | None] = {}
    nonneg: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        layout = layouts[node] = infer_layout(node, layouts)
        nonneg[node] = _nonnegative(node, nonneg)
        node.meta[LAYOUT] = layout.name if isinstance(layout, ImageLayout) else None
        node.meta[NONNEGATIVE] = nonneg[node]
    annotate_tokens(graph, layouts)
    return graph
