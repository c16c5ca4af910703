"""Metric conventions of the surface-normal meter: the official NDDR-CNN evaluation or MTAN's.

A config's ``metrics_convention`` picks one (:class:`recipes.metrics.NormalMeter` takes it as
``convention``):

* ``"official"`` (default; the NDDR-CNN TF code, REFERENCE §7): a pixel is valid where the
  dataset's mask says so (NYU raw: not all channels 255; unit vectors: not all channels 0); every
  valid pixel of every image is pooled, then Mean / Median / RMSE and the % of angles ``≤ t``.
* ``"mtan"`` (lorenmt/mtan ``im2im_pred/utils.py: normal_error`` and its trainer, for users of
  the MTAN NYUv2 ``.npy`` build, ``dataset=nyuv2_mtan``):

  - valid pixels also need ``sum(target) != 0`` over the three components (MTAN's
    ``torch.sum(x_output, dim=1) != 0``; a unit vector such as (0.6, −0.6, 0) is left out);
  - the within-t° fractions count ``angle < t`` (strict, MTAN's ``np.mean(error < t)``);
  - every metric is computed per evaluation batch (one ``update`` call: ``eval_batch_size``
    images; MTAN evaluates batches of 2), then averaged over the batches with equal weights (the
    median too). A batch with no valid pixel is skipped (MTAN's would be NaN). MTAN reports no
    RMSE; here it is the per-batch RMSE averaged the same way;
  - while training, mirrored samples get the normal's x component negated
    (``TrainTransform(negate_normal_x=True)``; the official code does not negate it).

  MTAN's segmentation metrics (a dataset-wide confusion matrix in its current code) are the
  official ones here; its older per-image mIoU is not reproduced.

Example:
    >>> import torch
    >>> angles = torch.tensor([0.0, 11.25, 30.0, 40.0], dtype=torch.float64)
    >>> within_percent(angles, 11.25, "official"), within_percent(angles, 11.25, "mtan")
    (50.0, 25.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import ConfigError

__all__ = [
    "METRICS_CONVENTIONS",
    "check_convention",
    "normal_valid",
    "within_percent",
    "batch_row",
    "average_rows",
    "median",
]

#: The conventions, official first.
METRICS_CONVENTIONS: tuple[str, ...] = ("official", "mtan")


def check_convention(convention: str) -> str:
    """``convention`` if known, else :class:`ConfigError`.

    Example:
        >>> check_convention("mtan")
        'mtan'
    """
    if convention not in METRICS_CONVENTIONS:
        raise ConfigError(
            f"metrics convention {convention!r} is not known; use 'official' (the NDDR-CNN "
            "code) or 'mtan' (lorenmt/mtan)."
        )
    return convention


def median(values: torch.Tensor) -> float:
    """``np.median``: the middle value, or the mean of the two middle values (NaN when empty).

    Example:
        >>> import torch
        >>> median(torch.tensor([3.0, 1.0, 2.0, 10.0]))
        2.5
    """
    count = values.numel()
    if count == 0:
        return math.nan
    flat = values.reshape(-1).to(torch.float64)
    low = flat.kthvalue((count + 1) // 2).values
    if count % 2:
        return float(low)
    high = flat.kthvalue(count // 2 + 1).values
    return float((low + high) / 2)


def normal_valid(target: torch.Tensor, mask: torch.Tensor, convention: str) -> torch.Tensor:
    """The pixels scored: ``mask`` (N×H×W), and under ``"mtan"`` also ``target.sum(1) != 0``
    (``target`` N×3×H×W).

    Example:
        >>> import torch
        >>> target = torch.tensor([[0.6, -0.6, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 2)
        >>> mask = torch.ones(1, 1, 2, dtype=torch.bool)
        >>> normal_valid(target, mask, "official").tolist(), normal_valid(target, mask, "mtan").tolist()
        ([[[True, True]]], [[[False, True]]])
    """
    valid = mask.bool()
    if check_convention(convention) == "mtan":
        valid = valid & (target.sum(dim=1) != 0)
    return valid


def within_percent(angles: torch.Tensor, threshold: float, convention: str) -> float:
    """% of ``angles`` within ``threshold`` degrees: ``≤`` (official) or ``<`` (MTAN)."""
    hits = angles < threshold if check_convention(convention) == "mtan" else angles <= threshold
    return 100 * float(hits.to(torch.float64).mean())


def batch_row(angles: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor | None:
    """One batch's ``[mean, median, rmse, within_t...]`` (float64, MTAN's strict ``<``), or None
    for a batch without angles.

    Example:
        >>> import torch
        >>> batch_row(torch.tensor([10.0, 20.0]), (15.0,)).tolist()
        [15.0, 15.0, 15.811388300841896, 50.0]
    """
    if angles.numel() == 0:
        return None
    wide = angles.reshape(-1).to(torch.float64)
    values = [float(wide.mean()), median(wide), math.sqrt(float((wide**2).mean()))]
    values += [within_percent(wide, t, "mtan") for t in thresholds]
    return torch.tensor(values, dtype=torch.float64)


def average_rows(rows: torch.Tensor, thresholds: Sequence[float]) -> dict[str, float]:
    """The :class:`recipes.metrics.NormalMeter` result from K×(3 + T) batch rows: each column's
    mean over the batches (NaN without batches).

    Example:
        >>> import torch
        >>> rows = torch.tensor([[15.0, 15.0, 16.0, 50.0], [5.0, 5.0, 6.0, 100.0]])
        >>> average_rows(rows, (15.0,))
        {'mean': 10.0, 'median': 10.0, 'rmse': 11.0, 'within_15': 75.0}
    """
    names = ["mean", "median", "rmse", *(f"within_{t:g}" for t in thresholds)]
    if rows.numel() == 0:
        return dict.fromkeys(names, math.nan)
    averages = rows.to(torch.float64).mean(dim=0).tolist()
    return dict(zip(names, averages))
