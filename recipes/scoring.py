"""Scoring a network on a split with the paper's metrics: :func:`evaluate_network`, used by
:mod:`recipes.train` (periodic and final evaluation) and :mod:`recipes.evaluate` (trained runs),
neither of which imports the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .configs import RecipeConfig
from .distributed import DistContext

__all__ = ["evaluate_network"]


def _meters(config: RecipeConfig, tasks: Sequence[str]) -> dict[str, Any]:
    from .builders import num_outputs
    from .metrics import METERS, SegmentationMeter

    meters: dict[str, Any] = {}
    for task in tasks:
        if task == "seg":
            meters[task] = SegmentationMeter(
                num_classes=num_outputs(config, "seg"), absent=config.miou_absent
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
    from .loading import eval_loader
    from .metrics import sync_meter

    context = context or DistContext()
    split = split or config.eval_split
    tasks = list(config.tasks)
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
