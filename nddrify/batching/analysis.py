"""Which operations have a batched form, and why the K tasks' modules cannot share one.

The per-operation and per-module questions :mod:`~nddrify.batching.rules` asks when it decides
how K aligned task nodes run: ``operation_kind`` (how a node runs on task-stacked maps, if at
all), ``module_kind`` (the same for a module), ``module_difference`` (why two tasks' modules
differ), ``fusion_difference`` (why a fusion layer runs per task), and the node predicates and
shape helpers they share. Layer types with a batched form come from the registry
(:mod:`~nddrify.batching.registry`).

Example:
    >>> from torch import nn
    >>> from nddrify.batching.analysis import module_difference, module_kind
    >>> module_difference(nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 5), "seg", "normal")
    'kernel_size (3, 3) in seg vs (5, 5) in normal'
    >>> [module_kind(module, 4) for module in (nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LSTM(3, 8))]
    ['module', 'asis', None]
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils import _pytree as pytree
from torchvision.ops import SqueezeExcitation, StochasticDepth

from ..layers import NDDRLayer, NDDRShortcutLayer
from .modules import has_state, is_timm_norm_act
from .registry import batched_form

__all__ = [
    "tensor_meta",
    "meta_signature",
    "is_size_query",
    "is_random",
    "is_plain_function",
    "module_kind",
    "operation_kind",
    "same_value",
    "shape_text",
    "module_difference",
    "fusion_difference",
]


def _words(text: str) -> set[str]:
    return set(text.split())


def _named(owner: Any, names: str) -> tuple[Any, ...]:
    return tuple(getattr(owner, name) for name in _words(names))


_ELEMENTWISE_MODULES = _named(
    nn,
    "ReLU ReLU6 LeakyReLU ELU CELU SELU GELU SiLU Mish Sigmoid Tanh Hardswish Hardsigmoid "
    "Hardtanh Softplus Identity Dropout AlphaDropout",
)
#: parameter-free modules acting on the trailing (spatial) dims of an N × C × spatial input
_SPATIAL_MODULES: dict[type, int] = {
    module: dims
    for dims in (1, 2, 3)
    for module in _named(
        nn,
        f"MaxPool{dims}d AvgPool{dims}d AdaptiveAvgPool{dims}d AdaptiveMaxPool{dims}d "
        f"Dropout{dims}d ZeroPad{dims}d ConstantPad{dims}d ReflectionPad{dims}d "
        f"ReplicationPad{dims}d",
    )
}
_SPATIAL_MODULES.update({nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2})
_SPATIAL_ANY = (nn.Upsample,)  # any N × C × spatial input
_EVAL_IDENTITY = (StochasticDepth,)  # random per sample in training, the identity in eval

_ELEMENTWISE_FUNCTIONS = {
    *_named(
        F,
        "relu relu_ relu6 gelu silu mish hardswish hardsigmoid hardtanh leaky_relu elu celu "
        "selu softplus sigmoid tanh dropout",
    ),
    *_named(torch, "relu relu_ sigmoid tanh abs neg add sub mul div"),
    *_named(operator, "neg add sub mul truediv"),
}
_SPATIAL_FUNCTIONS = set(
    _named(
        F,
        "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
        "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
        "adaptive_max_pool3d interpolate dropout1d dropout2d dropout3d",
    )
)
_MAX_POOLS = set(_named(F, "max_pool1d max_pool2d max_pool3d"))
_ELEMENTWISE_METHODS = _words(
    "relu relu_ sigmoid sigmoid_ tanh tanh_ add add_ sub sub_ mul mul_ div div_ neg abs "
    "contiguous clone"
)
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SIZE_METHODS = {"size", "dim"}
_SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_RANDOM = (nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RANDOM_FUNCTIONS = set(_named(F, "dropout dropout1d dropout2d dropout3d alpha_dropout"))
#: functions of plain Python values (sizes, indices) that are safe to compute once for all tasks
_PLAIN_FUNCTIONS = {
    *_named(operator, "getitem add sub mul floordiv truediv mod neg"),
    *_named(builtins, "getattr len int"),
}


def tensor_meta(node: Any) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def meta_signature(value: Any) -> Any:
    if isinstance(value, TensorMetadata):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(meta_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, meta_signature(v)) for k, v in value.items())
    return None


def is_size_query(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's size, rank, dtype or device (the same for all tasks)."""
    return (node.op == "call_method" and node.target in _SIZE_METHODS) or (
        node.op == "call_function"
        and node.target is builtins.getattr
        and node.args[1] in _SIZE_ATTRIBUTES
    )


def is_random(node: fx.Node, module: nn.Module | None) -> bool:
    """Whether ``node`` draws random numbers (dropout in training), so cannot run once for all
    tasks on a shared input."""
    return (isinstance(module, _RANDOM) and module.training) or (
        node.op == "call_function" and node.target in _RANDOM_FUNCTIONS
    )


