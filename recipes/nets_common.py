"""Small pieces shared by the recipes' networks (:mod:`recipes.nets_vgg`, :mod:`recipes.nets_resnet`,
:mod:`recipes.nets_alexnet`).

Example:
    >>> OFFICIAL_BN_EPS, OFFICIAL_BN_MOMENTUM
    (0.001, 0.05)
    >>> check_num_outputs(3, "deeplab_vgg16")  # fine: returns None
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .errors import ConfigError

__all__ = ["OFFICIAL_BN_EPS", "OFFICIAL_BN_MOMENTUM", "check_num_outputs", "freeze_batch_norm"]

#: BatchNorm settings of the official TF/slim code: decay 0.95 (PyTorch momentum 0.05), eps 1e-3.
OFFICIAL_BN_EPS = 1e-3
OFFICIAL_BN_MOMENTUM = 0.05


def check_num_outputs(num_outputs: Any, model: str) -> None:
    """Raise :class:`ConfigError` unless ``num_outputs`` is a positive int."""
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(
            f"{model}: num_outputs must be a positive int (e.g. 40 classes, 3 normal channels), "
            f"got {num_outputs!r}."
        )


def freeze_batch_norm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` (in place) by torchvision's
    ``FrozenBatchNorm2d`` with the same statistics, affine values and eps: running statistics
    *and* scale/shift fixed, in train and eval mode alike (Caffe's ``use_global_stats`` with
    ``lr_mult: 0`` on the Scale layer). State-dict keys stay the same (``bn1.weight`` …, now
    buffers; a file's ``num_batches_tracked`` is ignored). Returns how many were replaced.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> freeze_batch_norm(net), type(net[1]).__name__, sum(p.numel() for p in net.parameters())
        (1, 'FrozenBatchNorm2d', 16)
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.BatchNorm2d:
                continue
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                source = getattr(child, key)
                if source is not None:
                    getattr(frozen, key).copy_(source.detach())
            setattr(parent, name, frozen)
            replaced += 1
    return replaced
