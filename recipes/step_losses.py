"""The per-task losses of a training step: how many values each task's mean averages over
(:func:`valid_counts`, for the global means of data-parallel runs), the autocast context of a
config (:func:`autocast_for`), and the losses recomputed on a batch after the optimiser's step
(:func:`recomputed_losses`, what FAMO learns from).

Example:
    >>> import torch
    >>> from recipes.step_losses import valid_counts
    >>> valid_counts({"age": torch.zeros(3, 100)}, {"age": torch.tensor([1, 2, 3])}, "output")
    {'age': 3.0}
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .builders import DENSE_TASKS
from .configs import RecipeConfig
from .distributed import DistContext, all_reduce_sum
from .errors import ConfigError
from .losses import multitask_loss

__all__ = ["valid_counts", "global_means", "autocast_for", "recomputed_losses"]


def valid_counts(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    at: str,
    losses: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """How many pixels (dense tasks) or images each task's mean loss averages over, counted as
    :mod:`recipes.losses` does: labels nearest-resized to the prediction when ``at="output"``.
    With ``losses`` (your own tasks' losses): :func:`recipes.custom_losses.loss_counts`.

    Example:
        >>> import torch
        >>> outputs = {"seg": torch.zeros(1, 3, 1, 2), "age": torch.zeros(2, 100)}
        >>> batch = {"seg": torch.tensor([[[0, 255], [255, 1]]]), "age": torch.tensor([1, 2])}
        >>> valid_counts(outputs, batch, "output")  # seg at 1×2: rows 0 → [0, 255]
        {'seg': 1.0, 'age': 2.0}
    """
    from .losses import resize_labels

    if losses:
        from .custom_losses import loss_counts

        return loss_counts(outputs, batch, at, losses)
    counts = {}
    for task, prediction in outputs.items():
        if task in DENSE_TASKS:
            key = "seg" if task == "seg" else "normal_mask"
            labels = batch[key]
            if at == "output":
                labels = resize_labels(labels, tuple(prediction.shape[-2:]))
            valid = labels != 255 if task == "seg" else labels.bool()
            counts[task] = float(valid.sum())
        else:
            counts[task] = float(prediction.shape[0])
    return counts


def global_means(
    per_task: Mapping[str, torch.Tensor | float],
    counts: Mapping[str, float],
    context: DistContext,
) -> dict[str, float]:
    """Each task's mean loss over every process's batch, from this process's mean and count
    (one all-reduce; 0.0 for a task with no valid value anywhere).

    Example:
        >>> from recipes.distributed import DistContext
        >>> import torch
        >>> global_means({"seg": torch.tensor(2.0)}, {"seg": 4.0}, DistContext())
        {'seg': 2.0}
    """
    sums = all_reduce_sum(
        {
            **{f"{t}.sum": float(value) * counts[t] for t, value in per_task.items()},
            **{f"{t}.count": counts[t] for t in per_task},
        },
        context,
    )
    return {
        t: sums[f"{t}.sum"] / sums[f"{t}.count"] if sums[f"{t}.count"] else 0.0 for t in per_task
    }


def autocast_for(config: RecipeConfig, device: torch.device) -> Any:
    """The autocast context of ``config.amp`` (``none``: none; ``fp16`` needs CUDA)."""
    if config.amp == "none":
        return nullcontext()
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp='fp16' needs a CUDA device (GradScaler); use amp='bf16' on CPU.")
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def recomputed_losses(
    net: nn.Module,
    images: torch.Tensor,
    batch: dict[str, torch.Tensor],
    config: RecipeConfig,
    context: DistContext,
) -> dict[str, torch.Tensor]:
    """The per-task losses of this batch after the step (FAMO learns from them): no
    gradients, BatchNorm statistics restored, global means under DDP."""
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    with torch.no_grad(), autocast_for(config, images.device):
        outputs = net(images)
    with torch.no_grad():
        for name, b in net.named_buffers():
            b.copy_(buffers[name])
        outputs = {t: outputs[t].float() for t in outputs}
        _, per_task = multitask_loss(
            outputs, batch, config.loss_weights, at=config.loss_at, losses=config.losses,
            resize=config.eval_resize,
        )  # fmt: skip
    if context.world_size == 1:
        return per_task
    counts = valid_counts(outputs, batch, config.loss_at, config.losses)
    means = global_means(per_task, counts, context)
    return {t: torch.tensor(value) for t, value in means.items()}
