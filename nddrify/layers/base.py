"""What every fusion layer shares: the base class, the diagonal init, option checks, resizing
and layouts.

* :class:`FusionLayer` — the base class of every layer the rewriter inserts;
* :func:`default_init`, :func:`check_init`, :func:`block_diagonal` — the (α, β) diagonal init
  of NDDR, its cheaper variants, cross-stitch and sluice: one validator, one matrix;
* :func:`make_norm`, :func:`make_activation`, :func:`norm_params` — the per-task tails;
* :func:`resize_bilinear` — the three bilinear conventions of NDDR code;
* :class:`FeatureLayout`, :func:`to_nchw`, :func:`from_nchw` — channels-last maps and token
  sequences are fused as N×C×H×W (tokens as N×C×L×1, or on their patch grid when a level mixes
  them with maps).

Example:
    >>> from nddrify.layers import block_diagonal, check_init
    >>> alpha, beta = check_init(None, num_tasks=2)
    >>> block_diagonal([2, 2], [2, 2], alpha, beta)
    tensor([[0.9000, 0.0000, 0.1000, 0.0000],
            [0.0000, 0.9000, 0.0000, 0.1000],
            [0.1000, 0.0000, 0.9000, 0.0000],
            [0.0000, 0.1000, 0.0000, 0.9000]])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FusionConfigError

__all__ = [
    "FusionLayer",
    "Init",
    "Norm",
    "Activation",
    "ResizeMode",
    "RESIZE_MODES",
    "default_init",
    "check_init",
    "block_diagonal",
    "check_norm",
    "check_activation",
    "check_resize_mode",
    "check_positive_int",
    "make_norm",
    "make_activation",
    "norm_params",
    "resize_bilinear",
    "FeatureLayout",
    "as_layouts",
    "on_grid",
    "to_nchw",
    "from_nchw",
]

#: ``(alpha, beta)``, ``"xavier"``, or ``None`` for the default (α, β) = (0.9, 0.1/(K−1)).
Init = tuple[float, float] | Literal["xavier"] | None
#: ``"batchnorm"``, ``None`` (no norm), or a callable ``channels -> nn.Module``.
Norm = Literal["batchnorm"] | Callable[[int], nn.Module] | None
#: ``"auto"`` (ReLU where the fused feature was non-negative), ``"relu"``, ``None`` or a callable.
Activation = Literal["auto", "relu"] | Callable[[], nn.Module] | None
#: How feature maps are resized to another H×W (see :func:`resize_bilinear`).
ResizeMode = Literal["align_corners_false", "align_corners_true", "tf_legacy"]
#: Every :data:`ResizeMode`.
RESIZE_MODES: tuple[str, ...] = ("align_corners_false", "align_corners_true", "tf_legacy")

_BN_EPS = 1e-3  # TF/slim default of the official code
_BN_MOMENTUM = 0.05  # TF decay 0.95


class FusionLayer(nn.Module):
    """Base class of every layer the rewriter inserts; ``param_groups`` finds fusion parameters
    by this type and trains them at ``lr_mult`` × the base lr unless told otherwise.

    A layer of one level is called with the K tasks' maps and returns K maps; a layer spanning
    the levels (:class:`~nddrify.layers.NDDRShortcutLayer`) is called with every level's maps.

    Example:
        >>> import torch
        >>> from nddrify.layers import FusionLayer
        >>> class Swap(FusionLayer):
        ...     def forward(self, a, b):
        ...         return b, a
        >>> Swap().lr_mult, [t.item() for t in Swap()(torch.tensor(1), torch.tensor(2))]
        (100.0, [2, 1])
    """

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


def check_init(
    init: object, num_tasks: int | None = None, *, xavier: bool = True, kind: str = "NDDR"
) -> tuple[float, float] | Literal["xavier"] | None:
    """The one validator of ``init=``: ``(alpha, beta)`` as two floats, ``"xavier"`` (where
    ``xavier`` allows it) or, for ``None``, :func:`default_init` of ``num_tasks`` (``None``
    when ``num_tasks`` is not given: factories check their options before the task count is
    known).

    Raises:
        FusionConfigError: naming ``init`` and ``kind`` and saying which values are accepted.

    Example:
        >>> from nddrify.layers import check_init
        >>> check_init([1, 0]), check_init(None, 3), check_init(None)
        ((1.0, 0.0), (0.9, 0.05), None)
        >>> check_init((0.9,), xavier=False, kind="cross-stitch")
        Traceback (most recent call last):
        ...
        nddrify.errors.FusionConfigError: init=(0.9,) is not supported by cross-stitch; use (alpha, beta) such as (0.9, 0.1) (α on the own task, β on every other), or None for the default (0.9, 0.1/(K−1)).
    """
    if init is None:
        return None if num_tasks is None else default_init(num_tasks)
    accepted = "(alpha, beta) such as (0.9, 0.1) (α on the own task, β on every other), "
    accepted += "'xavier', " if xavier else ""
    accepted += "or None for the default (0.9, 0.1/(K−1))"
    if isinstance(init, str) and init == "xavier":
        if xavier:
            return "xavier"
        raise FusionConfigError(
            f"init='xavier' is not supported by {kind}, which keeps the diagonal init; use "
            f"{accepted}."
        )
    if (
        isinstance(init, (tuple, list))
        and len(init) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in init)
    ):
        alpha, beta = float(init[0]), float(init[1])
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise FusionConfigError(
                f"init={init!r} contains NaN or inf; use finite (alpha, beta) such as (0.9, 0.1)."
            )
        return (alpha, beta)
    raise FusionConfigError(f"init={init!r} is not supported by {kind}; use {accepted}.")


def block_diagonal(
    out_channels: Sequence[int],
    in_channels: Sequence[int],
    alpha: float,
    beta: float,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The diagonal-init matrix of every fusion layer: ΣC_out × ΣC_in, block (i, j) is α·I on
    the own task (i = j) and β·I elsewhere. A block that is not square gets the identity on its
    overlapping channels (top-left corner); all other entries are 0.

    NDDR's 1×1 weights are its rows per task (``block_diagonal(C, C, α, β).split(C)``);
    cross-stitch's K×K matrix is ``block_diagonal([1] * K, [1] * K, α, β)``; sluice's
    (K·S)×(K·S) matrix is ``block_diagonal([S] * K, [S] * K, α, β)``.

    Example:
        >>> from nddrify.layers import block_diagonal
        >>> block_diagonal([1, 2], [1, 2], 1.0, 0.5)
        tensor([[1.0000, 0.5000, 0.0000],
                [0.5000, 1.0000, 0.0000],
                [0.0000, 0.0000, 1.0000]])
    """
    out_channels = [int(c) for c in out_channels]
    in_channels = [int(c) for c in in_channels]
    matrix = torch.zeros(sum(out_channels), sum(in_channels), dtype=dtype, device=device)
    row = 0
    for i, rows in enumerate(out_channels):
        col = 0
        for j, cols in enumerate(in_channels):
            block = matrix[row : row + rows, col : col + cols]
            block.diagonal().fill_(alpha if i == j else beta)
            col += cols
        row += rows
    return matrix


