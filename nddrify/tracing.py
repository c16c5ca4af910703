"""Stage 1 of 3: trace each task's model into a torch.fx graph with readable node names and shapes.

Tracing follows torchvision's feature-extraction conventions: every node is named by the dotted path
of the module it ran in plus the op (``layer4.2.relu_2``), and a module name stands for the last node
executed inside it. When timm is importable its no-trace registry (leaf modules and autowrapped
functions) is used, so timm models trace as they do in ``timm.models.FeatureGraphNet``.

Each model is traced twice, in train and in eval mode, because torch.fx bakes ``self.training``
branches into the graph (googlenet's auxiliary heads, ``F.dropout(x, training=self.training)``).
Shapes come from :class:`torch.fx.passes.shape_prop.ShapeProp` run on the eval graph.

Example:
    >>> import torchvision, nddrify
    >>> from nddrify.tracing import trace_model
    >>> traced = trace_model(torchvision.models.resnet18())
    >>> traced.node("layer4").meta["qualname"], tuple(traced.node("layer4").meta["tensor_meta"].shape)
    ('layer4.1.relu_1', (1, 512, 7, 7))
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .adapters import TraceAdapter, UntraceableModelError, find_adapter, patched
from .adapters.concrete import metadata_tracer
from .errors import InputError, ModelsError, TraceError
from .meta import MODULE_CALLS, QUALNAME, ModuleCall
from .shapes import propagate_shapes, share_shapes

__all__ = [
    "TraceOptions",
    "TracedModel",
    "trace_model",
    "default_example_input",
    "parameter_placement",
    "module_modes",
    "restore_module_modes",
    "QUALNAME",
]


@dataclass(frozen=True)
class TraceOptions:
    """How to trace a model: the tracer's knobs as one value.

    Pass one ``TraceOptions`` for every task, or one per task (a list in task order, or a dict
    task name → options) wherever nddrify traces (``trace``, ``plan``, ``fuse``, ``share``).

    Attributes:
        leaf_modules: module classes not to trace into (added to torchvision's and timm's).
        autowrap_functions: functions to keep as single calls (added to timm's; fx ignores
            functions whose name starts with ``_`` unless listed here).
        concrete_args: values for forward arguments other than the image. Arguments with a
            non-tensor default (``None``, flags) are fixed to that default unless given here.

    Example:
        >>> import torchvision, nddrify
        >>> from torchvision.ops.misc import Conv2dNormActivation
        >>> opts = nddrify.TraceOptions(leaf_modules=(Conv2dNormActivation,))
        >>> traced = nddrify.trace([torchvision.models.mobilenet_v2()] * 2, options=opts)
        >>> traced["task0"].node("features.1").op
        'call_module'
    """

    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()
    concrete_args: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        object.__setattr__(self, "autowrap_functions", tuple(self.autowrap_functions))
        if self.concrete_args is not None and not isinstance(self.concrete_args, Mapping):
            raise InputError(
                f"TraceOptions(concrete_args=...) must be a dict argument name → value, got "
                f"{type(self.concrete_args).__name__}; give one TraceOptions per task for "
                "per-task values."
            )


@dataclass
class TracedModel:
    """One task's model after tracing.

    Attributes:
        task: the task's name (``"task0"`` or the key of a ``models`` dict).
        module: the user's model (never modified); both graphs call into it. The rewriter
            copies it, so the fused model owns its own weights.
        graph_module: the eval-mode graph, with ``meta["qualname"]`` and ``meta["tensor_meta"]`` on
            every node. Planning reads this graph.
        train_graph_module: the train-mode graph when it differs from the eval one, else ``None``.
        example_input: the tensor the shapes were propagated with.
    """

    task: str
    module: nn.Module
    graph_module: fx.GraphModule
    train_graph_module: fx.GraphModule | None
    example_input: torch.Tensor = field(repr=False)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def node_names(self) -> list[str]:
        """Every node's torchvision-style name, in execution order."""
        return [n.meta[QUALNAME] for n in self.graph.nodes if n.op not in ("placeholder", "output")]

    def node(self, name: str) -> fx.Node:
        """The node called ``name``, or the last node executed inside the module called ``name``.

        Raises:
            KeyError: when no node or module has that name (the planner turns this into a
                :class:`~nddrify.errors.PointError` with suggestions).
        """
        found = None
        for node in self.graph.nodes:
            qualname = node.meta.get(QUALNAME, "")
            if node.op in ("placeholder", "output"):
                continue
            if qualname == name or qualname.startswith(name + "."):
                found = node
        if found is None:
            raise KeyError(name)
        return found


