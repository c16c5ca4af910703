"""Per-library tracing adapters: what nddrify needs to know to trace a library's models.

:func:`~nddrify.tracing.trace_model` looks up the model's :class:`TraceAdapter` with
:func:`find_adapter` and merges it into the user's :class:`~nddrify.TraceOptions` (extra leaf
modules and autowrapped functions), applies its patches while tracing and propagating shapes,
calls the model its way and keeps its output's form. Built in (:mod:`.builtin`):
segmentation_models_pytorch, Hugging Face transformers vision models, and torchvision detectors
(not traceable whole: their ``backbone`` is the route). timm needs none: its own no-trace
registry is used directly. Register your own with :func:`register_adapter`.

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.adapters import TraceAdapter, register_adapter, unregister_adapter
    >>> class KeywordNet(nn.Module):  # takes the image by keyword, returns a dict
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(3, 8, 3, padding=1)
    ...     def forward(self, *, image):
    ...         return {"features": self.conv(image).relu()}
    >>> adapter = register_adapter(TraceAdapter(
    ...     name="keyword-nets", applies_to=(KeywordNet,), call=lambda m, x: m(image=x)))
    >>> a, b = KeywordNet(), KeywordNet()
    >>> fused = nddrify.fuse([a, b], points=["conv"], init=(1.0, 0.0), norm=None,
    ...                      activation=None, example_input=torch.randn(1, 3, 16, 16))
    >>> x = torch.randn(2, 3, 16, 16)
    >>> bool(torch.allclose(fused(x)[1]["features"], b(image=x)["features"]))
    True
    >>> unregister_adapter(adapter)
"""

from . import builtin, registry
from .outputs import keep_output_class
from .registry import *  # noqa: F403

__all__ = [*registry.__all__, "keep_output_class", "builtin"]
