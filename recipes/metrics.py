"""The paper's evaluation metrics as streaming meters (official NDDR conventions).

Every meter has ``update(prediction, *targets)``, ``update_batch(prediction, batch)`` (reads the
batch keys of :data:`recipes.losses.TASK_TARGETS`), ``compute() -> dict[str, float]``,
``reset()``, and for multi-process evaluation ``state_dict()`` / ``merge(other_or_state)`` /
:func:`sync_meter` (``torch.distributed.all_gather_object`` of the states, merged in rank order).

* :class:`SegmentationMeter` — ``mIoU`` and ``pixel_acc`` (%) from a dataset-wide confusion
  matrix. Official convention (``absent="exclude"``, TF ``mean_iou``): a class with
  ``TP + FP + FN = 0`` (neither in the labels nor predicted) is left out of the mean;
  ``absent="zero"`` counts it as IoU 0 (another re-implementation). Labels equal to
  ``ignore_index`` or outside ``0..C−1`` are not scored (official ``gt < num_classes`` filter).
* :class:`NormalMeter` — angle ``degrees(arccos(clip(cos(pred, gt), −1, 1)))`` pooled over
  every valid pixel of every image: ``mean``, ``median``, ``rmse`` (degrees) and ``within_11.25``,
  ``within_22.5``, ``within_30`` (% with angle ≤ t, inclusive as the official ``np.less_equal``).
  The median needs all angles: they are kept (float32, CPU), about 4 bytes per valid pixel
  (≈ 0.8 GB for NYUv2's 654 test images at 480×640). Angles are computed in float64 and stored
  in float32, so a pair exactly t degrees apart counts as within t. ``convention="mtan"``
  (config ``metrics_convention``; :mod:`recipes.metric_conventions`) follows lorenmt/mtan
  instead: valid also needs ``sum(target) != 0``, ``within`` is strict (``< t``), and every
  metric is taken per batch, then averaged over the batches.
* :class:`AgeMeter` — expected age ``Σ_k p(k)·k`` over the softmax of k = 0..99; ``mean_ae`` and
  ``median_ae`` (years).
* :class:`GenderMeter` — ``accuracy`` (%).

Pixel predictions at output stride are upsampled bilinearly to the label size before scoring
(``resize``, config ``eval_resize``; :mod:`recipes.resizing`): by default ``"tf_legacy"``, TF1's
``resize_bilinear`` without half-pixel centres (source = destination · in/out), as the official
evaluation (REFERENCE §7); ``"align_corners_false"`` (PyTorch's default, half-pixel) and
``"align_corners_true"`` are options. Float64 scores stay float64 (others become float32).
Medians are ``np.median``'s (mean of the two middle values for an even count).

Example:
    >>> import torch
    >>> meter = SegmentationMeter(num_classes=3)
    >>> meter.update(torch.tensor([[[0, 1], [1, 2]]]), torch.tensor([[[0, 1], [2, 255]]]))
    >>> {k: round(v, 2) for k, v in meter.compute().items()}
    {'mIoU': 50.0, 'pixel_acc': 66.67}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .losses import TASK_TARGETS
from .metric_conventions import (
    average_rows,
    batch_row,
    check_convention,
    median,
    normal_valid,
    within_percent,
)
from .metric_tables import COLUMN_LABELS, COLUMN_ORDER, format_table
from .resizing import check_resize_mode, resize_bilinear

__all__ = [
    "Meter",
    "SegmentationMeter",
    "NormalMeter",
    "AgeMeter",
    "GenderMeter",
    "METERS",
    "sync_meter",
    "format_table",
    "COLUMN_LABELS",
    "COLUMN_ORDER",
    "NORMAL_THRESHOLDS",
]

#: The "within t°" thresholds of the normal metrics (inclusive).
NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


class Meter(Protocol):
    """What every meter offers."""

    task: str

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None: ...

    def update_batch(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def merge(self, other: Any) -> None: ...


class _MeterBase:
    task = ""

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update_batch(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """``update(prediction, batch[key], ...)`` for this task's keys in ``TASK_TARGETS``."""
        keys = TASK_TARGETS[self.task]
        missing = [key for key in keys if key not in batch]
        if missing:
            raise ConfigError(
                f"{type(self).__name__}: the batch lacks {missing}; task {self.task!r} needs "
                f"{list(keys)}."
            )
        self.update(prediction, *(batch[key] for key in keys))

    def _other_state(self, other: Any) -> Mapping[str, torch.Tensor]:
        if isinstance(other, type(self)):
            return other.state_dict()
        if isinstance(other, Mapping):
            return other
        raise ConfigError(
            f"{type(self).__name__}.merge: expected another {type(self).__name__} or its "
            f"state_dict(), got {type(other).__name__}."
        )


