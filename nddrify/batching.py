"""Batched execution: run the K tasks of a fused model as one computation.

A fused model runs its K task graphs one after another, so at batch size 1 every layer is K small
kernels. When the tasks share an architecture, :func:`batch_tasks` rewrites the fused graph so
that each layer runs **once for all tasks**: the K tasks' feature maps are kept side by side along
the channel axis (the *task-stacked* layout, ``N × K·C × H × W``; task k owns channels
``k·C … (k+1)·C − 1``), every convolution becomes one grouped convolution with the K weights
stacked (``groups = K·g``), every batch norm one batch norm over ``K·C`` channels, every linear
layer one batched matmul, and channel-independent operations (activations, pools, residual adds,
flatten, resize) run unchanged on the stacked tensor. An NDDR layer is then a single 1×1
convolution: the concatenation of the tasks' maps *is* the stacked tensor.

The decision is taken per operation, by comparing the K tasks' nodes at the same position of each
segment (the stretch of a task's graph between two fusion levels): an operation is batched when
the K nodes have the same module type, hyper-parameters, parameter shapes and input/output shapes,
and a batched form exists; otherwise it runs per task on views of the stacked tensor. So two
models that differ only in their last layer (40 segmentation classes vs 3 normal channels) run
everything batched except that layer. :func:`batching_report` says what runs how, and why.

The batched model is a snapshot: it copies the fused model's weights when it is built. It trains
like any module (gradients, batch-norm running statistics, dropout with independent masks per
task); :meth:`BatchedFusedModel.sync` writes its weights back into the fused model, and
:meth:`BatchedFusedModel.fused_state_dict` gives them under the fused model's keys.

Where it pays: on a GPU at small batch sizes, where K small kernels cost K launches and leave the
device idle, the batched model launches one (``torch.compile(batched, mode="reduce-overhead")``
adds CUDA graphs). On a CPU the work is compute-bound and the same either way: expect the fused
model's latency (measured 0.94–1.0× at batch 1 on 2 × VGG-16 and 2 × ResNet-50 at 224², 1.1–1.2×
faster on small mobile networks, where fewer Python calls matter).

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.batching import batch_tasks
    >>> def cnn(classes):
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                          nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
    ...                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))
    >>> fused = nddrify.fuse({"seg": cnn(40), "normal": cnn(3)}, points=["2"]).eval()
    >>> batched = batch_tasks(fused)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> expected, out = fused(x), batched(x)
    >>> all(bool((out[t] - expected[t]).abs().max() < 1e-5) for t in ("seg", "normal"))
    True
    >>> print(batched.report)
    BatchingReport(2 tasks: seg, normal; 8 of 9 operations batched, 1 of 1 fusion layers)
      stage 0  x → nddr1           3/3 batched
      nddr1    batched
      stage 1  nddr1 → output      5/6 batched; per task: 8 (Linear: out_features 40 in seg vs 3 in normal)
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.utils import skip_init
from torch.utils import _pytree as pytree
from torchvision.ops import SqueezeExcitation, StochasticDepth

from .baselines import CrossStitchLayer
from .errors import NddrifyError
from .layers import FusionLayer, NDDRLayer, NDDRShortcutLayer, resize_bilinear
from .rewriting import PLAN_META_KEY, TASK_META_KEY, FusedGraphModule
from .tracing import QUALNAME

__all__ = [
    "batch_tasks",
    "batching_report",
    "BatchedFusedModel",
    "BatchingReport",
    "StageReport",
    "PerTaskOperation",
    "FusionReport",
    "BatchingError",
    "TaskBatchedConv1d",
    "TaskBatchedConv2d",
    "TaskBatchedConv3d",
    "TaskBatchedConvTranspose1d",
    "TaskBatchedConvTranspose2d",
    "TaskBatchedConvTranspose3d",
    "TaskBatchedBatchNorm1d",
    "TaskBatchedBatchNorm2d",
    "TaskBatchedBatchNorm3d",
    "TaskBatchedBatchNormAct2d",
    "TaskBatchedLinear",
    "TaskBatchedNDDR",
    "TaskBatchedCrossStitch",
    "TaskBatchedShortcut",
    "cat_task_channels",
    "BATCHED_META_KEY",
    "CONV_MODES",
]

#: ``batched.meta`` key holding the :class:`BatchingReport`.
BATCHED_META_KEY = "nddrify_batching"
#: How a batched convolution runs: ``"grouped"`` (one grouped convolution), ``"split"`` (one
#: convolution per task on views of the stacked input, outputs concatenated), ``"auto"`` (grouped
#: on CUDA; on a CPU grouped for maps of 14×14 and more, split for smaller ones).
CONV_MODES = ("auto", "grouped", "split")

_CLASS_NAME = "NDDRBatchedModel"
_WIDE_ROOT = "batched"  # where the task-batched modules live: batched.<path in the task model>


class BatchingError(NddrifyError, ValueError):
    """``batch_tasks`` got something it cannot batch (not a fused model, a bad option), or
    ``sync`` got a model whose weights do not match."""


# ----------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class PerTaskOperation:
    """An operation that runs once per task, and why.

    ``differs`` is True when the tasks' nodes differ (module hyper-parameters, shapes, structure)
    and False when they are identical but have no batched form.
    """

    node: str
    reason: str
    differs: bool

    def __str__(self) -> str:
        return f"{self.node} ({self.reason})"


@dataclass(frozen=True)
class StageReport:
    """One segment of the task graphs: from ``start`` (``x`` or a fusion layer) to ``end``.

    Attributes:
        operations: node positions in the segment (the K tasks' nodes at one position count
            once; where the task graphs diverge, the longest remainder counts).
        batched: how many of them run once for all tasks.
        per_task: the others, each with its reason.
    """

    index: int
    start: str
    end: str
    operations: int
    batched: int
    per_task: tuple[PerTaskOperation, ...]

    @property
    def identical(self) -> bool:
        """Whether the K tasks' segments are identical in structure, modules and shapes."""
        return not any(op.differs for op in self.per_task)

    def __str__(self) -> str:
        where = f"{self.start} → {self.end}"
        text = f"  stage {self.index:<2} {where:<19} {self.batched}/{self.operations} batched"
        if self.per_task:
            shown = "; ".join(str(op) for op in self.per_task[:3])
            more = f"; … {len(self.per_task) - 3} more" if len(self.per_task) > 3 else ""
            text += f"; per task: {shown}{more}"
        return text


@dataclass(frozen=True)
class FusionReport:
    """A fusion layer: batched (one call on the stacked maps) or called with the K maps."""

    name: str
    batched: bool
    reason: str = ""
    after_stage: int = -1

    def __str__(self) -> str:
        return f"  {self.name:<8} " + ("batched" if self.batched else f"per task: {self.reason}")


@dataclass(frozen=True)
class BatchingReport:
    """What :func:`batch_tasks` runs batched and what per task, segment by segment.

    ``print(report)`` gives one line per segment and fusion layer; ``batched_operations`` /
    ``operations`` count task-graph nodes (task 0's), ``batchable`` says whether anything runs
    batched at all.
    """

    tasks: tuple[str, ...]
    stages: tuple[StageReport, ...]
    fusions: tuple[FusionReport, ...]

    @property
    def operations(self) -> int:
        return sum(s.operations for s in self.stages)

    @property
    def batched_operations(self) -> int:
        return sum(s.batched for s in self.stages)

    @property
    def batchable(self) -> bool:
        return self.batched_operations > 0 or any(f.batched for f in self.fusions)

    def __str__(self) -> str:
        fused = sum(f.batched for f in self.fusions)
        lines = [
            f"BatchingReport({len(self.tasks)} tasks: {', '.join(self.tasks)}; "
            f"{self.batched_operations} of {self.operations} operations batched, "
            f"{fused} of {len(self.fusions)} fusion layers)"
        ]
        if not self.batchable:
            lines.append("  nothing runs batched: the tasks share no identical operation")
        lines += [str(f) for f in self.fusions if f.after_stage < 0]
        for stage in self.stages:
            lines.append(str(stage))
            lines += [str(f) for f in self.fusions if f.after_stage == stage.index]
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------------------------
# Task-batched modules


