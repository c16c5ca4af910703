"""Task-batched modules: K tasks' layers of one configuration as one layer on task-stacked maps.

In the task-stacked layout the K tasks' maps lie side by side along the channel axis
(``N × K·C × …``; task k owns channels ``k·C … (k+1)·C − 1``). Each ``TaskBatched*`` module
holds the K tasks' weights stacked, remembers the fused-model paths they came from
(``sources``) and gives task k's weights back under its own keys (``task_state(k)``). The
convolutions, batch norms and linear layer are registered as the batched forms of their
``torch.nn`` types (:func:`~nddrify.batching.register_batched_form`); :func:`wide_module` builds
the batched form of K tasks' identical modules. The fusion layers' batched forms are in
:mod:`nddrify.batching.fusion_modules`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from nddrify.batching.modules import TaskBatchedConv2d
    >>> convs = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(2)]
    >>> wide = TaskBatchedConv2d(convs, ["seg.0", "normal.0"], conv_mode="grouped")
    >>> x = torch.randn(1, 3, 8, 8)
    >>> out = wide(x, shared_input=True)  # one convolution, 2 × 4 output channels
    >>> out.shape
    torch.Size([1, 8, 8, 8])
    >>> bool(torch.allclose(out, torch.cat([conv(x) for conv in convs], dim=1), atol=1e-6))
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import LAYER_KINDS, batched_form, register_batched_form

__all__ = [
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
    "TaskBatched",
    "cat_task_channels",
    "wide_module",
    "has_state",
    "is_timm_norm_act",
    "CONV_MODES",
]

#: How a batched convolution runs: ``"grouped"`` (one grouped convolution), ``"split"`` (one
#: convolution per task on views of the stacked input, outputs concatenated), ``"auto"`` (grouped
#: on CUDA; on a CPU grouped for maps of 14×14 and more, split for smaller ones).
CONV_MODES = ("auto", "grouped", "split")


class TaskBatched:
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


class _TaskBatchedConv(TaskBatched):
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
register_batched_form(nn.Conv1d, TaskBatchedConv1d, kind="conv")
register_batched_form(nn.Conv2d, TaskBatchedConv2d, kind="conv")
register_batched_form(nn.Conv3d, TaskBatchedConv3d, kind="conv")
register_batched_form(nn.ConvTranspose1d, TaskBatchedConvTranspose1d, kind="conv")
register_batched_form(nn.ConvTranspose2d, TaskBatchedConvTranspose2d, kind="conv")
register_batched_form(nn.ConvTranspose3d, TaskBatchedConvTranspose3d, kind="conv")


class _TaskBatchedNorm(TaskBatched):
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


def _init_stacked_norm(
    module: _TaskBatchedNorm,
    base: type[nn.Module],
    norms: Sequence[nn.Module],
    sources: Sequence[str],
) -> None:
    """``base.__init__`` with K·C features and the first task's settings, then the K norms'
    weights stacked in (see ``_TaskBatchedNorm._setup``)."""
    first = norms[0]
    base.__init__(
        module,
        first.num_features * len(norms),
        eps=first.eps,
        momentum=first.momentum,
        affine=first.affine,
        track_running_stats=first.track_running_stats,
        device="meta",
        dtype=next(iter([*first.parameters(), *first.buffers()])).dtype,
    )
    module._setup(norms, sources)


def _norm_class(base: type[nn.Module], doc: str) -> type[nn.Module]:
    def __init__(self, norms: Sequence[nn.Module], sources: Sequence[str]):
        _init_stacked_norm(self, base, norms, sources)

    return type(
        f"TaskBatched{base.__name__}",
        (_TaskBatchedNorm, base),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__},
    )


_NORM_DOC = "K tasks' {name} layers as one {name} over the task-stacked channels."
TaskBatchedBatchNorm1d = _norm_class(nn.BatchNorm1d, _NORM_DOC.format(name="BatchNorm1d"))
TaskBatchedBatchNorm2d = _norm_class(nn.BatchNorm2d, _NORM_DOC.format(name="BatchNorm2d"))
TaskBatchedBatchNorm3d = _norm_class(nn.BatchNorm3d, _NORM_DOC.format(name="BatchNorm3d"))
register_batched_form(nn.BatchNorm1d, TaskBatchedBatchNorm1d, kind="norm")
register_batched_form(nn.BatchNorm2d, TaskBatchedBatchNorm2d, kind="norm")
register_batched_form(nn.BatchNorm3d, TaskBatchedBatchNorm3d, kind="norm")


class TaskBatchedBatchNormAct2d(_TaskBatchedNorm, nn.BatchNorm2d):
    """K tasks' timm ``BatchNormAct2d`` layers (batch norm, drop, activation) as one batch norm
    over the task-stacked channels, then the (batched) drop and activation."""

    def __init__(self, norms: Sequence[nn.Module], sources: Sequence[str], conv_mode: str) -> None:
        _init_stacked_norm(self, nn.BatchNorm2d, norms, sources)
        for name in ("drop", "act"):
            children = [norm._modules[name] for norm in norms]
            child_sources = [f"{source}.{name}" for source in sources]
            self.add_module(name, wide_module(children, child_sources, conv_mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def is_timm_norm_act(kind: type) -> bool:
    """Whether ``kind`` is timm's ``BatchNormAct2d`` (recognised by name: timm is optional)."""
    return kind.__name__ == "BatchNormAct2d" and kind.__module__.startswith("timm.")


class TaskBatchedLinear(TaskBatched, nn.Linear):
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


register_batched_form(nn.Linear, TaskBatchedLinear, kind="linear")


def cat_task_channels(tensors: Sequence[torch.Tensor], num_tasks: int) -> torch.Tensor:
    """``torch.cat(dim=1)`` of task-stacked tensors: each task's channels stay together.

    Example:
        >>> import torch
        >>> a = torch.tensor([[1, 2]]); b = torch.tensor([[3, 4, 5, 6]])  # two tasks each
        >>> cat_task_channels([a, b], 2).tolist()
        [[1, 3, 4, 2, 5, 6]]
    """
    return torch.cat([t.unflatten(1, (num_tasks, -1)) for t in tensors], dim=2).flatten(1, 2)


def wide_module(modules: Sequence[nn.Module], sources: Sequence[str], conv_mode: str) -> nn.Module:
    """The batched form of K identical modules (``module_kind`` in
    :mod:`~nddrify.batching.analysis` said they have one): their registered batched form, a
    :class:`TaskBatchedBatchNormAct2d`, a container of batched children, or a copy of the first
    (a module without weights runs as it is on the task-stacked maps)."""
    kind = type(modules[0])
    form = batched_form(kind)
    if form is not None and form.kind == "conv":
        wide: nn.Module = form.factory(modules, sources, conv_mode)
    elif form is not None and form.kind in LAYER_KINDS:
        wide = form.factory(modules, sources)
    elif is_timm_norm_act(kind):
        wide = TaskBatchedBatchNormAct2d(modules, sources, conv_mode)
    elif has_state(modules[0]):  # a container: its forward, with batched children
        wide = copy.copy(modules[0])
        wide.__dict__ = {  # its own bookkeeping dicts (hooks, ...), not the fused module's
            key: copy.copy(value) if isinstance(value, dict) else value
            for key, value in modules[0].__dict__.items()
        }
        wide._modules = {
            name: wide_module(
                [m._modules[name] for m in modules], [f"{s}.{name}" for s in sources], conv_mode
            )
            for name in modules[0]._modules
        }
    else:
        wide = copy.deepcopy(modules[0])
    return wide.train(modules[0].training)


def has_state(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) holds parameters or buffers."""
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
