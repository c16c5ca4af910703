"""The adapter registry: what tracing needs to know about a library's models, looked up by class.

A :class:`TraceAdapter` is a small frozen value: which model classes it applies to (by class, by
``"module:Qualname"`` or by module-name prefix, so the library is never imported to match), the
leaf modules and autowrapped functions it adds to the user's :class:`~nddrify.TraceOptions`, the
functions or methods it patches out while tracing, how to call the model and how to keep its
output's form, and, for models that cannot be traced whole, the submodule that holds the trunk.

:func:`register_adapter` adds one (the latest registered match wins, so a user's adapter beats a
built-in); :func:`find_adapter` returns the one that applies to a model, or ``None``.

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.adapters import TraceAdapter, find_adapter, register_adapter, unregister_adapter
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(3, 8, 3, padding=1)
    ...     def check(self, x):
    ...         if x.shape[-1] % 8:  # data-dependent Python control flow: fx cannot trace it
    ...             raise ValueError("size")
    ...     def forward(self, x):
    ...         self.check(x)
    ...         return self.conv(x).relu()
    >>> adapter = register_adapter(TraceAdapter(
    ...     name="my-nets", applies_to=(Net,), patches={(Net, "check"): None}))
    >>> find_adapter(Net()) is adapter
    True
    >>> fused = nddrify.fuse([Net(), Net()], points=["conv"], example_input=torch.randn(1, 3, 32, 32))
    >>> Net.check is Net.__dict__["check"]  # restored after tracing
    True
    >>> unregister_adapter(adapter)
"""

from __future__ import annotations

import contextlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from torch import nn

from ..errors import InputError, TraceError

__all__ = [
    "TraceAdapter",
    "UntraceableModelError",
    "register_adapter",
    "unregister_adapter",
    "registered_adapters",
    "find_adapter",
    "trunk_of",
    "patched",
    "noop",
]

#: A class, a ``"package.module:Qualname"`` class path, or a module-name prefix (``"timm"``).
ClassRef = type | str