class _TaskBatched:
    """Mixin of the modules that hold K tasks' weights stacked: ``sources`` are the fused-model
    paths they came from (one per task); ``task_state(k)`` is task k's state under its keys."""

    sources: tuple[str, ...]

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _stacked(tensors: Sequence[torch.Tensor | None], dim: int = 0) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return torch.cat([t.detach() for t in tensors], dim=dim)  # type: ignore[union-attr]


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor | None, like: Any) -> None:
    if value is None:
        module.register_parameter(name, None)
    else:
        module.register_parameter(name, nn.Parameter(value, requires_grad=like.requires_grad))


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _TaskBatchedConv(_TaskBatched):
    """K convolutions of one configuration as one grouped convolution (``groups = K·g``) over the
    task-stacked input; ``forward(x, shared_input=True)`` takes an input all tasks share (the
    image) and, for ``g = 1``, runs one convolution with K·C_out output channels."""

    num_tasks: int
    task_groups: int
    conv_mode: str
    _spatial: int

    def _setup(self, convs: Sequence[nn.Module], sources: Sequence[str], conv_mode: str) -> None:
        first = convs[0]
        self.num_tasks = len(convs)
        self.task_groups = first.groups
        self.conv_mode = conv_mode
        self.sources = tuple(sources)
        _set_parameter(self, "weight", _stacked([c.weight for c in convs]), first.weight)
        _set_parameter(self, "bias", _stacked([c.bias for c in convs]), first.bias)

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias: Any, groups: int) -> torch.Tensor:
        if self.transposed:
            function = _CONV_TRANSPOSE_FUNCTIONS[self._spatial]
            return function(
                x, weight, bias, self.stride, self.padding, self.output_padding, groups,
                self.dilation,
            )  # fmt: skip
        function = _CONV_FUNCTIONS[self._spatial]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return function(x, weight, bias, self.stride, 0, self.dilation, groups)
        return function(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        k = self.num_tasks
        if self.conv_mode == "split" or (self.conv_mode == "auto" and _split_on(x)):
            inputs = [x] * k if shared_input else x.chunk(k, dim=1)
            biases = [None] * k if self.bias is None else self.bias.chunk(k)
            outputs = [
                self._run(x_t, w_t, b_t, self.task_groups)
                for x_t, w_t, b_t in zip(inputs, self.weight.chunk(k), biases)
            ]
            return torch.cat(outputs, dim=1)
        if shared_input:
            if self.task_groups == 1 and not self.transposed:
                return self._run(x, self.weight, self.bias, 1)
            x = torch.cat([x] * k, dim=1)
        return self._run(x, self.weight, self.bias, self.groups)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight.chunk(self.num_tasks)[task]}
        if self.bias is not None:
            state["bias"] = self.bias.chunk(self.num_tasks)[task]
        return state

    def extra_repr(self) -> str:
        k = self.num_tasks
        per_task = {
            **self.__dict__,
            "bias": self.bias,
            "in_channels": self.in_channels // k,  # type: ignore[attr-defined]
            "out_channels": self.out_channels // k,  # type: ignore[attr-defined]
            "groups": self.task_groups,
        }
        text = nn.modules.conv._ConvNd.extra_repr(SimpleNamespace(**per_task))  # type: ignore[arg-type]
        mode = "" if self.conv_mode == "auto" else f", conv_mode={self.conv_mode!r}"
        return f"{k} tasks × {text}{mode}"


#: below this many output positions per map, "auto" runs a CPU convolution per task: there, CPU
#: grouped kernels were up to 4× slower than K plain ones (3×3 on 1×1 maps), while above it they
#: match and splitting costs a copy of the outputs (VGG-16's first layers: ~7% of its latency)
_SPLIT_BELOW = 14 * 14


def _split_on(x: torch.Tensor) -> bool:
    return x.device.type != "cuda" and math.prod(x.shape[2:]) < _SPLIT_BELOW


def _conv_class(base: type[nn.Module], spatial: int, doc: str) -> type[nn.Module]:
    def __init__(self, convs: Sequence[nn.Module], sources: Sequence[str], conv_mode: str = "auto"):
        first = convs[0]
        k = len(convs)
        options = {
            "stride": first.stride,
            "padding": first.padding,
            "dilation": first.dilation,
            "groups": first.groups * k,
            "bias": first.bias is not None,
            "padding_mode": first.padding_mode,
            "device": "meta",
            "dtype": first.weight.dtype,
        }
        if first.transposed:
            options["output_padding"] = first.output_padding
        base.__init__(  # meta device: the stacked weights below replace the initial ones
            self, first.in_channels * k, first.out_channels * k, first.kernel_size, **options
        )
        self._spatial = spatial
        self._setup(convs, sources, conv_mode)

    return type(
        f"TaskBatched{base.__name__}",
        (_TaskBatchedConv, base),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__},
    )


_CONV_DOC = "K tasks' {name} layers as one grouped {name} over the task-stacked channels."
TaskBatchedConv1d = _conv_class(nn.Conv1d, 1, _CONV_DOC.format(name="Conv1d"))
TaskBatchedConv2d = _conv_class(nn.Conv2d, 2, _CONV_DOC.format(name="Conv2d"))
TaskBatchedConv3d = _conv_class(nn.Conv3d, 3, _CONV_DOC.format(name="Conv3d"))
TaskBatchedConvTranspose1d = _conv_class(
    nn.ConvTranspose1d, 1, _CONV_DOC.format(name="ConvTranspose1d")
)
TaskBatchedConvTranspose2d = _conv_class(
    nn.ConvTranspose2d, 2, _CONV_DOC.format(name="ConvTranspose2d")
)
TaskBatchedConvTranspose3d = _conv_class(
    nn.ConvTranspose3d, 3, _CONV_DOC.format(name="ConvTranspose3d")
)
_CONVS: dict[type, type] = {
    nn.Conv1d: TaskBatchedConv1d,
    nn.Conv2d: TaskBatchedConv2d,
    nn.Conv3d: TaskBatchedConv3d,
    nn.ConvTranspose1d: TaskBatchedConvTranspose1d,
    nn.ConvTranspose2d: TaskBatchedConvTranspose2d,
    nn.ConvTranspose3d: TaskBatchedConvTranspose3d,
}


class _TaskBatchedNorm(_TaskBatched):
    """K batch norms of one configuration as one batch norm over K·C channels."""

    num_tasks: int
    _initial_counts: tuple[int, ...]

    def _setup(self, norms: Sequence[nn.Module], sources: Sequence[str]) -> None:
        first = norms[0]
        self.num_tasks = len(norms)
        self.sources = tuple(sources)
        if first.affine:
            _set_parameter(self, "weight", _stacked([n.weight for n in norms]), first.weight)
            _set_parameter(self, "bias", _stacked([n.bias for n in norms]), first.bias)
        if first.track_running_stats:
            self.running_mean = _stacked([n.running_mean for n in norms])
            self.running_var = _stacked([n.running_var for n in norms])
            self.num_batches_tracked = first.num_batches_tracked.detach().clone()
            # each task keeps its own count: sync adds the batches seen here to it
            self._initial_counts = tuple(int(n.num_batches_tracked) for n in norms)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        k = self.num_tasks
        state = {}
        if self.affine:
            state["weight"] = self.weight.chunk(k)[task]
            state["bias"] = self.bias.chunk(k)[task]
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.chunk(k)[task]
            state["running_var"] = self.running_var.chunk(k)[task]
            seen = self.num_batches_tracked - self._initial_counts[0]
            state["num_batches_tracked"] = seen + self._initial_counts[task]
        return state

    def extra_repr(self) -> str:
        per_task = {
            **self.__dict__,
            "bias": self.bias,
            "num_features": self.num_features // self.num_tasks,  # type: ignore[attr-defined]
        }
        text = nn.modules.batchnorm._NormBase.extra_repr(SimpleNamespace(**per_task))  # type: ignore[arg-type]
        return f"{self.num_tasks} tasks × {text}"


def _norm_class(base: type[nn.Module], doc: str) -> type[nn.Module]:
    def __init__(self, norms: Sequence[nn.Module], sources: Sequence[str]):
        first = norms[0]
        base.__init__(
            self,
            first.num_features * len(norms),
            eps=first.eps,
            momentum=first.momentum,
            affine=first.affine,
            track_running_stats=first.track_running_stats,
            device="meta",
            dtype=next(iter([*first.parameters(), *first.buffers()])).dtype,
        )
        self._setup(norms, sources)

    return type(
        f"TaskBatched{base.__name__}",
        (_TaskBatchedNorm, base),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__},
    )


