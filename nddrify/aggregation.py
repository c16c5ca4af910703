"""Gradient aggregation for fused models: the shared parameters get a combination of the
per-task gradients chosen by an aggregator (UPGrad, MGDA, PCGrad, CAGrad, Nash-MTL, IMTL-G,
Aligned-MTL, GradDrop, …) instead of their sum; every other parameter gets its usual gradient.

The aggregators come from `TorchJD <https://github.com/SimplexLab/TorchJD>`_ (MIT licence),
an optional extra: ``pip install 'nddrify[mtl]'``. nddrify adds what TorchJD cannot know: which
parameters of a fused model are shared.

**Shared parameters.** A parameter is shared when the outputs of two or more tasks depend on
it, found by autograd on a small example input (:func:`shared_parameters`): in an NDDR model,
every parameter upstream of the last fusion level (all tasks' backbones up to there, and the
fusion layers of the earlier levels) and none of the last level's per-task 1×1 convolutions
(each feeds one task); in a hard-sharing model (``nddrify.share``), the trunk.

Example:
    >>> import torch, torchvision, nddrify
    >>> from nddrify.aggregation import shared_parameters
    >>> fused = nddrify.fuse([torchvision.models.resnet18(), torchvision.models.resnet18()])
    >>> found = shared_parameters(fused)
    >>> "task0.layer4.0.conv1.weight" in found.shared, "nddr5.convs.0.weight" in found.shared
    (True, False)
    >>> found.by_task["task1"][:2], found.by_task["task1"][-1]
    (('task1.fc.weight', 'task1.fc.bias'), 'nddr5.norms.1.bias')
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import FusedModelError, FusionConfigError
from .meta import BUILD_META_KEY, fused_plan

__all__ = [
    "SharedParameters",
    "shared_parameters",
    "AGGREGATORS",
    "make_aggregator",
    "aggregate_backward",
]

#: name → TorchJD aggregator class name (``torchjd.aggregation``)
AGGREGATORS = {
    "upgrad": "UPGrad",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "nashmtl": "NashMTL",
    "imtlg": "IMTLG",
    "alignedmtl": "AlignedMTL",
    "graddrop": "GradDrop",
    "gradvac": "GradVac",
    "dualproj": "DualProj",
    "config": "ConFIG",
    "mean": "Mean",
    "random": "Random",
}

_INSTALL = "pip install 'nddrify[mtl]' (TorchJD with its quadprog projector)"


@dataclass(frozen=True)
class SharedParameters:
    """Which parameters of a multi-task model the tasks share (names as in
    ``named_parameters``, in that order).

    Attributes:
        shared: parameters two or more tasks' outputs depend on.
        by_task: task → the parameters only that task's output depends on.
        unused: parameters no output depends on (or that do not require gradients).
    """

    shared: tuple[str, ...]
    by_task: Mapping[str, tuple[str, ...]]
    unused: tuple[str, ...] = ()

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t}: {len(n)}" for t, n in self.by_task.items())
        return f"SharedParameters({len(self.shared)} shared; task-specific {tasks}; {len(self.unused)} unused)"


def _outputs_by_task(output: Any, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    if isinstance(output, Mapping):
        return {t: output[t] for t in tasks}
    return dict(zip(tasks, output))


def _example_input(model: nn.Module, given: Any) -> Any:
    if given is not None:
        return given
    build = getattr(model, "meta", {}).get(BUILD_META_KEY)
    if build is None:
        raise FusedModelError(
            "this model does not record its input size (a hard-sharing model, say); pass "
            "example_input=torch.randn(2, 3, H, W) of a size it accepts."
        )
    param = next(model.parameters())
    shapes = build["example_input_shapes"]
    inputs = [
        torch.randn(2, *shape[1:], device=param.device, dtype=param.dtype) for shape in shapes
    ]
    # one input for every task unless the tasks were traced on inputs of different shapes
    return inputs[0] if len({tuple(s) for s in shapes}) == 1 else inputs


def shared_parameters(model: nn.Module, example_input: Any = None) -> SharedParameters:
    """Which parameters of a fused (``nddrify.fuse``) or hard-sharing (``nddrify.share``)
    model are shared by two or more tasks: autograd on one training-mode forward of a small
    input (batch 2; the running statistics of norms and the random number generators are
    restored afterwards).

    Args:
        model: the multi-task model nddrify built.
        example_input: an input the model accepts (default: the recorded example input size,
            batch 2; a list or dict per task for per-task inputs).

    Raises:
        FusedModelError: a model nddrify did not build, or no recorded input size.
    """
    tasks = fused_plan(model).tasks
    x = _example_input(model, example_input)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    devices = sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
    try:
        model.train()
        # the random streams (dropout) continue as if this forward had not run
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            output = model(*x) if isinstance(x, (list, tuple)) else model(x)
            users: dict[str, list[str]] = {name: [] for name, _ in named}
            for task, value in _outputs_by_task(output, tasks).items():
                grads = torch.autograd.grad(
                    value.float().sum(), [p for _, p in named], retain_graph=True, allow_unused=True
                )
                for (name, _), grad in zip(named, grads):
                    if grad is not None:
                        users[name].append(task)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    shared = tuple(n for n, u in users.items() if len(u) > 1)
    by_task = {t: tuple(n for n, u in users.items() if u == [t]) for t in tasks}
    trainable = {n for n, _ in named}
    unused = tuple(n for n, _ in model.named_parameters() if n not in trainable or not users[n])
    return SharedParameters(shared, by_task, unused)


def make_aggregator(name: str, **options: Any) -> Any:
    """The TorchJD aggregator ``name`` (see :data:`AGGREGATORS`) with its options, e.g.
    ``make_aggregator("cagrad", c=0.5)``.

    Raises:
        FusionConfigError: an unknown name, bad options, or TorchJD (or the solver the
            aggregator needs) not installed, saying what to install.
    """
    class_name = AGGREGATORS.get(name.lower())
    if class_name is None:
        raise FusionConfigError(
            f"unknown aggregator {name!r}; choose one of {sorted(AGGREGATORS)}."
        )
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
    except ImportError:
        raise FusionConfigError(f"aggregator {name!r} needs TorchJD: {_INSTALL}.") from None
    try:
        return getattr(aggregation, class_name)(**options)
    except TypeError as err:
        raise FusionConfigError(f"aggregator {name!r}: {err}.") from None
    except ImportError as err:
        raise FusionConfigError(f"aggregator {name!r}: {err}") from None


def aggregate_backward(
    losses: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    model: nn.Module,
    aggregator: Any,
    *,
    shared: SharedParameters | None = None,
) -> None:
    """Backward pass of the K task losses: the shared parameters' ``.grad`` is ``aggregator``
    applied to the Jacobian of the losses with respect to them (one row per task, TorchJD's
    ``backward`` + ``jac_to_grad``); every other parameter's ``.grad`` is the gradient of the
    summed losses (each is used by one task). Gradients accumulate, as ``loss.backward()``.

    Args:
        losses: one scalar loss per task (dict or task order); weight them beforehand if you
            want (e.g. with :mod:`nddrify.weighting`).
        model: the fused or hard-sharing model the losses come from.
        aggregator: a TorchJD aggregator (:func:`make_aggregator`).
        shared: from :func:`shared_parameters` (computed here when omitted: pass it in a
            training loop to compute it once).

    Raises:
        FusionConfigError: TorchJD is not installed.
    """
    try:
        autojac = importlib.import_module("torchjd.autojac")
    except ImportError:
        raise FusionConfigError(f"gradient aggregation needs TorchJD: {_INSTALL}.") from None
    values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
    found = shared if shared is not None else shared_parameters(model)
    params = dict(model.named_parameters())
    shared_params = [params[n] for n in found.shared]
    others = [params[n] for names in found.by_task.values() for n in names]
    if others:
        torch.autograd.backward(torch.stack(values).sum(), inputs=others, retain_graph=True)
    if shared_params:
        previous = [p.grad for p in shared_params]
        for p in shared_params:
            p.grad = None
        autojac.backward(values, inputs=shared_params)
        autojac.jac_to_grad(shared_params, aggregator)
        for p, before in zip(shared_params, previous):
            if before is not None:
                p.grad = p.grad + before