def check_norm(norm: object) -> None:
    """Raise :class:`FusionConfigError` unless ``norm`` is ``"batchnorm"``, None or a callable.

    Example:
        >>> from nddrify.layers import check_norm
        >>> check_norm("layernorm")
        Traceback (most recent call last):
        ...
        nddrify.errors.FusionConfigError: norm='layernorm' is not supported; use 'batchnorm', None, or a callable channels -> module (e.g. lambda c: nn.GroupNorm(32, c)).
    """
    if norm is None or norm == "batchnorm" or (callable(norm) and not isinstance(norm, str)):
        return
    raise FusionConfigError(
        f"norm={norm!r} is not supported; use 'batchnorm', None, or a callable channels -> module "
        "(e.g. lambda c: nn.GroupNorm(32, c))."
    )


def check_activation(activation: object) -> None:
    """Raise :class:`FusionConfigError` unless ``activation`` is ``"auto"``, ``"relu"``, None
    or a callable returning a module."""
    if activation is None or activation in ("auto", "relu"):
        return
    if callable(activation) and not isinstance(activation, str):
        return
    raise FusionConfigError(
        f"activation={activation!r} is not supported; use 'auto', 'relu', None, or a callable that "
        "returns a module (e.g. nn.GELU)."
    )


def check_resize_mode(mode: object, argument: str = "resize_mode") -> None:
    """Raise :class:`FusionConfigError` unless ``mode`` is one of :data:`RESIZE_MODES`."""
    if mode not in RESIZE_MODES:
        raise FusionConfigError(
            f"{argument}={mode!r} is unknown; use one of {RESIZE_MODES} (resize mode of the "
            "bilinear resize)."
        )