def is_plain_function(node: fx.Node) -> bool:
    """Whether ``node`` is a function of plain Python values (sizes, indices) that is safe to
    compute once for all tasks."""
    return node.op == "call_function" and node.target in _PLAIN_FUNCTIONS


def _normal_dims(dims: Any, ndim: int) -> list[int] | None:
    values = (
        [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
    )
    if values is None or not all(isinstance(d, int) for d in values):
        return None
    return [d % ndim for d in values]


def _broadcasts(shape: Sequence[int], out: Sequence[int]) -> bool:
    """Whether an operand of ``shape`` broadcasts to ``out`` without mixing tasks: same rank and
    channel count; other dims equal or 1 (a squeeze-excitation scale N × C × 1 × 1)."""
    if len(shape) != len(out) or shape[1] != out[1]:
        return False
    return all(a in (1, b) for i, (a, b) in enumerate(zip(shape, out)) if i != 1)


def _is_container(module: nn.Module) -> bool:
    """Whether ``module`` only calls its children, so that its batched form is its own forward
    with batched children: a plain ``nn.Sequential`` (or a subclass keeping its forward, such as
    torchvision's Conv2dNormActivation) or torchvision's SqueezeExcitation."""
    if module._parameters or module._buffers:
        return False
    kind = type(module)
    return kind is SqueezeExcitation or (
        isinstance(module, nn.Sequential) and kind.forward is nn.Sequential.forward
    )


def module_kind(module: nn.Module, ndim: int) -> str | None:
    """How ``module`` runs batched on an input of ``ndim`` dims: "module" (a batched module with
    the K tasks' weights), "asis" (itself, on the stacked tensor), or None."""
    kind = type(module)
    form = batched_form(kind)
    if form is not None and form.kind == "conv":
        return "module" if ndim == module.weight.dim() else None
    if form is not None and form.kind == "norm":
        return "module" if module.momentum is not None else None
    if form is not None and form.kind == "linear":
        return "module"
    if is_timm_norm_act(kind):
        children = (module._modules.get("drop"), module._modules.get("act"))
        batchable = all(c is not None and module_kind(c, ndim) for c in children)
        return "module" if ndim == 4 and module.momentum is not None and batchable else None
    if kind in _ELEMENTWISE_MODULES or (kind in _EVAL_IDENTITY and not module.training):
        return "asis"
    if kind in _SPATIAL_MODULES or kind in _SPATIAL_ANY:
        if getattr(module, "return_indices", False) or ndim < 3:
            return None
        return "asis" if kind in _SPATIAL_ANY or ndim == _SPATIAL_MODULES[kind] + 2 else None
    if kind is nn.Flatten:
        return (
            "asis" if module.start_dim % ndim >= 1 and module.end_dim % ndim == ndim - 1 else None
        )
    if kind is SqueezeExcitation and ndim == 4 and _is_container(module):
        children = [
            module.avgpool,
            module.fc1,
            module.activation,
            module.fc2,
            module.scale_activation,
        ]
        return "module" if all(module_kind(child, 4) for child in children) else None
    if isinstance(module, nn.Sequential) and _is_container(module):
        for child in module:
            if module_kind(child, ndim) is None:
                return None
            if type(child) is nn.Flatten:
                ndim = child.start_dim % ndim + 1
        return "module" if has_state(module) else "asis"
    return None


def operation_kind(
    node: fx.Node,
    module: nn.Module | None,
    tensor_args: Sequence[fx.Node],
    out: TensorMetadata | None,
) -> str | None:
    """How ``node`` runs on task-stacked maps, given its tensor arguments and output metadata:
    "module" (a batched module), "asis" (itself, on the stacked tensors), "cat" (a
    concatenation keeping each task's channels together), or None (no batched form)."""
    if out is None or len(out.shape) < 2:
        return None
    shapes = [tuple(tensor_meta(a).shape) for a in tensor_args]  # type: ignore[union-attr]
    if any(len(s) < 2 for s in shapes):
        return None
    ndim = len(shapes[0]) if shapes else len(out.shape)
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs or len(tensor_args) != 1:
            return None
        return module_kind(module, ndim)
    target = node.target
    if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and target in _ELEMENTWISE_METHODS
    ):
        return "asis" if tensor_args and all(_broadcasts(s, out.shape) for s in shapes) else None
    if node.op == "call_function" and target in _SPATIAL_FUNCTIONS:
        if node.kwargs.get("return_indices") or len(tensor_args) != 1 or ndim < 3:
            return None
        if target in _MAX_POOLS and len(node.args) > 6:
            return None  # return_indices given by position
        return "asis"
    if (node.op == "call_function" and target is torch.flatten) or (
        node.op == "call_method" and target == "flatten"
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        return "asis" if start % ndim >= 1 and end % ndim == ndim - 1 else None
    if node.op == "call_method" and target in _REDUCE_METHODS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        normal = _normal_dims(dims, ndim) if dims is not None else None
        return "asis" if normal and min(normal) >= 2 and len(tensor_args) == 1 else None
    if node.op == "call_function" and target is torch.cat:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(dim, int) or not isinstance(node.args[0], (list, tuple)):
            return None
        if not all(isinstance(a, fx.Node) and tensor_meta(a) is not None for a in node.args[0]):
            return None
        dim %= ndim
        return "asis" if dim >= 2 else "cat" if dim == 1 else None
    return None


# Module state that is not configuration (nn.Module's own bookkeeping).
_MACHINERY = _words(
    "_parameters _buffers _modules _non_persistent_buffers_set training _backward_pre_hooks "
    "_backward_hooks _is_full_backward_hook _forward_hooks _forward_hooks_with_kwargs "
    "_forward_hooks_always_called _forward_pre_hooks _forward_pre_hooks_with_kwargs "
    "_state_dict_hooks _state_dict_pre_hooks _load_state_dict_pre_hooks "
    "_load_state_dict_post_hooks _compiled_call_impl _initial_counts"
)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # objects whose == raises or is not a bool
        return a is b


def shape_text(tensor: torch.Tensor | None) -> str:
    return "none" if tensor is None else "×".join(map(str, tensor.shape)) or "scalar"


def module_difference(a: nn.Module, b: nn.Module, task_a: str, task_b: str) -> str | None:
    """Why two modules cannot share one batched form, or None when they match (type, flags,
    hyper-parameters, parameter and buffer shapes, submodules)."""
    if type(a) is not type(b):
        return f"{type(a).__name__} in {task_a} vs {type(b).__name__} in {task_b}"
    if a.training != b.training:
        return f"train/eval flag {a.training} in {task_a} vs {b.training} in {task_b}"
    for hooks in _HOOKS:
        if getattr(a, hooks, None) or getattr(b, hooks, None):
            return "has hooks"
    keys = (set(a.__dict__) | set(b.__dict__)) - _MACHINERY
    for key in sorted(keys, key=lambda name: (name.startswith("_"), name)):
        va, vb = a.__dict__.get(key), b.__dict__.get(key)
        if not same_value(va, vb):
            if isinstance(va, torch.Tensor):
                return f"tensor attribute {key} differs between {task_a} and {task_b}"
            return f"{key} {va!r} in {task_a} vs {vb!r} in {task_b}"
    for kind in ("_parameters", "_buffers"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        for name in sorted(set(ta) | set(tb)):
            x, y = ta.get(name), tb.get(name)
            if (x is None) != (y is None) or (
                x is not None and (x.shape != y.shape or x.dtype != y.dtype)
            ):
                return f"{name} shape {shape_text(x)} in {task_a} vs {shape_text(y)} in {task_b}"
            if x is not None and x.requires_grad != y.requires_grad:
                return f"{name}.requires_grad differs between {task_a} and {task_b}"
    if set(a._modules) != set(b._modules):
        return f"submodules differ between {task_a} and {task_b}"
    for name, child in a._modules.items():
        other = b._modules[name]
        if (child is None) != (other is None):
            return f"submodule {name} differs between {task_a} and {task_b}"
        if child is not None:
            reason = module_difference(child, other, task_a, task_b)
            if reason:
                return f"{name}: {reason}"
    return None


def _outputs_difference(norms: Sequence[nn.Module], activations: Sequence[nn.Module]) -> str | None:
    """Why per-task norms and activations of a fusion layer cannot run as one, or None."""
    if {type(n) for n in norms} not in ({nn.Identity}, {nn.BatchNorm2d}):
        return "norms other than BatchNorm2d run per task"
    for modules in (norms, activations):
        if any(
            module_difference(modules[0], m, "task 0", f"task {i}") for i, m in enumerate(modules)
        ):
            return "the tasks' norms or activations differ"
    if type(activations[0]) not in _ELEMENTWISE_MODULES:
        return f"activation {type(activations[0]).__name__} has no batched form"
    return None


def fusion_difference(layer: nn.Module, levels: Sequence[Sequence[Any]]) -> str | None:
    """Why a fusion layer has no batched form for these inputs (levels × tasks of shape
    signatures), or None."""
    if any(len(set(shapes)) != 1 or None in shapes for shapes in levels):
        return "the tasks' maps differ in shape"
    kind = type(layer)
    form = batched_form(kind)
    if form is None or form.kind not in ("fusion", "shortcut"):
        return f"{kind.__name__} has no batched form"
    if (len(levels) == 1) != (form.kind == "fusion"):
        return f"{kind.__name__} got unexpected inputs"
    if kind is NDDRLayer and layer.resize is not None:
        return "NDDR with resize= runs per task"
    layouts = pytree.tree_leaves(getattr(layer, "layouts", ()))
    if any(getattr(layout, "name", "NCHW") != "NCHW" for layout in layouts):
        return "fusion of channels-last maps or token sequences runs per task"
    if kind not in (NDDRLayer, NDDRShortcutLayer):  # cross-stitch, or a registered type
        return None
    return _outputs_difference(layer.norms, layer.activations)
