"""nddrify: fuse single-task PyTorch models into one NDDR multi-task model.

Data flows one way, each stage a value you can hold: :func:`trace` (a
:class:`~nddrify.tasks.TracedSet`) → :func:`plan` (a serialisable :class:`Plan`) →
:func:`rewrite` (a fused ``torch.fx.GraphModule``); :func:`fuse` does all three in one call.
Everything else lives in its submodule: errors in :mod:`nddrify.errors`, layers in
:mod:`nddrify.layers`, training helpers in :mod:`nddrify.training`, batched execution in
:mod:`nddrify.batching`, the fusion-kind protocol in :mod:`nddrify.protocol`.

Example:
    >>> import torchvision, nddrify
    >>> traced = nddrify.trace([torchvision.models.vgg16(), torchvision.models.vgg16()])
    >>> plan = nddrify.plan(traced, points="auto")
    >>> plan.overhead.fusion_weights
    2441216
    >>> fused = nddrify.rewrite(traced, plan)
"""

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
