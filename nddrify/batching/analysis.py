"""Which operations have a batched form, and why the K tasks' modules cannot share one.

Internal to :mod:`nddrify.batching` (nothing public, ``__all__`` is empty): the builder asks
``_module_kind`` how a module runs on task-stacked maps, ``_module_difference`` why two tasks'
modules differ, and ``_fusion_difference`` why a fusion layer runs per task.

Example:
    >>> from torch import nn
    >>> from nddrify.batching.analysis import _module_difference, _module_kind
    >>> _module_difference(nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 5), "seg", "normal")
    'kernel_size (3, 3) in seg vs (5, 5) in normal'
    >>> [_module_kind(module, 4) for module in (nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LSTM(3, 8))]
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

from ..baselines import CrossStitchLayer
from ..layers import NDDRLayer, NDDRShortcutLayer
from .modules import _CONVS, _FUSIONS, _NORMS, _has_state, _is_timm_norm_act

__all__: list[str] = []


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


def _tensor_meta(node: Any) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _meta_signature(value: Any) -> Any:
    if isinstance(value, TensorMetadata):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_meta_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _meta_signature(v)) for k, v in value.items())
    return None


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (
            name.endswith("_") and not name.startswith("_")
        )
    return (
        node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
    )


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


def _module_kind(module: nn.Module, ndim: int) -> str | None:
    """How ``module`` runs batched on an input of ``ndim`` dims: "module" (a batched module with
    the K tasks' weights), "asis" (itself, on the stacked tensor), or None."""
    kind = type(module)
    if kind in _CONVS:
        return "module" if ndim == module.weight.dim() else None
    if kind in _NORMS:
        return "module" if module.momentum is not None else None
    if _is_timm_norm_act(kind):
        children = (module._modules.get("drop"), module._modules.get("act"))
        batchable = all(c is not None and _module_kind(c, ndim) for c in children)
        return "module" if ndim == 4 and module.momentum is not None and batchable else None
    if kind is nn.Linear:
        return "module"
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
        return "module" if all(_module_kind(child, 4) for child in children) else None
    if isinstance(module, nn.Sequential) and _is_container(module):
        for child in module:
            if _module_kind(child, ndim) is None:
                return None
            if type(child) is nn.Flatten:
                ndim = child.start_dim % ndim + 1
        return "module" if _has_state(module) else "asis"
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


def _same(a: Any, b: Any) -> bool:
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


def _shape_text(tensor: torch.Tensor | None) -> str:
    return "none" if tensor is None else "×".join(map(str, tensor.shape)) or "scalar"


def _module_difference(a: nn.Module, b: nn.Module, task_a: str, task_b: str) -> str | None:
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
        if not _same(va, vb):
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
                return f"{name} shape {_shape_text(x)} in {task_a} vs {_shape_text(y)} in {task_b}"
            if x is not None and x.requires_grad != y.requires_grad:
                return f"{name}.requires_grad differs between {task_a} and {task_b}"
    if set(a._modules) != set(b._modules):
        return f"submodules differ between {task_a} and {task_b}"
    for name, child in a._modules.items():
        other = b._modules[name]
        if (child is None) != (other is None):
            return f"submodule {name} differs between {task_a} and {task_b}"
        if child is not None:
            reason = _module_difference(child, other, task_a, task_b)
            if reason:
                return f"{name}: {reason}"
    return None


def _outputs_difference(norms: Sequence[nn.Module], activations: Sequence[nn.Module]) -> str | None:
    """Why per-task norms and activations of a fusion layer cannot run as one, or None."""
    if {type(n) for n in norms} not in ({nn.Identity}, {nn.BatchNorm2d}):
        return "norms other than BatchNorm2d run per task"
    for modules in (norms, activations):
        if any(
            _module_difference(modules[0], m, "task 0", f"task {i}") for i, m in enumerate(modules)
        ):
            return "the tasks' norms or activations differ"
    if type(activations[0]) not in _ELEMENTWISE_MODULES:
        return f"activation {type(activations[0]).__name__} has no batched form"
    return None


def _fusion_difference(layer: nn.Module, levels: Sequence[Sequence[Any]]) -> str | None:
    """Why a fusion layer has no batched form for these inputs (levels × tasks of shape
    signatures), or None."""
    if any(len(set(shapes)) != 1 or None in shapes for shapes in levels):
        return "the tasks' maps differ in shape"
    kind = type(layer)
    if kind not in _FUSIONS:
        return f"{kind.__name__} has no batched form"
    if (len(levels) == 1) != (kind is not NDDRShortcutLayer):
        return f"{kind.__name__} got unexpected inputs"
    if kind is NDDRLayer and layer.resize is not None:
        return "NDDR with resize= runs per task"
    if any(pytree.tree_leaves(layer.channels_last)):
        return "fusion of channels-last maps runs per task"
    if kind is CrossStitchLayer:
        return None
    return _outputs_difference(layer.norms, layer.activations)
