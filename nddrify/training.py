"""Training helpers: optimizer parameter groups, overhead, and per-task weights of a fused model.

The conventions follow the official NDDR code (shared REFERENCE §1): every fusion parameter (1×1
weights and their norm's affine) trains at ``fusion_lr_mult`` × the base lr; weight decay applies
to convolution and linear *weights* only (norm affine parameters and biases are not decayed);
optional head modules get their own weight and bias multipliers (fc8: 10× and 20×). Each group
stores its ``lr_mult``; multiplicative schedulers such as ``LambdaLR`` keep the ratios.

Example:
    >>> import torch, torchvision, nddrify
    >>> fused = nddrify.fuse([torchvision.models.resnet18(), torchvision.models.resnet18()])
    >>> groups = nddrify.param_groups(fused, lr=1e-3)
    >>> sorted((g["name"], g["lr"]) for g in groups)
    [('base', 0.001), ('base_no_decay', 0.001), ('fusion', 0.1), ('fusion_no_decay', 0.1)]
    >>> optimizer = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import FusedModelError, FusionConfigError
from .layers import FusionLayer
from .meta import fused_plan
from .plans import Overhead, Plan

__all__ = ["param_groups", "overhead", "task_state_dict", "fused_plan"]

_DECAYED = (nn.modules.conv._ConvNd, nn.Linear)


def _matching_head(name: str, heads: Sequence[str]) -> str | None:
    """The head that ``name`` (``seg.classifier.6``) is or lies inside, heads given with or
    without the task prefix."""
    without_task = name.partition(".")[2]
    for head in heads:
        for candidate in (name, without_task):
            if candidate == head or candidate.startswith(head + "."):
                return head
    return None


def _check_heads_matched(model: nn.Module, heads: Sequence[str], matched: set[str]) -> None:
    unmatched = [h for h in heads if h not in matched]
    if not unmatched:
        return
    names = sorted(
        {n for n, m in model.named_modules() if n and any(True for _ in m.parameters())}
        | {n.partition(".")[2] for n, _ in model.named_modules() if "." in n}
    )
    hints = []
    for head in unmatched:
        close = difflib.get_close_matches(head, names, n=4, cutoff=0.5)
        hints.append(f"{head!r}" + (f" (close names: {close})" if close else ""))
    raise FusionConfigError(
        f"param_groups(head=...) names {', '.join(hints)}, which match(es) no module with "
        "trainable parameters; give module names as in model.named_modules(), with or without "
        "the task prefix (e.g. 'classifier.6' or 'seg.classifier.6')."
    )


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 2.5e-4,
    fusion_lr_mult: float | None = None,
    *,
    head: Sequence[str] = (),
    head_weight_lr_mult: float = 10.0,
    head_bias_lr_mult: float = 20.0,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` following the official NDDR conventions.

    Args:
        model: a fused model (or any model: without fusion layers there is no fusion group).
        lr: base learning rate.
        weight_decay: PyTorch ``weight_decay`` for conv/linear weights; the official 5e-4
            ``l2_loss`` term is 2.5e-4 here.
        fusion_lr_mult: multiplier for every fusion-layer parameter (1×1 weights and norm). The
            default (None) uses each layer's own ``lr_mult``: 100 for NDDR layers (official
            code), 1000 for cross-stitch and sluice units (paper Table A2).
        head: module names (with or without the task prefix, e.g. ``"classifier.6"``) that get
            ``head_weight_lr_mult`` on weights and ``head_bias_lr_mult`` on biases.

    Returns:
        Non-empty groups, each with ``params``, ``lr``, ``weight_decay``, ``lr_mult`` and ``name``
        (``fusion``, ``fusion_no_decay``, ``head``, ``head_bias``, ``base``, ``base_no_decay``;
        fusion groups get a ``_x<mult>`` suffix when layers of different multipliers coexist).
    """
    buckets: dict[tuple[str, float, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    with_params = [n for n, m in model.named_modules() if any(True for _ in m.parameters())]
    _check_heads_matched(
        model, head, {h for n in with_params if (h := _matching_head(n, head)) is not None}
    )
    fusion_layers = {
        name + ".": m for name, m in model.named_modules() if isinstance(m, FusionLayer) and name
    }
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            decayed = isinstance(module, _DECAYED) and param_name == "weight"
            full = f"{module_name}.{param_name}" if module_name else param_name
            layer = next((m for p, m in fusion_layers.items() if full.startswith(p)), None)
            if layer is not None:
                mult = fusion_lr_mult if fusion_lr_mult is not None else layer.lr_mult
                key = ("fusion" if decayed else "fusion_no_decay", mult, weight_decay * decayed)
            elif _matching_head(module_name, head) is not None:
                key = (
                    ("head", head_weight_lr_mult, weight_decay)
                    if param_name != "bias"
                    else ("head_bias", head_bias_lr_mult, 0.0)
                )
            else:
                key = ("base" if decayed else "base_no_decay", 1.0, weight_decay * decayed)
            buckets.setdefault(key, []).append(param)
    fusion_mults = {mult for (name, mult, _) in buckets if name.startswith("fusion")}
    groups = []
    for (name, mult, decay), params in buckets.items():
        if name.startswith("fusion") and len(fusion_mults) > 1:
            name = f"{name}_x{mult:g}"
        groups.append(
            {
                "params": params,
                "lr": lr * mult,
                "weight_decay": decay,
                "lr_mult": mult,
                "name": name,
            }
        )
    order = ["fusion", "fusion_no_decay", "head", "head_bias", "base", "base_no_decay"]
    return sorted(groups, key=lambda g: (order.index(g["name"].split("_x")[0]), g["lr_mult"]))


def overhead(fused_or_plan: nn.Module | Plan) -> Overhead:
    """Parameters the fusion layers add, absolute and relative to the original models.

    Example:
        >>> import torchvision, nddrify
        >>> p = nddrify.plan([torchvision.models.vgg16(), torchvision.models.vgg16()])
        >>> from nddrify.training import overhead
        >>> print(overhead(p))
        2,441,216 fusion 1×1 weights (1,220,608 per task = 0.88% of one model's 138,357,544) + 5,888 norm parameters
    """
    if isinstance(fused_or_plan, Plan):
        return fused_or_plan.overhead
    return fused_plan(fused_or_plan).overhead


def task_state_dict(fused: nn.Module, task: str | int) -> OrderedDict[str, torch.Tensor]:
    """One task's weights from a fused model, under the original model's key names.

    The fused model keeps each task's whole model (``fused.seg`` is the original class), so the
    keys are exactly the original ``state_dict``'s and ``model.load_state_dict(sd)`` is strict.

    Example:
        >>> import torchvision, nddrify
        >>> vgg = torchvision.models.vgg11()
        >>> fused = nddrify.fuse({"seg": vgg, "depth": torchvision.models.vgg11()})
        >>> from nddrify.training import task_state_dict
        >>> sd = task_state_dict(fused, "seg")
        >>> sorted(sd) == sorted(vgg.state_dict())
        True
    """
    tasks = fused_plan(fused).tasks
    if isinstance(task, int):
        if not 0 <= task < len(tasks):
            raise FusedModelError(f"task index {task} is out of range for tasks {list(tasks)}.")
        task = tasks[task]
    if task not in tasks:
        raise FusedModelError(f"no task {task!r} in this fused model; its tasks are {list(tasks)}.")
    state = fused.state_dict()
    weights: OrderedDict[str, torch.Tensor] = OrderedDict()
    for prefix in ("shared.", task + "."):  # a hard-sharing model's trunk belongs to every task
        weights.update((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
    return weights