def check_positive_int(value: object, argument: str, hint: str = "") -> None:
    """Raise :class:`FusionConfigError` unless ``value`` is a whole number ≥ 1 (not a bool)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return
    raise FusionConfigError(
        f"{argument}={value!r} is not valid; use a whole number ≥ 1{' ' + hint if hint else ''}."
    )


def make_norm(norm: Norm, channels: int) -> nn.Module:
    """The norm of one task's output: BatchNorm2d with the official eps 1e-3 and momentum 0.05,
    ``nn.Identity`` for None, or ``norm(channels)``."""
    check_norm(norm)
    if norm is None:
        return nn.Identity()
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
    return norm(channels)  # type: ignore[operator]


def make_activation(activation: Activation, nonnegative: bool) -> nn.Module:
    """The activation of one task's output (``"auto"``: ReLU only where ``nonnegative``)."""
    check_activation(activation)
    if activation is None:
        return nn.Identity()
    if activation == "auto":
        return nn.ReLU() if nonnegative else nn.Identity()
    if activation == "relu":
        return nn.ReLU()
    return activation()  # type: ignore[operator]


def norm_params(norm: Norm, channels: int) -> int:
    """The affine parameters of :func:`make_norm` ``(norm, channels)``.

    Example:
        >>> from nddrify.layers import norm_params
        >>> norm_params("batchnorm", 64), norm_params(None, 64)
        (128, 0)
    """
    if norm is None:
        return 0
    if norm == "batchnorm":
        return 2 * channels
    return sum(p.numel() for p in make_norm(norm, channels).parameters())


