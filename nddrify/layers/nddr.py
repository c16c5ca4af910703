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
from .kernels import (
    activate,
    eval_affine,
    fold_affine,
)

__all__ = ["NDDRLayer", "NDDRShortcutLayer", "PerTaskOutputs"]


class PerTaskOutputs(FusionLayer):
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

    def _folded_norms(
        self, features: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per task, the eval-mode BatchNorm as ``(scale, shift)`` to fold into the mixing
        weights at this call, or None where it cannot be folded or folding costs more than it
        saves: scaling the weights touches every weight (fresh memory each call), applying
        the norm touches every output value, so it is folded only when the maps have at least
        as many pixels (N·H·W) as each output channel has weights
        (:func:`nddrify.inference.optimize_for_inference` folds once and for all)."""
        first = features[0]
        pixels = first.numel() // max(first.shape[1], 1)
        if pixels < self._weights_per_channel():
            return [None] * len(self.norms)
        return [eval_affine(norm) for norm in self.norms]

    def _weights_per_channel(self) -> int:
        """The mixing weights of one output channel (what folding a norm scales)."""
        return sum(self.in_channels)

    def fold_norms(self) -> int:
        """Fold every eval-mode BatchNorm into the mixing weights (the 1×1 weights scaled, a
        bias added) and replace it by ``nn.Identity``: the layer's inference form, equal to
        the eval-mode layer up to float rounding. Returns how many norms were folded.

        Example:
            >>> import torch
            >>> from nddrify.layers import NDDRLayer
            >>> layer = NDDRLayer([4, 4]).eval()
            >>> x = (torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))
            >>> before = layer(*x)
            >>> layer.fold_norms(), type(layer.norms[0]).__name__
            (2, 'Identity')
            >>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(layer(*x), before))
            True
        """
        count = 0
        with torch.no_grad():
            for task, affine in enumerate(eval_affine(norm) for norm in self.norms):
                if affine is not None:
                    self._fold_task(task, affine[0].detach(), affine[1].detach())
                    self.norms[task] = nn.Identity()
                    count += 1
        return count

    def _fold_task(self, task: int, scale: torch.Tensor, shift: torch.Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def _fold_into(conv: nn.Conv2d, rows: slice, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Scale ``conv``'s output rows ``rows`` and set their bias (created at zero)."""
        conv.weight[rows] *= scale.view(-1, 1, 1, 1)
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.weight.shape[0]))
        conv.bias[rows] = conv.bias[rows] * scale + shift

    def _finish(
        self,
        mixed: Sequence[torch.Tensor],
        folded: Sequence[object | None] = (),
        *,
        inputs: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        folded = list(folded) or [None] * len(mixed)
        outputs = [
            activate(act, x if done is not None else norm(x))
            for x, norm, act, done in zip(mixed, self.norms, self.activations, folded)
        ]
        return from_nchw(outputs, self.layouts, inputs, self.on_grid)

    def extra_repr(self) -> str:
        shown = [layout.name for layout in self.layouts]
        layouts = "" if set(shown) == {"NCHW"} else f", layouts={self.layouts}"
        return f"in_channels={self.in_channels}{layouts}"


class NDDRLayer(PerTaskOutputs):
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
        folded = self._folded_norms(features)
        if self.resize is None:
            # One convolution of the concatenation per task, an eval BatchNorm folded into its
            # weights and bias (per-input GEMMs are no faster here: the GEMM dominates). Each
            # output is its own tensor (not a view of a shared one), so downstream in-place
            # ops and memory-format choices behave as in the model.
            stacked = torch.cat(features, dim=1)
            mixed = []
            for conv, affine in zip(self.convs, folded):
                weight, bias = fold_affine(conv.weight, conv.bias, affine)
                mixed.append(F.conv2d(stacked, weight, bias))
            return self._finish(mixed, folded, inputs=inputs)
        else:
            mixed = []
            for conv, own in zip(self.convs, features):
                size = own.shape[-2:]
                stacked = torch.cat([resize_bilinear(f, size, self.resize) for f in features], 1)
                mixed.append(conv(stacked))
        return self._finish(mixed, inputs=inputs)

    def _fold_task(self, task: int, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self._fold_into(self.convs[task], slice(None), scale, shift)


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