def _upsample_to(prediction: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(prediction.shape[-2:]) == tuple(size):
        return prediction
    if prediction.dtype != torch.float64:
        prediction = prediction.float()
    return resize_bilinear(prediction, size, mode)


class SegmentationMeter(_MeterBase):
    """Dataset-wide confusion matrix → ``{"mIoU", "pixel_acc"}`` in percent.

    Args:
        num_classes: C (40 for NYUv2).
        ignore_index: label that is never scored.
        absent: ``"exclude"`` (official: classes with TP + FP + FN = 0 leave the mean) or
            ``"zero"`` (they count as IoU 0).
        resize: how scores are upsampled to the labels' H×W (:data:`recipes.resizing.RESIZE_MODES`;
            default ``"tf_legacy"``, the official evaluation's).

    ``update(output, target)``: ``output`` N×C×h×w scores (upsampled bilinearly to H×W, then
    argmax) or N×H×W integer predictions; ``target`` N×H×W labels.

    Example:
        >>> import torch
        >>> meter = SegmentationMeter(num_classes=3, absent="zero")
        >>> meter.update(torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]]))
        >>> meter.compute()["mIoU"]  # class 0: 100; classes 1, 2 never seen: 0
        33.33333333333333
    """

    task = "seg"

    def __init__(
        self,
        num_classes: int = 40,
        ignore_index: int = 255,
        absent: str = "exclude",
        resize: str = "tf_legacy",
    ) -> None:
        if absent not in ("exclude", "zero"):
            raise ConfigError(f"SegmentationMeter: absent={absent!r}; use 'exclude' or 'zero'.")
        self.num_classes, self.ignore_index, self.absent = num_classes, ignore_index, absent
        self.resize = check_resize_mode(resize, "SegmentationMeter: resize")
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None:
        (target,) = targets
        if prediction.is_floating_point():
            if prediction.dim() != 4 or prediction.shape[1] != self.num_classes:
                raise ConfigError(
                    f"SegmentationMeter: scores must be N×{self.num_classes}×h×w, got "
                    f"{tuple(prediction.shape)}."
                )
            prediction = _upsample_to(prediction, target.shape[-2:], self.resize).argmax(dim=1)
        if prediction.shape != target.shape:
            raise ConfigError(
                f"SegmentationMeter: predicted labels {tuple(prediction.shape)} and target "
                f"{tuple(target.shape)} differ in shape."
            )
        prediction, target = prediction.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        prediction, target = prediction[valid], target[valid]
        if prediction.numel() and (prediction.min() < 0 or prediction.max() >= self.num_classes):
            raise ConfigError(
                f"SegmentationMeter: predicted labels must lie in 0..{self.num_classes - 1}."
            )
        counts = torch.bincount(
            target * self.num_classes + prediction, minlength=self.num_classes**2
        )
        self.confusion += counts.reshape(self.num_classes, self.num_classes)

    def per_class_iou(self) -> torch.Tensor:
        """IoU of every class (0..1, float64); NaN where TP + FP + FN = 0."""
        confusion = self.confusion.to(torch.float64)
        true_positive = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        return torch.where(union > 0, true_positive / union.clamp(min=1), math.nan)

    def compute(self) -> dict[str, float]:
        iou = self.per_class_iou()
        if self.absent == "zero":
            iou = torch.nan_to_num(iou, nan=0.0)
        seen = iou[~iou.isnan()]
        total = int(self.confusion.sum())
        return {
            "mIoU": 100 * float(seen.mean()) if seen.numel() else math.nan,
            "pixel_acc": 100 * int(self.confusion.diagonal().sum()) / total if total else math.nan,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion.clone()}

    def merge(self, other: Any) -> None:
        """Add another meter's (or state dict's) confusion matrix."""
        self.confusion += self._other_state(other)["confusion"].to(torch.int64).cpu()


class NormalMeter(_MeterBase):
    """Angles between predicted and true normals over valid pixels → ``{"mean", "median",
    "rmse", "within_11.25", "within_22.5", "within_30"}``.

    ``update(pred, target, mask)``: ``pred`` N×3×h×w (upsampled bilinearly to H×W as ``resize``
    says, default ``"tf_legacy"``), ``target`` N×3×H×W (raw 0..255 or unit vectors; both are
    L2-normalised), ``mask`` N×H×W bool (True = valid). A zero vector normalises to zero: its
    angle is 90°. ``convention``: ``"official"`` (pooled angles, ``≤ t``) or ``"mtan"`` (per
    ``update`` call, i.e. per batch, then averaged; ``< t``; valid also needs ``sum != 0``;
    :mod:`recipes.metric_conventions`).

    Example:
        >>> import torch
        >>> meter = NormalMeter()
        >>> meter.update_angles(torch.tensor([0.0, 11.25, 20.0, 40.0]))
        >>> meter.compute()
        {'mean': 17.8125, 'median': 15.625, 'rmse': 23.057333432120895, 'within_11.25': 50.0, 'within_22.5': 75.0, 'within_30': 75.0}
    """

    task = "normal"

    def __init__(
        self,
        thresholds: Iterable[float] = NORMAL_THRESHOLDS,
        resize: str = "tf_legacy",
        convention: str = "official",
    ) -> None:
        self.thresholds = tuple(thresholds)
        self.resize = check_resize_mode(resize, "NormalMeter: resize")
        self.convention = check_convention(convention)
        self.reset()

    def reset(self) -> None:
        self.angles: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []  # convention "mtan": one row per batch

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None:
        target, mask = targets
        if prediction.dim() != 4 or target.dim() != 4 or prediction.shape[1] != target.shape[1]:
            raise ConfigError(
                f"NormalMeter: prediction {tuple(prediction.shape)} and target "
                f"{tuple(target.shape)} must both be N×3×H×W."
            )
        if tuple(mask.shape) != (target.shape[0], *target.shape[2:]):
            raise ConfigError(
                f"NormalMeter: mask {tuple(mask.shape)} must be N×H×W of target "
                f"{tuple(target.shape)}."
            )
        prediction = _upsample_to(prediction, target.shape[-2:], self.resize)
        cosine = (
            F.normalize(prediction.to(torch.float64), dim=1)
            * F.normalize(target.to(torch.float64), dim=1)
        ).sum(dim=1)
        angles = torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0)))
        self.update_angles(angles[normal_valid(target, mask, self.convention)])

    def update_angles(self, angles: torch.Tensor) -> None:
        """Add precomputed angles in degrees (any shape; stored as float32 on the CPU), one
        batch of them for ``convention="mtan"`` (kept as that batch's metrics)."""
        if self.convention == "mtan":
            row = batch_row(angles.detach().cpu(), self.thresholds)
            if row is not None:
                self.rows.append(row)
            return
        self.angles.append(angles.detach().reshape(-1).to(torch.float32).cpu())

    def _all(self) -> torch.Tensor:
        return torch.cat(self.angles) if self.angles else torch.zeros(0, dtype=torch.float32)

    def _rows(self) -> torch.Tensor:
        width = 3 + len(self.thresholds)
        return torch.stack(self.rows) if self.rows else torch.zeros(0, width, dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        if self.convention == "mtan":
            return average_rows(self._rows(), self.thresholds)
        angles = self._all()
        result = {"mean": math.nan, "median": math.nan, "rmse": math.nan}
        result.update({f"within_{t:g}": math.nan for t in self.thresholds})
        if angles.numel() == 0:
            return result
        wide = angles.to(torch.float64)
        result["mean"] = float(wide.mean())
        result["median"] = median(angles)
        result["rmse"] = math.sqrt(float((wide**2).mean()))
        for t in self.thresholds:
            result[f"within_{t:g}"] = within_percent(angles, t, "official")
        return result

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.convention == "mtan":
            return {"batches": self._rows()}
        return {"angles": self._all()}

    def merge(self, other: Any) -> None:
        """Append another meter's (or state dict's) angles (``"mtan"``: batch rows)."""
        state = self._other_state(other)
        key = "batches" if self.convention == "mtan" else "angles"
        if key not in state:
            raise ConfigError(
                f"NormalMeter.merge: the other state has no {key!r}; merge meters of the same "
                f"convention ({self.convention!r})."
            )
        if key == "batches":
            self.rows.extend(state["batches"].to(torch.float64).cpu().unbind(0))
        else:
            self.angles.append(state["angles"].to(torch.float32).cpu())


class AgeMeter(_MeterBase):
    """Expected age from the softmax over 0..K−1 → ``{"mean_ae", "median_ae"}`` in years.

    ``update(logits, age)``: ``logits`` N×K (K = 100), ``age`` N integers.

    Example:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))  # E = 0.5, 2
        >>> meter = AgeMeter()
        >>> meter.update(logits, torch.tensor([2, 1]))
        >>> meter.compute()
        {'mean_ae': 1.25, 'median_ae': 1.25}
    """

    task = "age"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.errors: list[torch.Tensor] = []

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None:
        (age,) = targets
        if prediction.dim() != 2 or prediction.shape[0] != age.reshape(-1).shape[0]:
            raise ConfigError(
                f"AgeMeter: logits must be N×K with N = {age.numel()} ages, got "
                f"{tuple(prediction.shape)}."
            )
        probabilities = prediction.detach().to(torch.float64).softmax(dim=1)
        ages = torch.arange(prediction.shape[1], dtype=torch.float64, device=prediction.device)
        expected = probabilities @ ages
        errors = (expected - age.reshape(-1).to(torch.float64)).abs()
        self.errors.append(errors.cpu())

    def _all(self) -> torch.Tensor:
        return torch.cat(self.errors) if self.errors else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        errors = self._all()
        if errors.numel() == 0:
            return {"mean_ae": math.nan, "median_ae": math.nan}
        return {"mean_ae": float(errors.mean()), "median_ae": median(errors)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"errors": self._all()}

    def merge(self, other: Any) -> None:
        """Append another meter's (or state dict's) absolute errors."""
        self.errors.append(self._other_state(other)["errors"].to(torch.float64).cpu())


class GenderMeter(_MeterBase):
    """Classification accuracy → ``{"accuracy"}`` in percent.

    ``update(logits, gender)``: ``logits`` N×2 (or N predicted labels), ``gender`` N labels.

    Example:
        >>> import torch
        >>> meter = GenderMeter()
        >>> meter.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
        >>> round(meter.compute()["accuracy"], 4)
        66.6667
    """

    task = "gender"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros((), dtype=torch.int64)
        self.total = torch.zeros((), dtype=torch.int64)

    def update(self, prediction: torch.Tensor, *targets: torch.Tensor) -> None:
        (gender,) = targets
        labels = prediction.argmax(dim=1) if prediction.dim() == 2 else prediction
        gender = gender.reshape(-1)
        if labels.reshape(-1).shape != gender.shape:
            raise ConfigError(
                f"GenderMeter: {tuple(prediction.shape)} predictions for {gender.numel()} labels."
            )
        self.correct += int((labels.reshape(-1).long() == gender.long()).sum())
        self.total += gender.numel()

    def compute(self) -> dict[str, float]:
        total = int(self.total)
        return {"accuracy": 100 * int(self.correct) / total if total else math.nan}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct.clone(), "total": self.total.clone()}

    def merge(self, other: Any) -> None:
        """Add another meter's (or state dict's) counts."""
        state = self._other_state(other)
        self.correct += int(state["correct"])
        self.total += int(state["total"])


#: Meter factory of each task.
METERS: dict[str, Callable[[], Meter]] = {
    "seg": SegmentationMeter,
    "normal": NormalMeter,
    "age": AgeMeter,
    "gender": GenderMeter,
}


def sync_meter(meter: Meter) -> Meter:
    """Make ``meter`` hold every process's updates (no-op without ``torch.distributed``).

    All ranks call it; each gathers all states with ``all_gather_object`` and merges them in
    rank order, so every rank computes the same result. Normal angles travel as whole tensors
    (fine for NYUv2-sized test sets).

    Example:
        >>> meter = GenderMeter()
        >>> sync_meter(meter) is meter  # not distributed: unchanged
        True
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return meter
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, meter.state_dict())
    meter.reset()
    for state in states:
        meter.merge(state)
    return meter
