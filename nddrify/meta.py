"""The keys nddrify writes into ``node.meta`` and ``GraphModule.meta``, and the helpers that read
them, in one place.

Node meta (on traced and fused graphs):

* :data:`QUALNAME` — the torchvision-style node name (``"layer1.0.relu"``), written by tracing.
* :data:`LAYOUT` — ``"NCHW"`` or ``"NHWC"`` for image feature maps, ``"NLC"`` for token
  sequences (N × tokens × channels, a transformer's blocks), else ``None``;
  :data:`TOKENS` — on ``"NLC"`` nodes, a :class:`~nddrify.graph_analysis.TokenGrid` (how many
  extra tokens lead the sequence and the patch grid behind them, when known); and
  :data:`NONNEGATIVE` — ``True`` when the value is known to be ≥ 0 (after a ReLU, say); all
  written by :func:`nddrify.graph_analysis.annotate`.
* :data:`MODULE_CALLS` — on the last node a submodule's forward produced: the
  :class:`ModuleCall` records of the submodules (innermost first) whose whole forward is the run
  of nodes ending there; the rewriter turns such a run back into one call.
* :data:`TASK_META_KEY` — on every node a rewriter copied from a task graph: the task's name.
* :data:`SEGMENT_META_KEY` — on those nodes: the index of the fusion level the node runs before
  (0 … number of levels; the last segment runs to the output).
* :data:`JUNCTION_META_KEY` — on the nodes a rewriter inserted between segments (a fusion call,
  the items taken from it, guards): a :class:`JunctionRef` saying which junction.

Module meta (``fused.meta``): :data:`PLAN_META_KEY` (the :class:`~nddrify.Plan`),
:data:`BUILD_META_KEY` (what ``nddrify.save`` stores to rebuild the model), on a batched
model :data:`BATCHED_META_KEY` (its :class:`~nddrify.batching.BatchingReport`), and on the
inference form :data:`INFERENCE_META_KEY` (its :class:`~nddrify.inference.InferenceForm`; such a
model refuses ``.train()``).

Example:
    >>> import torch, torchvision, nddrify
    >>> from nddrify.meta import fused_plan
    >>> fused = nddrify.fuse([torchvision.models.vgg11(), torchvision.models.vgg11()], points=1)
    >>> fused_plan(fused).points("task0")
    ['features.20']
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .errors import FusedModelError

if TYPE_CHECKING:
    from .plans import Plan

__all__ = [
    "QUALNAME",
    "LAYOUT",
    "TOKENS",
    "NONNEGATIVE",
    "MODULE_CALLS",
    "TASK_META_KEY",
    "SEGMENT_META_KEY",
    "JUNCTION_META_KEY",
    "PLAN_META_KEY",
    "BUILD_META_KEY",
    "INFERENCE_META_KEY",
    "BATCHED_META_KEY",
    "ModuleCall",
    "JunctionRef",
    "is_inplace",
    "fused_plan",
]

QUALNAME = "qualname"
LAYOUT = "nddrify_layout"
TOKENS = "nddrify_tokens"
NONNEGATIVE = "nddrify_nonnegative"
MODULE_CALLS = "nddrify_module_calls"
TASK_META_KEY = "nddrify_task"
SEGMENT_META_KEY = "nddrify_segment"
JUNCTION_META_KEY = "nddrify_junction"
PLAN_META_KEY = "nddrify_plan"
BUILD_META_KEY = "nddrify_build"
INFERENCE_META_KEY = "nddrify_inference"  # nddrify.inference.InferenceForm: inference only
BATCHED_META_KEY = "nddrify_batching"


@dataclass(frozen=True, eq=False)
class ModuleCall:
    """One call of a submodule recorded while tracing: the run of ``nodes`` its forward produced
    (in graph order, ``nodes[-1]`` is its result), called with ``args`` / ``kwargs`` (fx
    arguments: nodes of the graph, or constants)."""

    path: str
    nodes: tuple[fx.Node, ...]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    def __repr__(self) -> str:
        return f"ModuleCall({self.path!r}, {len(self.nodes)} nodes → {self.output.name})"


@dataclass(frozen=True)
class JunctionRef:
    """Where a node a rewriter inserted belongs: ``kind`` is ``"fusion"`` (a level's fusion
    layer, its items and guards), ``"across"`` (the layer spanning the levels) or ``"trunk"``;
    ``level`` is the fusion level's index."""

    kind: str
    level: int


_INPLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in [
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "iand",
        "ior",
        "ixor",
        "ilshift",
        "irshift",
    ]
)


def is_inplace(node: fx.Node, called: nn.Module | None = None) -> bool:
    """Whether ``node`` writes into one of its inputs: a module with ``inplace=True`` (``called``
    is the module a ``call_module`` node calls), a function called with ``inplace=True`` or named
    with a trailing underscore (``torch.relu_``), an in-place operator (``x += y``), or a method
    such as ``x.add_(y)``. The one rule every rewriter uses."""
    if node.op == "call_module":
        return bool(getattr(called, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (
            bool(node.kwargs.get("inplace", False))
            or node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.startswith("_"))
        )
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    return False


def fused_plan(fused: nn.Module) -> Plan:
    """The :class:`~nddrify.Plan` a model built by ``fuse`` or ``share`` was built from.

    Raises:
        FusedModelError: ``fused`` was not built by nddrify.
    """
    meta = getattr(fused, "meta", None)
    if (
        not isinstance(fused, fx.GraphModule)
        or not isinstance(meta, dict)
        or PLAN_META_KEY not in meta
    ):
        raise FusedModelError(
            f"expected a model returned by nddrify.fuse (or nddrify.share), got "
            f"{type(fused).__name__} without a plan in .meta[{PLAN_META_KEY!r}]."
        )
    return meta[PLAN_META_KEY]
