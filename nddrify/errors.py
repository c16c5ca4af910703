"""The exceptions nddrify raises on bad input.

Every error a user can cause is a subclass of :class:`NddrifyError`, so one ``except`` clause catches
them all, and each message names the task, node or argument at fault and says how to fix it.

Example:
    >>> import torch, nddrify
    >>> try:
    ...     nddrify.fuse(models=[torch.nn.Conv2d(3, 8, 3)], points="auto")
    ... except nddrify.NddrifyError as err:
    ...     print(type(err).__name__)
    ModelsError
"""

from __future__ import annotations

__all__ = [
    "NddrifyError",
    "ModelsError",
    "TraceError",
    "PointError",
    "ShapeMismatchError",
    "FusionConfigError",
    "SpecError",
]


class NddrifyError(Exception):
    """Base class of every error nddrify raises because of its input."""


class ModelsError(NddrifyError, ValueError):
    """The ``models`` argument cannot be fused (too few, wrong type, different devices or dtypes)."""


class TraceError(NddrifyError, RuntimeError):
    """torch.fx could not trace a task's model (or run it on the example input)."""


class PointError(NddrifyError, ValueError):
    """A fusion point is unknown, duplicated, out of order or not a feature map."""


class ShapeMismatchError(NddrifyError, ValueError):
    """The tasks' feature maps at one fusion level do not share their spatial size."""


class FusionConfigError(NddrifyError, ValueError):
    """An option of the fusion layers (init, norm, activation, shortcut) is invalid."""


class SpecError(NddrifyError, ValueError):
    """A command-line model spec such as ``torchvision:vgg16`` cannot be resolved."""
