"""Stage 1 of 3: resolve the ``models`` argument into named tasks and trace every one of them.

:func:`trace` returns a :class:`TracedSet`: each task's :class:`~nddrify.tracing.TracedModel`
(train- and eval-mode graphs with readable node names and shapes), whether ``models`` was a
dict (the fused model then returns a dict), and the options it was traced with. Planning and
rewriting read it; nothing modifies it.

Example:
    >>> import torchvision, nddrify
    >>> traced = nddrify.trace({"seg": torchvision.models.resnet18(), "depth": "torchvision:resnet18"})
    >>> traced
    TracedSet(seg: ResNet, depth: ResNet; input 1×3×224×224)
    >>> traced["depth"].node("layer4").meta["qualname"]
    'layer4.1.relu_1'
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import UntraceableModelError
from .errors import InputError, ModelsError, NddrifyError, TraceError
from .specs import is_spec, load_spec
from .tracing import TracedModel, TraceOptions, default_example_input, trace_model

__all__ = [
    "TaskModels",
    "TracedSet",
    "resolve_models",
    "trace",
    "per_task_options",
    "traceable_trunks",
    "TaskOptions",
    "ExampleInputs",
    "per_task_inputs",
]

#: One :class:`TraceOptions` for every task, one per task in task order, or a dict task → options.
TaskOptions = TraceOptions | Sequence[TraceOptions] | Mapping[str, TraceOptions] | None

#: One example input for every task, one per task in task order, or a dict task → tensor.
ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None

_RESERVED = {"x", "shortcut", "shared", "self", "torch"}

#: How :func:`nddrify.tracing.trace_model` words a shape-propagation failure (a model that does
#: not run on the example input, e.g. a fixed ``nn.Linear`` after a flatten).
_SHAPE_FAILURE = "the traced model failed on an example input"


@dataclass(frozen=True)
class TaskModels:
    """The ``models`` argument resolved: task names, modules, their specs (or None), dict or not."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    specs: tuple[str | None, ...]
    as_dict: bool


def resolve_models(models: Any, *, spec_device: str | torch.device | None = None) -> TaskModels:
    """Validate ``models`` (a list or dict of ``nn.Module`` or spec strings such as
    ``"torchvision:vgg16"``, built on ``spec_device``) and name the tasks (``task0, task1, …``
    for a list).

    Raises:
        ModelsError: fewer than two models, something that is not a model, a task name that
            cannot be an attribute, or models on different devices or dtypes.
    """
    if isinstance(models, TaskModels):
        return models
    if isinstance(models, nn.Module):
        raise ModelsError(
            "models must be a list or dict of at least two models, got a single "
            f"{type(models).__name__}; pass models=[model_a, model_b]."
        )
    if isinstance(models, Mapping):
        names, given, as_dict = [str(k) for k in models], list(models.values()), True
    elif isinstance(models, Iterable) and not isinstance(models, (str, bytes)):
        given = list(models)
        names, as_dict = [f"task{i}" for i in range(len(given))], False
    else:
        raise ModelsError(
            f"models must be a list or dict of nn.Module, got {type(models).__name__}."
        )
    if len(given) < 2:
        raise ModelsError(
            f"NDDR fuses at least two tasks, got {len(given)} model(s); pass two or more models."
        )
    specs = [m if is_spec(m) else None for m in given]
    modules = [load_spec(m, device=spec_device) if is_spec(m) else m for m in given]
    for name, module in zip(names, modules):
        if not isinstance(module, nn.Module):
            raise ModelsError(
                f"task {name!r} is a {type(module).__name__}, not an nn.Module or a model spec "
                "such as 'torchvision:resnet50'."
            )
        if not name.isidentifier() or name in _RESERVED or name.startswith("nddr"):
            raise ModelsError(
                f"task name {name!r} cannot be used: task names become attribute names of the "
                "fused module, so use a Python identifier that is not 'x', 'shortcut', 'shared' "
                "and does not start with 'nddr' (e.g. 'seg', 'normal')."
            )
    placements = {}
    for name, module in zip(names, modules):
        tensor = next((t for t in (*module.parameters(), *module.buffers())), None)
        if tensor is not None:
            placements[name] = (tensor.device, tensor.dtype)
    if len(set(placements.values())) > 1:
        listing = ", ".join(
            f"{n}: {d}/{str(t).replace('torch.', '')}" for n, (d, t) in placements.items()
        )
        raise ModelsError(
            f"the models live on different devices or dtypes ({listing}); move them to one, "
            "e.g. model.to('cuda', torch.float32), before fusing."
        )
    return TaskModels(tuple(names), tuple(modules), tuple(specs), as_dict)


