"""The cheaper NDDR variants: :class:`NDDRLowRankLayer` (learned per-channel mixing plus a
low-rank correction) and :class:`NDDRGroupedLayer` (a grouped 1×1 convolution whose every
group mixes all tasks). Both keep NDDR's diagonal-init semantics and its per-task norm and
activation (:class:`~nddrify.layers.nddr.PerTaskOutputs`).

Example:
    >>> import torch
    >>> from nddrify.layers import NDDRLowRankLayer
    >>> layer = NDDRLowRankLayer([8, 8], rank=4, init=(1.0, 0.0), norm=None, activation=None)
    >>> x = (torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3))
    >>> all(torch.equal(y, t) for y, t in zip(layer(*x), x))
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FusionConfigError
from .base import (
    Activation,
    FeatureLayout,
    Init,
    Norm,
    block_diagonal,
    check_init,
    to_nchw,
)
from .kernels import (
    channel_mix,
    fold_affine,
    memory_format_of,
    pointwise,
    prefers_gemms,
)
from .nddr import PerTaskOutputs

__all__ = ["NDDRLowRankLayer", "NDDRGroupedLayer"]


class NDDRLowRankLayer(PerTaskOutputs):
    """Cheaper NDDR: a learned diagonal mixing (own block α·I, other blocks β·I, one weight per
    channel) plus a low-rank correction ΣC → r → C_i whose up-projection starts at zero, so the
    diagonal init semantics hold exactly (α=1, β=0 is the identity). Parameters: K·ΣC diagonal
    weights + r·ΣC + r·ΣC_i, instead of ΣC·ΣC_i.

    Example:
        >>> import torch
        >>> from nddrify.layers import NDDRLowRankLayer
        >>> layer = NDDRLowRankLayer([2, 3], rank=4, init=(0.9, 0.1), norm=None)
        >>> layer.diagonal[1]  # task 1's scale of each task's channels (rows: tasks)
        Parameter containing:
        tensor([[0.1000, 0.1000, 0.0000],
                [0.9000, 0.9000, 0.9000]], requires_grad=True)
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        rank: int,
        *,
        init: Init = None,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        layouts: Sequence[FeatureLayout | str | bool] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        num_tasks = len(self.in_channels)
        if num_tasks < 2 or rank < 1:
            raise FusionConfigError(f"low-rank NDDR needs ≥ 2 tasks and rank ≥ 1, got {rank}.")
        alpha, beta = check_init(init, num_tasks, xavier=False, kind="low-rank NDDR")  # type: ignore[misc]
        matrix = block_diagonal(self.in_channels, self.in_channels, alpha, beta)
        self.diagonal = nn.ParameterList()
        for c_i, rows in zip(self.in_channels, matrix.split(self.in_channels)):
            # row j: the diagonal of block (i, j), zero-padded to C_i
            scales = [block.diagonal() for block in rows.split(self.in_channels, dim=1)]
            weight = torch.stack([F.pad(s, (0, c_i - s.numel())) for s in scales])
            self.diagonal.append(nn.Parameter(weight))
        self.down = nn.Conv2d(sum(self.in_channels), rank, 1, bias=False)
        self.ups = nn.ModuleList(nn.Conv2d(rank, c, 1, bias=False) for c in self.in_channels)
        for up in self.ups:
            nn.init.zeros_(up.weight)
        self._set_outputs(self.in_channels, norm, activation, nonnegative, layouts)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = to_nchw(inputs, self.layouts, self.on_grid)
        folded = self._folded_norms(features)
        down = self.down.weight[:, :, 0, 0].split(self.in_channels, 1)
        mixing = []
        for up, scales, affine in zip(self.ups, self.diagonal, folded):
            # an eval BatchNorm folds into the up-projection and the channel scales
            weight, shift = fold_affine(up.weight[:, :, 0, 0], up.bias, affine)
            mixing.append((weight, shift, list(scales if affine is None else scales * affine[0])))
        return self._finish(self._mix(features, down, mixing), folded, inputs=inputs)

    def _mix(
        self,
        features: Sequence[torch.Tensor],
        down: Sequence[torch.Tensor],
        mixing: Sequence[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]],
    ) -> list[torch.Tensor]:
        """Per task: the per-channel mixing (in place), then the low-rank GEMM accumulating
        into it (the shift, when a norm is folded, starts the sum)."""
        low = pointwise(features, down)
        return [
            pointwise([low], [weight], accumulate=channel_mix(features, scales, c_i, shift))
            for c_i, (weight, shift, scales) in zip(self.in_channels, mixing)
        ]

    def _weights_per_channel(self) -> int:
        return self.down.weight.shape[0] + len(self.in_channels)

    def _fold_task(self, task: int, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self._fold_into(self.ups[task], slice(None), scale, shift)
        self.diagonal[task] *= scale


class NDDRGroupedLayer(PerTaskOutputs):
    """Cheaper NDDR: a grouped 1×1 convolution over the concatenation, where group g holds the
    g-th slice of every task's channels, so every group still mixes all tasks. Diagonal init
    within each group; parameters ΣC·ΣC/groups instead of ΣC·ΣC.

    Example:
        >>> from nddrify.layers import NDDRGroupedLayer
        >>> layer = NDDRGroupedLayer([4, 4], groups=2, init=(0.9, 0.1), norm=None)
        >>> layer.conv.weight[:4, :, 0, 0].detach()  # group 0: two channels of each task
        tensor([[0.9000, 0.0000, 0.1000, 0.0000],
                [0.0000, 0.9000, 0.0000, 0.1000],
                [0.1000, 0.0000, 0.9000, 0.0000],
                [0.0000, 0.1000, 0.0000, 0.9000]])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        groups: int,
        *,
        init: Init = None,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        layouts: Sequence[FeatureLayout | str | bool] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        if groups < 1 or any(c % groups for c in self.in_channels):
            raise FusionConfigError(
                f"grouped NDDR needs every width {list(self.in_channels)} divisible by "
                f"groups={groups}."
            )
        total = sum(self.in_channels)
        self.conv = nn.Conv2d(total, total, 1, groups=groups, bias=False)
        self.groups = groups
        self._set_outputs(self.in_channels, norm, activation, nonnegative, layouts)
        self.reset_parameters(init)

    @property
    def group_order(self) -> torch.Tensor:
        """``group_order[k]``: the task-major channel (in the concatenation of the tasks' maps)
        at position k of the group-major order the grouped weight uses."""
        order: list[int] = []
        for g in range(self.groups):
            start = 0
            for c in self.in_channels:
                size = c // self.groups
                order.extend(range(start + g * size, start + (g + 1) * size))
                start += c
        return torch.tensor(order)

    def _orders(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_order, its inverse) on ``device``, computed once per device."""
        cache = self.__dict__.setdefault("_order_cache", {})
        if device not in cache:
            order = self.group_order.to(device)
            cache[device] = (order, torch.argsort(order))
        return cache[device]

    def _grouped_conv(
        self, features: Sequence[torch.Tensor], folded: Sequence[tuple[torch.Tensor, ...] | None]
    ) -> tuple[list[torch.Tensor], Sequence[object | None]]:
        """Small maps: the grouped convolution of the group-major concatenation (fewer calls
        than one GEMM per task, group and input), eval BatchNorms folded in when every task's
        can be; (the tasks' maps, what was folded)."""
        order, back = self._orders(features[0].device)
        weight, bias = self.conv.weight, self.conv.bias
        if all(a is not None for a in folded):
            scale = torch.cat([a[0] for a in folded]).index_select(0, order)  # type: ignore[index]
            shift = torch.cat([a[1] for a in folded]).index_select(0, order)  # type: ignore[index]
            weight, bias = fold_affine(weight, bias, (scale, shift))
        else:
            folded = [None] * len(folded)  # fold all or none: _finish applies the norms
        grouped = F.conv2d(
            torch.cat(list(features), 1).index_select(1, order), weight, bias, groups=self.groups
        )
        bounds = list(itertools.accumulate(self.in_channels, initial=0))
        layout = memory_format_of(features[0])  # index_select gives contiguous maps
        mixed = [
            grouped.index_select(1, back[a:b]).contiguous(memory_format=layout)
            for a, b in itertools.pairwise(bounds)
        ]
        return mixed, folded

    def reset_parameters(self, init: Init = None) -> None:
        """Re-initialise the grouped 1×1 weights (diagonal within each group, or Xavier)."""
        checked = check_init(init, len(self.in_channels), kind="grouped NDDR")
        if checked == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
            return
        per_group = [c // self.groups for c in self.in_channels]
        weight = self.conv.weight
        matrix = block_diagonal(
            per_group, per_group, *checked, dtype=weight.dtype, device=weight.device
        )
        with torch.no_grad():  # every group: the same diagonal init over its slices
            weight.copy_(matrix.repeat(self.groups, 1)[:, :, None, None])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = to_nchw(inputs, self.layouts, self.on_grid)
        folded = self._folded_norms(features)
        if not prefers_gemms(features):
            return self._finish(*self._grouped_conv(features, folded), inputs=inputs)
        widths = [c // self.groups for c in self.in_channels]  # each task's slice per group
        slices = [
            [x[:, g * w : (g + 1) * w] for x, w in zip(features, widths)]
            for g in range(self.groups)
        ]
        blocks = self.conv.weight[:, :, 0, 0].chunk(self.groups)  # group-major rows
        bias = self.conv.bias
        biases = bias.chunk(self.groups) if bias is not None else [None] * self.groups
        mixed = []
        for i, affine in enumerate(folded):
            # task i, group g: its rows of group g's block times every task's g-th slice, as
            # GEMMs on the slices in place (no concatenation, no reordering copies)
            start, width = sum(widths[:i]), widths[i]
            pieces = []
            for g, (block, group_bias, xs) in enumerate(zip(blocks, biases, slices)):
                own = slice(start, start + width)
                weight = block[own]
                part = (
                    None
                    if affine is None
                    else tuple(a[g * width : (g + 1) * width] for a in affine)
                )
                weight, shift = fold_affine(
                    weight, None if group_bias is None else group_bias[own], part
                )
                pieces.append(pointwise(xs, weight.split(widths, 1), shift))
            mixed.append(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
        return self._finish(mixed, folded, inputs=inputs)

    def _weights_per_channel(self) -> int:
        return sum(self.in_channels) // self.groups

    def _fold_task(self, task: int, scale: torch.Tensor, shift: torch.Tensor) -> None:
        widths = [c // self.groups for c in self.in_channels]
        start, width, size = sum(widths[:task]), widths[task], sum(widths)
        for g in range(self.groups):  # task i's rows of every group's block
            rows = slice(g * size + start, g * size + start + width)
            own = slice(g * width, (g + 1) * width)
            self._fold_into(self.conv, rows, scale[own], shift[own])
