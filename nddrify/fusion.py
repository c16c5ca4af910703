"""``nddrify.fuse``: trace → plan → rewrite in one call.

Example:
    >>> import torch, torchvision, nddrify
    >>> seg, normal = torchvision.models.vgg16(), torchvision.models.vgg16()
    >>> fused = nddrify.fuse(models=[seg, normal], points="auto")
    >>> seg_out, normal_out = fused(torch.randn(1, 3, 224, 224))
    >>> seg_out.shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .baselines import CrossStitch, Sluice
from .errors import FusionConfigError
from .layers import NDDR, Activation, Init, Norm, ResizeMode, Shortcut, as_shortcut
from .planning import Plan, Points, TaskModels, plan, resolve_models
from .rewriting import rewrite

__all__ = [
    "fuse",
    "fusion_factory",
    "build_record",
    "factory_from_record",
    "BUILD_META_KEY",
    "FUSION_KINDS",
]

#: ``fused.meta`` key: how the model was built (specs, points, options), for ``nddrify.save``.
BUILD_META_KEY = "nddrify_build"

_UNSET: Any = object()


#: Built-in fusion kinds by name.
FUSION_KINDS = ("nddr", "cross_stitch", "sluice")


def fusion_factory(
    fusion: Any = None,
    *,
    init: Init = _UNSET,
    norm: Norm = _UNSET,
    activation: Activation = _UNSET,
    resize: Any = False,
    subspaces: int | None = None,
) -> Any:
    """The fusion-layer factory ``fuse`` uses: a factory object as given, or one of the built-in
    kinds by name (``"nddr"``, ``"cross_stitch"``, ``"sluice"``) with the given options.

    A factory is any object with ``__call__(shapes, nonnegative, channels_last) -> FusionLayer``
    (one layer per level, K shapes in (N, C, H, W)) and ``num_parameters(shapes) -> (weights,
    norm_params)``; see the README for a custom example.
    """
    resize_mode: ResizeMode | None
    if resize is True:
        resize_mode = "align_corners_false"
    elif resize in (False, None):
        resize_mode = None
    else:
        resize_mode = resize
    given = {
        n: v
        for n, v in (("init", init), ("norm", norm), ("activation", activation))
        if v is not _UNSET
    }
    if fusion is None or fusion == "nddr":
        if subspaces is not None:
            raise FusionConfigError("subspaces= belongs to fusion='sluice'.")
        return NDDR(
            init=given.get("init"),
            norm=given.get("norm", "batchnorm"),
            activation=given.get("activation", "auto"),
            resize=resize_mode,
        )
    if isinstance(fusion, str):
        if fusion not in FUSION_KINDS:
            raise FusionConfigError(
                f"fusion={fusion!r} is unknown; use one of {FUSION_KINDS} or a factory object "
                "such as nddrify.NDDR(rank=64)."
            )
        extra = sorted(set(given) - {"init"})
        if extra or resize_mode is not None:
            raise FusionConfigError(
                f"fusion={fusion!r} takes init= only (and subspaces= for sluice), not "
                f"{extra or ['resize']}; those options belong to NDDR layers."
            )
        if fusion == "cross_stitch":
            if subspaces is not None:
                raise FusionConfigError("subspaces= belongs to fusion='sluice'.")
            return CrossStitch(init=given.get("init"))
        return Sluice(subspaces=2 if subspaces is None else subspaces, init=given.get("init"))
    if given or subspaces is not None or resize_mode is not None:
        raise FusionConfigError(
            f"pass either fusion=... or the NDDR options {sorted(given)}, not both; e.g. "
            "fusion=nddrify.NDDR(init=(1.0, 0.0), norm=None)."
        )
    if not callable(fusion) or not hasattr(fusion, "num_parameters"):
        raise FusionConfigError(
            f"fusion={fusion!r} is not a fusion factory: it needs __call__(shapes, nonnegative, "
            "channels_last) and num_parameters(shapes)."
        )
    return fusion


def _plain(value: Any) -> Any:
    """``value`` if it is made of plain Python values only (storable with weights_only=True)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else type(value)(items)
    return _NOT_PLAIN


_NOT_PLAIN: Any = object()


_FACTORY_KINDS = {"nddr": NDDR, "cross_stitch": CrossStitch, "sluice": Sluice}


def build_record(
    resolved: TaskModels,
    fusion_plan: Plan,
    factory: Any,
    shortcut: Shortcut | None,
    example_input: torch.Tensor | None,
) -> dict[str, Any]:
    """What ``nddrify.save`` stores to rebuild a fused model: plain values only. ``options`` is
    None when the fusion factory is a custom class or an option is a callable (a custom norm),
    which cannot be stored without pickling code."""
    kind = next((k for k, cls in _FACTORY_KINDS.items() if type(factory) is cls), None)
    options: dict[str, Any] | None = None
    if kind is not None:
        fields = {"kind": kind, **dataclasses.asdict(factory)}
        short = None if shortcut is None else dataclasses.asdict(shortcut)
        if _plain(list(fields.values())) is not _NOT_PLAIN and (
            short is None or _plain(list(short.values())) is not _NOT_PLAIN
        ):
            options = {"fusion": fields, "shortcut": short}
    return {
        "tasks": list(fusion_plan.tasks),
        "as_dict": resolved.as_dict,
        "specs": list(resolved.specs),
        "points": [fusion_plan.points(t) for t in fusion_plan.tasks],
        "example_input_shape": None if example_input is None else list(example_input.shape),
        "options": options,
    }


