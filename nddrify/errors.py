"""Every exception nddrify raises on bad input, in one place.

Each error a user can cause is a subclass of :class:`NddrifyError`, so one ``except`` clause
catches them all; each class stands for one kind of mistake, and each message names the task,
node or argument at fault and says how to fix it.

Example:
    >>> import torch, nddrify
    >>> from nddrify.errors import ModelsError
    >>> try:
    ...     nddrify.fuse(models=[torch.nn.Conv2d(3, 8, 3)], points="auto")
    ... except nddrify.NddrifyError as err:
    ...     print(type(err).__name__, isinstance(err, ModelsError))
    ModelsError True
"""

from __future__ import annotations

__all__ = [
    "NddrifyError",
    "ModelsError",
    "InputError",
    "TraceError",
    "PointError",
    "ShapeMismatchError",
    "FusionConfigError",
    "PlanError",
    "ShareError",
    "FusedModelError",
    "SpecError",
    "CheckpointError",
    "BatchingError",
    "ExportError",
]


class NddrifyError(Exception):
    """Base class of every error nddrify raises because of its input."""


class ModelsError(NddrifyError, ValueError):
    """The ``models`` argument cannot be fused: too few, wrong type, unusable task names, or
    models on different devices or dtypes."""


class InputError(NddrifyError, ValueError):
    """What nddrify must feed a model is wrong: the example input (not a 4-D tensor), a
    ``forward`` signature it cannot call, or ``concrete_args`` that do not match it."""


class TraceError(NddrifyError, RuntimeError):
    """torch.fx could not trace a task's model (or run it on the example input)."""


class PointError(NddrifyError, ValueError):
    """A fusion point is unknown, duplicated, out of order or not a feature map."""


class ShapeMismatchError(NddrifyError, ValueError):
    """The tasks' feature maps at one fusion level do not share their spatial size."""


class FusionConfigError(NddrifyError, ValueError):
    """A fusion kind or one of its options (init, norm, activation, shortcut) is invalid."""


class PlanError(NddrifyError, ValueError):
    """A :class:`~nddrify.Plan` (or its ``to_dict`` form) is malformed, or does not match the
    traced models it is applied to."""


class ShareError(NddrifyError, ValueError):
    """Hard sharing cannot be built: the trunks differ, or ``split`` / ``trunk`` is invalid."""


class FusedModelError(NddrifyError, ValueError):
    """A helper that needs a model built by nddrify got another module, or a task the fused
    model does not have."""


class SpecError(NddrifyError, ValueError):
    """A command-line model spec such as ``torchvision:vgg16`` cannot be resolved."""


class CheckpointError(NddrifyError, ValueError):
    """A checkpoint cannot be written or rebuilt (unknown format, missing models or specs)."""


class BatchingError(NddrifyError, ValueError):
    """``batch_tasks`` got something it cannot batch (not a fused model, a bad option), or
    ``sync`` got a model whose weights do not match."""


class ExportError(NddrifyError, RuntimeError):
    """A fused model cannot be exported (ONNX, ``torch.export``): the exporter failed, a package
    it needs is missing, or the model is not one nddrify built."""
