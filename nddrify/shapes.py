"""Shapes for traced graphs: ShapeProp on fake tensors with one clear error, and the train-mode
graph's shapes taken from the eval-mode one.

Both are torch.fx passes writing ``node.meta["tensor_meta"]`` (ShapeProp's own key).

Example:
    >>> import torch, torch.fx as fx, torchvision
    >>> from nddrify.shapes import propagate_shapes
    >>> gm = fx.symbolic_trace(torchvision.models.resnet18().eval())
    >>> propagate_shapes(gm, torch.randn(1, 3, 64, 64), task="cls")
    >>> tuple(next(n for n in gm.graph.nodes if n.name == "layer4_1_relu_1").meta["tensor_meta"].shape)
    (1, 512, 2, 2)
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TraceError
from .meta import QUALNAME

__all__ = ["propagate_shapes", "share_shapes"]


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it was running when it failed."""

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _where(gm: fx.GraphModule, node: fx.Node | None) -> str:
    if node is None:
        return ""
    name = node.meta.get(QUALNAME, node.name)
    if node.op == "call_module":
        return f" in module {name!r} ({type(gm.get_submodule(str(node.target))).__name__})"
    return f" at node {name!r}"


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor, task: str) -> None:
    """ShapeProp on fake tensors (no compute, no memory), falling back to real ones (in eval mode,
    without gradients) for the rare op that has no fake implementation. A failure is one
    :class:`TraceError` naming the module and the real cause (not ShapeProp's node dump)."""
    # ShapeProp prints every failure's traceback and fake mode logs its own: the TraceError below
    # says what failed, so both stay quiet.
    quiet = contextlib.redirect_stderr(io.StringIO())
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    with torch.no_grad(), quiet:
        try:
            fake_log.setLevel(logging.CRITICAL)
            # Real parameters enter the fake mode as non-fake inputs: no copy of the model.
            with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                ShapeProp(gm).propagate(fake_mode.from_tensor(example_input))
            return
        except Exception:
            pass
        finally:
            fake_log.setLevel(level)
        prop = _ShapeProp(gm)
        try:
            prop.propagate(example_input)
        except Exception as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise TraceError(
                f"task {task!r}: the traced model failed on an example input of shape "
                f"{tuple(example_input.shape)}{_where(gm, getattr(prop, 'current', None))}: "
                f"{type(cause).__name__}: {reason}\nHow to fix: pass example_input= with a size "
                "the model accepts (e.g. its training resolution)."
            ) from cause


def share_shapes(eval_graph: fx.Graph, train_graph: fx.Graph) -> None:
    """Give the train-mode graph's nodes the shapes of the eval-mode nodes of the same name, op
    and target (a node runs on the same shapes in both modes; shapes are propagated in eval mode
    only, so that no batch-norm statistics move)."""
    shapes = {
        (n.meta.get(QUALNAME), n.op, str(n.target)): n.meta["tensor_meta"]
        for n in eval_graph.nodes
        if "tensor_meta" in n.meta
    }
    for node in train_graph.nodes:
        found = shapes.get((node.meta.get(QUALNAME), node.op, str(node.target)))
        if found is not None and "tensor_meta" not in node.meta:
            node.meta["tensor_meta"] = found
