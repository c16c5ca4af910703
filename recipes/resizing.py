"""The resize conventions of the recipes: bilinear for predictions and images, nearest for labels.

Three conventions, named as :data:`nddrify.layers.RESIZE_MODES` (a config's ``eval_resize`` and
``rescale_resize`` take one of them). For an input of size ``in`` and an output of size ``out``,
output index ``i`` reads source coordinate ``s``:

* ``"tf_legacy"`` — TF1 ``tf.image.resize_bilinear`` / ``resize_nearest_neighbor`` /
  ``resize_images`` with their defaults (``align_corners=False``, no half-pixel centres), what the
  official NDDR-CNN code uses everywhere (REFERENCE §3, §7): ``s = i · in / out``; nearest takes
  ``floor(s)``.
* ``"align_corners_false"`` — PyTorch's ``F.interpolate`` default (half-pixel centres):
  ``s = (i + 0.5) · in / out − 0.5``; nearest takes ``floor((i + 0.5) · in / out)`` (PyTorch's
  ``"nearest-exact"``).
* ``"align_corners_true"`` — ``s = i · (in − 1) / (out − 1)``; nearest takes ``round(s)`` (halves
  up, as TF1's ``resize_nearest_neighbor(align_corners=True)``).

Bilinear resizing is nddrify's :func:`nddrify.layers.resize_bilinear` (the same code as the
NDDR-Shortcut layer); source coordinates are computed in float32, as TF1 does. Nearest source
indices are clamped to ``in − 1``.

Example:
    >>> import torch
    >>> row = torch.tensor([[[0.0, 10.0, 20.0]]])  # 1×1×3 → 1×1×5
    >>> [round(v, 4) for v in resize_bilinear(row, (1, 5), "tf_legacy").flatten().tolist()]
    [0.0, 6.0, 12.0, 18.0, 20.0]
    >>> labels = torch.arange(5).reshape(1, 5)  # 1×5 → 1×2
    >>> [resize_nearest(labels, (1, 2), mode).flatten().tolist() for mode in RESIZE_MODES]
    [[0, 2], [1, 3], [0, 4]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nddrify.layers import resize_bilinear as _nddrify_resize_bilinear

from .errors import ConfigError

__all__ = ["RESIZE_MODES", "check_resize_mode", "resize_bilinear", "resize_nearest"]

#: The resize conventions, official first.
RESIZE_MODES: tuple[str, ...] = ("tf_legacy", "align_corners_false", "align_corners_true")


def check_resize_mode(mode: str, what: str = "resize mode") -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else :class:`ConfigError`.

    Example:
        >>> check_resize_mode("tf_legacy")
        'tf_legacy'
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(
            f"{what}={mode!r} is not known; use one of {', '.join(RESIZE_MODES)} "
            "('tf_legacy' is the official TF1 code's)."
        )
    return mode


def resize_bilinear(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Bilinear resize of the last two dimensions of a C×H×W or N×C×H×W float tensor to ``size``
    with convention ``mode`` (module docstring); unchanged when already that size.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[0.0, 10.0]]])
        >>> [round(v, 4) for v in resize_bilinear(x, (1, 4), "align_corners_true").flatten().tolist()]
        [0.0, 3.3333, 6.6667, 10.0]
    """
    check_resize_mode(mode)
    if tuple(x.shape[-2:]) == (int(size[0]), int(size[1])):
        return x
    if x.dim() == 3:
        return _nddrify_resize_bilinear(x[None], size, mode)[0]  # type: ignore[arg-type]
    if x.dim() != 4:
        raise ConfigError(
            f"resize_bilinear: expected a C×H×W or N×C×H×W tensor, got {tuple(x.shape)}."
        )
    return _nddrify_resize_bilinear(x, size, mode)  # type: ignore[arg-type]


def _nearest_index(in_size: int, out_size: int, mode: str, device: torch.device) -> torch.Tensor:
    steps = torch.arange(out_size, device=device, dtype=torch.float32)
    if mode == "tf_legacy":
        source = (steps * (in_size / out_size)).floor()
    elif mode == "align_corners_false":
        source = ((steps + 0.5) * (in_size / out_size)).floor()
    else:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        source = (steps * scale + 0.5).floor()
    return source.long().clamp(0, in_size - 1)


def resize_nearest(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Nearest-neighbour resize of the last two dimensions of ``x`` (any dtype, any leading
    dimensions: H×W labels, N×H×W masks, C×H×W normals) with convention ``mode``; dtype kept.

    Example:
        >>> import torch
        >>> resize_nearest(torch.tensor([[True, False, False]]), (1, 2), "tf_legacy").tolist()
        [[True, False]]
    """
    check_resize_mode(mode)
    height, width = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (height, width):
        return x
    rows = _nearest_index(x.shape[-2], height, mode, x.device)
    columns = _nearest_index(x.shape[-1], width, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, columns)
