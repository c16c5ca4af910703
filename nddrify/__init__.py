"""nddrify: fuse single-task PyTorch models into one NDDR multi-task model.

Data flows one way: :mod:`~nddrify.tracing` → :mod:`~nddrify.planning` → :mod:`~nddrify.rewriting`,
with the fusion layers in :mod:`~nddrify.layers`.

Example:
    >>> import torchvision, nddrify
    >>> fused = nddrify.fuse(models=[torchvision.models.vgg16(), torchvision.models.vgg16()])
    >>> nddrify.overhead(fused).fusion_weights
    2441216
"""

from .baselines import CrossStitch, Sluice
from .batching import BatchedFusedModel, BatchingError, BatchingReport, batch_tasks, batching_report
from .checkpoint import CheckpointError, load, save
from .errors import (
    FusionConfigError,
    ModelsError,
    NddrifyError,
    PointError,
    ShapeMismatchError,
    SpecError,
    TraceError,
)
from .fusion import fuse
from .layers import NDDR, NDDRLayer, NDDRShortcutLayer, Shortcut
from .planning import (
    Candidate,
    FusionLevel,
    FusionPoint,
    Overhead,
    Plan,
    get_fusion_candidates,
    plan,
)
from .rewriting import FusedGraphModule
from .sharing import share
from .specs import load_spec
from .tracing import TracedModel, default_example_input, trace_model
from .training import overhead, param_groups, task_state_dict

__version__ = "0.1.0"

__all__ = [
    "fuse",
    "share",
    "batch_tasks",
    "batching_report",
    "plan",
    "get_fusion_candidates",
    "param_groups",
    "overhead",
    "task_state_dict",
    "save",
    "load",
    "load_spec",
    "trace_model",
    "default_example_input",
    "NDDR",
    "CrossStitch",
    "Sluice",
    "Shortcut",
    "NDDRLayer",
    "NDDRShortcutLayer",
    "Plan",
    "FusedGraphModule",
    "BatchedFusedModel",
    "BatchingReport",
    "FusionLevel",
    "FusionPoint",
    "Candidate",
    "Overhead",
    "TracedModel",
    "NddrifyError",
    "ModelsError",
    "TraceError",
    "PointError",
    "ShapeMismatchError",
    "FusionConfigError",
    "SpecError",
    "CheckpointError",
    "BatchingError",
]
