"""``nddrify.fuse``: the one-line front door, exactly ``rewrite(trace(...), plan(...))``.

Example:
    >>> import torch, torchvision, nddrify
    >>> seg, normal = torchvision.models.vgg16(), torchvision.models.vgg16()
    >>> fused = nddrify.fuse(models=[seg, normal], points="auto")
    >>> seg_out, normal_out = fused(torch.randn(1, 3, 224, 224))
    >>> seg_out.shape
    torch.Size([1, 1000])

Models whose forward cannot be traced (detectors) fuse through a submodule:
``nddrify.fuse({"det": det, "seg": seg}, within="backbone")`` returns task models sharing the fused
backbones (:mod:`nddrify.submodules`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, overload

from torch import nn

from .errors import FusionConfigError
from .kinds import UNSET, fusion_factory
from .layers import Activation, Init, Norm, ResizeMode, Shortcut
from .planning import Points, plan
from .rewriting import FusedGraphModule, rewrite
from .submodules import SharedTrunkModels, Within, fuse_within
from .tasks import ExampleInputs, TaskOptions, trace

__all__ = ["fuse"]


@overload
def fuse(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    points: Points = "auto",
    *,
    init: Init = UNSET,
    norm: Norm = UNSET,
    activation: Activation = UNSET,
    fusion: Any = None,
    subspaces: int | None = None,
    shortcut: bool | Shortcut = False,
    resize: bool | ResizeMode = False,
    example_input: ExampleInputs = None,
    trace_options: TaskOptions = None,
    within: None = None,
    copy: bool = True,
) -> FusedGraphModule: ...


@overload
def fuse(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    points: Points = "auto",
    *,
    init: Init = UNSET,
    norm: Norm = UNSET,
    activation: Activation = UNSET,
    fusion: Any = None,
    subspaces: int | None = None,
    shortcut: bool | Shortcut = False,
    resize: bool | ResizeMode = False,
    example_input: ExampleInputs = None,
    trace_options: TaskOptions = None,
    within: Within,
    copy: bool = True,
) -> SharedTrunkModels: ...


def fuse(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    points: Points = "auto",
    *,
    init: Init = UNSET,
    norm: Norm = UNSET,
    activation: Activation = UNSET,
    fusion: Any = None,
    subspaces: int | None = None,
    shortcut: bool | Shortcut = False,
    resize: bool | ResizeMode = False,
    example_input: ExampleInputs = None,
    trace_options: TaskOptions = None,
    within: Within | None = None,
    copy: bool = True,
) -> FusedGraphModule | SharedTrunkModels:
    """Fuse K single-task models into one multi-task GraphModule with NDDR layers.

    The models are traced (never modified, :func:`nddrify.trace`), fusion points are chosen
    (:func:`nddrify.plan`), and one GraphModule is emitted (:func:`nddrify.rewrite`) that takes
    one image batch and returns every task's output: a tuple in task order, or a dict when
    ``models`` is a dict. The fused model owns copies of the models' weights
    (``fused.<task>.<original key>``), or with ``copy=False`` the models' own tensors;
    :func:`nddrify.training.task_state_dict` gives them back under the original key names.

    Args:
        models: two or more ``nn.Module`` (a list, or a dict task name → model); a model may be
            a spec string such as ``"torchvision:vgg16"`` or ``"timm:resnet50"``, which
            ``nddrify.save`` records so ``nddrify.load`` needs no code to rebuild.
        points: ``"auto"``, ``"declared"``, an int N, module/node names, or one list of names
            per task (see :func:`nddrify.plan`).
        init: NDDR diagonal init ``(alpha, beta)``, ``"xavier"``; default (0.9, 0.1) for two
            tasks and rows summing to one for more.
        norm: ``"batchnorm"`` (default: eps 1e-3, momentum 0.05), ``None`` or ``channels -> module``.
        activation: ``"auto"`` (default: ReLU only where the fused feature was non-negative, so a
            pre-activation feature is never clipped), ``"relu"`` (the official code), ``None``, or
            a callable returning a module.
        fusion: the fusion kind: ``"nddr"`` (default), ``"cross_stitch"``, ``"sluice"``, or a
            kind object such as ``nddrify.NDDR(rank=64)``, ``nddrify.CrossStitch(per_channel=True)``
            or your own (see :mod:`nddrify.protocol`).
        subspaces: the number of subspaces per task for ``fusion="sluice"`` (default 2).
        shortcut: add the NDDR-Shortcut (``True`` or ``nddrify.Shortcut(resize_mode=...)``).
        resize: allow points with different H×W across tasks (``True`` or a resize mode).
        example_input: input used to propagate shapes (default 1×3×224×224): one tensor for all
            tasks, or one per task (a list, or a dict task → tensor) when the models need
            different sizes; the fused model then takes one input per task (see
            :func:`nddrify.trace`).
        trace_options: :class:`nddrify.TraceOptions` (leaf modules, autowrapped functions,
            concrete arguments), one for all tasks or one per task.
        within: fuse a named submodule of each model instead of the whole model, for models
            whose forward cannot be traced (a detector's ``"backbone"``): one name for all
            tasks, one per task, or a dict task → name. All the options above then apply to the
            submodules (point names relative to them), and K task models sharing the fused
            trunk come back (see :mod:`nddrify.submodules` for how the tasks must feed it).
        copy: ``True`` (default) copies the weights and leaves the models untouched;
            ``False`` moves the models' own parameter and buffer tensors into the fused model
            (no copy: for models too large to hold twice) and **consumes** the models: their
            tensors become empty meta tensors and calling them raises
            :class:`~nddrify.errors.ModelsError` (see :mod:`nddrify.rewriting.ownership`).

    Returns:
        A :class:`~nddrify.rewriting.FusedGraphModule`; ``fused.meta["nddrify_plan"]`` holds its
        :class:`~nddrify.Plan`. With ``within``, a
        :class:`~nddrify.submodules.SharedTrunkModels`: task name → a copy of the task's model
        whose submodule runs the shared fused trunk (the originals are untouched).

    Example:
        >>> import torch, torchvision, nddrify
        >>> a, b = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
        >>> fused = nddrify.fuse({"a": a, "b": b}, init=(1.0, 0.0), norm=None, activation=None)
        >>> x = torch.randn(2, 3, 64, 64)
        >>> out = fused(x)
        >>> bool((out["a"] - a(x)).abs().max() < 1e-5)
        True
    """
    if within is not None:
        if not copy:
            raise FusionConfigError(
                "copy=False is not available with within=: the task models returned keep the "
                "rest of each model, so they are copies; fuse with copy=True."
            )
        return fuse_within(
            models,
            within,
            points,
            init=init,
            norm=norm,
            activation=activation,
            fusion=fusion,
            subspaces=subspaces,
            shortcut=shortcut,
            resize=resize,
            example_input=example_input,
            trace_options=trace_options,
        )
    kind = fusion_factory(
        fusion, init=init, norm=norm, activation=activation, resize=resize, subspaces=subspaces
    )
    traced = trace(models, example_input=example_input, options=trace_options)
    fusion_plan = plan(traced, points, fusion=kind, shortcut=shortcut)
    return rewrite(traced, fusion_plan, fusion=kind, shortcut=shortcut, copy=copy)
