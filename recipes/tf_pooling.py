"""TensorFlow ``'SAME'`` max pooling for PyTorch models (the official NDDR code's pools).

TF pads a ``'SAME'`` pool so that the output has ``ceil(size / stride)`` rows: the padding total is
``max((ceil(size / stride) − 1) · stride + kernel − size, 0)``, of which ``total // 2`` goes
before and the rest after (max pools pad with −inf). PyTorch pads symmetrically, so a 3×3
stride-2 pool with ``padding=1`` agrees with TF on odd sizes (pads 1 and 1: the 321×321 training
crops) but not on even ones (TF pads 0 before and 1 after: the 480×640 NYUv2 evaluation images).

* :func:`same_padding` — the (before, after) padding of one axis;
* :func:`tf_same_pads`, :func:`tf_same_max_pool2d` — the padding and the pool as functions;
* :class:`TFSameMaxPool2d` — an ``nn.MaxPool2d`` that pools the TF way;
* :func:`use_tf_same_pooling` — swap every ``nn.MaxPool2d`` of a model for it, in place.

Example:
    >>> import torch
    >>> same_padding(4, 3, 2), same_padding(5, 3, 2)
    ((0, 1), (1, 1))
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> TFSameMaxPool2d(3, 2)(x).flatten().tolist()  # windows start at row/column 0, not −1
    [10.0, 11.0, 14.0, 15.0]
    >>> torch.nn.MaxPool2d(3, 2, padding=1)(x).flatten().tolist()
    [5.0, 7.0, 13.0, 15.0]
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .errors import ConfigError

__all__ = [
    "same_padding",
    "tf_same_pads",
    "tf_same_max_pool2d",
    "TFSameMaxPool2d",
    "use_tf_same_pooling",
]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``'SAME'`` padding (before, after) of one axis of length ``size``.

    Example:
        >>> [same_padding(n, 3, 2) for n in (320, 321)], same_padding(41, 3, 1)
        ([(0, 1), (1, 1)], (1, 1))
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def tf_same_pads(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """The padding *before* the rows and the columns of a TF ``'SAME'`` pool of ``x`` (N×C×H×W).

    ``torch.fx`` keeps a call of it as one node: the padding is computed from the actual input
    size at run time.

    Example:
        >>> import torch
        >>> tf_same_pads(torch.empty(1, 1, 480, 641), (3, 3), (2, 2))
        (0, 1)
    """
    top = same_padding(int(x.shape[-2]), kernel_size[0], stride[0])[0]
    left = same_padding(int(x.shape[-1]), kernel_size[1], stride[1])[0]
    return top, left


torch.fx.wrap("tf_same_pads")


def tf_same_max_pool2d(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """Max pool ``x`` (N×C×H×W) as TF's ``tf.nn.max_pool(..., padding='SAME')``: −inf padding,
    ``total // 2`` before, the rest after; output ``ceil(H / stride)`` × ``ceil(W / stride)``.

    Computed as ``F.max_pool2d`` with the TF padding *before* on both sides and ``ceil_mode``:
    for ``kernel ≥ stride`` TF's "after" padding is the "before" one or one more, which ceil
    mode covers exactly (a window never starts in the right padding). ``torch.fx`` traces it as
    ``tf_same_pads`` → ``F.max_pool2d`` (graph analyses still see a max pool on ``x``).

    Raises:
        ValueError: ``kernel < stride`` on an axis (TF would skip input pixels; not supported).

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1.0, 5.0, 2.0, 4.0]]]])
        >>> tf_same_max_pool2d(x, (1, 3), (1, 2)).tolist()  # windows [0, 2] and [2, 4)
        [[[[5.0, 4.0]]]]
    """
    if kernel_size[0] < stride[0] or kernel_size[1] < stride[1]:
        raise ValueError(f"tf_same_max_pool2d needs kernel ≥ stride, got {kernel_size}, {stride}")
    return F.max_pool2d(
        x, kernel_size, stride, padding=tf_same_pads(x, kernel_size, stride), ceil_mode=True
    )


class TFSameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(kernel_size, stride)`` with TF ``'SAME'`` padding (:func:`tf_same_max_pool2d`).

    A subclass of ``nn.MaxPool2d`` (code that looks for max pools still finds it); ``padding``
    is 0 and unused.

    Example:
        >>> import torch
        >>> pool = TFSameMaxPool2d(3, 2)
        >>> tuple(pool(torch.randn(1, 2, 480, 640)).shape), pool
        ((1, 2, 240, 320), TFSameMaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=SAME))
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int]) -> None:
        super().__init__(_pair(kernel_size), _pair(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tf_same_max_pool2d(x, _pair(self.kernel_size), _pair(self.stride))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


def use_tf_same_pooling(model: nn.Module) -> int:
    """Replace every ``nn.MaxPool2d`` of ``model`` (in place) by a :class:`TFSameMaxPool2d` with
    the same kernel and stride; returns how many were replaced.

    Raises:
        ConfigError: a max pool has dilation or returns indices (TF has neither).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True))
        >>> use_tf_same_pooling(net), type(net[1]).__name__
        (1, 'TFSameMaxPool2d')
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.MaxPool2d) or isinstance(child, TFSameMaxPool2d):
                continue
            if _pair(child.dilation) != (1, 1) or child.return_indices:
                raise ConfigError(
                    f"tf_same_pooling: max pool {name!r} has dilation {child.dilation} or returns "
                    "indices; TF 'SAME' pooling has neither."
                )
            setattr(parent, name, TFSameMaxPool2d(child.kernel_size, child.stride))
            replaced += 1
    return replaced