def per_task_options(options: TaskOptions, names: Sequence[str]) -> tuple[TraceOptions, ...]:
    """One :class:`TraceOptions` per task from what the user gave."""
    if options is None:
        return (TraceOptions(),) * len(names)
    if isinstance(options, TraceOptions):
        return (options,) * len(names)
    if isinstance(options, Mapping):
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise InputError(
                f"trace options name unknown task(s) {unknown}; the tasks are {list(names)}."
            )
        chosen = [options.get(n, TraceOptions()) for n in names]
    elif isinstance(options, Sequence) and not isinstance(options, str):
        if len(options) != len(names):
            raise InputError(
                f"got {len(options)} TraceOptions for {len(names)} tasks {list(names)}; give one "
                "for all tasks, one per task, or a dict task → TraceOptions."
            )
        chosen = list(options)
    else:
        chosen = [options]  # type: ignore[list-item]
    for name, value in zip(names, chosen):
        if not isinstance(value, TraceOptions):
            raise InputError(
                f"task {name!r}: trace options must be nddrify.TraceOptions(...), got "
                f"{type(value).__name__}."
            )
    return tuple(chosen)


def per_task_inputs(
    example_input: ExampleInputs, names: Sequence[str], modules: Sequence[nn.Module]
) -> tuple[torch.Tensor, ...]:
    """One example input per task from what the user gave: a tensor for every task (default
    1×3×224×224, or the first model's declared input size), a list in task order, or a dict
    task → tensor.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from nddrify.tasks import per_task_inputs
        >>> inputs = per_task_inputs(
        ...     {"det": torch.zeros(1, 3, 64, 64), "cls": torch.zeros(1, 3, 48, 48)},
        ...     ["det", "cls"], [nn.Identity(), nn.Identity()])
        >>> [tuple(x.shape[2:]) for x in inputs]
        [(64, 64), (48, 48)]

    Raises:
        InputError: a wrong number of inputs, a dict that misses tasks or names unknown ones,
            or an input that is not a tensor (naming the task).
    """
    if example_input is None:
        return (default_example_input(modules[0]),) * len(names)
    if isinstance(example_input, torch.Tensor):
        return (example_input,) * len(names)
    if isinstance(example_input, Mapping):
        missing = [n for n in names if n not in example_input]
        unknown = [str(k) for k in example_input if k not in names]
        if missing or unknown:
            extra = f"; it names unknown task(s) {unknown}" if unknown else ""
            raise InputError(
                f"example_input is a dict but has no entry for task(s) {missing}{extra}; the "
                f"tasks are {list(names)}: give one tensor per task, or one tensor for all."
            )
        chosen = [example_input[n] for n in names]
    elif (
        isinstance(example_input, Sequence)
        and not isinstance(example_input, (str, bytes))
        and any(isinstance(x, torch.Tensor) for x in example_input)
    ):
        if len(example_input) != len(names):
            raise InputError(
                f"got {len(example_input)} example inputs for {len(names)} tasks {list(names)}; "
                "give one tensor for all tasks, one per task in task order, or a dict task → "
                "tensor."
            )
        chosen = list(example_input)
    else:
        shape = isinstance(example_input, Sequence) and all(
            isinstance(x, int) for x in example_input
        )
        hint = f" (for a shape, pass torch.randn{tuple(example_input)})" if shape else ""
        raise InputError(
            f"example_input must be a tensor, a list of tensors (one per task) or a dict task → "
            f"tensor, got {type(example_input).__name__}{hint}."
        )
    for name, value in zip(names, chosen):
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"task {name!r}: example_input must be a tensor, got {type(value).__name__}."
            )
    return tuple(chosen)


