"""Hard parameter sharing, the paper's multi-task baseline ("Mul."), from the same models.

``share(models, split=...)`` runs ONE trunk (task 0's weights, or the tasks' average) up to the
split point, then every task's own copy of the rest of its model. The paper's Mul. shares all
conv layers and splits after the last one (fc6 onwards task-specific); ``split="auto"`` takes the
last automatic fusion point, which is that place on VGG-16 (``features.30``, pool5). It is
written by the same rewriter as ``fuse``, with a trunk junction instead of fusion layers.

The single-task baseline needs no code: it is the original models, unchanged.

Example:
    >>> import torch, torchvision, nddrify
    >>> shared = nddrify.share({"seg": torchvision.models.vgg11(), "depth": torchvision.models.vgg11()})
    >>> sorted(name for name, _ in shared.named_children())
    ['depth', 'seg', 'shared']
    >>> out = shared(torch.randn(1, 3, 64, 64))
    >>> sorted(out)
    ['depth', 'seg']
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from .errors import ShareError
from .meta import PLAN_META_KEY, QUALNAME
from .planning import plan as make_plan
from .plans import Plan
from .protocol import FusionKind
from .rewriting import FusedGraphModule, emit_graphs, rebuild
from .rewriting.ir import TaskSegments, trunk_ir
from .tasks import TaskOptions, TracedSet, trace

__all__ = ["share", "SHARED"]

#: Name of the trunk module in a hard-sharing model.
SHARED = "shared"


class _Split:
    """Plans a split point: nothing is inserted there, so nothing is added."""

    name = "split"

    def build(self, level: Any) -> nn.Module:
        return nn.Identity()

    def num_parameters(self, level: Any) -> tuple[int, int]:
        return (0, 0)


def _signature(node: fx.Node, module: nn.Module) -> tuple[Any, ...]:
    kind = type(module.get_submodule(str(node.target))) if node.op == "call_module" else None
    return (node.meta.get(QUALNAME), node.op, str(node.target), kind)


def _check_same_trunk(tasks: Sequence[TaskSegments]) -> None:
    reference = [_signature(n, tasks[0].module) for n in tasks[0].segments[0]]
    for task in tasks[1:]:
        mine = [_signature(n, task.module) for n in task.segments[0]]
        if mine != reference:
            first = next(
                (i for i, (a, b) in enumerate(zip(mine, reference)) if a != b),
                min(len(mine), len(reference)),
            )
            where = (mine if first < len(mine) else reference)[first][0]
            raise ShareError(
                f"hard sharing needs the same architecture up to the split point; task "
                f"{task.task!r} differs from task {tasks[0].task!r} at node {where!r}. Choose "
                "an earlier split, or fuse the models with nddrify.fuse instead."
            )


def _trunk_weights(traced: TracedSet, trunk: TaskSegments, mode: str) -> nn.Module:
    shared = copy.deepcopy(traced.modules[0])
    if mode == "first":
        return shared
    if mode != "average":
        raise ShareError(f"trunk={mode!r} is not valid; use 'first' or 'average'.")
    prefixes = [str(n.target) for n in trunk.segments[0] if n.op in ("call_module", "get_attr")]
    states = [m.state_dict() for m in traced.modules]
    averaged = {}
    for key, value in states[0].items():
        inside = any(key == p or key.startswith(p + ".") for p in prefixes)
        if inside and value.is_floating_point():
            averaged[key] = sum(s[key] for s in states) / len(states)
    shared.load_state_dict(averaged, strict=False)
    return shared


def _keep_used(
    children: Mapping[str, nn.Module], graphs: Sequence[fx.Graph]
) -> dict[str, nn.Module]:
    """Copies of ``children`` holding only the submodules, parameters and buffers the graphs
    use (each task's own trunk is not part of the shared model)."""
    used = sorted(
        {str(n.target) for g in graphs for n in g.nodes if n.op in ("call_module", "get_attr")}
    )
    kept: dict[str, nn.Module] = {}
    for target in used:
        top, _, rest = target.partition(".")
        source = children[top]
        owner = kept.setdefault(top, nn.Module())
        owner.training = source.training
        *parents, leaf = rest.split(".") if rest else ([], None)
        for parent in parents:
            source = getattr(source, parent)
            if not hasattr(owner, parent):
                child = nn.Module()
                child.training = source.training
                owner.add_module(parent, child)
            owner = getattr(owner, parent)
        if leaf is None:
            kept[top] = source
            continue
        value = getattr(source, leaf)
        if isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor) and leaf in dict(source.named_buffers(recurse=False)):
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
    return kept


def share(
    models: TracedSet | Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    split: str | int | Sequence[str] = "auto",
    *,
    trunk: Literal["first", "average"] = "first",
    example_input: torch.Tensor | None = None,
    trace_options: TaskOptions = None,
) -> FusedGraphModule:
    """Hard parameter sharing: one trunk up to ``split``, then each task's own layers.

    Args:
        models: two or more models with the same architecture up to the split (heads may
            differ), or a :class:`~nddrify.tasks.TracedSet`.
        split: ``"auto"`` (the last automatic fusion point), a module or node name, one name
            per task, or an int N (the N-th automatic point from the end).
        trunk: ``"first"`` (task 0's weights) or ``"average"`` (the mean of the tasks' trunks).
        example_input, trace_options: as for :func:`nddrify.fuse`.

    Returns:
        A GraphModule with the same output convention as ``fuse`` (tuple, or dict for a dict);
        ``.shared`` is the trunk, ``.<task>`` each task's remaining layers.

    Raises:
        ShareError: the trunks differ, or ``split`` / ``trunk`` is invalid.
    """
    traced = trace(models, example_input=example_input, options=trace_options)
    kind: FusionKind = _Split()
    if split == "auto":
        split = 1
    if isinstance(split, int):
        last = make_plan(traced, split, fusion=kind)  # the last N automatic points
        points: Any = [[last.levels[0].points[k].node] for k in range(len(traced))]
    else:
        points = [split] if isinstance(split, str) else list(split)
    split_plan: Plan = make_plan(traced, points, fusion=kind)
    if len(split_plan.levels) != 1:
        raise ShareError(f"split must name one point, got {len(split_plan.levels)}: {split!r}.")
    eval_ir = trunk_ir(traced, split_plan, train=False, module=SHARED)
    _check_same_trunk(eval_ir.tasks)

    children: dict[str, nn.Module] = {SHARED: _trunk_weights(traced, eval_ir.tasks[0], trunk)}
    for task, module in zip(traced.tasks, traced.modules):
        children[task] = copy.deepcopy(module)
    needs_train = any(t.train_graph_module is not None for t in traced)
    graphs, flats = emit_graphs(
        lambda train: trunk_ir(traced, split_plan, train=True, module=SHARED) if train else eval_ir,
        needs_train=needs_train,
    )
    return rebuild(
        _keep_used(children, [*graphs, *flats]),
        *graphs,
        meta={PLAN_META_KEY: split_plan},
        training=traced.modules[0].training,
        kwargs={"flat_graphs": flats},
    )