_NORM_DOC = "K tasks' {name} layers as one {name} over the task-stacked channels."
TaskBatchedBatchNorm1d = _norm_class(nn.BatchNorm1d, _NORM_DOC.format(name="BatchNorm1d"))
TaskBatchedBatchNorm2d = _norm_class(nn.BatchNorm2d, _NORM_DOC.format(name="BatchNorm2d"))
TaskBatchedBatchNorm3d = _norm_class(nn.BatchNorm3d, _NORM_DOC.format(name="BatchNorm3d"))
_NORMS: dict[type, type] = {
    nn.BatchNorm1d: TaskBatchedBatchNorm1d,
    nn.BatchNorm2d: TaskBatchedBatchNorm2d,
    nn.BatchNorm3d: TaskBatchedBatchNorm3d,
}


class TaskBatchedBatchNormAct2d(_TaskBatchedNorm, nn.BatchNorm2d):
    """K tasks' timm ``BatchNormAct2d`` layers (batch norm, drop, activation) as one batch norm
    over the task-stacked channels, then the (batched) drop and activation."""

    def __init__(self, norms: Sequence[nn.Module], sources: Sequence[str], conv_mode: str) -> None:
        first = norms[0]
        nn.BatchNorm2d.__init__(
            self,
            first.num_features * len(norms),
            eps=first.eps,
            momentum=first.momentum,
            affine=first.affine,
            track_running_stats=first.track_running_stats,
            device="meta",
            dtype=next(iter([*first.parameters(), *first.buffers()])).dtype,
        )
        self._setup(norms, sources)
        for name in ("drop", "act"):
            children = [norm._modules[name] for norm in norms]
            child_sources = [f"{source}.{name}" for source in sources]
            self.add_module(name, _wide_module(children, child_sources, conv_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _is_timm_norm_act(kind: type) -> bool:
    return kind.__name__ == "BatchNormAct2d" and kind.__module__.startswith("timm.")


class TaskBatchedLinear(_TaskBatched, nn.Linear):
    """K linear layers of one shape as one batched matmul: weight K × out × in, bias K × out.

    The input is task-stacked along dim 1 (``N × K·F`` for per-task ``N × F``, or
    ``N × K·L × F`` for per-task ``N × L × F``); so is the output.
    """

    def __init__(self, linears: Sequence[nn.Linear], sources: Sequence[str]) -> None:
        first = linears[0]
        super().__init__(
            first.in_features, first.out_features, first.bias is not None, device="meta"
        )
        self.num_tasks = len(linears)
        self.sources = tuple(sources)
        _set_parameter(
            self, "weight", torch.stack([m.weight.detach() for m in linears]), first.weight
        )
        bias = None if first.bias is None else torch.stack([m.bias.detach() for m in linears])
        _set_parameter(self, "bias", bias, first.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = x.unflatten(1, (self.num_tasks, -1))  # N × K × … × F
        out = torch.einsum("nk...f,kof->nk...o", tasks, self.weight)
        if self.bias is not None:
            out = out + self.bias.view(self.num_tasks, *([1] * (tasks.dim() - 3)), -1)
        return out.flatten(1, 2)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight[task]}
        if self.bias is not None:
            state["bias"] = self.bias[task]
        return state

    def extra_repr(self) -> str:
        return f"{self.num_tasks} tasks × {super().extra_repr()}"


class TaskBatchedNDDR(_TaskBatched, FusionLayer):
    """An :class:`~nddrify.NDDRLayer` on task-stacked maps: its K per-task 1×1 convolutions over
    the concatenated maps are one K·C → K·C convolution (the stacked tensor *is* the
    concatenation), then one norm over K·C channels and the activation."""

    def __init__(self, layer: NDDRLayer, source: str) -> None:
        super().__init__()
        k = len(layer.in_channels)
        self.num_tasks = k
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        weight = torch.cat([conv.weight.detach() for conv in layer.convs])
        self.conv = skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], 1, bias=False)
        self.conv.weight = nn.Parameter(weight, requires_grad=layer.convs[0].weight.requires_grad)
        self.norm = _stacked_norm(layer.norms, source)
        self.activation = copy.deepcopy(layer.activations[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        # the norm is a task-batched module of its own, with its own sources
        weights = self.conv.weight.chunk(self.num_tasks)
        return {f"convs.{i}.weight": weight for i, weight in enumerate(weights)}


class TaskBatchedCrossStitch(_TaskBatched, FusionLayer):
    """A :class:`~nddrify.baselines.CrossStitchLayer` on task-stacked maps:
    ``out_i = Σ_j a_ij · x_j`` as one einsum."""

    def __init__(self, layer: CrossStitchLayer, source: str) -> None:
        super().__init__()
        self.num_tasks = layer.weight.shape[0]
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        self.weight = nn.Parameter(
            layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = x.unflatten(1, (self.num_tasks, -1))  # N × K × C × …
        if self.weight.dim() == 2:
            mixed = torch.einsum("ij,nj...->ni...", self.weight, tasks)
        else:
            mixed = torch.einsum("ijc,njc...->nic...", self.weight, tasks)
        return mixed.flatten(1, 2)

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}


class TaskBatchedShortcut(_TaskBatched, FusionLayer):
    """An :class:`~nddrify.NDDRShortcutLayer` on task-stacked maps: every level resized at once,
    concatenated per task, and the K per-task 1×1 reductions as one grouped convolution."""

    def __init__(self, layer: NDDRShortcutLayer, source: str) -> None:
        super().__init__()
        k = len(layer.convs)
        self.num_tasks = k
        self.lr_mult = layer.lr_mult
        self.sources = (source,)
        self.resize_mode = layer.resize_mode
        weight = torch.cat([conv.weight.detach() for conv in layer.convs])
        self.conv = skip_init(
            nn.Conv2d, k * weight.shape[1], weight.shape[0], 1, groups=k, bias=False
        )
        self.conv.weight = nn.Parameter(weight, requires_grad=layer.convs[0].weight.requires_grad)
        self.norm = _stacked_norm(layer.norms, source)
        self.activation = copy.deepcopy(layer.activations[0])

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        size = levels[-1].shape[-2:]
        resized = [resize_bilinear(level, size, self.resize_mode) for level in levels]
        return self.activation(self.norm(self.conv(cat_task_channels(resized, self.num_tasks))))

    def task_state(self, task: int) -> dict[str, torch.Tensor]:
        weights = self.conv.weight.chunk(self.num_tasks)
        return {f"convs.{i}.weight": weight for i, weight in enumerate(weights)}


def _stacked_norm(norms: Sequence[nn.Module], source: str) -> nn.Module:
    if type(norms[0]) is nn.Identity:
        return nn.Identity()
    return TaskBatchedBatchNorm2d(norms, [f"{source}.norms.{i}" for i in range(len(norms))])


def cat_task_channels(tensors: Sequence[torch.Tensor], num_tasks: int) -> torch.Tensor:
    """``torch.cat(dim=1)`` of task-stacked tensors: each task's channels stay together.

    Example:
        >>> import torch
        >>> a = torch.tensor([[1, 2]]); b = torch.tensor([[3, 4, 5, 6]])  # two tasks each
        >>> cat_task_channels([a, b], 2).tolist()
        [[1, 3, 4, 2, 5, 6]]
    """
    return torch.cat([t.unflatten(1, (num_tasks, -1)) for t in tensors], dim=2).flatten(1, 2)


_FUSIONS: dict[type, type] = {
    NDDRLayer: TaskBatchedNDDR,
    CrossStitchLayer: TaskBatchedCrossStitch,
    NDDRShortcutLayer: TaskBatchedShortcut,
}

# ----------------------------------------------------------------------------------------------
# Which operations have a batched form


def _words(text: str) -> set[str]:
    return set(text.split())


def _named(owner: Any, names: str) -> tuple[Any, ...]:
    return tuple(getattr(owner, name) for name in _words(names))


_ELEMENTWISE_MODULES = _named(
    nn,
    "ReLU ReLU6 LeakyReLU ELU CELU SELU GELU SiLU Mish Sigmoid Tanh Hardswish Hardsigmoid "
    "Hardtanh Softplus Identity Dropout AlphaDropout",
)
#: parameter-free modules acting on the trailing (spatial) dims of an N × C × spatial input
_SPATIAL_MODULES: dict[type, int] = {
    module: dims
    for dims in (1, 2, 3)
    for module in _named(
        nn,
        f"MaxPool{dims}d AvgPool{dims}d AdaptiveAvgPool{dims}d AdaptiveMaxPool{dims}d "
        f"Dropout{dims}d ZeroPad{dims}d ConstantPad{dims}d ReflectionPad{dims}d "
        f"ReplicationPad{dims}d",
    )
}
_SPATIAL_MODULES.update({nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2})
_SPATIAL_ANY = (nn.Upsample,)  # any N × C × spatial input
_EVAL_IDENTITY = (StochasticDepth,)  # random per sample in training, the identity in eval

_ELEMENTWISE_FUNCTIONS = {
    *_named(
        F,
        "relu relu_ relu6 gelu silu mish hardswish hardsigmoid hardtanh leaky_relu elu celu "
        "selu softplus sigmoid tanh dropout",
    ),
    *_named(torch, "relu relu_ sigmoid tanh abs neg add sub mul div"),
    *_named(operator, "neg add sub mul truediv"),
}
_SPATIAL_FUNCTIONS = set(
    _named(
        F,
        "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
        "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
        "adaptive_max_pool3d interpolate dropout1d dropout2d dropout3d",
    )
)
_MAX_POOLS = set(_named(F, "max_pool1d max_pool2d max_pool3d"))
_ELEMENTWISE_METHODS = _words(
    "relu relu_ sigmoid sigmoid_ tanh tanh_ add add_ sub sub_ mul mul_ div div_ neg abs "
    "contiguous clone"
)
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_SIZE_METHODS = {"size", "dim"}
_SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_RANDOM = (nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RANDOM_FUNCTIONS = set(_named(F, "dropout dropout1d dropout2d dropout3d alpha_dropout"))
#: functions of plain Python values (sizes, indices) that are safe to compute once for all tasks
_PLAIN_FUNCTIONS = {
    *_named(operator, "getitem add sub mul floordiv truediv mod neg"),
    *_named(builtins, "getattr len int"),
}


def _tensor_meta(node: Any) -> TensorMetadata | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMetadata) else None


def _meta_signature(value: Any) -> Any:
    if isinstance(value, TensorMetadata):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_meta_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _meta_signature(v)) for k, v in value.items())
    return None


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace", False)) or (
            name.endswith("_") and not name.startswith("_")
        )
    return (
        node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
    )


