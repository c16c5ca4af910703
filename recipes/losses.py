"""The paper's training losses (official NDDR conventions).

* Segmentation: softmax cross-entropy averaged over the non-ignored pixels (label 255).
* Surface normals: the cosine distance ``1 − cos(pred, gt)`` averaged over the valid pixels, both
  vectors L2-normalised first. That is the official code (``tf.losses.cosine_distance`` on
  ``l2_normalize``-d vectors with the valid-pixel mask as weights, reduced by the number of
  non-zero weights); the paper's "ℓ2 loss on unit vectors" is the same up to a factor 2
  (``‖p̂ − t̂‖² = 2 − 2 cos``). The target may be raw NYU 0..255 values (what the official code
  feeds) or unit vectors: it is normalised here either way.
* Age (100-way over 0..99) and gender (2-way): softmax cross-entropy.
* Total: ``seg + 20 · normal`` (:data:`LOSS_WEIGHTS`; ``age + gender`` for IMDB-WIKI).

Your own tasks (``losses=task=NAME``, :mod:`recipes.custom`) use the losses of
:mod:`recipes.custom_losses` (``ce``, ``l1``, ``l2`` / ``mse``, ``cosine``, ``bce``, or your own).

Where the loss is taken (``at``): ``"output"`` (official) compares at the network's output
stride, labels/targets/masks nearest-downsampled to the prediction's H×W (PyTorch ``"nearest"``:
source index ``floor(i · in/out)``, the same as TF1 ``resize_nearest_neighbor``); ``"input"`` (the
PyTorch ports) upsamples the prediction bilinearly to the label size with ``resize`` (config
``eval_resize``, :mod:`recipes.resizing`): default ``"tf_legacy"`` (TF1 ``resize_bilinear``, as
the official evaluation), or ``"align_corners_false"`` / ``"align_corners_true"`` (PyTorch's).

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 4, 2, 2)
    >>> round(segmentation_loss(logits, torch.tensor([[[0, 1], [2, 255]]])).item(), 4)  # ln 4
    1.3863
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .resizing import resize_bilinear

__all__ = [
    "segmentation_loss",
    "normal_loss",
    "age_loss",
    "gender_loss",
    "multitask_loss",
    "TASK_LOSSES",
    "LOSS_WEIGHTS",
    "TASK_TARGETS",
    "resize_labels",
]

#: Loss weight of each task in the total (official: segmentation 1, normals 20).
LOSS_WEIGHTS: dict[str, float] = {"seg": 1.0, "normal": 20.0, "age": 1.0, "gender": 1.0}

#: The batch keys each task's loss (and meter) reads, in argument order.
TASK_TARGETS: dict[str, tuple[str, ...]] = {
    "seg": ("seg",),
    "normal": ("normal", "normal_mask"),
    "age": ("age",),
    "gender": ("gender",),
}

_PLACES = ("output", "input")


def _check_at(at: str) -> None:
    if at not in _PLACES:
        raise ConfigError(f"loss at={at!r} is not known; use 'output' (official) or 'input'.")


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of N×H×W labels or N×C×H×W targets to ``size`` (dtype kept).

    Row ``i`` of the result is row ``floor(i · H / h)`` of the input (TF1 legacy nearest).

    Example:
        >>> resize_labels(torch.arange(5).reshape(1, 5, 1), (2, 1)).flatten().tolist()
        [0, 2]
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    squeeze = labels.dim() == 3
    values = labels[:, None] if squeeze else labels
    dtype = values.dtype
    resized = F.interpolate(values.to(torch.float32), size=size, mode="nearest")
    resized = resized.round().to(dtype) if not dtype.is_floating_point else resized.to(dtype)
    return resized[:, 0] if squeeze else resized


def _upsample(
    prediction: torch.Tensor, size: tuple[int, ...], mode: str = "tf_legacy"
) -> torch.Tensor:
    """``prediction`` (N×C×h×w) bilinearly resized to ``size`` with convention ``mode``."""
    return resize_bilinear(prediction, size, mode)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = 255,
    at: str = "output",
    resize: str = "tf_legacy",
) -> torch.Tensor:
    """Cross-entropy over the pixels whose label is not ``ignore_index`` (0 when there are none).

    Args:
        logits: N×C×h×w class scores (output stride 8 for DeepLab).
        target: N×H×W int64 labels.
        ignore_index: label excluded from the loss.
        at: ``"output"`` (labels nearest-downsampled to h×w, official) or ``"input"`` (logits
            bilinearly upsampled to H×W).
        resize: the bilinear convention of ``at="input"`` (:data:`recipes.resizing.RESIZE_MODES`).

    Example:
        >>> import torch
        >>> logits = torch.tensor([[[[2.0]], [[0.0]]]])  # N=1, C=2, 1×1
        >>> round(segmentation_loss(logits, torch.tensor([[[1]]])).item(), 4)  # ln(1 + e^2)
        2.1269
    """
    _check_at(at)
    if at == "output":
        target = resize_labels(target, tuple(logits.shape[-2:]))
    else:
        logits = _upsample(logits, tuple(target.shape[-2:]), resize)
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def normal_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    at: str = "output",
    resize: str = "tf_legacy",
) -> torch.Tensor:
    """Mean cosine distance ``1 − cos(pred, target)`` over the valid pixels (0 when none).

    Args:
        pred: N×3×h×w predicted normals (any scale: normalised here).
        target: N×3×H×W normals, raw 0..255 or unit vectors (normalised here).
        mask: N×H×W bool, True where the ground truth is valid.
        at: ``"output"`` (target and mask nearest-downsampled to h×w, official) or ``"input"``
            (prediction bilinearly upsampled to H×W).
        resize: the bilinear convention of ``at="input"`` (:data:`recipes.resizing.RESIZE_MODES`).

    Example:
        >>> import torch
        >>> pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 2)
        >>> target = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
        >>> normal_loss(pred, target, torch.ones(1, 1, 2, dtype=torch.bool)).item()  # (0 + 1) / 2
        0.5
    """
    _check_at(at)
    if at == "output":
        size = tuple(pred.shape[-2:])
        target, mask = resize_labels(target, size), resize_labels(mask, size)
    else:
        pred = _upsample(pred, tuple(target.shape[-2:]), resize)
    pred = pred.float()  # half-precision outputs (AMP) are normalised in float32
    cosine = (F.normalize(pred, dim=1) * F.normalize(target.float(), dim=1)).sum(dim=1)
    valid = mask.bool()
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return (1.0 - cosine[valid]).mean()


def age_loss(logits: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of N×100 age logits against integer ages 0..99.

    Example:
        >>> import torch
        >>> round(age_loss(torch.zeros(2, 100), torch.tensor([3, 50])).item(), 4)  # ln 100
        4.6052
    """
    return F.cross_entropy(logits, age.long())


