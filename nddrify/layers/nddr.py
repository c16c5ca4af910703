"""The NDDR layers: NDDR (Gao et al., CVPR 2019), its two cheaper variants, and the
NDDR-Shortcut.

An :class:`NDDRLayer` takes the K tasks' feature maps at one fusion level, concatenates them
along channels in task order and, for every task i, maps the ΣC_j channels back to C_i with its
own 1×1 convolution (no bias), a norm and an activation. Its diagonal initialisation
(:func:`~nddrify.layers.block_diagonal`) gives task i's own block α·I and every other block β·I,
so with (α, β) = (1, 0), no norm and no activation the layer is exactly the identity.

Example:
    >>> import torch
    >>> from nddrify.layers import NDDRLayer
    >>> layer = NDDRLayer([8, 16], init=(1.0, 0.0), norm=None, activation=None)
    >>> a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4)
    >>> out_a, out_b = layer(a, b)
    >>> torch.equal(out_a, a) and torch.equal(out_b, b)
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from ..errors import FusionConfigError
from .base import (
    Activation,
    FeatureLayout,
    FusionLayer,
    Init,
    Norm,
    ResizeMode,
    as_layouts,
    block_diagonal,
    check_init,
    check_resize_mode,
    from_nchw,
    make_activation,
    make_norm,
    on_grid,
    resize_bilinear,
    to_nchw,
)

__all__ = ["NDDRLayer", "NDDRLowRankLayer", "NDDRGroupedLayer", "NDDRShortcutLayer"]


class _PerTaskOutputs(FusionLayer):
    """Shared tail of the NDDR-style layers: per task a norm and an activation, and the layout
    of each task's maps (channels-last maps are fused as N×C×H×W and returned as they came)."""

    def _set_outputs(
        self,
        channels: Sequence[int],
        norm: Norm,
        activation: Activation,
        nonnegative: Sequence[bool] | None,
        layouts: Sequence[FeatureLayout | str | bool] | None,
    ) -> None:
        count = len(channels)
        nonnegative = tuple(nonnegative) if nonnegative is not None else (False,) * count
        self.norms = nn.ModuleList(make_norm(norm, c) for c in channels)
        self.activations = nn.ModuleList(make_activation(activation, n) for n in nonnegative)
        self.layouts = as_layouts(layouts, count)
        self.on_grid = on_grid(self.layouts)

    @property
    def channels_last(self) -> tuple[bool, ...]:
        """Per task, whether its maps are N×H×W×C."""
        return tuple(layout.name == "NHWC" for layout in self.layouts)

    def _finish(
        self, mixed: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        outputs = [act(norm(x)) for x, norm, act in zip(mixed, self.norms, self.activations)]
        return from_nchw(outputs, self.layouts, inputs, self.on_grid)

    def extra_repr(self) -> str:
        shown = [layout.name for layout in self.layouts]
        layouts = "" if set(shown) == {"NCHW"} else f", layouts={self.layouts}"
        return f"in_channels={self.in_channels}{layouts}"


class NDDRLayer(_PerTaskOutputs):
    """NDDR fusion of K feature maps into K feature maps (one 1×1 conv, norm, activation per task).

    Args:
        in_channels: C_i of every task, in task order.
        init: ``(alpha, beta)`` diagonal init, ``"xavier"``, or ``None`` for
            :func:`~nddrify.layers.default_init`.
        norm: ``"batchnorm"`` (eps 1e-3, momentum 0.05 as in the official code), ``None`` or a
            callable ``channels -> module``.
        activation: ``"auto"`` applies ReLU only to tasks whose incoming feature is non-negative
            (``nonnegative[i]``), so pre-activation features are never clipped; ``"relu"`` always
            (the official code's behaviour); ``None`` never; or a callable returning a module.
        nonnegative: per task, whether the fused feature map was non-negative in the original model.
        resize: resize other tasks' maps to task i's H×W before fusing (for tasks whose maps differ).
        layouts: per task, a :class:`~nddrify.layers.FeatureLayout` (or ``"NCHW"``, ``"NHWC"``,
            ``"NLC"``, or a channels-last flag): channels-last maps (Swin-style stages) and token
            sequences are viewed as N×C×H×W for the fusion and returned in their own layout.
            Tokens are fused one position per token (a per-token linear map), or on their patch
            grid with their extra tokens passed through when the level mixes them with maps
            (:func:`~nddrify.layers.on_grid`).

    Example:
        >>> import torch
        >>> from nddrify.layers import NDDRLayer
        >>> layer = NDDRLayer([4, 4], init=(0.9, 0.1), norm=None, activation=None)
        >>> layer.convs[0].weight[:, :, 0, 0][0].tolist()
        [0.8999999761581421, 0.0, 0.0, 0.0, 0.10000000149011612, 0.0, 0.0, 0.0]
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        init: Init = None,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        resize: ResizeMode | None = None,
        layouts: Sequence[FeatureLayout | str | bool] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        if len(self.in_channels) < 2:
            raise FusionConfigError(f"NDDR fuses at least two tasks, got {len(self.in_channels)}.")
        total = sum(self.in_channels)
        # skip_init: reset_parameters below writes every weight (diagonal or Xavier).
        self.convs = nn.ModuleList(
            skip_init(nn.Conv2d, total, c, 1, bias=False) for c in self.in_channels
        )
        self._set_outputs(self.in_channels, norm, activation, nonnegative, layouts)
        self.resize = resize
        self.reset_parameters(init)

    def reset_parameters(self, init: Init = None) -> None:
        """Re-initialise the 1×1 weights (diagonal or Xavier) and the norms."""
        checked = check_init(init, len(self.in_channels))
        if checked == "xavier":
            for conv in self.convs:
                nn.init.xavier_uniform_(conv.weight)
        else:
            like = self.convs[0].weight
            matrix = block_diagonal(
                self.in_channels, self.in_channels, *checked, dtype=like.dtype, device=like.device
            )
            with torch.no_grad():
                for conv, rows in zip(self.convs, matrix.split(self.in_channels)):
                    conv.weight.copy_(rows[:, :, None, None])
        for norm in self.norms:
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = to_nchw(inputs, self.layouts, self.on_grid)
        if self.resize is None:
            stacked = torch.cat(features, dim=1)
            # One convolution per task: each output is its own tensor (not a view of a shared
            # one), so downstream in-place ops and memory-format choices behave as in the model.
            mixed = [conv(stacked) for conv in self.convs]
        else:
            mixed = []
            for conv, own in zip(self.convs, features):
                size = own.shape[-2:]
                stacked = torch.cat([resize_bilinear(f, size, self.resize) for f in features], 1)
                mixed.append(conv(stacked))
        return self._finish(mixed, inputs)


class NDDRLowRankLayer(_PerTaskOutputs):
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
        low = self.down(torch.cat(features, dim=1))
        outputs = []
        for i, (c_i, up) in enumerate(zip(self.in_channels, self.ups)):
            mixed = up(low)
            for j, x_j in enumerate(features):
                m = min(c_i, x_j.shape[1])
                term = self.diagonal[i][j, :m, None, None] * x_j[:, :m]
                mixed = mixed + (F.pad(term, (0, 0, 0, 0, 0, c_i - m)) if m < c_i else term)
            outputs.append(mixed)
        return self._finish(outputs, inputs)


class NDDRGroupedLayer(_PerTaskOutputs):
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
        # order[k] = index in the task-major concatenation of channel k in group-major order
        order = []
        for g in range(groups):
            start = 0
            for c in self.in_channels:
                size = c // groups
                order.extend(range(start + g * size, start + (g + 1) * size))
                start += c
        order_t = torch.tensor(order)
        self.register_buffer("group_order", order_t, persistent=False)
        self.register_buffer("task_order", torch.argsort(order_t), persistent=False)
        self.conv = nn.Conv2d(total, total, 1, groups=groups, bias=False)
        self.groups = groups
        self._set_outputs(self.in_channels, norm, activation, nonnegative, layouts)
        self.reset_parameters(init)

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
        stacked = torch.cat(features, dim=1).index_select(1, self.group_order)
        grouped = self.conv(stacked)
        bounds = torch.tensor((0, *self.in_channels)).cumsum(0).tolist()
        mixed = [  # index_select gives each task its own tensor (not a view)
            grouped.index_select(1, self.task_order[start:end])
            for start, end in itertools.pairwise(bounds)
        ]
        return self._finish(mixed, inputs)


class NDDRShortcutLayer(FusionLayer):
    """NDDR-Shortcut: per task, resize every level's NDDR output to the last level's H×W,
    concatenate them in level order and reduce to the last level's width (1×1 conv, norm, act).

    ``forward(levels)`` takes a sequence of levels, each a tuple of the K tasks' maps, and returns
    the K tasks' new last-level maps.

    Example:
        >>> import torch
        >>> from nddrify.layers import NDDRShortcutLayer
        >>> layer = NDDRShortcutLayer([[8, 8], [16, 16]], norm=None)
        >>> levels = [(torch.randn(1, 8, 8, 8),) * 2, (torch.randn(1, 16, 4, 4),) * 2]
        >>> [tuple(y.shape) for y in layer(levels)]
        [(1, 16, 4, 4), (1, 16, 4, 4)]
    """

    def __init__(
        self,
        level_channels: Sequence[Sequence[int]],
        *,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        resize_mode: ResizeMode = "align_corners_false",
        layouts: Sequence[Sequence[FeatureLayout | str | bool]] | None = None,
    ) -> None:
        super().__init__()
        check_resize_mode(resize_mode)
        channels = [tuple(int(c) for c in level) for level in level_channels]
        num_tasks = len(channels[-1])
        self.layouts = tuple(
            as_layouts(level, num_tasks) for level in (layouts or [None] * len(channels))
        )
        # A task's token sequences go on their patch grid when its levels differ in layout or
        # grid (token stages of a hierarchical transformer); one position per token otherwise.
        self.on_grid = tuple(
            len({level[task] for level in self.layouts}) > 1 for task in range(num_tasks)
        )
        nonnegative = tuple(nonnegative) if nonnegative is not None else (False,) * num_tasks
        self.resize_mode = resize_mode
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.activations = nn.ModuleList()
        for task in range(num_tasks):
            total = sum(level[task] for level in channels)
            width = channels[-1][task]
            conv = nn.Conv2d(total, width, 1, bias=False)
            nn.init.xavier_uniform_(conv.weight)
            self.convs.append(conv)
            self.norms.append(make_norm(norm, width))
            self.activations.append(make_activation(activation, nonnegative[task]))

    @property
    def channels_last(self) -> tuple[tuple[bool, ...], ...]:
        """Per level and task, whether the maps are N×H×W×C."""
        return tuple(tuple(t.name == "NHWC" for t in level) for level in self.layouts)

    def forward(self, levels: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        outputs = []
        for task, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.activations)):
            grid = self.on_grid[task]
            maps = [
                to_nchw([level[task]], [layouts[task]], grid)[0]
                for level, layouts in zip(levels, self.layouts)
            ]
            size = maps[-1].shape[-2:]
            stacked = torch.cat([resize_bilinear(m, size, self.resize_mode) for m in maps], dim=1)
            last = [levels[-1][task]]
            outputs.append(
                from_nchw([act(norm(conv(stacked)))], [self.layouts[-1][task]], last, grid)[0]
            )
        return tuple(outputs)
