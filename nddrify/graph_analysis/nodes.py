"""Node-level helpers shared by the graph analyses: shapes, module lookup and op tables.

Every predicate reads one :class:`torch.fx.Node` (its op, target, module type and the shapes
ShapeProp recorded); none of them looks at model-specific names.
"""

from __future__ import annotations

from collections.abc import Collection

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
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