@dataclass(frozen=True)
class TracedSet:
    """Every task traced: what :func:`trace` returns and :func:`nddrify.plan` /
    :func:`nddrify.rewrite` read.

    Attributes:
        traced: one :class:`~nddrify.tracing.TracedModel` per task, in task order.
        as_dict: whether ``models`` was a dict (the fused model then returns a dict by task).
        specs: each task's spec string (``"torchvision:vgg16"``) or None.
        options: the :class:`TraceOptions` each task was traced with.
    """

    traced: tuple[TracedModel, ...]
    as_dict: bool = False
    specs: tuple[str | None, ...] = ()
    options: tuple[TraceOptions, ...] = field(default=(), repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.task for t in self.traced)

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return tuple(t.module for t in self.traced)

    @property
    def example_input(self) -> torch.Tensor:
        """The first task's example input (every task's, unless :attr:`separate_inputs`)."""
        return self.traced[0].example_input

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Each task's example input, in task order."""
        return tuple(t.example_input for t in self.traced)

    @property
    def separate_inputs(self) -> bool:
        """Whether the tasks' example inputs differ in shape: the fused model then takes one
        input per task (named after the tasks, in task order) instead of one shared ``x``."""
        return len({tuple(x.shape) for x in self.example_inputs}) > 1

    @property
    def model_params(self) -> tuple[int, ...]:
        return tuple(sum(p.numel() for p in m.parameters()) for m in self.modules)

    def __getitem__(self, task: str | int) -> TracedModel:
        if isinstance(task, int):
            return self.traced[task]
        for traced in self.traced:
            if traced.task == task:
                return traced
        raise KeyError(task)

    def __iter__(self) -> Iterator[TracedModel]:
        return iter(self.traced)

    def __len__(self) -> int:
        return len(self.traced)

    def __repr__(self) -> str:
        models = ", ".join(f"{t.task}: {type(t.module).__name__}" for t in self.traced)
        if self.traced and self.separate_inputs:
            shapes = ", ".join(
                f"{t.task} {'×'.join(map(str, t.example_input.shape))}" for t in self.traced
            )
            return f"TracedSet({models}; inputs {shapes})"
        shape = "×".join(map(str, self.example_input.shape)) if self.traced else "-"
        return f"TracedSet({models}; input {shape})"


