"""Which layer types have a batched form: the registry, and :func:`register_batched_form`.

A layer type runs batched when it is registered here with the *factory* that builds its batched
form from the K tasks' layers. nddrify registers its own forms when :mod:`nddrify.batching` is
imported (``nn.Conv1d`` … ``nn.ConvTranspose3d``, ``nn.BatchNorm1d`` … ``3d``, ``nn.Linear`` in
:mod:`~nddrify.batching.modules`; ``NDDRLayer``, ``CrossStitchLayer``, ``NDDRShortcutLayer`` in
:mod:`~nddrify.batching.fusion_modules`); :func:`register_batched_form` adds a project's own
types. Look-ups are by exact type: a subclass of ``nn.Conv2d`` runs per task until it is
registered (its forward may differ from Conv2d's).

Example:
    >>> from torch import nn
    >>> from nddrify.batching.registry import batched_form
    >>> batched_form(nn.Conv2d).kind, batched_form(nn.Conv2d).factory.__name__
    ('conv', 'TaskBatchedConv2d')
    >>> batched_form(nn.LSTM) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import BatchingError

__all__ = [
    "BATCHED_FORM_KINDS",
    "LAYER_KINDS",
    "BatchedForm",
    "batched_form",
    "register_batched_form",
]

#: What a registered type is, which says when its batched form applies and how it is called:
#:
#: - ``"conv"``: a convolution (``weight``, ``groups``, ... as ``nn.Conv2d``); batched on inputs
#:   with as many dims as its weight. ``factory(layers, sources, conv_mode)``; the batched
#:   module's ``forward(x, shared_input=False)`` also takes one input all tasks share (the image).
#: - ``"norm"``: a batch norm (``momentum`` as ``nn.BatchNorm2d``); batched unless its momentum
#:   is None (a cumulative average). ``factory(layers, sources)``.
#: - ``"linear"``: any other layer with weights; always batched. ``factory(layers, sources)``.
#: - ``"fusion"``: a :class:`~nddrify.layers.FusionLayer` called with the K tasks' maps of one level.
#:   ``factory(layer, path)``; the batched module's ``forward`` takes the task-stacked maps.
#: - ``"shortcut"``: a :class:`~nddrify.layers.FusionLayer` called with every level's K maps (as
#:   ``NDDRShortcutLayer``). ``factory(layer, path)``; ``forward`` takes one task-stacked map per
#:   level.
#:
#: ``layers`` are the K tasks' layers (identical but for their weights), ``sources`` their paths in
#: the fused model, ``conv_mode`` one of :data:`~nddrify.batching.CONV_MODES`; ``layer`` is the
#: fused model's fusion layer at ``path``. Every batched module works on task-stacked maps
#: (``N × K·C × …``) and subclasses :class:`~nddrify.batching.modules.TaskBatched`.
BATCHED_FORM_KINDS = ("conv", "norm", "linear", "fusion", "shortcut")
#: the kinds of task layers (the others are fusion layers)
LAYER_KINDS = ("conv", "norm", "linear")


@dataclass(frozen=True)
class BatchedForm:
    """A registered batched form: its ``kind`` (one of :data:`BATCHED_FORM_KINDS`) and the
    ``factory`` that builds it."""

    kind: str
    factory: Callable[..., nn.Module]


_FORMS: dict[type, BatchedForm] = {}


def register_batched_form(
    module_type: type[nn.Module], factory: Callable[..., nn.Module], *, kind: str
) -> None:
    """Run the K tasks' layers of type ``module_type`` as one batched layer built by ``factory``.

    ``kind`` says what the layer is, hence when the batched form applies and how ``factory`` is
    called (see :data:`BATCHED_FORM_KINDS`); registering a type again replaces its form. A layer
    type must be a leaf of the trace (a ``torch.nn`` layer, or one in
    ``nddrify.fuse(..., trace_options=nddrify.TraceOptions(leaf_modules=[...]))``) for the fused graph to call it as one module.

    Args:
        module_type: the layer's class (matched exactly, not its subclasses).
        factory: builds the batched module, e.g. :class:`~nddrify.batching.TaskBatchedConv2d`
            for a subclass of ``nn.Conv2d`` that keeps Conv2d's forward.
        kind: ``"conv"``, ``"norm"``, ``"linear"``, ``"fusion"`` or ``"shortcut"``.

    Raises:
        BatchingError: ``module_type`` is not a module class, ``factory`` is not callable, or
            ``kind`` is unknown.

    Example:
        >>> import torch, nddrify
        >>> from torch import nn
        >>> from nddrify.batching import (
        ...     TaskBatchedConv2d, batch_tasks, batching_report, register_batched_form)
        >>> class TaggedConv2d(nn.Conv2d):
        ...     '''A project's own layer type: Conv2d's forward under another name.'''
        >>> def cnn():
        ...     return nn.Sequential(TaggedConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> models = {"a": cnn(), "b": cnn()}
        >>> options = nddrify.TraceOptions(leaf_modules=[TaggedConv2d])
        >>> fused = nddrify.fuse(models, points=["1"], trace_options=options).eval()
        >>> print(batching_report(fused).stages[0].per_task[0])
        0 (no batched form for TaggedConv2d)
        >>> register_batched_form(TaggedConv2d, TaskBatchedConv2d, kind="conv")
        >>> batched = batch_tasks(fused)
        >>> batched.report.batched_operations, batched.report.operations
        (3, 3)
        >>> type(batched.get_submodule("batched.0")).__name__
        'TaskBatchedConv2d'
        >>> x = torch.randn(1, 3, 16, 16)
        >>> expected, out = fused(x), batched(x)
        >>> all(bool((out[t] - expected[t]).abs().max() < 1e-5) for t in ("a", "b"))
        True
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise BatchingError(
            f"register_batched_form needs a module class, got {module_type!r}; pass the layer's "
            "class, e.g. register_batched_form(MyConv2d, TaskBatchedConv2d, kind='conv')."
        )
    if not callable(factory):
        raise BatchingError(
            f"the factory for {module_type.__name__} must be callable, got {factory!r}."
        )
    if kind not in BATCHED_FORM_KINDS:
        raise BatchingError(f"kind={kind!r} is unknown; use one of {BATCHED_FORM_KINDS}.")
    _FORMS[module_type] = BatchedForm(kind, factory)


def batched_form(module_type: type) -> BatchedForm | None:
    """The batched form registered for exactly ``module_type``, or None."""
    return _FORMS.get(module_type)
