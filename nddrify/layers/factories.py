"""The NDDR fusion kind and the NDDR-Shortcut: the factories ``nddrify.fuse`` builds layers with.

:class:`NDDR` implements :class:`~nddrify.protocol.FusionKind`: ``build(level)`` makes the
layer of one :class:`~nddrify.plans.FusionLevel` and ``num_parameters(level)`` says what it adds.
:class:`Shortcut` implements :class:`~nddrify.protocol.SpansLevels`: ``build_across(levels)``
makes the one layer over every level. Options are checked when the factory is made, so a wrong
one fails before anything is traced.

Example:
    >>> import torch
    >>> from nddrify.layers import NDDR
    >>> from nddrify.plans import FusionLevel, FusionPoint
    >>> level = FusionLevel(0, (FusionPoint("a", "p", "p", (1, 8, 4, 4), False),
    ...                         FusionPoint("b", "p", "p", (1, 16, 4, 4), False)))
    >>> layer = NDDR(init=(1.0, 0.0), norm=None, activation=None).build(level)
    >>> a, b = torch.randn(1, 8, 4, 4), torch.randn(1, 16, 4, 4)
    >>> out_a, out_b = layer(a, b)
    >>> torch.equal(out_a, a) and torch.equal(out_b, b)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import FusionConfigError
from .base import (
    Activation,
    FusionLayer,
    Init,
    Norm,
    ResizeMode,
    check_activation,
    check_init,
    check_norm,
    check_positive_int,
    check_resize_mode,
    norm_params,
)
from .cheap import NDDRGroupedLayer, NDDRLowRankLayer
from .nddr import NDDRLayer, NDDRShortcutLayer

if TYPE_CHECKING:
    from ..plans import FusionLevel

__all__ = ["NDDR", "Shortcut", "as_shortcut"]


@dataclass(frozen=True)
class NDDR:
    """The NDDR fusion kind: ``NDDR(...).build(level)`` builds one level's layer.

    The options are those of :class:`~nddrify.layers.NDDRLayer`; ``nddrify.fuse(init=...,
    norm=..., activation=...)`` builds this factory for you. NDDR costs K²·C² weights per level;
    for wide networks:

    * ``rank=r`` builds :class:`~nddrify.layers.NDDRLowRankLayer` (per-channel diagonal mixing
      + ΣC → r → C_i);
    * ``groups=g`` builds :class:`~nddrify.layers.NDDRGroupedLayer` (grouped 1×1 conv,
      ΣC·ΣC/g weights).

    Both keep the diagonal init, so ``init=(1.0, 0.0)`` with no norm is still the identity.

    Raises:
        FusionConfigError: when made with an invalid option (``init=(0.9,)``, ``rank=`` and
            ``groups=`` together, ``resize=`` with either, an unknown norm or activation).

    Example:
        >>> from nddrify.layers import NDDR
        >>> from nddrify.plans import FusionLevel, FusionPoint
        >>> level = FusionLevel(0, (FusionPoint("a", "p", "p", (1, 64, 112, 112), True),
        ...                         FusionPoint("b", "p", "p", (1, 64, 112, 112), True)))
        >>> NDDR().num_parameters(level), NDDR(rank=16).num_parameters(level)
        ((16384, 256), (4352, 256))
        >>> NDDR().name, NDDR(rank=64).name, NDDR(groups=8).name
        ('NDDR', 'NDDR(rank=64)', 'NDDR(groups=8)')
    """

    init: Init = None
    norm: Norm = "batchnorm"
    activation: Activation = "auto"
    resize: ResizeMode | None = None
    rank: int | None = None
    groups: int = 1

    def __post_init__(self) -> None:
        if self.rank is not None:
            check_positive_int(self.rank, "rank")
        check_positive_int(self.groups, "groups")
        if self.rank is not None and self.groups != 1:
            raise FusionConfigError(
                f"NDDR(rank={self.rank}, groups={self.groups}): choose rank= or groups=, not both."
            )
        if self.resize is not None:
            if self.rank is not None or self.groups != 1:
                raise FusionConfigError(
                    f"resize={self.resize!r} is only supported by the full NDDR layer; drop "
                    "rank=/groups= or resize=."
                )
            check_resize_mode(self.resize, "resize")
        check_init(self.init, xavier=self.rank is None, kind=self.name)
        check_norm(self.norm)
        check_activation(self.activation)

    @property
    def name(self) -> str:
        """``"NDDR"``, or ``"NDDR(rank=r)"`` / ``"NDDR(groups=g)"`` for the cheaper layers."""
        if self.rank is not None:
            return f"NDDR(rank={self.rank})"
        if self.groups != 1:
            return f"NDDR(groups={self.groups})"
        return "NDDR"

    def _channels(self, level: FusionLevel) -> list[int]:
        channels = [int(c) for c in level.channels]
        if self.groups != 1 and any(c % self.groups for c in channels):
            raise FusionConfigError(
                f"fusion {level.describe()}: grouped NDDR needs every width {channels} divisible "
                f"by groups={self.groups}; choose groups= dividing every width, or other points."
            )
        return channels

    def build(self, level: FusionLevel) -> FusionLayer:
        """The layer of one level: :class:`~nddrify.layers.NDDRLayer`, or the low-rank or
        grouped layer when ``rank=`` or ``groups=`` is set."""
        channels = self._channels(level)
        options = {
            "init": self.init,
            "norm": self.norm,
            "activation": self.activation,
            "nonnegative": level.nonnegative,
            "layouts": level.layouts,
        }
        if self.rank is not None:
            return NDDRLowRankLayer(channels, self.rank, **options)
        if self.groups != 1:
            return NDDRGroupedLayer(channels, self.groups, **options)
        return NDDRLayer(channels, resize=self.resize, **options)

    def num_parameters(self, level: FusionLevel) -> tuple[int, int]:
        """(fusion weights, norm parameters) the layer of ``level`` adds."""
        channels = self._channels(level)
        total = sum(channels)
        norms = sum(norm_params(self.norm, c) for c in channels)
        if self.rank is not None:
            return (len(channels) * total + self.rank * total + self.rank * total, norms)
        if self.groups != 1:
            return (total * total // self.groups, norms)
        return (sum(total * c for c in channels), norms)


@dataclass(frozen=True)
class Shortcut:
    """Options of the NDDR-Shortcut (``nddrify.fuse(shortcut=True)`` uses the defaults).

    It spans the levels (:class:`~nddrify.protocol.SpansLevels`): ``build_across(levels)``
    builds the :class:`~nddrify.layers.NDDRShortcutLayer` over every level's maps.

    Args:
        resize_mode: ``"align_corners_false"`` (default), ``"align_corners_true"`` (one public
            port), or ``"tf_legacy"`` (the official TF1 code); checked when the layer is built
            or priced.
        norm, activation: as for :class:`~nddrify.layers.NDDRLayer`; checked when made.

    Example:
        >>> from nddrify.layers import Shortcut
        >>> from nddrify.plans import FusionLevel, FusionPoint
        >>> levels = [FusionLevel(i, tuple(FusionPoint(t, "p", "p", shape, True) for t in "ab"))
        ...           for i, shape in enumerate([(1, 8, 8, 8), (1, 16, 4, 4)])]
        >>> Shortcut().across_parameters(levels)  # per task (8 + 16) × 16 weights, 2 × 16 norm
        (768, 64)
        >>> [tuple(c.weight.shape) for c in Shortcut().build_across(levels).convs]
        [(16, 24, 1, 1), (16, 24, 1, 1)]
    """

    resize_mode: ResizeMode = "align_corners_false"
    norm: Norm = "batchnorm"
    activation: Activation = "auto"

    def __post_init__(self) -> None:
        check_norm(self.norm)
        check_activation(self.activation)

    def build_across(self, levels: Sequence[FusionLevel]) -> NDDRShortcutLayer | None:
        """The shortcut over these levels (None without levels): the last level's
        ``nonnegative`` flags decide ``activation="auto"``; each level keeps its layout."""
        check_resize_mode(self.resize_mode)
        if not levels:
            return None
        return NDDRShortcutLayer(
            [level.channels for level in levels],
            norm=self.norm,
            activation=self.activation,
            nonnegative=levels[-1].nonnegative,
            resize_mode=self.resize_mode,
            layouts=[level.layouts for level in levels],
        )

    def across_parameters(self, levels: Sequence[FusionLevel]) -> tuple[int, int]:
        """(1×1 weights, norm parameters) the shortcut adds; (0, 0) without levels."""
        check_resize_mode(self.resize_mode)
        if not levels:
            return (0, 0)
        weights = norms = 0
        for task, width in enumerate(levels[-1].channels):
            weights += sum(int(level.channels[task]) for level in levels) * int(width)
            norms += norm_params(self.norm, int(width))
        return weights, norms


def as_shortcut(value: bool | Shortcut | None) -> Shortcut | None:
    """The shortcut options for ``shortcut=`` (``True`` means the defaults), or None.

    Example:
        >>> from nddrify.layers import Shortcut, as_shortcut
        >>> as_shortcut(True) == Shortcut(), as_shortcut(False)
        (True, None)
    """
    if value is True:
        return Shortcut()
    if value is False or value is None:
        return None
    if isinstance(value, Shortcut):
        return value
    raise FusionConfigError(
        f"shortcut={value!r} is not valid; use True, False, or nddrify.Shortcut(resize_mode=...)."
    )
