"""Baseline fusion layers the paper compares NDDR with: cross-stitch and sluice.

Both are fusion kinds (:class:`~nddrify.protocol.FusionKind`) like :class:`nddrify.NDDR`, so
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
    >>> from nddrify.plans import FusionLevel, FusionPoint
    >>> level = FusionLevel(0, tuple(FusionPoint(t, "p", "p", (1, 4, 8, 8), True) for t in "ab"))
    >>> layer = nddrify.CrossStitch().build(level)
    >>> a, b = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    >>> [round(float(t.mean().detach()), 4) for t in layer(a, b)]
    [0.9, 0.1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import FusionConfigError
from .layers.base import (
    FeatureLayout,
    FusionLayer,
    Init,
    as_layouts,
    block_diagonal,
    check_init,
    check_positive_int,
    from_nchw,
    on_grid,
    to_nchw,
)

if TYPE_CHECKING:
    from .plans import FusionLevel

__all__ = [
    "CrossStitch",
    "CrossStitchLayer",
    "Sluice",
    "SluiceLayer",
    "LayerStitchLayer",
]


def _pair(init: Init, num_tasks: int, kind: str) -> tuple[float, float]:
    """The (alpha, beta) of ``init`` (the default for None); 'xavier' is refused."""
    return check_init(init, num_tasks, xavier=False, kind=kind)  # type: ignore[return-value]


def _equal_widths(level: FusionLevel, kind: str) -> int:
    channels = [int(c) for c in level.channels]
    if len(set(channels)) != 1:
        raise FusionConfigError(
            f"fusion {level.describe()}: {kind} mixes feature maps elementwise and needs the same "
            f"width in every task, got channels {channels}; use fusion='nddr' (1×1 convolutions "
            "handle different widths) or points where the widths match."
        )
    return channels[0]


class CrossStitchLayer(FusionLayer):
    """``out_i = Σ_j a_ij · x_j``; ``a`` is K×K (scalar) or K×K×C (per channel).

    Example:
        >>> from nddrify.baselines import CrossStitchLayer
        >>> CrossStitchLayer(3, channels=4).weight
        Parameter containing:
        tensor([[0.9000, 0.0500, 0.0500],
                [0.0500, 0.9000, 0.0500],
                [0.0500, 0.0500, 0.9000]], requires_grad=True)
    """

    lr_mult = 1000.0  # paper Table A2: 1000× was best for cross-stitch on VGG-16

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        *,
        per_channel: bool = False,
        init: Init = None,
        layouts: Sequence[FeatureLayout | str | bool] | None = None,
    ) -> None:
        super().__init__()
        alpha, beta = _pair(init, num_tasks, "cross-stitch")
        weight = block_diagonal([1] * num_tasks, [1] * num_tasks, alpha, beta)
        if per_channel:
            weight = weight[:, :, None].repeat(1, 1, channels)
        self.weight = nn.Parameter(weight)
        self.layouts = as_layouts(layouts, num_tasks)
        self.on_grid = on_grid(self.layouts)

    @property
    def channels_last(self) -> tuple[bool, ...]:
        """Per task, whether its maps are N×H×W×C."""
        return tuple(layout.name == "NHWC" for layout in self.layouts)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = to_nchw(features, self.layouts, self.on_grid)
        weight = self.weight if self.weight.dim() == 3 else self.weight[:, :, None]
        mixed = [  # one fresh tensor per task (not views of a stacked result)
            sum(weight[i, j].view(1, -1, 1, 1) * x_j for j, x_j in enumerate(maps))
            for i in range(len(maps))
        ]
        return from_nchw(mixed, self.layouts, features, self.on_grid)


@dataclass(frozen=True)
class CrossStitch:
    """The cross-stitch fusion kind (``nddrify.fuse(fusion="cross_stitch")`` uses the defaults).

    Args:
        per_channel: one weight per channel per task pair instead of one scalar per pair.
        init: ``(alpha, beta)``; default (0.9, 0.1) for two tasks, rows summing to one for more.

    Raises:
        FusionConfigError: when made with an invalid ``init`` (``(0.9,)``, ``"xavier"``).

    Example:
        >>> from nddrify import CrossStitch
        >>> from nddrify.plans import FusionLevel, FusionPoint
        >>> level = FusionLevel(0, tuple(FusionPoint(t, "p", "p", (1, 32, 8, 8), True) for t in "ab"))
        >>> CrossStitch().num_parameters(level), CrossStitch(per_channel=True).num_parameters(level)
        ((4, 0), (128, 0))
    """

    per_channel: bool = False
    init: Init = None

    def __post_init__(self) -> None:
        check_init(self.init, xavier=False, kind="cross-stitch")

    @property
    def name(self) -> str:
        """``"CrossStitch"``."""
        return "CrossStitch"

    def build(self, level: FusionLevel) -> CrossStitchLayer:
        """The cross-stitch unit of ``level`` (its tasks' maps must share their width)."""
        channels = _equal_widths(level, "cross-stitch")
        return CrossStitchLayer(
            len(level.points),
            channels,
            per_channel=self.per_channel,
            init=self.init,
            layouts=level.layouts,
        )

    def num_parameters(self, level: FusionLevel) -> tuple[int, int]:
        """(K² weights, or K²·C per channel; 0 norm parameters)."""
        channels = _equal_widths(level, "cross-stitch")
        k = len(level.points)
        return (k * k * (channels if self.per_channel else 1), 0)


class SluiceLayer(FusionLayer):
    """Mix K·S channel subspaces with a learned (K·S)×(K·S) matrix.

    Example:
        >>> from nddrify.baselines import SluiceLayer
        >>> SluiceLayer(2, channels=4, subspaces=2).weight
        Parameter containing:
        tensor([[0.9000, 0.0000, 0.1000, 0.0000],
                [0.0000, 0.9000, 0.0000, 0.1000],
                [0.1000, 0.0000, 0.9000, 0.0000],
                [0.0000, 0.1000, 0.0000, 0.9000]], requires_grad=True)
    """

    lr_mult = 1000.0

    def __init__(
        self,
        num_tasks: int,
        channels: int,
        subspaces: int = 2,
        *,
        init: Init = None,
        layouts: Sequence[FeatureLayout | str | bool] | None = None,
    ) -> None:
        super().__init__()
        if subspaces < 1 or channels % subspaces:
            raise FusionConfigError(
                f"sluice splits each task's {channels} channels into {subspaces} equal subspaces; "
                "choose subspaces that divide the width."
            )
        alpha, beta = _pair(init, num_tasks, "sluice")
        # rows and columns (task, subspace): same subspace α (own task) or β, others 0
        weight = block_diagonal([subspaces] * num_tasks, [subspaces] * num_tasks, alpha, beta)
        self.weight = nn.Parameter(weight)
        self.subspaces = subspaces
        self.layouts = as_layouts(layouts, num_tasks)
        self.on_grid = on_grid(self.layouts)

    @property
    def channels_last(self) -> tuple[bool, ...]:
        """Per task, whether its maps are N×H×W×C."""
        return tuple(layout.name == "NHWC" for layout in self.layouts)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = to_nchw(features, self.layouts, self.on_grid)
        n, c, h, w = maps[0].shape
        k, s = len(maps), self.subspaces
        stacked = torch.stack(maps).reshape(k, n, s, c // s, h, w).transpose(1, 2)
        stacked = stacked.reshape(k * s, n, c // s, h, w)
        mixed = torch.einsum("ab,bnchw->anchw", self.weight, stacked)
        outputs = [  # cat gives each task its own tensor (not a view of the mixed stack)
            torch.cat(list(mixed[i * s : (i + 1) * s]), dim=1) for i in range(k)
        ]
        return from_nchw(outputs, self.layouts, features, self.on_grid)


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
    """The sluice fusion kind (``nddrify.fuse(fusion="sluice", subspaces=2)``).

    It spans the levels too (:class:`~nddrify.protocol.SpansLevels`): ``build_across(levels)``
    is the layer-stitch, or None where the network's shapes allow none.

    Args:
        subspaces: S, the number of subspaces per task (paper: 2).
        init: ``(alpha, beta)`` for same-subspace mixing; other subspaces start at 0.
        layer_stitch: add the layer-stitch over the levels whose maps share the last level's
            shape (needs at least two such levels; otherwise none is built).

    Raises:
        FusionConfigError: when made with an invalid ``init`` or ``subspaces``.

    Example:
        >>> from nddrify import Sluice
        >>> from nddrify.plans import FusionLevel, FusionPoint
        >>> levels = [FusionLevel(i, tuple(FusionPoint(t, "p", "p", s, True) for t in "ab"))
        ...           for i, s in enumerate([(1, 64, 56, 56), (1, 256, 28, 28), (1, 256, 28, 28)])]
        >>> Sluice().num_parameters(levels[0]), Sluice().stitched_levels(levels)
        ((16, 0), [1, 2])
        >>> Sluice().across_parameters(levels), Sluice().build_across(levels).levels
        ((4, 0), (1, 2))
    """

    subspaces: int = 2
    init: Init = None
    layer_stitch: bool = True

    def __post_init__(self) -> None:
        check_positive_int(self.subspaces, "subspaces", "that divides every fused width (paper: 2)")
        check_init(self.init, xavier=False, kind="sluice")

    @property
    def name(self) -> str:
        """``"Sluice"``."""
        return "Sluice"

    def _channels(self, level: FusionLevel) -> int:
        channels = _equal_widths(level, "sluice")
        if channels % self.subspaces:
            raise FusionConfigError(
                f"fusion {level.describe()}: sluice splits each task's {channels} channels into "
                f"subspaces={self.subspaces} equal subspaces; choose subspaces= that divides the "
                "width."
            )
        return channels

    def build(self, level: FusionLevel) -> SluiceLayer:
        """The sluice unit of ``level`` (its tasks' maps must share their width)."""
        channels = self._channels(level)
        return SluiceLayer(
            len(level.points),
            channels,
            self.subspaces,
            init=self.init,
            layouts=level.layouts,
        )

    def num_parameters(self, level: FusionLevel) -> tuple[int, int]:
        """((K·S)² weights, 0 norm parameters)."""
        self._channels(level)
        size = len(level.points) * self.subspaces
        return (size * size, 0)

    def stitched_levels(self, levels: Sequence[FusionLevel]) -> list[int]:
        """Indices of the levels the layer-stitch mixes (empty when it is not built)."""
        if not self.layer_stitch or not levels:
            return []
        last = [tuple(s[1:]) for s in levels[-1].shapes]
        stitched = [
            i for i, level in enumerate(levels) if [tuple(s[1:]) for s in level.shapes] == last
        ]
        return stitched if len(stitched) >= 2 else []

    def build_across(self, levels: Sequence[FusionLevel]) -> LayerStitchLayer | None:
        """The layer-stitch over :meth:`stitched_levels`, or None where there is none."""
        stitched = self.stitched_levels(levels)
        return LayerStitchLayer(len(levels[-1].points), stitched) if stitched else None

    def across_parameters(self, levels: Sequence[FusionLevel]) -> tuple[int, int]:
        """(K betas per stitched level, 0 norm parameters)."""
        stitched = self.stitched_levels(levels)
        return ((len(levels[-1].points) * len(stitched)) if stitched else 0, 0)
