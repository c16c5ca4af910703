"""Baseline fusion layers the paper compares NDDR with: cross-stitch and sluice.

Both are fusion factories with the same interface as :class:`nddrify.NDDR`, so
``nddrify.fuse(models, fusion="cross_stitch")`` builds the cross-stitch network from the very same
points, heads and training code as the NDDR one.

* **Cross-stitch** (Misra et al., 2016): ``out_i = Σ_j a_ij · x_j`` with one scalar per task pair
  (default) or one weight per channel per task pair (``per_channel=True``). It needs the same
  width in every task at a level. NDDR generalises it: an NDDR layer whose 1×1 blocks are
  ``a_ij · I`` computes exactly this (tested).
* **Sluice** (Ruder et al., 2019), paper setting S = 2 subspaces: every task's channels are split
  into S equal subspaces and a learned (K·S)×(K·S) matrix mixes all K·S subspaces at every level.
  Init: own task, same subspace α; other tasks, same subspace β; other subspaces 0. Its
  layer-stitch (learned betas mixing the levels) is built where the network's shape allows: it
  mixes the levels whose maps have the last level's shape (see :class:`LayerStitchLayer`).
  Not reproduced: sluice's subspace-orthogonality loss term (it belongs to the training loss).

Example:
    >>> import torch, nddrify
    >>> layer = nddrify.CrossStitch()([(1, 4, 8, 8), (1, 4, 8, 8)])
    >>> a, b = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    >>> [round(float(t.mean().detach()), 4) for t in layer(a, b)]
    [0.9, 0.1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import FusionConfigError
from .layers import FusionLayer, Init, _from_nchw, _to_nchw, default_init

__all__ = [
    "CrossStitch",
    "CrossStitchLayer",
    "Sluice",
    "SluiceLayer",
    "LayerStitchLayer",
]


def _diagonal_pair(init: Init, num_tasks: int) -> tuple[float, float]:
    if init is None:
        return default_init(num_tasks)
    if init == "xavier":
        raise FusionConfigError("cross-stitch and sluice use (alpha, beta) init, not 'xavier'.")
    alpha, beta = (float(v) for v in init)
    if not all(torch.isfinite(torch.tensor([alpha, beta]))):
        raise FusionConfigError(f"init={init!r} contains NaN or inf; use finite (alpha, beta).")
    return alpha, beta


def _equal_widths(shapes: Sequence[Sequence[int]], kind: str) -> int:
    channels = [int(s[1]) for s in shapes]
    if len(set(channels)) != 1:
        raise FusionConfigError(
            f"{kind} mixes feature maps elementwise and needs the same width in every task, got "
            f"channels {channels}; use fusion='nddr' (1×1 convolutions handle different widths) "
            "or points where the widths match."
        )
    return channels[0]


class CrossStitchLayer(FusionLayer):
    """``out_i = Σ_j a_ij · x_j``; ``a`` is K×K (scalar) or K×K×C (per channel)."""

    lr_mult = 1000.0  # paper Table A2: 1000× was best for cross-stitch on VGG-16

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        *,
        per_channel: bool = False,
        init: Init = None,
        channels_last: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        alpha, beta = _diagonal_pair(init, num_tasks)
        weight = torch.full((num_tasks, num_tasks), beta)
        weight.fill_diagonal_(alpha)
        if per_channel:
            weight = weight[:, :, None].repeat(1, 1, channels)
        self.weight = nn.Parameter(weight)
        self.channels_last = tuple(channels_last or (False,) * num_tasks)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = _to_nchw(features, self.channels_last)
        weight = self.weight if self.weight.dim() == 3 else self.weight[:, :, None]
        mixed = [  # one fresh tensor per task (not views of a stacked result)
            sum(weight[i, j].view(1, -1, 1, 1) * x_j for j, x_j in enumerate(maps))
            for i in range(len(maps))
        ]
        return _from_nchw(mixed, self.channels_last)


@dataclass(frozen=True)
class CrossStitch:
    """Factory for cross-stitch units (``nddrify.fuse(fusion="cross_stitch")`` uses the defaults).

    Args:
        per_channel: one weight per channel per task pair instead of one scalar per pair.
        init: ``(alpha, beta)``; default (0.9, 0.1) for two tasks, rows summing to one for more.
    """

    per_channel: bool = False
    init: Init = None

    def __call__(
        self,
        shapes: Sequence[Sequence[int]],
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[bool] | None = None,
    ) -> CrossStitchLayer:
        channels = _equal_widths(shapes, "cross-stitch")
        return CrossStitchLayer(
            len(shapes),
            channels,
            per_channel=self.per_channel,
            init=self.init,
            channels_last=channels_last,
        )

    def num_parameters(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
        channels = _equal_widths(shapes, "cross-stitch")
        k = len(shapes)
        return (k * k * (channels if self.per_channel else 1), 0)


class SluiceLayer(FusionLayer):
    """Mix K·S channel subspaces with a learned (K·S)×(K·S) matrix."""

    lr_mult = 1000.0

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        subspaces: int = 2,
        *,
        init: Init = None,
        channels_last: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        if subspaces < 1 or channels % subspaces:
            raise FusionConfigError(
                f"sluice splits each task's {channels} channels into {subspaces} equal subspaces; "
                "choose subspaces that divide the width."
            )
        alpha, beta = _diagonal_pair(init, num_tasks)
        size = num_tasks * subspaces
        weight = torch.zeros(size, size)
        for i in range(num_tasks):
            for j in range(num_tasks):
                for s in range(subspaces):
                    weight[i * subspaces + s, j * subspaces + s] = alpha if i == j else beta
        self.weight = nn.Parameter(weight)
        self.subspaces = subspaces
        self.channels_last = tuple(channels_last or (False,) * num_tasks)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = _to_nchw(features, self.channels_last)
        n, c, h, w = maps[0].shape
        k, s = len(maps), self.subspaces
        stacked = torch.stack(maps).reshape(k, n, s, c // s, h, w).transpose(1, 2)
        stacked = stacked.reshape(k * s, n, c // s, h, w)
        mixed = torch.einsum("ab,bnchw->anchw", self.weight, stacked)
        outputs = [  # cat gives each task its own tensor (not a view of the mixed stack)
            torch.cat(list(mixed[i * s : (i + 1) * s]), dim=1) for i in range(k)
        ]
        return _from_nchw(outputs, self.channels_last)


class LayerStitchLayer(FusionLayer):
    """Sluice's layer-stitch: per task, a learned convex-at-init mix (betas) of the levels whose
    fused maps have the last level's shape; it replaces the last level's map downstream."""

    lr_mult = 1000.0

    def __init__(self, num_tasks: int, levels: Sequence[int]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        betas = torch.zeros(num_tasks, len(self.levels))
        betas[:, -1] = 1.0  # identity at init: the last level alone
        self.betas = nn.Parameter(betas)

    def forward(self, levels: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        num_tasks = self.betas.shape[0]
        return tuple(
            sum(self.betas[t, i] * levels[level][t] for i, level in enumerate(self.levels))
            for t in range(num_tasks)
        )


@dataclass(frozen=True)
class Sluice:
    """Factory for sluice units (``nddrify.fuse(fusion="sluice", subspaces=2)``).

    Args:
        subspaces: S, the number of subspaces per task (paper: 2).
        init: ``(alpha, beta)`` for same-subspace mixing; other subspaces start at 0.
        layer_stitch: add the layer-stitch over the levels whose maps share the last level's
            shape (needs at least two such levels; otherwise none is built).
    """

    subspaces: int = 2
    init: Init = None
    layer_stitch: bool = True

    def __call__(
        self,
        shapes: Sequence[Sequence[int]],
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[bool] | None = None,
    ) -> SluiceLayer:
        channels = _equal_widths(shapes, "sluice")
        return SluiceLayer(
            len(shapes), channels, self.subspaces, init=self.init, channels_last=channels_last
        )

    def num_parameters(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
        _equal_widths(shapes, "sluice")
        size = len(shapes) * self.subspaces
        return (size * size, 0)

    def stitched_levels(self, level_shapes: Sequence[Sequence[Sequence[int]]]) -> list[int]:
        """Indices of the levels the layer-stitch mixes (empty when it is not built)."""
        if not self.layer_stitch:
            return []
        last = [tuple(s[1:]) for s in level_shapes[-1]]
        levels = [i for i, lv in enumerate(level_shapes) if [tuple(s[1:]) for s in lv] == last]
        return levels if len(levels) >= 2 else []

    def level_mixer(
        self, level_shapes: Sequence[Sequence[Sequence[int]]]
    ) -> LayerStitchLayer | None:
        levels = self.stitched_levels(level_shapes)
        return LayerStitchLayer(len(level_shapes[-1]), levels) if levels else None
