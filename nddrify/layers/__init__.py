"""The fusion layers and the factories that build them.

* :mod:`~nddrify.layers.base` — :class:`FusionLayer` (base class of every inserted layer), the
  one diagonal init (:func:`block_diagonal`) and its validator (:func:`check_init`), norms,
  activations, :func:`resize_bilinear` and the layout helpers;
* :mod:`~nddrify.layers.nddr` — :class:`NDDRLayer` (Gao et al., CVPR 2019) and
  :class:`NDDRShortcutLayer`, on :class:`PerTaskOutputs` (per-task norms, activations,
  layouts and norm folding);
* :mod:`~nddrify.layers.cheap` — its cheaper :class:`NDDRLowRankLayer` and
  :class:`NDDRGroupedLayer`;
* :mod:`~nddrify.layers.kernels` — their arithmetic: 1×1 convolutions as GEMMs accumulating
  over the tasks, in-place channel mixing, an eval BatchNorm folded into the weights;
* :mod:`~nddrify.layers.factories` — the :class:`NDDR` fusion kind and the :class:`Shortcut`
  (see :mod:`nddrify.protocol`).

The baselines (cross-stitch, sluice) live in :mod:`nddrify.baselines`.

Example:
    >>> import torch
    >>> from nddrify.layers import NDDR
    >>> from nddrify.plans import FusionLevel, FusionPoint
    >>> level = FusionLevel(0, (FusionPoint("a", "p", "p", (1, 8, 4, 4), True),
    ...                         FusionPoint("b", "p", "p", (1, 8, 4, 4), False)))
    >>> layer = NDDR().build(level)
    >>> type(layer).__name__, [type(a).__name__ for a in layer.activations]
    ('NDDRLayer', ['ReLU', 'Identity'])
"""

from __future__ import annotations

from . import base, cheap, factories, nddr
from .base import *  # noqa: F403
from .cheap import *  # noqa: F403
from .factories import *  # noqa: F403
from .nddr import *  # noqa: F403

__all__ = [*base.__all__, *nddr.__all__, *cheap.__all__, *factories.__all__]
