"""Stage 3 of 3: build the fused model from traced models and a plan — the only place where
graphs are spliced.

:func:`rewrite` cuts every task graph at the plan's points (:mod:`.ir`), builds one fusion
layer per level from the plan's fusion kind, and writes one graph (:mod:`.emit`) that runs the
tasks level by level with one fusion call between levels. When a model's train- and eval-mode
graphs differ (``self.training`` branches), both fused graphs are built and
:class:`FusedGraphModule` switches between them in ``.train()`` / ``.eval()``.

Example:
    >>> import json, torch, torchvision, nddrify
    >>> models = {"seg": torchvision.models.vgg11(), "depth": torchvision.models.vgg11()}
    >>> traced = nddrify.trace(models)
    >>> plan = nddrify.plan(traced, points=["features.2"])
    >>> saved = json.dumps(plan.to_dict())
    >>> fused = nddrify.rewrite(traced, nddrify.Plan.from_dict(json.loads(saved)))
    >>> "nddr1 = self.nddr1(seg_features_2, depth_features_2)" in fused.code
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PlanError
from ..graph_analysis import feature_shape
from ..kinds import kind_from_record, shortcut_from_record
from ..layers import Shortcut, as_shortcut
from ..meta import BUILD_META_KEY, PLAN_META_KEY, QUALNAME
from ..plans import Plan
from ..protocol import FusionKind, check_fusion_kind, spanning
from ..tasks import TracedSet
from ..tracing import parameter_placement
from .emit import GraphWriter, identifier
from .ir import RewriteIR, fused_ir
from .module import FusedGraphModule, portable_graph, rebuild
from .ownership import check_distinct, consume, owned_copy, take_weights

__all__ = [
    "rewrite",
    "emit_graphs",
    "FusedGraphModule",
    "GraphWriter",
    "RewriteIR",
    "rebuild",
    "portable_graph",
    "identifier",
]


def _check_shapes(traced: TracedSet, plan: Plan) -> None:
    """A plan edited by hand, or made for other models or input sizes, must still fit."""
    by_name = {t.task: {n.meta.get(QUALNAME): n for n in t.graph.nodes} for t in traced}
    for level in plan.levels:
        for point in level.points:
            node = by_name.get(point.task, {}).get(point.node)
            if node is None:
                continue  # cutting the graphs names what is missing
            actual = feature_shape(node) if "tensor_meta" in node.meta else None
            if actual is not None and tuple(actual[1:]) != tuple(point.shape[1:]):
                raise PlanError(
                    f"task {point.task!r}: the plan says point {point.node!r} is "
                    f"{point.describe_shape()}, the traced model gives "
                    f"{'×'.join(map(str, actual[1:]))}; make the plan again for these models "
                    "and this input size."
                )


def emit_graphs(build_ir: Any, *, needs_train: bool) -> tuple[list[Any], list[Any]]:
    """(executed graphs, flat graphs): ``[train, eval]`` when ``needs_train``, else ``[eval]``;
    ``build_ir(train)`` gives the :class:`RewriteIR` of one mode."""
    modes = [True, False] if needs_train else [False]
    irs = [build_ir(mode) for mode in modes]
    graphs = [GraphWriter(ir, collapse=True).emit() for ir in irs]
    flats = [GraphWriter(ir, collapse=False).emit() for ir in irs]
    return graphs, flats


def rewrite(
    traced: TracedSet,
    plan: Plan,
    *,
    fusion: FusionKind | None = None,
    shortcut: bool | Shortcut | None = None,
    copy: bool = True,
) -> FusedGraphModule:
    """Build the fused model for ``plan`` from the traced models.

    The fused model owns copies of the models' weights (``fused.<task>.<original key>``), or,
    with ``copy=False``, the models' own tensors (the models are then consumed: see
    :mod:`nddrify.rewriting.ownership`), one
    fusion layer per level (``fused.nddr1`` …) and, with a shortcut (or sluice's layer-stitch),
    ``fused.shortcut``. It returns a tuple of outputs in task order, or a dict when the models
    were given as a dict. It takes one input ``x`` shared by every task, or one input per task
    (named after the tasks, in task order) when the tasks were traced on example inputs of
    different shapes (``nddrify.trace(models, example_input={task: tensor})``).

    Args:
        traced: from :func:`nddrify.trace` (the models are not modified).
        plan: from :func:`nddrify.plan`, possibly saved with ``to_dict`` and loaded back.
        fusion: the fusion kind, needed when the plan's is your own (``plan.fusion`` is None);
            otherwise the plan's built-in kind is rebuilt from its options.
        shortcut: override the plan's shortcut (needed when it has a callable option).
        copy: ``True`` (default): the fused model owns deep copies of the weights and the
            models are untouched. ``False``: it takes the models' parameter and buffer tensors
            without copying them (peak memory: the fusion layers only); the models are left
            empty (meta tensors) and calling them raises :class:`~nddrify.errors.ModelsError`.

    Raises:
        PlanError: the plan does not fit the traced models, or names a kind it cannot hold.
        ModelsError: ``copy=False`` and two tasks hold the same tensor.
    """
    if fusion is None:
        if plan.fusion is None:
            raise PlanError(
                f"the plan's fusion kind {plan.fusion_kind!r} is your own (a plan stores only "
                "built-in kinds); pass it again: nddrify.rewrite(traced, plan, fusion=...)."
            )
        fusion = kind_from_record(plan.fusion)
    kind = check_fusion_kind(fusion)
    shortcut_options = (
        shortcut_from_record(plan.shortcut) if shortcut is None else as_shortcut(shortcut)
    )
    _check_shapes(traced, plan)
    found = next(filter(None, map(parameter_placement, traced.modules)), None)
    where = dict(zip(("device", "dtype"), found)) if found is not None else {}
    mode = traced.modules[0].training
    if not copy:
        check_distinct(traced.tasks, traced.modules)

    root = nn.Module()
    for task, module in zip(traced.tasks, traced.modules):
        # submodule train/eval flags come along with the weights
        root.add_module(task, owned_copy(module) if copy else take_weights(module))
    for level in plan.levels:
        root.add_module(f"nddr{level.index + 1}", kind.build(level).to(**where).train(mode))
    hook = spanning(kind, shortcut_options)
    across = hook.build_across(plan.levels) if hook is not None and plan.levels else None
    if across is not None:
        root.add_module("shortcut", across.to(**where).train(mode))

    def build_ir(train: bool) -> RewriteIR:
        return fused_ir(traced, plan, train=train, across=across is not None)

    needs_train = any(t.train_graph_module is not None for t in traced)
    graphs, flats = emit_graphs(build_ir, needs_train=needs_train)
    if not copy:
        for task, module in zip(traced.tasks, traced.modules):
            consume(module, task)
    return rebuild(
        dict(root.named_children()),
        *graphs,
        meta={PLAN_META_KEY: plan, BUILD_META_KEY: build_record(traced, plan)},
        training=mode,
        kwargs={"flat_graphs": flats},
    )


def build_record(traced: TracedSet, plan: Plan) -> dict[str, Any]:
    """What ``nddrify.save`` stores to rebuild a fused model: plain values only.

    ``example_input_shapes`` holds each task's example input shape in task order (models traced
    on inputs of different shapes take one input per task); ``example_input_shape`` the first
    one, as checkpoints before per-task inputs recorded it.
    """
    return {
        "as_dict": traced.as_dict,
        "specs": list(traced.specs),
        "example_input_shape": list(traced.example_input.shape),
        "example_input_shapes": [list(x.shape) for x in traced.example_inputs],
        "plan": plan.to_dict(),
    }