def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: the default replacement of a patched function (a shape check)."""


@dataclass(frozen=True)
class TraceAdapter:
    """How to trace the models of one library (or one family of classes).

    Attributes:
        name: a label for messages and ``repr`` (``"segmentation_models_pytorch"``).
        applies_to: the model classes it applies to: classes (``isinstance``),
            ``"package.module:Qualname"`` class paths, or module-name prefixes
            (``"segmentation_models_pytorch"`` matches every class defined under that package);
            strings are matched against the names of the model's class and its bases, so the
            library is never imported to match.
        leaf_modules: module classes (or ``"module:Qualname"`` paths, imported when the adapter
            is used) not to trace into; added to the user's ``TraceOptions.leaf_modules``.
            A path the installed version of the library does not have is skipped.
        autowrap_functions: functions (or paths) to keep as single calls; added to the user's.
        patches: ``{target: replacement}`` applied only while tracing and propagating shapes,
            then restored (``None`` stands for :func:`noop`); for checks that need concrete
            values, such as an input-size assertion. A target is ``(owner, "attribute")`` or a
            dotted path ``"package.module.Class.method"``; a path the installed version of the
            library does not have is skipped.
        call: ``call(model, image, **concrete_args) -> output`` runs the model while tracing
            (e.g. ``lambda m, x: m(pixel_values=x)`` for a keyword-only image); the traced
            graph takes the image alone. ``None``: ``forward(image)``.
        output: ``output(value) -> value`` maps the model's return value while tracing (on fx
            proxies), e.g. :func:`~nddrify.adapters.outputs.keep_output_class` so a dataclass
            output is rebuilt in the graph rather than flattened to a dict. ``None``: as it is.
        concrete_metadata: trace with every value's shape and dtype known (fake tensors run
            alongside), so Python control flow on metadata (``if x.dtype != ...``, ``for d in
            x.shape``) is decided for the example input while the values stay symbolic in the
            graph (see :mod:`~nddrify.adapters.concrete`); slower, for libraries that need it.
        trunk: for models that cannot be traced whole (list inputs, targets): the submodule
            that holds the image trunk (a detector's ``"backbone"``). Tracing the whole model
            then fails at once with an :class:`UntraceableModelError` naming it.
    """

    name: str
    applies_to: tuple[ClassRef, ...]
    leaf_modules: tuple[ClassRef, ...] = ()
    autowrap_functions: tuple[Callable | str, ...] = ()
    patches: Mapping[str | tuple[Any, str], Callable | None] = field(
        default_factory=dict, hash=False
    )
    call: Callable[..., Any] | None = None
    output: Callable[[Any], Any] | None = None
    concrete_metadata: bool = False
    trunk: str | None = None

    def __post_init__(self) -> None:
        for attr in ("applies_to", "leaf_modules", "autowrap_functions"):
            value = getattr(self, attr)
            object.__setattr__(self, attr, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "patches", dict(self.patches))
        if not self.applies_to:
            raise InputError(f"TraceAdapter {self.name!r}: applies_to names no class or module.")
        for ref in self.applies_to:
            if not isinstance(ref, (type, str)):
                raise InputError(
                    f"TraceAdapter {self.name!r}: applies_to takes classes, 'module:Qualname' "
                    f"paths or module-name prefixes, got {type(ref).__name__}."
                )

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter applies to ``model`` (by its class and its bases)."""
        classes = type(model).__mro__
        for ref in self.applies_to:
            if isinstance(ref, type):
                if isinstance(model, ref):
                    return True
            elif ":" in ref:
                if any(f"{c.__module__}:{c.__qualname__}" == ref for c in classes):
                    return True
            elif any(c.__module__ == ref or c.__module__.startswith(ref + ".") for c in classes):
                return True
        return False

    def leaf_classes(self) -> tuple[type, ...]:
        """:attr:`leaf_modules` with every path imported."""
        return _resolve_all(self.leaf_modules)

    def functions(self) -> tuple[Callable, ...]:
        """:attr:`autowrap_functions` with every path imported."""
        return _resolve_all(self.autowrap_functions)


class UntraceableModelError(TraceError):
    """A model that cannot be traced whole (a detector): fuse its :attr:`trunk` submodule."""

    def __init__(self, message: str, trunk: str) -> None:
        super().__init__(message)
        self.trunk = trunk


def _resolve_all(refs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Import every ``"module:Qualname"`` path; a path the installed library version does not
    have is skipped (no model of that version can contain it)."""
    found = []
    for ref in refs:
        if isinstance(ref, str):
            try:
                ref = pkgutil.resolve_name(ref)
            except (ImportError, AttributeError, ValueError):
                continue
        found.append(ref)
    return tuple(found)


_REGISTRY: list[TraceAdapter] = []


def register_adapter(adapter: TraceAdapter) -> TraceAdapter:
    """Add ``adapter`` to the registry; it wins over every adapter registered before it.

    Returns:
        ``adapter``, so that registering can be one line (see the module's example).
    """
    if not isinstance(adapter, TraceAdapter):
        raise InputError(
            f"register_adapter takes a nddrify.adapters.TraceAdapter, got {type(adapter).__name__}."
        )
    _REGISTRY.append(adapter)
    return adapter


def unregister_adapter(adapter: TraceAdapter) -> None:
    """Remove ``adapter`` (registered with :func:`register_adapter`) from the registry."""
    for index in range(len(_REGISTRY) - 1, -1, -1):
        if _REGISTRY[index] is adapter:
            del _REGISTRY[index]
            return


def registered_adapters() -> tuple[TraceAdapter, ...]:
    """Every registered adapter, the one consulted first (the latest) first."""
    return tuple(reversed(_REGISTRY))


def find_adapter(model: nn.Module) -> TraceAdapter | None:
    """The adapter that applies to ``model`` (the latest registered match), or ``None``.

    Example:
        >>> import torchvision
        >>> from nddrify.adapters import find_adapter
        >>> find_adapter(torchvision.models.resnet18()) is None
        True
        >>> det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        ...     weights=None, weights_backbone=None)
        >>> find_adapter(det).trunk
        'backbone'
    """
    return next((a for a in reversed(_REGISTRY) if a.matches(model)), None)


def trunk_of(model: nn.Module) -> str | None:
    """The submodule that holds ``model``'s trunk when its adapter says it cannot be traced whole
    (``"backbone"`` for torchvision detectors), else ``None``."""
    adapter = find_adapter(model)
    return adapter.trunk if adapter is not None else None


@contextlib.contextmanager
def patched(adapter: TraceAdapter | None) -> Iterator[None]:
    """Apply ``adapter``'s patches for the duration of the ``with`` block, then restore every
    patched attribute (also when the block raises)."""
    with contextlib.ExitStack() as stack:
        for target, replacement in adapter.patches.items() if adapter is not None else ():
            new = noop if replacement is None else replacement
            if not isinstance(target, str):
                stack.enter_context(mock.patch.object(*target, new))
                continue
            try:
                stack.enter_context(mock.patch(target, new))
            except (ImportError, AttributeError):
                continue  # not in the installed version: nothing can call it
        yield
