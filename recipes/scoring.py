"""Scoring a network on a split with the paper's metrics: :func:`evaluate_network`, used by
:mod:`recipes.train` (periodic and final evaluation) and :mod:`recipes.evaluate` (trained runs),
neither of which imports the other.

Your own tasks (``losses``, :mod:`recipes.custom`) are scored by :class:`TaskLossMeter`: the mean
loss on the split (``loss``) and the natural metrics of the built-in loss — ``ce``: ``pixel_acc``
and ``mIoU`` (dense labels, classes = the prediction's channels) or ``accuracy`` (image labels);
``l1`` / ``l2`` / ``mse``: ``mae`` and ``rmse``; ``cosine``: ``mean_angle``, ``median_angle``,
``within_11.25``, ``within_22.5``, ``within_30`` (degrees, %); ``bce``: ``accuracy`` (logit > 0
against target > 0.5, per element); your own loss: ``loss`` only. Metrics other than the loss
compare dense predictions upsampled bilinearly to the target's size (``resize``, config
``eval_resize``: default ``"tf_legacy"``, the official evaluation's TF1 ``resize_bilinear``; the
``loss`` itself with ``loss_at=input`` upsamples with ``"tf_legacy"``). The paper's tasks are
scored by :data:`recipes.metrics.METERS` with the config's ``eval_resize`` and
``metrics_convention``. A dataset callable without a
``split`` parameter has no test split: evaluating ``test`` returns ``{}`` (nothing is scored).

Example:
    >>> meter = TaskLossMeter("depth", "l1", "output")
    >>> meter.update_batch(torch.zeros(1, 1, 2, 2), {"depth": torch.tensor([[[[1.0, 3.0], [1.0, 3.0]]]])})
    >>> meter.compute()
    {'loss': 2.0, 'mae': 2.0, 'rmse': 2.23606797749979}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import RecipeConfig
from .distributed import DistContext
from .losses import _upsample

__all__ = ["evaluate_network", "TaskLossMeter"]

_SUMS = ("loss", "count", "abs", "square", "elements", "correct", "total")


class TaskLossMeter:
    """Evaluation of your own task ``task`` with loss ``spec`` (module docstring): streaming,
    with ``state_dict`` / ``merge`` for :func:`recipes.metrics.sync_meter` under DDP."""

    def __init__(
        self,
        task: str,
        spec: str,
        at: str = "output",
        absent: str = "exclude",
        resize: str = "tf_legacy",
    ) -> None:
        from .custom_losses import resolve_loss
        from .resizing import check_resize_mode

        self.task, self.spec, self.at, self.absent = task, spec, at, absent
        self.resize = check_resize_mode(resize, "TaskLossMeter: resize")
        self.loss = resolve_loss(spec, f"losses.{task}")
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(_SUMS, 0.0)
        self.segmentation: Any = None  # a SegmentationMeter once dense ce labels are seen
        self.angles: Any = None  # a NormalMeter holding the cosine loss's angles

    def update_batch(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: ``prediction`` N×…, the target ``batch[task]``."""
        from .metrics import NormalMeter, SegmentationMeter

        target = batch[self.task]
        count = self.loss.count(prediction, target, self.at)
        self.sums["loss"] += float(self.loss(prediction, target, self.at)) * count
        self.sums["count"] += count
        kind = self.loss.name
        if kind == "ce":
            index = self.loss.ignore_for(prediction)  # type: ignore[union-attr]
            if prediction.dim() == 4:
                if self.segmentation is None:
                    self.segmentation = SegmentationMeter(
                        prediction.shape[1],
                        ignore_index=index,
                        absent=self.absent,
                        resize=self.resize,
                    )
                self.segmentation.update(prediction, target)
            else:
                valid = target != index
                hits = (prediction.argmax(dim=1) == target) & valid
                self.sums["correct"] += float(hits.sum())
                self.sums["total"] += float(valid.sum())
        elif kind in ("l1", "l2", "bce", "cosine"):
            if prediction.dim() == 4 and target.dim() >= 3:
                prediction = _upsample(prediction, tuple(target.shape[-2:]), self.resize)
            prediction, target, valid = self.loss.prepare(prediction, target, "input")
            if kind == "cosine":
                cosine = (
                    F.normalize(prediction.double(), dim=1) * F.normalize(target.double(), dim=1)
                ).sum(dim=1)
                if self.angles is None:
                    self.angles = NormalMeter()
                self.angles.update_angles(torch.rad2deg(torch.arccos(cosine.clamp(-1, 1)))[valid])
            elif kind == "bce":
                hits = ((prediction > 0) == (target > 0.5)) & valid
                self.sums["correct"] += float(hits.sum())
                self.sums["total"] += float(valid.sum())
            else:
                error = (prediction - target).double()[valid]
                self.sums["abs"] += float(error.abs().sum())
                self.sums["square"] += float((error**2).sum())
                self.sums["elements"] += float(error.numel())

    def compute(self) -> dict[str, float]:
        """``loss`` and the loss's metrics (NaN where nothing was scored)."""
        sums = self.sums
        out = {"loss": sums["loss"] / sums["count"] if sums["count"] else math.nan}
        kind = self.loss.name
        if self.segmentation is not None:
            seg = self.segmentation.compute()
            out |= {"pixel_acc": seg["pixel_acc"], "mIoU": seg["mIoU"]}
        elif kind in ("ce", "bce"):
            out["accuracy"] = 100 * sums["correct"] / sums["total"] if sums["total"] else math.nan
        elif kind in ("l1", "l2"):
            n = sums["elements"]
            out["mae"] = sums["abs"] / n if n else math.nan
            out["rmse"] = math.sqrt(sums["square"] / n) if n else math.nan
        elif kind == "cosine":
            angles = self.angles.compute() if self.angles is not None else {}
            out["mean_angle"] = angles.get("mean", math.nan)
            out["median_angle"] = angles.get("median", math.nan)
            out |= {k: v for k, v in angles.items() if k.startswith("within_")}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"sums": torch.tensor([self.sums[k] for k in _SUMS], dtype=torch.float64)}
        if self.segmentation is not None:
            state["confusion"] = self.segmentation.state_dict()["confusion"]
        if self.angles is not None:
            state["angles"] = self.angles.state_dict()["angles"]
        return state

    def merge(self, other: Any) -> None:
        """Add another meter's (or state dict's) sums, confusion matrix and angles."""
        from .metrics import NormalMeter, SegmentationMeter

        state = other.state_dict() if isinstance(other, TaskLossMeter) else other
        for key, value in zip(_SUMS, state["sums"].tolist()):
            self.sums[key] += value
        if "confusion" in state:
            if self.segmentation is None:
                index = self.loss.ignore_index  # type: ignore[union-attr]
                self.segmentation = SegmentationMeter(
                    state["confusion"].shape[0],
                    ignore_index=255 if index is None else index,
                    absent=self.absent,
                    resize=self.resize,
                )
            self.segmentation.merge(state)
        if "angles" in state:
            if self.angles is None:
                self.angles = NormalMeter()
            self.angles.merge(state)


