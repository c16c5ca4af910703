"""nddrify: fuse single-task PyTorch models into one NDDR multi-task model.

Data flows one way, each stage a value you can hold: :func:`trace` (a
:class:`~nddrify.tasks.TracedSet`) → :func:`plan` (a serialisable :class:`Plan`) →
:func:`rewrite` (a fused ``torch.fx.GraphModule``); :func:`fuse` does all three in one call.
Everything else lives in its submodule: errors in :mod:`nddrify.errors`, layers in
:mod:`nddrify.layers`, training helpers in :mod:`nddrify.training`, batched execution in
:mod:`nddrify.batching`, the fusion-kind protocol in :mod:`nddrify.protocol`.

The public names (and the submodules, ``nddrify.errors`` …) are imported on first use, so
``import nddrify`` and the ``nddrify`` command's ``--help`` do not pay for torch, torchvision or
networkx until something needs them.

Example:
    >>> import torchvision, nddrify
    >>> traced = nddrify.trace([torchvision.models.vgg16(), torchvision.models.vgg16()])
    >>> plan = nddrify.plan(traced, points="auto")
    >>> plan.overhead.fusion_weights
    2441216
    >>> fused = nddrify.rewrite(traced, plan)
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "fuse",
    "trace",
    "plan",
    "rewrite",
    "share",
    "get_fusion_candidates",
    "NDDR",
    "CrossStitch",
    "Sluice",
    "Shortcut",
    "TraceOptions",
    "Plan",
    "param_groups",
    "save",
    "load",
    "NddrifyError",
]

# public name → the submodule defining it
_HOME = {
    "fuse": "fusion",
    "trace": "tasks",
    "plan": "planning",
    "rewrite": "rewriting",
    "share": "sharing",
    "get_fusion_candidates": "planning",
    "NDDR": "layers",
    "CrossStitch": "baselines",
    "Sluice": "baselines",
    "Shortcut": "layers",
    "TraceOptions": "tracing",
    "Plan": "plans",
    "param_groups": "training",
    "save": "checkpoint",
    "load": "checkpoint",
    "NddrifyError": "errors",
}

if TYPE_CHECKING:
    from .baselines import CrossStitch, Sluice
    from .checkpoint import load, save
    from .errors import NddrifyError
    from .fusion import fuse
    from .layers import NDDR, Shortcut
    from .planning import get_fusion_candidates, plan
    from .plans import Plan
    from .rewriting import rewrite
    from .sharing import share
    from .tasks import trace
    from .tracing import TraceOptions
    from .training import param_groups


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # nddrify.errors, nddrify.layers …
    raise AttributeError(f"module 'nddrify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
