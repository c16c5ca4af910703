"""The fusion layers: NDDR (Gao et al., CVPR 2019) and the NDDR-Shortcut.

An :class:`NDDRLayer` takes the K tasks' feature maps at one fusion level, concatenates them along
channels in task order and, for every task i, maps the ΣC_j channels back to C_i with its own 1×1
convolution (no bias), a norm and an activation. Its diagonal initialisation gives task i's own block
α·I and every other block β·I, so with (α, β) = (1, 0), no norm and no activation the layer is exactly
the identity.

:class:`NDDR` is the factory the rewriter calls once per level with the K feature-map shapes; its
options are the ones ``nddrify.fuse`` forwards.

Example:
    >>> import torch, nddrify
    >>> layer = nddrify.NDDR(init=(1.0, 0.0), norm=None, activation=None)([(1, 8, 4, 4), (1, 16, 4, 4)])
    >>> a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4)
    >>> out_a, out_b = layer(a, b)
    >>> torch.equal(out_a, a) and torch.equal(out_b, b)
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from .errors import FusionConfigError

__all__ = [
    "FusionLayer",
    "NDDRLayer",
    "NDDRShortcutLayer",
    "NDDRLowRankLayer",
    "NDDRGroupedLayer",
    "NDDR",
    "Shortcut",
    "diagonal_init_",
    "default_init",
    "resize_bilinear",
    "as_shortcut",
]

#: ``(alpha, beta)``, ``"xavier"``, or ``None`` for the default (α, β) = (0.9, 0.1/(K−1)).
Init = tuple[float, float] | Literal["xavier"] | None
#: ``"batchnorm"``, ``None`` (no norm), or a callable ``channels -> nn.Module``.
Norm = Literal["batchnorm"] | Callable[[int], nn.Module] | None
#: ``"auto"`` (ReLU where the fused feature was non-negative), ``"relu"``, ``None`` or a callable.
Activation = Literal["auto", "relu"] | Callable[[], nn.Module] | None
ResizeMode = Literal["align_corners_false", "align_corners_true", "tf_legacy"]
_RESIZE_MODES = ("align_corners_false", "align_corners_true", "tf_legacy")

_BN_EPS = 1e-3  # TF/slim default of the official code
_BN_MOMENTUM = 0.05  # TF decay 0.95


class FusionLayer(nn.Module):
    """Base class of every layer the rewriter inserts; ``param_groups`` finds fusion parameters
    by this type and trains them at ``lr_mult`` × the base lr unless told otherwise."""

    lr_mult: float = 100.0  # the official NDDR code


def default_init(num_tasks: int) -> tuple[float, float]:
    """The diagonal init used when none is given: (0.9, 0.1) for two tasks, rows summing to 1.

    Example:
        >>> from nddrify.layers import default_init
        >>> default_init(2), default_init(5)
        ((0.9, 0.1), (0.9, 0.025))
    """
    if num_tasks < 2:
        return (1.0, 0.0)
    return (0.9, 0.1 / (num_tasks - 1))


def diagonal_init_(
    weight: torch.Tensor, in_channels: Sequence[int], own: int, alpha: float, beta: float
) -> torch.Tensor:
    """Fill a 1×1 conv ``weight`` (C_out × ΣC_j × 1 × 1) with α·I on block ``own`` and β·I elsewhere.

    Blocks that are not square get the identity on their overlapping channels (top-left corner).
    """
    with torch.no_grad():
        weight.zero_()
        start = 0
        for j, channels in enumerate(in_channels):
            overlap = min(weight.shape[0], channels)
            index = torch.arange(overlap, device=weight.device)
            weight[index, start + index, 0, 0] = alpha if j == own else beta
            start += channels
    return weight


def _make_norm(norm: Norm, channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
    if callable(norm):
        return norm(channels)
    raise FusionConfigError(
        f"norm={norm!r} is not supported; use 'batchnorm', None, or a callable channels -> module "
        "(e.g. lambda c: nn.GroupNorm(32, c))."
    )


def _make_activation(activation: Activation, nonnegative: bool) -> nn.Module:
    if activation is None:
        return nn.Identity()
    if activation == "auto":
        return nn.ReLU() if nonnegative else nn.Identity()
    if activation == "relu":
        return nn.ReLU()
    if callable(activation):
        return activation()
    raise FusionConfigError(
        f"activation={activation!r} is not supported; use 'auto', 'relu', None, or a callable that "
        "returns a module (e.g. nn.GELU)."
    )


def _check_init(init: Init, num_tasks: int) -> tuple[float, float] | Literal["xavier"]:
    if init is None:
        return default_init(num_tasks)
    if init == "xavier":
        return "xavier"
    if (
        isinstance(init, (tuple, list))
        and len(init) == 2
        and all(isinstance(v, (int, float)) for v in init)
    ):
        alpha, beta = float(init[0]), float(init[1])
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise FusionConfigError(f"init={init!r} contains NaN or inf; use finite (alpha, beta).")
        return (alpha, beta)
    raise FusionConfigError(
        f"init={init!r} is not supported; use (alpha, beta) such as (0.9, 0.1), 'xavier', or None."
    )


def resize_bilinear(x: torch.Tensor, size: Sequence[int], mode: ResizeMode) -> torch.Tensor:
    """Bilinear resize with the three conventions found in NDDR code.

    ``"align_corners_false"`` and ``"align_corners_true"`` are PyTorch's; ``"tf_legacy"`` is
    TF1's ``resize_bilinear`` without half-pixel centres: source = destination × (in / out).
    """
    height, width = int(size[0]), int(size[1])
    if tuple(x.shape[-2:]) == (height, width):
        return x
    if mode == "align_corners_false":
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if mode == "align_corners_true":
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
    if mode == "tf_legacy":
        return _resize_asymmetric(_resize_asymmetric(x, height, dim=-2), width, dim=-1)
    raise FusionConfigError(
        f"resize mode {mode!r} is unknown; use 'align_corners_false', 'align_corners_true' or "
        "'tf_legacy'."
    )


def _resize_asymmetric(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    in_size = x.shape[dim]
    if in_size == out_size:
        return x
    source = torch.arange(out_size, device=x.device, dtype=torch.float32) * (in_size / out_size)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = (source - low.to(source.dtype)).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = out_size
    frac = frac.view(shape)
    return x.index_select(dim, low) * (1 - frac) + x.index_select(dim, high) * frac


def _to_nchw(
    features: Sequence[torch.Tensor], channels_last: Sequence[bool]
) -> tuple[torch.Tensor, ...]:
    return tuple(f.permute(0, 3, 1, 2) if last else f for f, last in zip(features, channels_last))


def _from_nchw(
    features: Sequence[torch.Tensor], channels_last: Sequence[bool]
) -> tuple[torch.Tensor, ...]:
    return tuple(f.permute(0, 2, 3, 1) if last else f for f, last in zip(features, channels_last))


class _PerTaskOutputs(FusionLayer):
    """Shared tail of the NDDR-style layers: per task a norm and an activation, and the layout
    of each task's maps (channels-last maps are fused as N×C×H×W and returned as they came)."""

    def _set_outputs(
        self,
        channels: Sequence[int],
        norm: Norm,
        activation: Activation,
        nonnegative: Sequence[bool] | None,
        channels_last: Sequence[bool] | None,
    ) -> None:
        count = len(channels)
        nonnegative = tuple(nonnegative) if nonnegative is not None else (False,) * count
        self.norms = nn.ModuleList(_make_norm(norm, c) for c in channels)
        self.activations = nn.ModuleList(_make_activation(activation, n) for n in nonnegative)
        self.channels_last = tuple(bool(c) for c in channels_last or (False,) * count)

    def _finish(self, mixed: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outputs = [act(norm(x)) for x, norm, act in zip(mixed, self.norms, self.activations)]
        return _from_nchw(outputs, self.channels_last)


class NDDRLayer(_PerTaskOutputs):
    """NDDR fusion of K feature maps into K feature maps (one 1×1 conv, norm, activation per task).

    Args:
        in_channels: C_i of every task, in task order.
        init: ``(alpha, beta)`` diagonal init, ``"xavier"``, or ``None`` for :func:`default_init`.
        norm: ``"batchnorm"`` (eps 1e-3, momentum 0.05 as in the official code), ``None`` or a
            callable ``channels -> module``.
        activation: ``"auto"`` applies ReLU only to tasks whose incoming feature is non-negative
            (``nonnegative[i]``), so pre-activation features are never clipped; ``"relu"`` always
            (the official code's behaviour); ``None`` never; or a callable returning a module.
        nonnegative: per task, whether the fused feature map was non-negative in the original model.
        resize: resize other tasks' maps to task i's H×W before fusing (for tasks whose maps differ).
        channels_last: per task, whether its maps are N×H×W×C (Swin-style stages); they are
            viewed as N×C×H×W for the fusion and returned in their own layout.

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
        channels_last: Sequence[bool] | None = None,
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
        self._set_outputs(self.in_channels, norm, activation, nonnegative, channels_last)
        self.resize = resize
        self.reset_parameters(init)

    def reset_parameters(self, init: Init = None) -> None:
        """Re-initialise the 1×1 weights (diagonal or Xavier) and the norms."""
        checked = _check_init(init, len(self.in_channels))
        for i, conv in enumerate(self.convs):
            if checked == "xavier":
                nn.init.xavier_uniform_(conv.weight)
            else:
                diagonal_init_(conv.weight, self.in_channels, i, *checked)
        for norm in self.norms:
            if hasattr(norm, "reset_parameters"):
                norm.reset_parameters()

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = _to_nchw(features, self.channels_last)
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
        return self._finish(mixed)

    def extra_repr(self) -> str:
        layouts = "" if not any(self.channels_last) else f", channels_last={self.channels_last}"
        return f"in_channels={self.in_channels}{layouts}"


class NDDRLowRankLayer(_PerTaskOutputs):
    """Cheaper NDDR: a learned diagonal mixing (own block α·I, other blocks β·I, one weight per
    channel) plus a low-rank correction ΣC → r → C_i whose up-projection starts at zero, so the
    diagonal init semantics hold exactly (α=1, β=0 is the identity). Parameters: K·ΣC diagonal
    weights + r·ΣC + r·ΣC_i, instead of ΣC·ΣC_i."""

    def __init__(
        self,
        in_channels: Sequence[int],
        rank: int,
        *,
        init: Init = None,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        num_tasks = len(self.in_channels)
        if num_tasks < 2 or rank < 1:
            raise FusionConfigError(f"low-rank NDDR needs ≥ 2 tasks and rank ≥ 1, got {rank}.")
        checked = _check_init(init, num_tasks)
        if checked == "xavier":
            raise FusionConfigError("low-rank NDDR keeps the diagonal init; use (alpha, beta).")
        alpha, beta = checked
        self.diagonal = nn.ParameterList()
        for i, c_i in enumerate(self.in_channels):
            weight = torch.zeros(num_tasks, c_i)
            for j, c_j in enumerate(self.in_channels):
                weight[j, : min(c_i, c_j)] = alpha if i == j else beta
            self.diagonal.append(nn.Parameter(weight))
        self.down = nn.Conv2d(sum(self.in_channels), rank, 1, bias=False)
        self.ups = nn.ModuleList(nn.Conv2d(rank, c, 1, bias=False) for c in self.in_channels)
        for up in self.ups:
            nn.init.zeros_(up.weight)
        self._set_outputs(self.in_channels, norm, activation, nonnegative, channels_last)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = _to_nchw(features, self.channels_last)
        low = self.down(torch.cat(features, dim=1))
        outputs = []
        for i, (c_i, up) in enumerate(zip(self.in_channels, self.ups)):
            mixed = up(low)
            for j, x_j in enumerate(features):
                m = min(c_i, x_j.shape[1])
                term = self.diagonal[i][j, :m, None, None] * x_j[:, :m]
                mixed = mixed + (F.pad(term, (0, 0, 0, 0, 0, c_i - m)) if m < c_i else term)
            outputs.append(mixed)
        return self._finish(outputs)


class NDDRGroupedLayer(_PerTaskOutputs):
    """Cheaper NDDR: a grouped 1×1 convolution over the concatenation, where group g holds the
    g-th slice of every task's channels, so every group still mixes all tasks. Diagonal init
    within each group; parameters ΣC·ΣC/groups instead of ΣC·ΣC."""

    def __init__(
        self,
        in_channels: Sequence[int],
        groups: int,
        *,
        init: Init = None,
        norm: Norm = "batchnorm",
        activation: Activation = "auto",
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[bool] | None = None,
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
        self._set_outputs(self.in_channels, norm, activation, nonnegative, channels_last)
        self.reset_parameters(init)

    def reset_parameters(self, init: Init = None) -> None:
        checked = _check_init(init, len(self.in_channels))
        if checked == "xavier":
            nn.init.xavier_uniform_(self.conv.weight)
            return
        alpha, beta = checked
        per_group = [c // self.groups for c in self.in_channels]
        with torch.no_grad():
            self.conv.weight.zero_()
            for g in range(self.groups):
                base = g * sum(per_group)
                out_start = 0
                for i, c_i in enumerate(per_group):
                    in_start = 0
                    for j, c_j in enumerate(per_group):
                        for a in range(min(c_i, c_j)):
                            self.conv.weight[base + out_start + a, in_start + a, 0, 0] = (
                                alpha if i == j else beta
                            )
                        in_start += c_j
                    out_start += c_i

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = _to_nchw(features, self.channels_last)
        stacked = torch.cat(features, dim=1).index_select(1, self.group_order)
        grouped = self.conv(stacked)
        bounds = torch.tensor((0, *self.in_channels)).cumsum(0).tolist()
        mixed = [  # index_select gives each task its own tensor (not a view)
            grouped.index_select(1, self.task_order[start:end])
            for start, end in itertools.pairwise(bounds)
        ]
        return self._finish(mixed)


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
        channels_last: Sequence[Sequence[bool]] | None = None,
    ) -> None:
        super().__init__()
        if resize_mode not in _RESIZE_MODES:
            raise FusionConfigError(
                f"resize_mode={resize_mode!r} is unknown; use one of {_RESIZE_MODES}."
            )
        channels = [tuple(int(c) for c in level) for level in level_channels]
        num_tasks = len(channels[-1])
        self.channels_last = tuple(
            tuple(bool(c) for c in level)
            for level in (channels_last or [(False,) * num_tasks] * len(channels))
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
            self.norms.append(_make_norm(norm, width))
            self.activations.append(_make_activation(activation, nonnegative[task]))

    def forward(self, levels: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        levels = [_to_nchw(level, last) for level, last in zip(levels, self.channels_last)]
        outputs = []
        for task, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.activations)):
            size = levels[-1][task].shape[-2:]
            stacked = torch.cat(
                [resize_bilinear(level[task], size, self.resize_mode) for level in levels], dim=1
            )
            outputs.append(act(norm(conv(stacked))))
        return _from_nchw(outputs, self.channels_last[-1])


def _norm_params(norm: Norm, channels: int) -> int:
    if norm is None:
        return 0
    if norm == "batchnorm":
        return 2 * channels
    return sum(p.numel() for p in _make_norm(norm, channels).parameters())


@dataclass(frozen=True)
class NDDR:
    """Factory for NDDR layers: ``NDDR(...)(shapes, nonnegative)`` builds one level's layer.

    The options are those of :class:`NDDRLayer`; ``nddrify.fuse(init=..., norm=..., activation=...)``
    builds this factory for you. NDDR costs K²·C² weights per level; for wide networks:

    * ``rank=r`` builds :class:`NDDRLowRankLayer` (per-channel diagonal mixing + ΣC → r → C_i);
    * ``groups=g`` builds :class:`NDDRGroupedLayer` (grouped 1×1 conv, ΣC·ΣC/g weights).

    Both keep the diagonal init, so ``init=(1.0, 0.0)`` with no norm is still the identity.

    Example:
        >>> from nddrify import NDDR
        >>> shapes = [(1, 64, 112, 112), (1, 64, 112, 112)]
        >>> NDDR().num_parameters(shapes), NDDR(rank=16).num_parameters(shapes)
        ((16384, 256), (4352, 256))
    """

    init: Init = None
    norm: Norm = "batchnorm"
    activation: Activation = "auto"
    resize: ResizeMode | None = None
    rank: int | None = None
    groups: int = 1

    def __call__(
        self,
        shapes: Sequence[Sequence[int]],
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[bool] | None = None,
    ) -> FusionLayer:
        """Build one level's layer for maps of these (N, C, H, W) shapes, one per task."""
        options = {
            "init": self.init,
            "norm": self.norm,
            "activation": self.activation,
            "nonnegative": nonnegative,
            "channels_last": channels_last,
        }
        channels = [s[1] for s in shapes]
        if self.rank is not None or self.groups != 1:
            if self.resize is not None:
                raise FusionConfigError("resize= is only supported by the full NDDR layer.")
            if self.rank is not None and self.groups != 1:
                raise FusionConfigError("choose rank= or groups=, not both.")
            if self.rank is not None:
                return NDDRLowRankLayer(channels, self.rank, **options)
            return NDDRGroupedLayer(channels, self.groups, **options)
        return NDDRLayer(
            [s[1] for s in shapes],
            init=self.init,
            norm=self.norm,
            activation=self.activation,
            nonnegative=nonnegative,
            resize=self.resize,
            channels_last=channels_last,
        )

    def num_parameters(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
        """(fusion weights, norm parameters) one level adds, for feature maps of these shapes."""
        channels = [int(s[1]) for s in shapes]
        total = sum(channels)
        norms = sum(_norm_params(self.norm, c) for c in channels)
        if self.rank is not None:
            return (len(channels) * total + self.rank * total + self.rank * total, norms)
        if self.groups != 1:
            if any(c % self.groups for c in channels):
                raise FusionConfigError(
                    f"grouped NDDR needs every width {channels} divisible by groups={self.groups}."
                )
            return (total * total // self.groups, norms)
        return (sum(total * c for c in channels), norms)


@dataclass(frozen=True)
class Shortcut:
    """Options of the NDDR-Shortcut (``nddrify.fuse(shortcut=True)`` uses the defaults).

    Args:
        resize_mode: ``"align_corners_false"`` (default), ``"align_corners_true"`` (one public
            port), or ``"tf_legacy"`` (the official TF1 code).
        norm, activation: as for :class:`NDDRLayer`.
    """

    resize_mode: ResizeMode = "align_corners_false"
    norm: Norm = "batchnorm"
    activation: Activation = "auto"

    def __call__(
        self,
        level_shapes: Sequence[Sequence[Sequence[int]]],
        nonnegative: Sequence[bool] | None = None,
        channels_last: Sequence[Sequence[bool]] | None = None,
    ) -> NDDRShortcutLayer:
        """Build the shortcut for these levels of (N, C, H, W) shapes (level × task)."""
        return NDDRShortcutLayer(
            [[s[1] for s in level] for level in level_shapes],
            norm=self.norm,
            activation=self.activation,
            nonnegative=nonnegative,
            resize_mode=self.resize_mode,
            channels_last=channels_last,
        )

    def num_parameters(self, level_shapes: Sequence[Sequence[Sequence[int]]]) -> tuple[int, int]:
        """(1×1 weights, norm parameters) the shortcut adds."""
        num_tasks = len(level_shapes[-1])
        weights = norms = 0
        for task in range(num_tasks):
            total = sum(int(level[task][1]) for level in level_shapes)
            width = int(level_shapes[-1][task][1])
            weights += total * width
            norms += _norm_params(self.norm, width)
        return weights, norms


def as_shortcut(value: bool | Shortcut | None) -> Shortcut | None:
    """The shortcut options for ``shortcut=`` (``True`` means the defaults), or None."""
    if value is True:
        return Shortcut()
    if value is False or value is None:
        return None
    if isinstance(value, Shortcut):
        return value
    raise FusionConfigError(
        f"shortcut={value!r} is not valid; use True, False, or nddrify.Shortcut(resize_mode=...)."
    )
