"""How the fused model comes to own the task models' weights: a deep copy (the default; the
originals are untouched), or, for ``nddrify.fuse(models, copy=False)``, the originals' own
parameter and buffer tensors with no copy, the originals being **consumed**.

A consumed model keeps its module tree and its parameters' shapes, but its parameters and
buffers are moved to the meta device (no storage) and calling it, or any of its submodules,
raises :class:`~nddrify.errors.ModelsError` naming the fused module to use instead. So nothing
silently trains one object through another, and the memory of the weights is held once.

Example:
    >>> import torch, torchvision, nddrify
    >>> a, b = torchvision.models.resnet18(), torchvision.models.resnet18()
    >>> weight = a.conv1.weight
    >>> fused = nddrify.fuse({"a": a, "b": b}, copy=False)
    >>> fused.a.conv1.weight is weight, a.conv1.weight.device.type
    (True, 'meta')
    >>> try:
    ...     a(torch.randn(1, 3, 64, 64))
    ... except nddrify.errors.ModelsError as err:
    ...     print(str(err)[:75])
    task 'a' was consumed by nddrify.fuse(..., copy=False): its weights now bel
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelsError

__all__ = ["owned_copy", "take_weights", "check_distinct", "consume", "CONSUMED_ATTRIBUTE"]

#: attribute set on the root of a consumed model: the name of the task that took its weights
CONSUMED_ATTRIBUTE = "_nddrify_consumed_by"


def owned_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (weights, buffers, train/eval flags): the default."""
    return copy.deepcopy(module)


def take_weights(module: nn.Module) -> nn.Module:
    """A new module tree like ``module`` (same classes, attributes, flags and hooks) holding
    the very same parameter and buffer tensors: no tensor is copied."""
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(module, memo)


def check_distinct(tasks: Sequence[str], modules: Sequence[nn.Module]) -> None:
    """``copy=False`` needs every task to own its tensors: two tasks holding one parameter
    (the same model passed twice, or shared submodules) would silently share weights.

    Raises:
        ModelsError: naming the two tasks and the shared tensor.
    """
    owners: dict[int, tuple[str, str]] = {}
    for task, module in zip(tasks, modules):
        named = (*module.named_parameters(), *module.named_buffers())
        for name, tensor in named:
            other = owners.setdefault(id(tensor), (task, name))
            if other[0] != task:
                raise ModelsError(
                    f"copy=False: tasks {other[0]!r} and {task!r} hold the same tensor "
                    f"({other[0]}.{other[1]} is {task}.{name}), so the fused tasks would share "
                    "it; pass distinct models (e.g. build each one), or copy=True."
                )


def consume(module: nn.Module, task: str) -> None:
    """Leave ``module`` (whose tensors the fused model took) empty: its parameters and buffers
    move to the meta device and calling it or any submodule raises a :class:`ModelsError`."""

    def refuse(called: nn.Module, args: Any) -> None:
        raise ModelsError(
            f"task {task!r} was consumed by nddrify.fuse(..., copy=False): its weights now belong "
            f"to the fused model; run fused.{task} (the task's own model inside the fused one), "
            "or fuse with copy=True (the default) to keep the original usable."
        )

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = torch.empty_like(buffer, device="meta")
        sub.register_forward_pre_hook(refuse)
    setattr(module, CONSUMED_ATTRIBUTE, task)
