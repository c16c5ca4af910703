"""The fused model's class: a GraphModule that keeps each task's whole model, its plan, and the
train- and eval-mode graphs when they differ.

Example:
    >>> import torch, torchvision, nddrify
    >>> fused = nddrify.fuse([torchvision.models.vgg11(), torchvision.models.vgg11()], points=1)
    >>> type(fused).__name__, type(fused.task0).__name__
    ('NDDRFusedModel', 'VGG')
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import FusionConfigError
from ..meta import INFERENCE_META_KEY

__all__ = ["FusedGraphModule", "rebuild", "portable_graph"]


class FusedGraphModule(fx.GraphModule):
    """The fused model: a GraphModule that keeps each task's whole model and its plan.

    When a task's train- and eval-mode graphs differ (``self.training`` branches), it holds both
    (``train_graph``, ``eval_graph``) and ``train()`` / ``eval()`` switch between them; otherwise
    both attributes are ``None`` and ``graph`` is the only graph. ``flat_graphs`` are the same
    graphs with every submodule call spelled out node by node (what ``batch_tasks`` reads; the
    executed graphs call a whole submodule where a run of nodes is exactly its forward). Deep
    copies and pickles keep the weights, the graphs, the mode and ``meta`` (the plan).
    """

    #: the class name of the generated code (``print(fused.code)``)
    generated_name = "NDDRFusedModel"

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        eval_graph: fx.Graph | None = None,
        *,
        flat_graphs: Sequence[fx.Graph] = (),
    ) -> None:
        super().__init__(root, graph, self.generated_name)
        # GraphModule copies only the modules the graph calls, into plain containers; keep the
        # whole modules instead (fused.seg is the seg model's own class; fused.seg(x) runs it
        # alone, and modules only the eval graph calls are there too).
        for name, child in root.named_children():
            setattr(self, name, child)
        self.train_graph = graph if eval_graph is not None else None
        self.eval_graph = eval_graph
        self.flat_graphs = tuple(flat_graphs)

    def train(self, mode: bool = True) -> FusedGraphModule:
        if mode and INFERENCE_META_KEY in getattr(self, "meta", {}):
            raise FusionConfigError(
                "this fused model is the inference form from "
                "nddrify.inference.optimize_for_inference (its BatchNorms are folded away), so "
                "it cannot be trained; train the model you optimized, then optimize it again."
            )
        super().train(mode)
        self._select_graph(mode)
        return self

    def _select_graph(self, mode: bool) -> None:
        if self.eval_graph is not None:
            wanted = self.train_graph if mode else self.eval_graph
            if self.graph is not wanted:
                self.graph = wanted

    def graphs(self) -> tuple[fx.Graph, ...]:
        """The executed graphs: ``(train, eval)`` when they differ, else ``(graph,)``."""
        if self.eval_graph is not None:
            return (self.train_graph, self.eval_graph)
        return (self.graph,)

    def flat_graph(self, train: bool) -> fx.Graph:
        """The node-by-node form of the train- or eval-mode graph."""
        flats = self.flat_graphs or self.graphs()
        return flats[0] if train or len(flats) == 1 else flats[1]

    def _init_kwargs(self) -> dict[str, Any]:
        """Constructor arguments beyond the root and the graphs (for subclasses)."""
        return {"flat_graphs": self.flat_graphs}

    def _own_class(self) -> type[FusedGraphModule]:
        # fx instantiates a per-instance subclass (qualname ...GraphModuleImpl, renamed to the
        # generated name); rebuild the class it wraps.
        return next(c for c in type(self).__mro__ if not c.__qualname__.endswith("GraphModuleImpl"))

    def __deepcopy__(self, memo: dict[int, Any]) -> FusedGraphModule:
        return rebuild(
            copy.deepcopy(dict(self.named_children()), memo),
            *copy.deepcopy(self.graphs(), memo),
            meta=copy.deepcopy(self.meta, memo),
            training=self.training,
            cls=self._own_class(),
            kwargs=copy.deepcopy(self._init_kwargs(), memo),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = dict(self._init_kwargs())
        if "flat_graphs" in kwargs:
            kwargs["flat_graphs"] = tuple(portable_graph(g) for g in kwargs["flat_graphs"])
        return (
            _rebuild_from_pickle,
            (
                dict(self.named_children()),
                tuple(portable_graph(g) for g in self.graphs()),
                self.meta,
                self.training,
                self._own_class(),
                kwargs,
            ),
        )


def portable_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose node meta holds plain values only (ShapeProp's TensorMetadata does
    not survive torch.save's pickler)."""
    copied = copy.deepcopy(graph)
    for node in copied.nodes:
        node.meta = {k: v for k, v in node.meta.items() if isinstance(v, (str, bool, int, float))}
    return copied


def rebuild(
    children: dict[str, nn.Module],
    graph: fx.Graph,
    eval_graph: fx.Graph | None = None,
    *,
    meta: dict[str, Any],
    training: bool,
    cls: type[FusedGraphModule] = FusedGraphModule,
    kwargs: dict[str, Any] | None = None,
) -> FusedGraphModule:
    """A ``cls`` over these top-level modules and graphs, in the given mode; every submodule
    keeps its own train/eval flag."""
    root = nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    fused = cls(root, graph, eval_graph, **(kwargs or {}))
    fused.meta = meta
    fused.training = training  # not .train(): keep every submodule's own flag
    fused._select_graph(training)
    return fused


def _rebuild_from_pickle(
    children: dict[str, nn.Module],
    graphs: tuple[fx.Graph, ...],
    meta: dict,
    training: bool,
    cls: type[FusedGraphModule] = FusedGraphModule,
    kwargs: dict[str, Any] | None = None,
) -> FusedGraphModule:
    return rebuild(children, *graphs, meta=meta, training=training, cls=cls, kwargs=kwargs)