def factory_from_record(fields: Mapping[str, Any]) -> Any:
    """The fusion factory a :func:`build_record` describes."""
    fields = dict(fields)
    return _FACTORY_KINDS[fields.pop("kind")](**fields)


def _placement(models: Sequence[nn.Module]) -> dict[str, Any]:
    for model in models:
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def fuse(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    points: Points = "auto",
    *,
    init: Init = _UNSET,
    norm: Norm = _UNSET,
    activation: Activation = _UNSET,
    fusion: Any = None,
    subspaces: int | None = None,
    shortcut: bool | Shortcut = False,
    resize: bool | ResizeMode = False,
    example_input: torch.Tensor | None = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> fx.GraphModule:
    """Fuse K single-task models into one multi-task GraphModule with NDDR layers.

    The models are traced (never modified), fusion points are chosen (see :func:`nddrify.plan`),
    and one GraphModule is emitted that takes one image batch and returns every task's output:
    a tuple in task order, or a dict when ``models`` is a dict. The fused model owns copies of the
    models' weights (``fused.<task>.<original key>``); :func:`nddrify.task_state_dict` gives
    them back under the original key names.

    Args:
        models: two or more ``nn.Module`` (a list, or a dict task name → model); a model may be
            a spec string such as ``"torchvision:vgg16"`` or ``"timm:resnet50"``, which
            ``nddrify.save`` records so ``nddrify.load`` needs no code to rebuild.
        points: ``"auto"``, an int N, module/node names, or one list of names per task.
        init: NDDR diagonal init ``(alpha, beta)``, ``"xavier"``; default (0.9, 0.1) for two
            tasks and rows summing to one for more.
        norm: ``"batchnorm"`` (default: eps 1e-3, momentum 0.05), ``None`` or ``channels -> module``.
        activation: ``"auto"`` (default: ReLU only where the fused feature was non-negative, so a
            pre-activation feature is never clipped), ``"relu"`` (the official code), ``None``, or
            a callable returning a module.
        fusion: the fusion kind: ``"nddr"`` (default), ``"cross_stitch"``, ``"sluice"``, or a
            factory such as ``nddrify.NDDR(rank=64)``, ``nddrify.CrossStitch(per_channel=True)``
            or your own (see :func:`fusion_factory`).
        subspaces: the number of subspaces per task for ``fusion="sluice"`` (default 2).
        shortcut: add the NDDR-Shortcut (``True`` or ``nddrify.Shortcut(resize_mode=...)``).
        resize: allow points with different H×W across tasks (``True`` or a resize mode).
        example_input: input used to propagate shapes (default 1×3×224×224).
        leaf_modules, autowrap_functions, concrete_args: tracing options.

    Returns:
        A ``torch.fx.GraphModule``; ``fused.meta["nddrify_plan"]`` holds its :class:`~nddrify.Plan`.

    Example:
        >>> import torch, torchvision, nddrify
        >>> a, b = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
        >>> fused = nddrify.fuse({"a": a, "b": b}, init=(1.0, 0.0), norm=None, activation=None)
        >>> x = torch.randn(2, 3, 64, 64)
        >>> out = fused(x)
        >>> bool((out["a"] - a(x)).abs().max() < 1e-5)
        True
    """
    factory = fusion_factory(
        fusion, init=init, norm=norm, activation=activation, resize=resize, subspaces=subspaces
    )
    resolved = resolve_models(models)
    fusion_plan = plan(
        resolved,
        points,
        example_input=example_input,
        fusion=factory,
        shortcut=shortcut,
        resize=getattr(factory, "resize", None) is not None,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        concrete_args=concrete_args,
    )
    modules = resolved.modules
    placement = _placement(modules)
    layers = [
        factory(
            [p.shape for p in level.points],
            [p.nonnegative for p in level.points],
            [p.layout == "NHWC" for p in level.points],
        ).to(**placement)
        for level in fusion_plan.levels
    ]
    shortcut_layer = None
    shortcut_factory = as_shortcut(shortcut)
    level_shapes = [[p.shape for p in level.points] for level in fusion_plan.levels]
    if shortcut_factory is not None:
        last = fusion_plan.levels[-1].points
        shortcut_layer = shortcut_factory(
            level_shapes,
            [p.nonnegative for p in last],
            [[p.layout == "NHWC" for p in level.points] for level in fusion_plan.levels],
        ).to(**placement)
    elif hasattr(factory, "level_mixer"):  # sluice's layer-stitch takes the shortcut's place
        shortcut_layer = factory.level_mixer(level_shapes)
        shortcut_layer = shortcut_layer.to(**placement) if shortcut_layer is not None else None
    fused = rewrite(fusion_plan, layers, shortcut_layer, as_dict=resolved.as_dict)
    fused.meta[BUILD_META_KEY] = build_record(
        resolved, fusion_plan, factory, shortcut_factory, example_input
    )
    return fused