_PLAIN_ARGUMENT = (int, float, bool, str, type(None), torch.dtype, torch.device)


@functools.cache
def _tracer_class() -> type:
    """The tracer class, built on first use: torchvision (whose import pulls in torch._dynamo)
    is imported when a model is traced, not when nddrify is."""
    from torchvision.models.feature_extraction import NodePathTracer

    class _Tracer(NodePathTracer):
        """torchvision's NodePathTracer that remembers the innermost module it failed in, and records
        every traced-through submodule call as a :class:`~nddrify.meta.ModuleCall` on its result's
        ``meta[MODULE_CALLS]``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.failed_module: str | None = None
            self.model: nn.Module | None = None  # the model an adapter's call runs (see _entry)

        def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
            if m is self.model:
                return forward(*args, **kwargs)  # the model itself, called by an adapter's call
            last = next(iter(reversed(self.graph.nodes)), None)
            try:
                result = super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_module is None:
                    self.failed_module = self.path_of_module(m)
                raise
            self._record_call(m, last, args, kwargs, result)
            return result

        def _record_call(
            self, m: nn.Module, last: fx.Node | None, args: Any, kwargs: Any, result: Any
        ) -> None:
            if not isinstance(result, fx.Proxy) or result.node.graph is not self.graph:
                return
            nodes = []
            node = last.next if last is not None else next(iter(self.graph.nodes), None)
            while node is not None and node.op != "root":
                nodes.append(node)
                node = node.next
            if len(nodes) < 2 or nodes[-1] is not result.node:
                return  # a leaf call (already one node), or a result made before the call
            leaves = pytree.tree_leaves((args, kwargs))
            if not all(isinstance(v, (fx.Proxy, *_PLAIN_ARGUMENT)) for v in leaves):
                return
            unwrap = lambda v: v.node if isinstance(v, fx.Proxy) else v  # noqa: E731
            call = ModuleCall(
                path=self.path_of_module(m),
                nodes=tuple(nodes),
                args=tuple(pytree.tree_map(unwrap, tuple(args))),
                kwargs=dict(pytree.tree_map(unwrap, dict(kwargs))),
            )
            result.node.meta[MODULE_CALLS] = (*result.node.meta.get(MODULE_CALLS, ()), call)

    return _Tracer


def _timm_notrace() -> tuple[list[type], list[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


def _torchvision_ops_leaf_modules() -> list[type]:
    import torchvision.ops as ops

    return [
        obj
        for name in dir(ops)
        if isinstance(obj := getattr(ops, name), type) and issubclass(obj, nn.Module)
    ]


def _tracer_kwargs(
    leaf_modules: Iterable[type], autowrap_functions: Iterable[Callable]
) -> dict[str, Any]:
    import torchvision.ops

    timm_modules, timm_functions = _timm_notrace()
    leaves = [*_torchvision_ops_leaf_modules(), *timm_modules, *leaf_modules]
    functions = [*timm_functions, *autowrap_functions]
    return {
        "leaf_modules": list(dict.fromkeys(leaves)),
        "autowrap_functions": tuple(dict.fromkeys(functions)),
        "autowrap_modules": (math, torchvision.ops),
    }


def _forward_concrete_args(
    model: nn.Module, task: str, user_args: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """Name of the image argument, and the values every other forward argument is fixed to."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if not positional:
        raise InputError(
            f"task {task!r}: {type(model).__name__}.forward takes no named input argument; nddrify "
            "feeds the image as the first positional argument. Wrap the model in a module whose "
            "forward(self, x) calls it."
        )
    concrete: dict[str, Any] = dict(user_args or {})
    image_arg = positional[0].name
    missing = []
    for param in positional[1:]:
        if param.name in concrete:
            continue
        if param.default is inspect.Parameter.empty:
            missing.append(param.name)
        elif not isinstance(param.default, torch.Tensor):
            concrete[param.name] = param.default
    if missing:
        raise InputError(
            f"task {task!r}: {type(model).__name__}.forward needs the argument(s) {missing} besides "
            f"the image {image_arg!r}; fix them with nddrify.TraceOptions(concrete_args="
            f"{{{missing[0]!r}: value}}) (one for all tasks, or one per task)."
        )
    unknown = sorted(set(concrete) - {p.name for p in positional[1:]})
    if unknown:
        raise InputError(
            f"task {task!r}: concrete_args names {unknown}, which {type(model).__name__}.forward "
            f"does not take; its arguments are {[p.name for p in positional]}."
        )
    return image_arg, concrete


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A 1×3×224×224 tensor, or 1×(the model's declared ``input_size``) for timm-style models.

    Example:
        >>> import torchvision, nddrify
        >>> from nddrify.tracing import default_example_input
        >>> tuple(default_example_input(torchvision.models.vgg16()).shape)
        (1, 3, 224, 224)
    """
    size: tuple[int, ...] = (3, 224, 224)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and isinstance(cfg.get("input_size"), (tuple, list)):
            size = tuple(int(s) for s in cfg["input_size"])
            break
    return torch.randn(1, *size)


def parameter_placement(model: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of the first floating-point parameter or buffer of ``model``, or None."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None


def _entry(model: nn.Module, fixed: dict[str, Any], adapter: TraceAdapter) -> nn.Module:
    """A root to trace in place of ``model`` whose ``forward(x)`` runs the adapter's call and
    output hook; it shares the model's submodules, parameters and buffers (same paths)."""
    call = adapter.call or (lambda m, x, **kwargs: m(x, **kwargs))
    output = adapter.output or (lambda value: value)

    def forward(self: nn.Module, x: torch.Tensor) -> Any:
        return output(call(model, x, **fixed))

    entry = type(type(model).__name__, (nn.Module,), {"forward": forward})()
    entry._modules, entry._parameters = model._modules, model._parameters
    entry._buffers = model._buffers
    entry.training = model.training
    return entry


def _trace_graph(
    model: nn.Module,
    task: str,
    concrete_args: dict[str, Any],
    tracer_kwargs: dict[str, Any],
    adapter: TraceAdapter | None = None,
    example_input: torch.Tensor | None = None,
) -> fx.GraphModule:
    if adapter is not None and adapter.concrete_metadata:
        tracer = metadata_tracer(_tracer_class())(**tracer_kwargs)
        tracer.example_input = example_input
    else:
        tracer = _tracer_class()(**tracer_kwargs)
    mode = "train" if model.training else "eval"
    root, fixed = model, concrete_args or None
    if adapter is not None and (adapter.call is not None or adapter.output is not None):
        root, fixed, tracer.model = _entry(model, concrete_args, adapter), None, model
    try:
        graph = tracer.trace(root, concrete_args=fixed)
    except Exception as err:
        where = tracer.failed_module
        module_desc = (
            f"in module {where!r} ({type(model.get_submodule(where)).__name__})"
            if where
            else f"in {type(model).__name__}.forward"
        )
        raise TraceError(
            f"task {task!r}: torch.fx could not trace the model in {mode} mode, {module_desc}: "
            f"{type(err).__name__}: {err}\n"
            "How to fix: make the failing module a leaf (nddrify.TraceOptions(leaf_modules=[ItsClass]) "
            "passed as trace_options=), autowrap the function that breaks tracing "
            "(TraceOptions(autowrap_functions=[fn]); fx ignores functions whose name starts with "
            "'_'), or fix data-dependent forward arguments (TraceOptions(concrete_args={'name': "
            "value}))."
        ) from err
    for node in graph.nodes:
        node.meta[QUALNAME] = tracer.node_to_qualname.get(node, node.op)
    _inline_fixed_arguments(graph, list(inspect.signature(model.forward).parameters), concrete_args)
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


_GUARDS = {torch._assert, torch.fx._symbolic_trace._assert_is_none}


def _inline_fixed_arguments(
    graph: fx.Graph, parameter_names: list[str], concrete_args: dict[str, Any]
) -> None:
    """Replace the placeholders of fixed forward arguments by their values and drop the guards fx
    adds for them, so the graph takes the image alone."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders[1:], parameter_names[1:]):
        value = concrete_args.get(name, node.args[0] if node.args else None)
        for user in list(node.users):
            user.args = fx.map_arg(
                user.args, lambda n, node=node, value=value: value if n is node else n
            )
            user.kwargs = fx.map_arg(
                user.kwargs, lambda n, node=node, value=value: value if n is node else n
            )
        graph.erase_node(node)
    for node in reversed(graph.nodes):
        is_guard = node.op == "call_function" and node.target in _GUARDS
        constant = all(not arg.all_input_nodes for arg in node.all_input_nodes)
        if is_guard and constant:
            inputs = node.all_input_nodes
            graph.erase_node(node)
            for arg in inputs:
                if not arg.users:
                    graph.erase_node(arg)


def module_modes(model: nn.Module) -> dict[str, bool]:
    """The train/eval flag of every submodule (models may mix them, e.g. frozen BatchNorm)."""
    return {name: m.training for name, m in model.named_modules()}


def restore_module_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    for name, module in model.named_modules():
        module.training = modes.get(name, module.training)


def trace_model(
    model: nn.Module,
    *,
    task: str = "task0",
    example_input: torch.Tensor | None = None,
    options: TraceOptions | None = None,
) -> TracedModel:
    """Trace ``model`` in train and eval mode and propagate shapes.

    The model comes back as it was: its weights are never touched (shapes are propagated on fake
    tensors) and every submodule's train/eval flag is restored.

    Args:
        model: any ``nn.Module`` whose forward takes the image as first argument. It is not
            modified (not even its train/eval mode).
        task: the task's name, used in error messages.
        example_input: input for shape propagation; default :func:`default_example_input`.
        options: the tracer's knobs (:class:`TraceOptions`), merged with those of the
            model's registered :class:`~nddrify.adapters.TraceAdapter` (smp, Hugging Face,
            torchvision detectors, or your own), whose patches hold while tracing.

    Raises:
        TraceError: torch.fx failed, or the traced model failed on ``example_input``
            (:class:`~nddrify.adapters.UntraceableModelError` for a model its adapter says
            cannot be traced whole, such as a detector: it names the submodule to fuse).
        InputError: the forward signature needs arguments nddrify cannot provide.
    """
    if not isinstance(model, nn.Module):
        raise ModelsError(f"task {task!r}: expected an nn.Module, got {type(model).__name__}.")
    options = options if options is not None else TraceOptions()
    adapter = find_adapter(model)
    if adapter is not None and adapter.trunk is not None:
        raise UntraceableModelError(
            f"task {task!r}: {type(model).__name__} cannot be traced whole (it takes lists of "
            f"images and targets); fuse its {adapter.trunk!r} submodule instead: "
            f"nddrify.fuse(models, within={adapter.trunk!r}), or "
            f"nddrify.fuse([model_a.{adapter.trunk}, model_b.{adapter.trunk}]).",
            adapter.trunk,
        )
    if adapter is not None and adapter.call is not None:
        fixed_args = dict(options.concrete_args or {})  # passed to the adapter's call
    else:
        _, fixed_args = _forward_concrete_args(model, task, options.concrete_args)
    if example_input is None:
        example_input = default_example_input(model)
    if not isinstance(example_input, torch.Tensor):
        raise InputError(
            f"task {task!r}: example_input must be a tensor, got {type(example_input).__name__}."
        )
    if example_input.dim() != 4:
        raise InputError(
            f"task {task!r}: example_input has shape {tuple(example_input.shape)}; nddrify fuses "
            "image models and needs a 4-D N×C×H×W batch, e.g. torch.randn(1, 3, 224, 224)."
        )
    placement = parameter_placement(model)
    if placement is not None:
        example_input = example_input.to(*placement)
    leaves, functions = options.leaf_modules, options.autowrap_functions
    if adapter is not None:
        leaves, functions = (*leaves, *adapter.leaf_classes()), (*functions, *adapter.functions())
    tracer_kwargs = _tracer_kwargs(leaves, functions)

    modes = module_modes(model)
    try:
        with patched(adapter):
            model.train(True)
            train_gm = _trace_graph(model, task, fixed_args, tracer_kwargs, adapter, example_input)
            model.train(False)
            eval_gm = _trace_graph(model, task, fixed_args, tracer_kwargs, adapter, example_input)
            propagate_shapes(eval_gm, example_input, task)
    finally:
        restore_module_modes(model, modes)

    same = train_gm.code == eval_gm.code
    if not same:
        share_shapes(eval_gm.graph, train_gm.graph)
    return TracedModel(
        task=task,
        module=model,
        graph_module=eval_gm,
        train_graph_module=None if same else train_gm,
        example_input=example_input,
    )