def resize_bilinear(x: torch.Tensor, size: Sequence[int], mode: ResizeMode) -> torch.Tensor:
    """Bilinear resize with the three conventions found in NDDR code.

    ``"align_corners_false"`` and ``"align_corners_true"`` are PyTorch's; ``"tf_legacy"`` is
    TF1's ``resize_bilinear`` without half-pixel centres: source = destination × (in / out).

    Example:
        >>> import torch
        >>> from nddrify.layers import resize_bilinear
        >>> x = torch.tensor([[[[0.0, 10.0, 20.0]]]])  # sources 0, .6, 1.2, 1.8, 2.4 (clamped)
        >>> [round(v, 4) for v in resize_bilinear(x, (1, 5), "tf_legacy").flatten().tolist()]
        [0.0, 6.0, 12.0, 18.0, 20.0]
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


@dataclass(frozen=True)
class FeatureLayout:
    """How one task's feature reaches a fusion layer.

    ``name`` is ``"NCHW"``, ``"NHWC"`` (channels last) or ``"NLC"`` (a token sequence: N × L × C);
    for tokens, ``prefix`` extra tokens (class, distillation, registers) lead the sequence and
    ``grid`` is the (H, W) patch grid behind them in raster order, when known.

    Example:
        >>> from nddrify.layers import FeatureLayout
        >>> FeatureLayout("NLC", prefix=1, grid=(14, 14))
        FeatureLayout(NLC, prefix=1, grid=14×14)
    """

    name: str = "NCHW"
    prefix: int = 0
    grid: tuple[int, int] | None = None

    @property
    def tokens(self) -> bool:
        return self.name == "NLC"

    def __repr__(self) -> str:
        if not self.tokens:
            return f"FeatureLayout({self.name})"
        grid = "?" if self.grid is None else f"{self.grid[0]}×{self.grid[1]}"
        return f"FeatureLayout(NLC, prefix={self.prefix}, grid={grid})"


def as_layouts(
    layouts: Sequence[FeatureLayout | str | bool] | None, count: int
) -> tuple[FeatureLayout, ...]:
    """Per-task :class:`FeatureLayout` values from layouts, layout names, or channels-last flags
    (``True`` = NHWC); ``None`` means NCHW for all ``count`` tasks."""
    if layouts is None:
        return (FeatureLayout(),) * count
    out = []
    for layout in layouts:
        if isinstance(layout, FeatureLayout):
            out.append(layout)
        elif isinstance(layout, str):
            out.append(FeatureLayout(layout))
        else:
            out.append(FeatureLayout("NHWC" if layout else "NCHW"))
    return tuple(out)


def on_grid(layouts: Sequence[FeatureLayout]) -> bool:
    """Whether token sequences are fused on their patch grid (their extra tokens passed through)
    rather than token by token: when the level mixes tokens with image maps, or token sequences
    whose extra tokens or grids differ.

    Example:
        >>> from nddrify.layers import FeatureLayout, on_grid
        >>> vit = FeatureLayout("NLC", prefix=1, grid=(14, 14))
        >>> on_grid([vit, vit]), on_grid([vit, FeatureLayout("NCHW")])
        (False, True)
    """
    tokens = [layout for layout in layouts if layout.tokens]
    if not tokens:
        return False
    return len(tokens) < len(layouts) or len(set(tokens)) > 1


def to_nchw(
    features: Sequence[torch.Tensor],
    layouts: Sequence[FeatureLayout | str | bool],
    grid: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Each feature as N×C×H×W: channels-last maps permuted, token sequences as N×C×L×1 (one
    position per token) or, :func:`on_grid` (or ``grid=True``), their patch tokens as N×C×H×W.

    Example:
        >>> import torch
        >>> from nddrify.layers import from_nchw, to_nchw
        >>> maps = to_nchw([torch.zeros(1, 4, 5, 3), torch.zeros(1, 3, 4, 5)], [True, False])
        >>> [tuple(m.shape) for m in maps], [tuple(m.shape) for m in from_nchw(maps, [True, False])]
        ([(1, 3, 4, 5), (1, 3, 4, 5)], [(1, 4, 5, 3), (1, 3, 4, 5)])
        >>> tokens = to_nchw([torch.zeros(2, 197, 8)], ["NLC"])
        >>> tuple(tokens[0].shape)
        (2, 8, 197, 1)
    """
    layouts = as_layouts(layouts, len(features))
    grid = on_grid(layouts) if grid is None else grid
    out = []
    for feature, layout in zip(features, layouts):
        if layout.name == "NHWC":
            feature = feature.permute(0, 3, 1, 2)
        elif layout.tokens and grid:
            if layout.grid is None:
                raise FusionConfigError(
                    "token sequence has no known patch grid; it can only be fused token by "
                    "token with sequences of the same length and extra tokens."
                )
            patches = feature[:, layout.prefix :].transpose(1, 2)
            feature = patches.reshape(*patches.shape[:2], *layout.grid)
        elif layout.tokens:
            feature = feature.transpose(1, 2).unsqueeze(-1)
        out.append(feature)
    return tuple(out)


def from_nchw(
    features: Sequence[torch.Tensor],
    layouts: Sequence[FeatureLayout | str | bool],
    inputs: Sequence[torch.Tensor] | None = None,
    grid: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`to_nchw`. On the grid, each token sequence's extra tokens are taken
    unchanged from ``inputs`` (the features the layer was called with)."""
    layouts = as_layouts(layouts, len(features))
    grid = on_grid(layouts) if grid is None else grid
    out = []
    for index, (feature, layout) in enumerate(zip(features, layouts)):
        if layout.name == "NHWC":
            feature = feature.permute(0, 2, 3, 1)
        elif layout.tokens and grid:
            patches = feature.flatten(2).transpose(1, 2)
            if layout.prefix:
                if inputs is None:
                    raise FusionConfigError("from_nchw needs the inputs to restore extra tokens.")
                patches = torch.cat([inputs[index][:, : layout.prefix], patches], dim=1)
            feature = patches
        elif layout.tokens:
            feature = feature.squeeze(-1).transpose(1, 2)
        out.append(feature)
    return tuple(out)
