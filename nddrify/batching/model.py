"""The batched model, and the public entry points :func:`batch_tasks` and :func:`batching_report`.

:func:`batch_tasks` checks that it got a fused model, builds the batched graphs (the eval graph,
and the train graph where the fused model has its own) with
:class:`~nddrify.batching.emission.BatchedGraphBuilder`, gathers the modules they call and wraps
everything in a :class:`BatchedFusedModel`; :func:`batching_report` runs the same builder
without copying weights.

Example:
    >>> import torch, nddrify
    >>> from torch import nn
    >>> from nddrify.batching.model import batch_tasks
    >>> def cnn():
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> fused = nddrify.fuse({"a": cnn(), "b": cnn()}, points=["1"]).eval()
    >>> batched = batch_tasks(fused)
    >>> x = torch.randn(1, 3, 16, 16)
    >>> expected, out = fused(x), batched(x)
    >>> all(bool((out[t] - expected[t]).abs().max() < 1e-5) for t in ("a", "b"))
    True
    >>> batched.report.batched_operations, batched.report.operations
    (3, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import BatchingError, FusedModelError
from ..meta import BATCHED_META_KEY, PLAN_META_KEY, fused_plan
from ..rewriting import FusedGraphModule, rebuild
from .analysis import shape_text
from .emission import BatchedGraphBuilder
from .modules import CONV_MODES, TaskBatched
from .report import BatchingReport

__all__ = ["batch_tasks", "batching_report", "BatchedFusedModel", "BATCHED_META_KEY"]


_CLASS_NAME = "NDDRBatchedModel"


class BatchedFusedModel(FusedGraphModule):
    """A fused model whose tasks run batched; built by :func:`batch_tasks`.

    Calling it gives the fused model's outputs (same structure: a tuple or a dict by task).
    Task-batched modules live under ``.batched`` (paths of the task models), per-task copies
    under ``.<task>``, fusion layers under ``.nddr<l>``. ``report`` says what runs how;
    ``print(batched.code)`` shows the generated forward. Train/eval graphs, deep copies and
    pickles work as for :class:`~nddrify.rewriting.FusedGraphModule`.

    It holds its own copy of the weights (a snapshot taken by ``batch_tasks``): train it like
    any module, then :meth:`sync` the weights back into the fused model.
    """

    generated_name = _CLASS_NAME

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        *,
        tasks: Sequence[str] = (),
        report: BatchingReport | None = None,
    ) -> None:
        super().__init__(root, graph, eval_graph)
        self.tasks = tuple(tasks)
        self.report = report
        self.meta[BATCHED_META_KEY] = report

    def _init_kwargs(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "report": self.report}

    def fused_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the fused model's keys (``seg.layer1.0.conv1.weight``, ...), for
        every module this model holds; load them with ``fused.load_state_dict(sd, strict=False)``
        or use :meth:`sync`."""
        stacked = {
            name: module for name, module in self.named_modules() if isinstance(module, TaskBatched)
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
                found = "missing" if key not in target else f"shape {shape_text(target[key])}"
                raise BatchingError(
                    f"cannot sync into this model: {key!r} is {found}, the batched model has "
                    f"{shape_text(value)}; pass the fused model batch_tasks was built from."
                )
        with torch.no_grad():
            for key, value in state.items():
                target[key].copy_(value)
        return fused


def _fused_graphs(fused: nn.Module) -> tuple[fx.Graph, fx.Graph | None]:
    """(eval graph, train graph or None when both modes share one graph), node by node: the
    batched form is made per operation, not per submodule call."""
    if not isinstance(fused, FusedGraphModule):
        return fused.graph, None
    if fused.eval_graph is not None:
        return fused.flat_graph(train=False), fused.flat_graph(train=True)
    return fused.flat_graph(train=False), None


def _check_fused(fused: Any) -> tuple[str, ...]:
    if isinstance(fused, BatchedFusedModel):
        raise BatchingError("this model is already batched; pass the fused model instead.")
    try:
        return tuple(fused_plan(fused).tasks)
    except FusedModelError:
        raise BatchingError(
            f"batch_tasks needs a model returned by nddrify.fuse (or nddrify.share), got "
            f"{type(fused).__name__} without a plan in .meta[{PLAN_META_KEY!r}]; fuse the task "
            "models first: nddrify.batching.batch_tasks(nddrify.fuse([model_a, model_b]))."
        ) from None


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
    builder = BatchedGraphBuilder(fused, tasks, {}, "auto", dry_run=True)
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
    builder = BatchedGraphBuilder(fused, tasks, modules, conv_mode, dry_run=False)
    graphs = [builder.build(eval_graph)]
    report = builder.report()
    if train_graph is not None:
        trainer = BatchedGraphBuilder(fused, tasks, modules, conv_mode, dry_run=False)
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
    model = rebuild(
        dict(root.named_children()),
        *graphs,
        meta={BATCHED_META_KEY: report},
        training=fused.training,
        cls=BatchedFusedModel,
        kwargs={"tasks": tasks, "report": report},
    )
    return model
