"""The fusion-kind protocol: what ``fuse(fusion=...)`` accepts.

A fusion kind builds one layer per fusion level and says what it costs before anything is built:

* ``name`` — a short display name (``"NDDR"``, ``"CrossStitch"``);
* ``build(level) -> FusionLayer`` — the layer for one :class:`~nddrify.plans.FusionLevel`
  (``level.shapes``, ``level.nonnegative``, ``level.channels_last``, one entry per task); it is
  called with the K feature maps and returns K maps;
* ``num_parameters(level) -> (weights, norm_params)`` — what that layer adds.

One optional hook covers layers that span levels (:class:`SpansLevels`): the NDDR-Shortcut
(:class:`nddrify.Shortcut`) and sluice's layer-stitch implement it; the layer it builds is
called once after the last level with every level's fused maps and replaces the last level's
maps downstream.

Example:
    >>> import torch, torchvision, nddrify
    >>> from nddrify.layers import FusionLayer
    >>> class MeanLayer(FusionLayer):
    ...     def forward(self, *maps):
    ...         mean = torch.stack(maps).mean(dim=0)
    ...         return tuple(mean for _ in maps)
    >>> class Averaging:
    ...     name = "Averaging"
    ...     def build(self, level):
    ...         return MeanLayer()
    ...     def num_parameters(self, level):
    ...         return (0, 0)
    >>> isinstance(Averaging(), FusionKind)
    True
    >>> fused = nddrify.fuse([torchvision.models.vgg11(), torchvision.models.vgg11()],
    ...                      fusion=Averaging(), points=1)
    >>> fused.nddr1
    MeanLayer()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn

from .errors import FusionConfigError

if TYPE_CHECKING:
    from .plans import FusionLevel

__all__ = ["FusionKind", "SpansLevels", "check_fusion_kind", "kind_name", "spanning"]


@runtime_checkable
class FusionKind(Protocol):
    """A fusion kind: builds and prices the layer of each fusion level."""

    name: str

    def build(self, level: FusionLevel) -> nn.Module: ...

    def num_parameters(self, level: FusionLevel) -> tuple[int, int]: ...


@runtime_checkable
class SpansLevels(Protocol):
    """The optional hook for one layer over all levels (shortcut, layer-stitch)."""

    def build_across(self, levels: Sequence[FusionLevel]) -> nn.Module | None: ...

    def across_parameters(self, levels: Sequence[FusionLevel]) -> tuple[int, int]: ...


def check_fusion_kind(fusion: Any) -> FusionKind:
    """``fusion`` if it implements :class:`FusionKind`, else a :class:`FusionConfigError` that
    says what is missing."""
    missing = [
        attr
        for attr in ("name", "build", "num_parameters")
        if not hasattr(fusion, attr) or (attr != "name" and not callable(getattr(fusion, attr)))
    ]
    if missing:
        raise FusionConfigError(
            f"fusion={fusion!r} is not a fusion kind: it lacks {missing}. A fusion kind has a "
            "name, build(level) -> FusionLayer and num_parameters(level) -> (weights, "
            "norm_params); see nddrify.protocol for an example, or use 'nddr', 'cross_stitch', "
            "'sluice', nddrify.NDDR(...)."
        )
    return fusion


def kind_name(fusion: Any) -> str:
    """The display name of a fusion kind."""
    return str(getattr(fusion, "name", type(fusion).__name__))


def spanning(fusion: Any, shortcut: Any) -> SpansLevels | None:
    """The object whose hook builds the layer spanning the levels: the shortcut when one is
    asked for, else the fusion kind when it has the hook (sluice's layer-stitch), else None."""
    if shortcut is not None:
        return shortcut
    return fusion if isinstance(fusion, SpansLevels) else None