def gender_loss(logits: torch.Tensor, gender: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of N×2 gender logits against 0 (female) / 1 (male).

    Example:
        >>> import torch
        >>> round(gender_loss(torch.zeros(1, 2), torch.tensor([1])).item(), 4)  # ln 2
        0.6931
    """
    return F.cross_entropy(logits, gender.long())


#: Loss function of each task; :data:`TASK_TARGETS` says which batch keys it takes.
TASK_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "seg": segmentation_loss,
    "normal": normal_loss,
    "age": age_loss,
    "gender": gender_loss,
}


def multitask_loss(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] = LOSS_WEIGHTS,
    at: str = "output",
    losses: Mapping[str, str] | None = None,
    resize: str = "tf_legacy",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the task losses of ``outputs`` (task → prediction).

    Args:
        outputs: predictions by task name (``"seg"``, ``"normal"``, ``"age"``, ``"gender"``).
        batch: the batch dict (``"seg"``; ``"normal"`` and ``"normal_mask"``; ``"age"``;
            ``"gender"``), see :data:`TASK_TARGETS`.
        weights: loss weight by task (missing tasks weigh 1).
        at: where the pixel losses are taken (``"output"`` or ``"input"``).
        losses: your own tasks' losses (task → built-in name or spec,
            :func:`recipes.custom_losses.resolve_loss`), each applied to ``batch[task]``; empty
            or None: the paper's losses by task name.
        resize: the bilinear convention of ``at="input"`` for the paper's seg and normal losses
            (config ``eval_resize``); your own tasks' built-in losses upsample with the default
            ``"tf_legacy"``.

    Returns:
        ``(total, per_task)``: the weighted sum and each task's unweighted loss.

    Example:
        >>> import torch
        >>> outputs = {"age": torch.zeros(1, 100), "gender": torch.zeros(1, 2)}
        >>> total, parts = multitask_loss(outputs, {"age": torch.tensor([7]), "gender": torch.tensor([0])})
        >>> round(total.item(), 4), sorted(parts)
        (5.2983, ['age', 'gender'])
    """
    _check_at(at)
    if not outputs:
        raise ConfigError("multitask_loss: outputs is empty; pass a dict task name → prediction.")
    per_task: dict[str, torch.Tensor] = {}
    for task, prediction in outputs.items():
        if losses:
            from .custom_losses import own_task_loss

            per_task[task] = own_task_loss(prediction, batch, task, at, losses)
            continue
        if task not in TASK_LOSSES:
            raise ConfigError(
                f"multitask_loss: task {task!r} has no loss; known tasks are {sorted(TASK_LOSSES)}."
            )
        missing = [key for key in TASK_TARGETS[task] if key not in batch]
        if missing:
            raise ConfigError(
                f"multitask_loss: task {task!r} needs batch keys {list(TASK_TARGETS[task])}, "
                f"missing {missing}; check the dataset's TASKS and the model's task names."
            )
        targets = [batch[key] for key in TASK_TARGETS[task]]
        extra = {"at": at, "resize": resize} if task in ("seg", "normal") else {}
        per_task[task] = TASK_LOSSES[task](prediction, *targets, **extra)
    total = torch.stack(
        [float(weights.get(task, 1.0)) * loss for task, loss in per_task.items()]
    ).sum()
    return total, per_task