def trace(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str] | TracedSet,
    *,
    example_input: ExampleInputs = None,
    options: TaskOptions = None,
    spec_device: str | torch.device | None = None,
) -> TracedSet:
    """Resolve ``models`` and trace every task in train and eval mode, propagating shapes.

    The models are never modified (not even their train/eval flags).

    Args:
        models: two or more models, as a list (tasks ``task0, task1, …``) or a dict (named
            tasks); a model may be a spec string such as ``"torchvision:vgg16"``. A
            :class:`TracedSet` is returned as it is.
        example_input: input for shape propagation: one tensor for every task (default
            1×3×224×224, or the first model's declared input size), or one per task (a list in
            task order, or a dict task → tensor) when the models need different sizes, e.g. a
            detector backbone at 128×128 and a classifier at 96×96. When the tasks' inputs
            differ in shape, the fused model takes one input per task.
        options: :class:`TraceOptions` for every task, or one per task (list or dict).
        spec_device: where models given as spec strings are built (default: as torch builds
            them, on the CPU); ``"meta"`` builds them without weights, which is all
            :func:`nddrify.plan` needs (a model built on the meta device fuses into a meta
            fused model: see :func:`nddrify.fuse` on loading weights into it).

    Raises:
        ModelsError, InputError, TraceError: see :mod:`nddrify.errors`.

    Example:
        >>> import torch, torchvision, nddrify
        >>> traced = nddrify.trace(
        ...     {"a": torchvision.models.resnet18(), "b": torchvision.models.resnet18()},
        ...     example_input={"a": torch.zeros(1, 3, 64, 64), "b": torch.zeros(1, 3, 32, 32)})
        >>> traced
        TracedSet(a: ResNet, b: ResNet; inputs a 1×3×64×64, b 1×3×32×32)
    """
    if isinstance(models, TracedSet):
        return models
    resolved = resolve_models(models, spec_device=spec_device)
    per_task = per_task_options(options, resolved.names)
    shared = example_input is None or isinstance(example_input, torch.Tensor)
    inputs = per_task_inputs(example_input, resolved.names, resolved.modules)
    traced = []
    for name, module, opts, x in zip(resolved.names, resolved.modules, per_task, inputs):
        try:
            traced.append(_trace_or_point_to_trunks(module, name, x, opts))
        except TraceError as err:
            if not (shared and _SHAPE_FAILURE in str(err)):
                raise
            sizes = ", ".join(f"{n!r}: torch.randn(1, 3, H, W)" for n in resolved.names)
            raise TraceError(
                f"{err}\nWhen the models need different input sizes, pass one example input "
                f"per task: example_input={{{sizes}}} (or a list in task order); the fused "
                "model then takes one input per task."
            ) from err.__cause__
    return TracedSet(tuple(traced), resolved.as_dict, resolved.specs, per_task)


def traceable_trunks(
    model: nn.Module, example_input: torch.Tensor, options: TraceOptions | None = None
) -> list[tuple[str, int]]:
    """The direct submodules of ``model`` that trace on their own on ``example_input`` and hold
    image feature maps, with their number of automatic fusion points (e.g. a detector's
    ``backbone``): what to fuse when the whole model cannot be traced.

    Example:
        >>> import torch, torchvision
        >>> from nddrify.tasks import traceable_trunks
        >>> det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights=None, weights_backbone=None)
        >>> traceable_trunks(det, torch.randn(1, 3, 224, 224))
        [('backbone', 5)]
    """
    from .graph_analysis import annotate, stage_ends

    found = []
    for name, child in model.named_children():
        try:
            traced = trace_model(child, task=name, example_input=example_input, options=options)
        except NddrifyError:
            continue
        points = len(stage_ends(annotate(traced.graph)))
        if points:
            found.append((name, points))
    return found


def _trace_or_point_to_trunks(
    module: nn.Module, task: str, example_input: torch.Tensor, options: TraceOptions
) -> TracedModel:
    """:func:`trace_model`; when the whole model cannot be traced, the error also names the
    submodules that can (the route for detectors and other models with list inputs)."""
    try:
        return trace_model(module, task=task, example_input=example_input, options=options)
    except UntraceableModelError:
        raise  # its adapter names the trunk: no search
    except TraceError as err:
        trunks = traceable_trunks(module, example_input, options)
        if not trunks:
            raise
        listing = ", ".join(f"{name!r} ({n} automatic points)" for name, n in trunks)
        first = trunks[0][0]
        raise TraceError(
            f"{err}\nThese submodules of task {task!r} trace on their own and hold its feature "
            f"maps: {listing}. Fuse them instead of the whole model: "
            f"nddrify.fuse(models, within={first!r}) fuses each model's {first!r} and returns "
            "one copy of every model running the shared fused trunk (feed every task the tensor "
            f"its {first!r} sees to run the trunk once)."
        ) from err.__cause__