def _normal_dims(dims: Any, ndim: int) -> list[int] | None:
    values = (
        [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
    )
    if values is None or not all(isinstance(d, int) for d in values):
        return None
    return [d % ndim for d in values]


def _broadcasts(shape: Sequence[int], out: Sequence[int]) -> bool:
    """Whether an operand of ``shape`` broadcasts to ``out`` without mixing tasks: same rank and
    channel count; other dims equal or 1 (a squeeze-excitation scale N × C × 1 × 1)."""
    if len(shape) != len(out) or shape[1] != out[1]:
        return False
    return all(a in (1, b) for i, (a, b) in enumerate(zip(shape, out)) if i != 1)


def _is_container(module: nn.Module) -> bool:
    """Whether ``module`` only calls its children, so that its batched form is its own forward
    with batched children: a plain ``nn.Sequential`` (or a subclass keeping its forward, such as
    torchvision's Conv2dNormActivation) or torchvision's SqueezeExcitation."""
    if module._parameters or module._buffers:
        return False
    kind = type(module)
    return kind is SqueezeExcitation or (
        isinstance(module, nn.Sequential) and kind.forward is nn.Sequential.forward
    )


def _module_kind(module: nn.Module, ndim: int) -> str | None:
    """How ``module`` runs batched on an input of ``ndim`` dims: "module" (a batched module with
    the K tasks' weights), "asis" (itself, on the stacked tensor), or None."""
    kind = type(module)
    if kind in _CONVS:
        return "module" if ndim == module.weight.dim() else None
    if kind in _NORMS:
        return "module" if module.momentum is not None else None
    if _is_timm_norm_act(kind):
        children = (module._modules.get("drop"), module._modules.get("act"))
        batchable = all(c is not None and _module_kind(c, ndim) for c in children)
        return "module" if ndim == 4 and module.momentum is not None and batchable else None
    if kind is nn.Linear:
        return "module"
    if kind in _ELEMENTWISE_MODULES or (kind in _EVAL_IDENTITY and not module.training):
        return "asis"
    if kind in _SPATIAL_MODULES or kind in _SPATIAL_ANY:
        if getattr(module, "return_indices", False) or ndim < 3:
            return None
        return "asis" if kind in _SPATIAL_ANY or ndim == _SPATIAL_MODULES[kind] + 2 else None
    if kind is nn.Flatten:
        return (
            "asis" if module.start_dim % ndim >= 1 and module.end_dim % ndim == ndim - 1 else None
        )
    if kind is SqueezeExcitation and ndim == 4 and _is_container(module):
        children = [
            module.avgpool,
            module.fc1,
            module.activation,
            module.fc2,
            module.scale_activation,
        ]
        return "module" if all(_module_kind(child, 4) for child in children) else None
    if isinstance(module, nn.Sequential) and _is_container(module):
        for child in module:
            if _module_kind(child, ndim) is None:
                return None
            if type(child) is nn.Flatten:
                ndim = child.start_dim % ndim + 1
        return "module" if _has_state(module) else "asis"
    return None


def _wide_module(modules: Sequence[nn.Module], sources: Sequence[str], conv_mode: str) -> nn.Module:
    """The batched form of K identical modules (``_module_kind`` said it has one)."""
    kind = type(modules[0])
    if kind in _CONVS:
        wide: nn.Module = _CONVS[kind](modules, sources, conv_mode)
    elif kind in _NORMS:
        wide = _NORMS[kind](modules, sources)
    elif _is_timm_norm_act(kind):
        wide = TaskBatchedBatchNormAct2d(modules, sources, conv_mode)
    elif kind is nn.Linear:
        wide = TaskBatchedLinear(modules, sources)
    elif _has_state(modules[0]):  # a container: its forward, with batched children
        wide = copy.copy(modules[0])
        wide.__dict__ = {  # its own bookkeeping dicts (hooks, ...), not the fused module's
            key: copy.copy(value) if isinstance(value, dict) else value
            for key, value in modules[0].__dict__.items()
        }
        wide._modules = {
            name: _wide_module(
                [m._modules[name] for m in modules], [f"{s}.{name}" for s in sources], conv_mode
            )
            for name in modules[0]._modules
        }
    else:
        wide = copy.deepcopy(modules[0])
    return wide.train(modules[0].training)


# Module state that is not configuration (nn.Module's own bookkeeping).
_MACHINERY = _words(
    "_parameters _buffers _modules _non_persistent_buffers_set training _backward_pre_hooks "
    "_backward_hooks _is_full_backward_hook _forward_hooks _forward_hooks_with_kwargs "
    "_forward_hooks_always_called _forward_pre_hooks _forward_pre_hooks_with_kwargs "
    "_state_dict_hooks _state_dict_pre_hooks _load_state_dict_pre_hooks "
    "_load_state_dict_post_hooks _compiled_call_impl _initial_counts"
)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # objects whose == raises or is not a bool
        return a is b


def _shape_text(tensor: torch.Tensor | None) -> str:
    return "none" if tensor is None else "×".join(map(str, tensor.shape)) or "scalar"


def _module_difference(a: nn.Module, b: nn.Module, task_a: str, task_b: str) -> str | None:
    """Why two modules cannot share one batched form, or None when they match (type, flags,
    hyper-parameters, parameter and buffer shapes, submodules)."""
    if type(a) is not type(b):
        return f"{type(a).__name__} in {task_a} vs {type(b).__name__} in {task_b}"
    if a.training != b.training:
        return f"train/eval flag {a.training} in {task_a} vs {b.training} in {task_b}"
    for hooks in _HOOKS:
        if getattr(a, hooks, None) or getattr(b, hooks, None):
            return "has hooks"
    keys = (set(a.__dict__) | set(b.__dict__)) - _MACHINERY
    for key in sorted(keys, key=lambda name: (name.startswith("_"), name)):
        va, vb = a.__dict__.get(key), b.__dict__.get(key)
        if not _same(va, vb):
            if isinstance(va, torch.Tensor):
                return f"tensor attribute {key} differs between {task_a} and {task_b}"
            return f"{key} {va!r} in {task_a} vs {vb!r} in {task_b}"
    for kind in ("_parameters", "_buffers"):
        ta, tb = getattr(a, kind), getattr(b, kind)
        for name in sorted(set(ta) | set(tb)):
            x, y = ta.get(name), tb.get(name)
            if (x is None) != (y is None) or (
                x is not None and (x.shape != y.shape or x.dtype != y.dtype)
            ):
                return f"{name} shape {_shape_text(x)} in {task_a} vs {_shape_text(y)} in {task_b}"
            if x is not None and x.requires_grad != y.requires_grad:
                return f"{name}.requires_grad differs between {task_a} and {task_b}"
    if set(a._modules) != set(b._modules):
        return f"submodules differ between {task_a} and {task_b}"
    for name, child in a._modules.items():
        other = b._modules[name]
        if (child is None) != (other is None):
            return f"submodule {name} differs between {task_a} and {task_b}"
        if child is not None:
            reason = _module_difference(child, other, task_a, task_b)
            if reason:
                return f"{name}: {reason}"
    return None


def _outputs_difference(norms: Sequence[nn.Module], activations: Sequence[nn.Module]) -> str | None:
    """Why per-task norms and activations of a fusion layer cannot run as one, or None."""
    if {type(n) for n in norms} not in ({nn.Identity}, {nn.BatchNorm2d}):
        return "norms other than BatchNorm2d run per task"
    for modules in (norms, activations):
        if any(
            _module_difference(modules[0], m, "task 0", f"task {i}") for i, m in enumerate(modules)
        ):
            return "the tasks' norms or activations differ"
    if type(activations[0]) not in _ELEMENTWISE_MODULES:
        return f"activation {type(activations[0]).__name__} has no batched form"
    return None


def _fusion_difference(layer: nn.Module, levels: Sequence[Sequence[Any]]) -> str | None:
    """Why a fusion layer has no batched form for these inputs (levels × tasks of shape
    signatures), or None."""
    if any(len(set(shapes)) != 1 or None in shapes for shapes in levels):
        return "the tasks' maps differ in shape"
    kind = type(layer)
    if kind not in _FUSIONS:
        return f"{kind.__name__} has no batched form"
    if (len(levels) == 1) != (kind is not NDDRShortcutLayer):
        return f"{kind.__name__} got unexpected inputs"
    if kind is NDDRLayer and layer.resize is not None:
        return "NDDR with resize= runs per task"
    if any(pytree.tree_leaves(layer.channels_last)):
        return "fusion of channels-last maps runs per task"
    if kind is CrossStitchLayer:
        return None
    return _outputs_difference(layer.norms, layer.activations)


# ----------------------------------------------------------------------------------------------
# Reading the fused graph


@dataclass
class _Stage:
    index: int
    common: list[fx.Node]
    nodes: dict[str, list[fx.Node]]


@dataclass
class _Fusion:
    call: fx.Node
    glue: list[fx.Node]  # getitem of the call (and clones of those), in graph order


def _is_fusion_call(node: fx.Node, fused: nn.Module) -> bool:
    if node.op != "call_module" or TASK_META_KEY in node.meta or "." in str(node.target):
        return False
    return isinstance(fused.get_submodule(node.target), FusionLayer)


def _split_graph(graph: fx.Graph, fused: nn.Module, tasks: Sequence[str]) -> list[Any]:
    """The graph's nodes as an ordered list of stages and fusion calls."""
    items: list[Any] = []
    calls: dict[fx.Node, _Fusion] = {}  # fusion call → its fusion
    items_of: dict[fx.Node, _Fusion] = {}  # getitem of a fusion call → its fusion
    stages = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if _is_fusion_call(node, fused):
            fusion = _Fusion(node, [])
            items.append(fusion)
            calls[node] = fusion
            continue
        source = node.args[0] if node.args else None
        is_item = node.op == "call_function" and node.target is operator.getitem
        is_clone = node.op == "call_method" and node.target == "clone"
        if isinstance(source, fx.Node) and (
            (is_item and source in calls) or (is_clone and source in items_of)
        ):
            fusion = calls.get(source) or items_of[source]
            fusion.glue.append(node)
            if is_item:
                items_of[node] = fusion
            continue
        if not items or not isinstance(items[-1], _Stage):
            items.append(_Stage(stages, [], {t: [] for t in tasks}))
            stages += 1
        task = node.meta.get(TASK_META_KEY)
        (items[-1].nodes[task] if task in tasks else items[-1].common).append(node)
    return items


def _qualname(node: fx.Node) -> str:
    return str(node.meta.get(QUALNAME, node.name))


def _relative(node: fx.Node, task: str) -> str:
    return str(node.target)[len(task) + 1 :]


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


# ----------------------------------------------------------------------------------------------
# Building the batched graph


class _Builder:
    """Builds one batched graph from one fused graph; module copies are shared between the
    train- and eval-mode graphs through ``modules``."""

    def __init__(
        self,
        fused: nn.Module,
        tasks: Sequence[str],
        modules: dict[str, nn.Module],
        conv_mode: str,
        dry_run: bool,
    ) -> None:
        self.fused = fused
        self.tasks = tuple(tasks)
        self.k = len(tasks)
        self.modules = modules  # path in the batched model → module
        self.conv_mode = conv_mode
        self.dry_run = dry_run
        self.graph = fx.Graph()
        # fused node → its value here: ("shared", g) the same for all tasks, ("task", g) its
        # task's own, ("wide", g, k) slice k of the task-stacked value g
        self.env: dict[fx.Node, tuple[Any, ...]] = {}
        self.roles: dict[fx.Node, Any] = {}
        self.views: dict[tuple[fx.Node, int], fx.Node] = {}
        self.unflattened: dict[fx.Node, fx.Node] = {}
        self.stacked: dict[tuple[fx.Node, ...], fx.Node] = {}
        self.stage_reports: list[StageReport] = []
        self.fusion_reports: list[FusionReport] = []

    # values ----------------------------------------------------------------------------------

    def to_task(self, node: Any) -> Any:
        """The graph value of one fused node for its own task."""
        if not isinstance(node, fx.Node):
            return node
        value = self.env[node]
        if value[0] != "wide":
            return value[1]
        wide, index = value[1], value[2]
        if (wide, index) not in self.views:
            if wide not in self.unflattened:
                self.unflattened[wide] = self.graph.create_node(
                    "call_method", "unflatten", (wide, 1, (self.k, -1)), name=f"{wide.name}_tasks"
                )
            self.views[(wide, index)] = self.graph.create_node(
                "call_function", torch.select, (self.unflattened[wide], 1, index), name=node.name
            )
        return self.views[(wide, index)]

    def to_wide(self, nodes: Sequence[fx.Node]) -> fx.Node:
        """One task-stacked graph value for the K tasks' nodes."""
        if self.is_wide(nodes):
            return self.env[nodes[0]][1]
        key = tuple(nodes)
        if key not in self.stacked:
            name = f"{_WIDE_ROOT}_{_identifier(_qualname(nodes[0]))}"
            self.stacked[key] = self.graph.create_node(
                "call_function", torch.cat, ([self.to_task(n) for n in nodes], 1), name=name
            )
        return self.stacked[key]

    def is_wide(self, nodes: Sequence[fx.Node]) -> bool:
        """Whether the K nodes are the K slices of one task-stacked value."""
        first = self.env[nodes[0]]
        return all(
            self.env[n][0] == "wide" and self.env[n][1] is first[1] and self.env[n][2] == k
            for k, n in enumerate(nodes)
        )

    def is_shared(self, nodes: Sequence[fx.Node]) -> bool:
        return all(
            self.env[n][0] == "shared" and self.env[n][1] is self.env[nodes[0]][1] for n in nodes
        )

    # modules ---------------------------------------------------------------------------------

    def copy_module(self, path: str) -> None:
        """Copy the fused model's module or attribute at ``path`` (per-task and common nodes)."""
        if path in self.modules or self.dry_run:
            return
        self.modules[path] = copy.deepcopy(self.fused.get_submodule(path))

    def copy_attribute(self, path: str) -> None:
        if path in self.modules or self.dry_run:
            return
        owner, _, name = path.rpartition(".")
        value = getattr(self.fused.get_submodule(owner) if owner else self.fused, name)
        self.modules[path] = copy.deepcopy(value)

    def module(self, node: fx.Node) -> nn.Module | None:
        """The fused model's module a call_module node calls (None for other nodes)."""
        return self.fused.get_submodule(str(node.target)) if node.op == "call_module" else None

    # nodes -----------------------------------------------------------------------------------

    def emit_per_task(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self.copy_module(str(node.target))
        elif node.op == "get_attr":
            self.copy_attribute(str(node.target))
        args = fx.map_arg(node.args, self.to_task)
        kwargs = fx.map_arg(node.kwargs, self.to_task)
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        new.meta = dict(node.meta)
        self.env[node] = ("task", new)
        if node.args and isinstance(node.args[0], fx.Node) and _is_inplace(node, self.module(node)):
            # an in-place op changed this value: stacked copies made from it are stale
            changed = node.args[0]
            self.stacked = {key: v for key, v in self.stacked.items() if changed not in key}

    def emit_common(self, node: fx.Node) -> None:
        self.emit_per_task(node)
        self.env[node] = ("shared", self.env[node][1])

    def structure(self, node: fx.Node, task: str) -> Any:
        leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
        target: Any = node.target
        kind = None
        if node.op in ("call_module", "get_attr"):
            target = _relative(node, task)
            if node.op == "call_module":
                kind = type(self.fused.get_submodule(str(node.target)))
        nodes = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node))
        return (node.op, target, kind, spec, nodes)

    def difference(self, nodes: Sequence[fx.Node]) -> str | None:
        """Why the K aligned nodes are not identical, or None."""
        first, task0 = nodes[0], self.tasks[0]
        leaves0 = pytree.tree_leaves((first.args, first.kwargs))
        for k, node in enumerate(nodes[1:], 1):
            task = self.tasks[k]
            leaves = pytree.tree_leaves((node.args, node.kwargs))
            for a, b in zip(leaves0, leaves):
                if isinstance(a, fx.Node):
                    if self.roles.get(a, ("own", a)) != self.roles.get(b, ("own", b)):
                        return f"inputs come from different places in {task0} and {task}"
                    if _meta_signature(_tensor_meta(a)) != _meta_signature(_tensor_meta(b)):
                        return f"input shapes differ between {task0} and {task}"
                elif not _same(a, b):
                    return f"argument {a!r} in {task0} vs {b!r} in {task}"
            module, other = self.module(first), self.module(node)
            if module is not None and other is not None:
                reason = _module_difference(module, other, task0, task)
                if reason:
                    return f"{type(module).__name__}: {reason}"
            out0 = _meta_signature(first.meta.get("tensor_meta"))
            if out0 != _meta_signature(node.meta.get("tensor_meta")):
                return f"output shape differs between {task0} and {task}"
        return None

    def wide_rule(self, nodes: Sequence[fx.Node]) -> tuple[str | None, str]:
        """How the K identical nodes run together: "module", "asis", "cat", "size", "shared",
        or None with the reason they run per task."""
        node = nodes[0]
        module = self.module(node)
        tensor_args = [a for a in node.all_input_nodes if _tensor_meta(a) is not None]
        out = _tensor_meta(node)
        arg_groups = self.arg_groups(nodes)
        all_shared = all(self.is_shared(group) for group in arg_groups)
        inplace = _is_inplace(node, module)
        if node.op == "get_attr":
            return None, "attribute read"
        if (node.op == "call_method" and node.target in _SIZE_METHODS) or (
            node.op == "call_function"
            and node.target is builtins.getattr
            and node.args[1] in _SIZE_ATTRIBUTES
        ):
            return "size", ""
        if any(not self.is_shared(g) for g in arg_groups if _tensor_meta(g[0]) is None):
            return None, "takes a per-task value that is not a tensor"
        kind = self.kind(node, module, tensor_args, out)
        deterministic = not (isinstance(module, _RANDOM) and module.training) and not (
            node.op == "call_function" and node.target in _RANDOM_FUNCTIONS
        )
        if all_shared and not inplace and deterministic:
            if kind in ("asis", "cat") and not (module is not None and _has_state(module)):
                return "shared", ""
            if (
                kind is None
                and not tensor_args
                and (node.op == "call_function" and node.target in _PLAIN_FUNCTIONS)
            ):
                return "shared", ""
        if kind is None:
            return None, self.unsupported(node, module)
        if inplace and not (
            self.is_wide(arg_groups[0]) or all(len(n.users) == 1 for n in arg_groups[0])
        ):
            return None, "in-place on a value other operations read"
        tensor_groups = [g for g in arg_groups if _tensor_meta(g[0]) is not None]
        if kind != "module" and not any(self.is_wide(g) for g in tensor_groups):
            # stacking per-task inputs only pays off for layers with weights
            return None, "its inputs run per task"
        return kind, ""

    def unsupported(self, node: fx.Node, module: nn.Module | None) -> str:
        if module is not None:
            return f"no batched form for {type(module).__name__}"
        name = getattr(node.target, "__name__", str(node.target))
        return f"no batched form for {name}"

    def kind(
        self,
        node: fx.Node,
        module: nn.Module | None,
        tensor_args: Sequence[fx.Node],
        out: TensorMetadata | None,
    ) -> str | None:
        """ "module", "asis", "cat" when the node has a batched form for these shapes, else None."""
        if out is None or len(out.shape) < 2:
            return None
        shapes = [tuple(_tensor_meta(a).shape) for a in tensor_args]  # type: ignore[union-attr]
        if any(len(s) < 2 for s in shapes):
            return None
        ndim = len(shapes[0]) if shapes else len(out.shape)
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs or len(tensor_args) != 1:
                return None
            return _module_kind(module, ndim)
        target = node.target
        if (node.op == "call_function" and target in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and target in _ELEMENTWISE_METHODS
        ):
            return (
                "asis" if tensor_args and all(_broadcasts(s, out.shape) for s in shapes) else None
            )
        if node.op == "call_function" and target in _SPATIAL_FUNCTIONS:
            if node.kwargs.get("return_indices") or len(tensor_args) != 1 or ndim < 3:
                return None
            if target in _MAX_POOLS and len(node.args) > 6:
                return None  # return_indices given by position
            return "asis"
        if (node.op == "call_function" and target is torch.flatten) or (
            node.op == "call_method" and target == "flatten"
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if not isinstance(start, int) or not isinstance(end, int):
                return None
            return "asis" if start % ndim >= 1 and end % ndim == ndim - 1 else None
        if node.op == "call_method" and target in _REDUCE_METHODS:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            normal = _normal_dims(dims, ndim) if dims is not None else None
            return "asis" if normal and min(normal) >= 2 and len(tensor_args) == 1 else None
        if node.op == "call_function" and target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(dim, int) or not isinstance(node.args[0], (list, tuple)):
                return None
            if not all(
                isinstance(a, fx.Node) and _tensor_meta(a) is not None for a in node.args[0]
            ):
                return None
            dim %= ndim
            return "asis" if dim >= 2 else "cat" if dim == 1 else None
        return None

    def arg_groups(self, nodes: Sequence[fx.Node]) -> list[list[fx.Node]]:
        """For every node argument of ``nodes[0]`` the K tasks' corresponding arguments."""
        per_task = [pytree.tree_leaves((n.args, n.kwargs)) for n in nodes]
        groups = []
        for index, leaf in enumerate(per_task[0]):
            if isinstance(leaf, fx.Node):
                groups.append([leaves[index] for leaves in per_task])
        return groups

    def map_args(self, nodes: Sequence[fx.Node], convert: Callable[[list[fx.Node]], Any]) -> Any:
        """``nodes[0]``'s (args, kwargs) with each node argument replaced by ``convert`` of the
        K tasks' corresponding arguments."""
        per_task = [pytree.tree_flatten((n.args, n.kwargs)) for n in nodes]
        leaves, spec = per_task[0]
        mapped = [
            convert([p[0][i] for p in per_task]) if isinstance(leaf, fx.Node) else leaf
            for i, leaf in enumerate(leaves)
        ]
        return pytree.tree_unflatten(mapped, spec)

    def wide_module(self, nodes: Sequence[fx.Node]) -> str:
        """Create (once) the batched module for the K nodes' modules; its path."""
        relative = _relative(nodes[0], self.tasks[0])
        path = f"{_WIDE_ROOT}.{relative}"
        if path in self.modules or self.dry_run:
            return path
        sources = [str(n.target) for n in nodes]
        modules = [self.fused.get_submodule(s) for s in sources]
        self.modules[path] = _wide_module(modules, sources, self.conv_mode)
        return path

    def emit_aligned(self, nodes: Sequence[fx.Node]) -> PerTaskOperation | None:
        """Emit the K aligned nodes; None when they run batched, else why not."""
        reason = self.difference(nodes)
        rule, why = (None, reason) if reason else self.wide_rule(nodes)
        if rule is None:
            for node in nodes:
                self.emit_per_task(node)
            return PerTaskOperation(_qualname(nodes[0]), why or "", reason is not None)
        first = nodes[0]
        name = f"{_WIDE_ROOT}_{_identifier(_qualname(first))}"
        if rule == "size":
            args, kwargs = self.map_args(nodes, lambda group: self.to_task(group[0]))
            new = self.graph.create_node(first.op, first.target, args, kwargs, name=name)
            new.meta = dict(first.meta)
            for node in nodes:
                self.env[node] = ("shared", new)
            return None
        if rule == "shared":
            args, kwargs = self.map_args(nodes, lambda group: self.env[group[0]][1])
            target = first.target
            if first.op == "call_module":
                target = self.wide_module(nodes)
            new = self.graph.create_node(first.op, target, args, kwargs, name=name)
            new.meta = dict(first.meta)
            for node in nodes:
                self.env[node] = ("shared", new)
            return None
        if rule == "cat":
            tensors = [self.to_wide(group) for group in self.arg_groups(nodes)]
            new = self.graph.create_node(
                "call_function", cat_task_channels, (tensors, self.k), name=name
            )
        elif first.op == "call_module":
            path = self.wide_module(nodes)
            groups = self.arg_groups(nodes)
            module_kind = type(self.module(first))
            if module_kind in _CONVS and self.is_shared(groups[0]):
                args, kwargs = (self.env[groups[0][0]][1],), {"shared_input": True}
            else:
                args, kwargs = (self.to_wide(groups[0]),), {}
            new = self.graph.create_node("call_module", path, args, kwargs, name=name)
        else:

            def convert(group: list[fx.Node]) -> Any:
                if _tensor_meta(group[0]) is None:
                    return self.env[group[0]][1]  # a shared plain value
                return self.to_wide(group)

            args, kwargs = self.map_args(nodes, convert)
            new = self.graph.create_node(first.op, first.target, args, kwargs, name=name)
        new.meta = dict(first.meta)
        for k, node in enumerate(nodes):
            self.env[node] = ("wide", new, k)
        return None

    def emit_stage(self, stage: _Stage, start: str, end: str) -> None:
        for node in stage.common:
            self.emit_common(node)
            self.roles[node] = ("common", node)
        lists = [stage.nodes[t] for t in self.tasks]
        count = min(len(nodes) for nodes in lists)
        aligned = 0
        while aligned < count:
            signatures = {
                repr(self.structure(nodes[aligned], t)) for nodes, t in zip(lists, self.tasks)
            }
            if len(signatures) != 1:
                break
            aligned += 1
        per_task: list[PerTaskOperation] = []
        batched = 0
        for index in range(aligned):
            nodes = [task_nodes[index] for task_nodes in lists]
            for node in nodes:
                self.roles[node] = ("node", stage.index, index)
            why_not = self.emit_aligned(nodes)
            if why_not is None:
                batched += 1
            else:
                per_task.append(why_not)
        remaining = [nodes[aligned:] for nodes in lists]
        if any(remaining):
            lengths = ", ".join(f"{len(r)} in {t}" for r, t in zip(remaining, self.tasks))
            where = next(r[0] for r in remaining if r)
            reason = f"the task graphs diverge here ({lengths} operations left)"
            per_task.append(PerTaskOperation(_qualname(where), reason, True))
            for rest in remaining:
                for node in rest:
                    self.roles[node] = ("own", node)
                    self.emit_per_task(node)
        operations = aligned + max(len(rest) for rest in remaining)
        self.stage_reports.append(
            StageReport(stage.index, start, end, operations, batched, tuple(per_task))
        )

    def emit_fusion(self, fusion: _Fusion) -> None:
        call, target = fusion.call, str(fusion.call.target)
        layer = self.fused.get_submodule(target)
        levels = self.fusion_inputs(call)
        reason = (
            f"{type(layer).__name__} has no batched form"
            if levels is None
            else _fusion_difference(
                layer, [[_meta_signature(_tensor_meta(a)) for a in level] for level in levels]
            )
        )
        if reason is None:
            if not self.dry_run and target not in self.modules:
                self.modules[target] = _FUSIONS[type(layer)](layer, target).train(layer.training)
            if type(layer) is NDDRShortcutLayer:
                wide_args: tuple[Any, ...] = ([self.to_wide(level) for level in levels],)
            else:
                wide_args = (self.to_wide(levels[0]),)
            new = self.graph.create_node("call_module", target, wide_args, {}, name=call.name)
            clones: dict[fx.Node, fx.Node] = {}
            for node in fusion.glue:
                if node.target is operator.getitem:
                    self.env[node] = ("wide", new, int(node.args[1]))
                else:  # a clone guarding an in-place user: clone the stacked maps once
                    source = self.env[node.args[0]][1]
                    if source not in clones:
                        clones[source] = self.graph.create_node(
                            "call_method", "clone", (source,), name=f"{call.name}_clone"
                        )
                    self.env[node] = ("wide", clones[source], self.env[node.args[0]][2])
                self.roles[node] = ("glue", target, node.op)
        else:
            self.copy_module(target)
            args = fx.map_arg(call.args, self.to_task)
            new = self.graph.create_node("call_module", target, args, {}, name=call.name)
            self.env[call] = ("shared", new)
            for node in fusion.glue:
                self.emit_per_task(node)
                self.roles[node] = ("glue", target, node.op)
        stage = len(self.stage_reports) - 1
        self.fusion_reports.append(FusionReport(target, reason is None, reason or "", stage))

    def fusion_inputs(self, call: fx.Node) -> list[list[fx.Node]] | None:
        """A fusion call's inputs as levels × tasks (one level for a per-level layer)."""
        args = call.args

        def is_level(level: Any) -> bool:
            return (
                isinstance(level, (tuple, list))
                and len(level) == self.k
                and all(isinstance(a, fx.Node) for a in level)
            )

        if is_level(args):
            return [list(args)]
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and all(map(is_level, args[0])):
            return [list(level) for level in args[0]]
        return None

    def build(self, fused_graph: fx.Graph) -> fx.Graph:
        items = _split_graph(fused_graph, self.fused, self.tasks)
        for node in fused_graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta = dict(node.meta)
                self.env[node] = ("shared", new)
                self.roles[node] = ("common", node)
        for index, item in enumerate(items):
            if isinstance(item, _Fusion):
                self.emit_fusion(item)
                continue
            first_before = index
            while first_before > 0 and isinstance(items[first_before - 1], _Fusion):
                first_before -= 1  # a level's layer, then the shortcut: name the level's
            after = [i for i in items[index + 1 :] if isinstance(i, _Fusion)]
            start = str(items[first_before].call.target) if first_before < index else "x"
            end = str(after[0].call.target) if after else "output"
            self.emit_stage(item, start, end)
        output = next(n for n in fused_graph.nodes if n.op == "output")
        self.graph.output(fx.map_arg(output.args[0], self.to_task))
        self.graph.lint()
        return self.graph

    def report(self) -> BatchingReport:
        return BatchingReport(self.tasks, tuple(self.stage_reports), tuple(self.fusion_reports))


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# ----------------------------------------------------------------------------------------------
# The batched model


class BatchedFusedModel(fx.GraphModule):
    """A fused model whose tasks run batched; built by :func:`batch_tasks`.

    Calling it gives the fused model's outputs (same structure: a tuple or a dict by task).
    Task-batched modules live under ``.batched`` (paths of the task models), per-task copies
    under ``.<task>``, fusion layers under ``.nddr<l>``. ``report`` says what runs how;
    ``print(batched.code)`` shows the generated forward.

    It holds its own copy of the weights (a snapshot taken by ``batch_tasks``): train it like
    any module, then :meth:`sync` the weights back into the fused model.
    """

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        *,
        tasks: Sequence[str] = (),
        report: BatchingReport | None = None,
    ) -> None:
        super().__init__(root, graph, _CLASS_NAME)
        for name, child in root.named_children():  # also what only the other graph calls
            setattr(self, name, child)
        self.train_graph = graph if eval_graph is not None else None
        self.eval_graph = eval_graph
        self.tasks = tuple(tasks)
        self.report = report
        self.meta[BATCHED_META_KEY] = report

    def train(self, mode: bool = True) -> BatchedFusedModel:
        super().train(mode)
        if self.eval_graph is not None:
            wanted = self.train_graph if mode else self.eval_graph
            if self.graph is not wanted:
                self.graph = wanted
        return self

    def _parts(self) -> tuple[Any, ...]:
        graphs = (
            (self.train_graph, self.eval_graph) if self.eval_graph is not None else (self.graph,)
        )
        return dict(self.named_children()), graphs, self.tasks, self.report, self.training

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchedFusedModel:
        return _rebuild(*copy.deepcopy(self._parts(), memo))

    def __reduce__(self) -> tuple[Any, ...]:
        children, graphs, tasks, report, training = self._parts()
        portable = tuple(_portable(g) for g in graphs)
        return (_rebuild, (children, portable, tasks, report, training))

    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the fused model's keys (``seg.layer1.0.conv1.weight``, ...), for
        every module this model holds; load them with ``fused.load_state_dict(sd, strict=False)``
        or use :meth:`sync`."""
        stacked = {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, _TaskBatched)
        }
        state: dict[str, torch.Tensor] = {}
        inside = tuple(f"{name}." for name in stacked)
        for key, value in self.state_dict().items():
            if not key.startswith(inside):
                state[key] = value
        for module in stacked.values():
            for k, source in enumerate(module.sources):
                part = module.task_state(k if len(module.sources) > 1 else 0)
                state.update({f"{source}.{n}": v.detach() for n, v in part.items()})
        return state

    def sync(self, fused: nn.Module) -> nn.Module:
        """Copy this model's weights into ``fused`` (the model it was built from, or one fused
        the same way) and return ``fused``.

        Raises:
            BatchingError: when ``fused`` lacks one of the weights or has it in another shape.
        """
        target = fused.state_dict(keep_vars=True)
        state = self.fused_state_dict()
        order = {key: index for index, key in enumerate(target)}  # report the first mismatch
        for key, value in sorted(state.items(), key=lambda item: order.get(item[0], len(order))):
            if key not in target or target[key].shape != value.shape:
                found = "missing" if key not in target else f"shape {_shape_text(target[key])}"
                raise BatchingError(
                    f"cannot sync into this model: {key!r} is {found}, the batched model has "
                    f"{_shape_text(value)}; pass the fused model batch_tasks was built from."
                )
        with torch.no_grad():
            for key, value in state.items():
                target[key].copy_(value)
        return fused


def _portable(graph: fx.Graph) -> fx.Graph:
    copied = copy.deepcopy(graph)
    for node in copied.nodes:
        node.meta = {k: v for k, v in node.meta.items() if isinstance(v, (str, bool, int, float))}
    return copied


def _rebuild(
    children: dict[str, nn.Module],
    graphs: tuple[fx.Graph, ...],
    tasks: tuple[str, ...],
    report: BatchingReport | None,
    training: bool,
) -> BatchedFusedModel:
    root = nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    model = BatchedFusedModel(root, *graphs, tasks=tasks, report=report)
    model.training = training  # not .train(): keep every submodule's own flag
    if model.eval_graph is not None:
        model.graph = model.train_graph if training else model.eval_graph
    return model


def _fused_graphs(fused: nn.Module) -> tuple[fx.Graph, fx.Graph | None]:
    """(eval graph, train graph or None when both modes share one graph)."""
    if isinstance(fused, FusedGraphModule) and fused.eval_graph is not None:
        return fused.eval_graph, fused.train_graph
    return fused.graph, None


def _check_fused(fused: Any) -> tuple[str, ...]:
    if isinstance(fused, BatchedFusedModel):
        raise BatchingError("this model is already batched; pass the fused model instead.")
    meta = getattr(fused, "meta", None)
    if (
        not isinstance(fused, fx.GraphModule)
        or not isinstance(meta, dict)
        or PLAN_META_KEY not in meta
    ):
        raise BatchingError(
            f"batch_tasks needs a model returned by nddrify.fuse (or nddrify.share), got "
            f"{type(fused).__name__} without a plan in .meta[{PLAN_META_KEY!r}]; fuse the task "
            "models first: nddrify.batch_tasks(nddrify.fuse([model_a, model_b]))."
        )
    return tuple(meta[PLAN_META_KEY].tasks)


def batching_report(fused: nn.Module) -> BatchingReport:
    """What :func:`batch_tasks` would run batched and what per task, and why (no weights are
    copied). ``report.batchable`` is False when the tasks share no identical operation.

    Example:
        >>> import nddrify
        >>> from torch import nn
        >>> from nddrify.batching import batching_report
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> b = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> report = batching_report(nddrify.fuse([a, b], points=["1"]))
        >>> [stage.identical for stage in report.stages], report.batched_operations
        ([False, True], 1)
        >>> print(report.stages[0].per_task[0])
        0 (Conv2d: kernel_size (3, 3) in task0 vs (5, 5) in task1)
    """
    tasks = _check_fused(fused)
    eval_graph, _ = _fused_graphs(fused)
    builder = _Builder(fused, tasks, {}, "auto", dry_run=True)
    builder.build(eval_graph)
    return builder.report()


def batch_tasks(fused: nn.Module, *, conv_mode: str = "auto") -> BatchedFusedModel:
    """Run a fused model's tasks as one batched computation (see the module docstring).

    Args:
        fused: a model returned by :func:`nddrify.fuse` (or :func:`nddrify.share`); it is not
            modified. Its train/eval flags, device and dtype carry over.
        conv_mode: how batched convolutions run: ``"auto"`` (one grouped convolution on CUDA,
            one convolution per task elsewhere), ``"grouped"`` or ``"split"``.

    Returns:
        A :class:`BatchedFusedModel` computing the fused model's outputs (to float rounding:
        grouped kernels sum in another order), with ``.report`` (a :class:`BatchingReport`).
        It works with ``torch.compile`` (CUDA graphs included: ``mode="reduce-overhead"``).

    Raises:
        BatchingError: ``fused`` is not a fused model, or ``conv_mode`` is unknown.
    """
    tasks = _check_fused(fused)
    if conv_mode not in CONV_MODES:
        raise BatchingError(f"conv_mode={conv_mode!r} is unknown; use one of {CONV_MODES}.")
    eval_graph, train_graph = _fused_graphs(fused)
    modules: dict[str, nn.Module] = {}
    builder = _Builder(fused, tasks, modules, conv_mode, dry_run=False)
    graphs = [builder.build(eval_graph)]
    report = builder.report()
    if train_graph is not None:
        trainer = _Builder(fused, tasks, modules, conv_mode, dry_run=False)
        graphs = [trainer.build(train_graph), graphs[0]]
    root = nn.Module()
    for path, value in sorted(modules.items(), key=lambda item: item[0].count(".")):
        owner = root
        *parents, name = path.split(".")
        for parent in parents:
            if not hasattr(owner, parent):
                owner.add_module(parent, nn.Module())
            owner = getattr(owner, parent)
        if isinstance(value, nn.Module):
            owner.add_module(name, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(name, value)
        else:
            setattr(owner, name, value)
    model = _rebuild(dict(root.named_children()), tuple(graphs), tasks, report, fused.training)
    return model
