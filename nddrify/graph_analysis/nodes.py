"""Node-level helpers shared by the graph analyses: shapes, module lookup and op tables.

Every predicate reads one :class:`torch.fx.Node` (its op, target, module type and the shapes
ShapeProp recorded); none of them looks at model-specific names.
"""

from __future__ import annotations

import operator
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..meta import QUALNAME

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "reached_from",
    "module_ancestors",
    "tensor_digraph",
    "POOL_MODULES",
    "POOL_FUNCTIONS",
    "IDENTITY_MODULES",
    "shape_of",
    "module_of",
    "is_op",
    "tensor_inputs",
    "has_parameters",
    "is_noop",
    "is_pool",
    "is_pad",
    "is_upsample",
    "is_conv",
    "is_merge",
    "is_gate_activation",
]

#: Pooling modules (a pool on the spine ends a stage).
POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
)
#: Pooling functions (the functional forms of :data:`POOL_MODULES`).
POOL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
#: Modules that return their input unchanged in eval mode.
IDENTITY_MODULES: tuple[type, ...] = (
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


def module_of(node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    root = node.graph.owning_module
    return root.get_submodule(node.target) if root is not None else None


def is_op(node: fx.Node, modules: tuple[type, ...], functions: Collection[object]) -> bool:
    """True when ``node`` calls a module of one of the ``modules`` types or one of ``functions``."""
    if node.op == "call_module":
        return isinstance(module_of(node), modules)
    return node.op == "call_function" and node.target in functions


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` whose values are tensors (they have a recorded shape)."""
    return [n for n in node.all_input_nodes if shape_of(n) is not None]


def has_parameters(node: fx.Node) -> bool:
    """True for a ``get_attr`` node or a call of a module that holds parameters."""
    if node.op == "get_attr":
        return True
    module = module_of(node)
    return module is not None and any(True for _ in module.parameters())


def is_noop(node: fx.Node) -> bool:
    """Ops that return their input unchanged (identity, dropout at eval, same-size adaptive pool)."""
    module = module_of(node)
    if isinstance(module, IDENTITY_MODULES):
        return True
    if is_op(node, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), set()) or (
        node.op == "call_method" and node.target in {"contiguous", "clone"}
    ):
        inputs = tensor_inputs(node)
        return bool(inputs) and shape_of(inputs[0]) == shape_of(node)
    return False


def is_pool(node: fx.Node) -> bool:
    """True for a pooling op that changes its input (not a same-size adaptive pool)."""
    return is_op(node, POOL_MODULES, POOL_FUNCTIONS) and not is_noop(node)


#: Padding modules (explicit or "same" padding before a strided conv; never a stage boundary).
PAD_MODULES: tuple[type, ...] = (
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.CircularPad2d,
)
_UPSAMPLE_MODULES: tuple[type, ...] = (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d)
_UPSAMPLE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
_GATE_MODULES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Tanh)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softmax, torch.softmax, torch.tanh}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax", "tanh", "tanh_"}


def is_pad(node: fx.Node) -> bool:
    """True for a padding op (``nn.ZeroPad2d`` and friends, ``F.pad``): it only widens the map."""
    return is_op(node, PAD_MODULES, {F.pad, torch.constant_pad_nd})


def is_upsample(node: fx.Node) -> bool:
    """True for an upsampling op (``F.interpolate``, ``nn.Upsample``)."""
    return is_op(node, _UPSAMPLE_MODULES, _UPSAMPLE_FUNCTIONS)


def is_conv(node: fx.Node) -> bool:
    """True for a 2-D convolution (module or functional) or a linear layer."""
    return is_op(node, (nn.Conv2d, nn.Linear), {F.conv2d, torch.conv2d, F.linear})


def is_merge(node: fx.Node) -> bool:
    """True for ops that merge two tensors: sums, differences, products and concatenations."""
    if node.op == "call_function":
        return node.target in {
            operator.add,
            operator.iadd,
            operator.sub,
            operator.mul,
            operator.imul,
            torch.add,
            torch.sub,
            torch.mul,
            torch.cat,
            torch.concat,
            torch.addcmul,
        }
    return node.op == "call_method" and node.target in {"add", "add_", "mul", "mul_", "sub"}


def is_gate_activation(node: fx.Node) -> bool:
    """True for the squashing activations that make gates (sigmoid, hard sigmoid, softmax, tanh)."""
    if node.op == "call_method":
        return node.target in _GATE_METHODS
    if node.op == "call_module":
        module = module_of(node)
        return isinstance(module, _GATE_MODULES) or type(module).__name__.lower() in {
            "hardsigmoid",
            "hard_sigmoid",
            "sigmoid",
        }
    return is_op(node, (), _GATE_FUNCTIONS)


def reached_from(source: fx.Node, *, upstream: bool = False) -> set[fx.Node]:
    """``source`` and every node computed from it (its users, their users, ...), or with
    ``upstream=True`` every node it is computed from."""
    reached, stack = {source}, [source]
    while stack:
        node = stack.pop()
        for other in node.all_input_nodes if upstream else node.users:
            if other not in reached:
                reached.add(other)
                stack.append(other)
    return reached


def module_ancestors(node: fx.Node) -> list[str]:
    """Module paths containing ``node``, outermost first (a leaf module call included):
    ``["layer1", "layer1.0"]`` for ``layer1.0.relu``."""
    parts = str(node.meta.get(QUALNAME, "")).split(".")
    if node.op != "call_module":
        parts = parts[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def tensor_digraph(graph: fx.Graph) -> nx.DiGraph:
    """The graph as a networkx digraph (an edge from each node to each user) over tensor values
    only: sizes read off a value (``x.shape``, a block's ``feat_size``) and passed on to later
    layers are no path of features. Non-tensor nodes that pack the output (a ``ModelOutput``,
    a dict) are kept."""
    import networkx as nx

    dg = nx.DiGraph()
    for node in graph.nodes:
        packs_output = any(user.op == "output" for user in node.users)
        if shape_of(node) is None and node.op not in ("output", "placeholder") and not packs_output:
            continue
        dg.add_node(node)
        dg.add_edges_from((node, user) for user in node.users)
    return dg
