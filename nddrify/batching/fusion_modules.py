"""Task-batched fusion layers: an NDDR, cross-stitch or shortcut layer on task-stacked maps.

A fusion layer takes the K tasks' maps and gives back K maps; on task-stacked maps
(``N × K·C × …``) the concatenation it starts from is the stacked tensor itself, so each layer
below runs as one call. Each is registered
(:func:`~nddrify.batching.register_batched_form`, kind ``"fusion"`` or ``"shortcut"``) as the
batched form of the layer type it stands for.

Example:
    >>> import torch, nddrify
    >>> from nddrify.batching.fusion_modules import TaskBatchedNDDR
    >>> layer = nddrify.layers.NDDRLayer([8, 8]).eval()
    >>> wide = TaskBatchedNDDR(layer, "nddr1").eval()
    >>> a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    >>> out = wide(torch.cat([a, b], dim=1))  # one 16 → 16 convolution
    >>> bool(torch.allclose(out, torch.cat(layer(a, b), dim=1), atol=1e-6))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from ..baselines import CrossStitchLayer
from ..layers import FusionLayer, NDDRLayer, NDDRShortcutLayer, resize_bilinear
from .modules import TaskBatched, TaskBatchedBatchNorm2d, cat_task_channels
from .registry import register_batched_form

__all__ = ["TaskBatchedNDDR", "TaskBatchedCrossStitch", "TaskBatchedShortcut"]


class TaskBatchedNDDR(TaskBatched, FusionLayer):
    """An :class:`~nddrify.layers.NDDRLayer` on task-stacked maps: its K per-task 1×1 convolutions over
    the concatenated maps are one K·C → K·C convolution (the stacked tensor *is* the
    concatenation), then one norm over K·C channels and the activation."""

    def __init__(self, layer: NDDRLayer, source: str) -> None:
        super().__init__()
        k = len(layer.in_channels)
        self.num_tasks = k
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        weight = torch.cat([conv.weight.detach() for conv in layer.convs])
        self.conv = skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], 1, bias=False)
        self.conv.weight = nn.Parameter(weight, requires_grad=layer.convs[0].weight.requires_grad)
        self.norm = _stacked_norm(layer.norms, source)
        self.activation = copy.deepcopy(layer.activations[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        # the norm is a task-batched module of its own, with its own sources
        weights = self.conv.weight.chunk(self.num_tasks)
        return {f"convs.{i}.weight": weight for i, weight in enumerate(weights)}


class TaskBatchedCrossStitch(TaskBatched, FusionLayer):
    """A :class:`~nddrify.baselines.CrossStitchLayer` on task-stacked maps:
    ``out_i = Σ_j a_ij · x_j`` as one einsum."""

    def __init__(self, layer: CrossStitchLayer, source: str) -> None:
        super().__init__()
        self.num_tasks = layer.weight.shape[0]
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        self.weight = nn.Parameter(
            layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = x.unflatten(1, (self.num_tasks, -1))  # N × K × C × …
        if self.weight.dim() == 2:
            mixed = torch.einsum("ij,nj...->ni...", self.weight, tasks)
        else:
            mixed = torch.einsum("ijc,njc...->nic...", self.weight, tasks)
        return mixed.flatten(1, 2)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}


class TaskBatchedShortcut(TaskBatched, FusionLayer):
    """An :class:`~nddrify.layers.NDDRShortcutLayer` on task-stacked maps: every level resized at once,
    concatenated per task, and the K per-task 1×1 reductions as one grouped convolution."""

    def __init__(self, layer: NDDRShortcutLayer, source: str) -> None:
        super().__init__()
        k = len(layer.convs)
        self.num_tasks = k
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        self.resize_mode = layer.resize_mode
        weight = torch.cat([conv.weight.detach() for conv in layer.convs])
        self.conv = skip_init(
            nn.Conv2d, k * weight.shape[1], weight.shape[0], 1, groups=k, bias=False
        )
        self.conv.weight = nn.Parameter(weight, requires_grad=layer.convs[0].weight.requires_grad)
        self.norm = _stacked_norm(layer.norms, source)
        self.activation = copy.deepcopy(layer.activations[0])

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        size = levels[-1].shape[-2:]
        resized = [resize_bilinear(level, size, self.resize_mode) for level in levels]
        return self.activation(self.norm(self.conv(cat_task_channels(resized, self.num_tasks))))

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        weights = self.conv.weight.chunk(self.num_tasks)
        return {f"convs.{i}.weight": weight for i, weight in enumerate(weights)}


def _stacked_norm(norms: Sequence[nn.Module], source: str) -> nn.Module:
    if type(norms[0]) is nn.Identity:
        return nn.Identity()
    return TaskBatchedBatchNorm2d(norms, [f"{source}.norms.{i}" for i in range(len(norms))])


register_batched_form(NDDRLayer, TaskBatchedNDDR, kind="fusion")
register_batched_form(CrossStitchLayer, TaskBatchedCrossStitch, kind="fusion")
register_batched_form(NDDRShortcutLayer, TaskBatchedShortcut, kind="shortcut")