def _meters(config: RecipeConfig, tasks: Sequence[str]) -> dict[str, Any]:
    from .builders import num_outputs
    from .custom import is_custom_data
    from .metrics import METERS, NormalMeter, SegmentationMeter

    if is_custom_data(config):
        return {
            t: TaskLossMeter(
                t, config.losses[t], config.loss_at, config.miou_absent, config.eval_resize
            )
            for t in tasks
        }
    meters: dict[str, Any] = {}
    for task in tasks:
        if task == "seg":
            meters[task] = SegmentationMeter(
                num_classes=num_outputs(config, "seg"),
                absent=config.miou_absent,
                resize=config.eval_resize,
            )
        elif task == "normal":
            meters[task] = NormalMeter(
                resize=config.eval_resize, convention=config.metrics_convention
            )
        else:
            meters[task] = METERS[task]()
    return meters


@torch.no_grad()
def evaluate_network(
    network: nn.Module,
    config: RecipeConfig,
    context: DistContext | None = None,
    split: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``network`` (returning task → prediction) on ``split`` (default
    ``config.eval_split``): task → metric → value. Under DDP each process scores its shard and
    the meters are merged, so every process gets the same numbers. The network is left in eval
    mode."""
    from .custom import has_split, is_custom_data
    from .loading import eval_loader
    from .metrics import sync_meter

    context = context or DistContext()
    split = split or config.eval_split
    tasks = list(config.tasks)
    if is_custom_data(config) and split == "test" and not has_split(config):
        network.eval()
        return {}  # your dataset has no test split: nothing to score
    meters = _meters(config, tasks)
    loader = eval_loader(config, split, rank=context.rank, world_size=context.world_size)
    network.eval()
    device = context.device
    autocast = _autocast(config, device)
    for batch in loader:
        images = batch["image"].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = network(images)
        for task in tasks:
            targets = {k: v.to(device) for k, v in batch.items() if k != "image"}
            meters[task].update_batch(outputs[task].float(), targets)
    results = {}
    for task in tasks:
        if context.initialized:
            sync_meter(meters[task])
        results[task] = meters[task].compute()
    return results


def _autocast(config: RecipeConfig, device: torch.device) -> Any:
    if config.amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
