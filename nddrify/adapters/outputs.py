"""Output hooks for :attr:`TraceAdapter.output <nddrify.adapters.TraceAdapter.output>`: keep a
model's own output class in the traced graph.

torch.fx lowers a returned ``dict`` subclass (a Hugging Face ``ModelOutput``) to a plain dict;
:func:`keep_output_class` makes the graph end in one call of the output's class instead, so the
traced (and the fused) model returns the same class as the model.

Example:
    >>> import dataclasses, torch, torch.fx as fx
    >>> from collections import OrderedDict
    >>> from nddrify.adapters.outputs import keep_output_class
    >>> @dataclasses.dataclass
    ... class Out(OrderedDict):
    ...     logits: torch.Tensor | None = None
    ...     def __post_init__(self):
    ...         self["logits"] = self.logits
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return keep_output_class(Out(logits=x * 2))
    >>> gm = fx.symbolic_trace(Net())
    >>> type(gm(torch.ones(1))).__name__
    'Out'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch.fx as fx

__all__ = ["keep_output_class"]


class _Rebuilt:
    """A return value that fx writes as one call of its class (its non-``None`` fields)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __fx_create_arg__(self, tracer: fx.Tracer) -> fx.node.Argument:
        value = self.value
        if isinstance(value, Mapping):
            fields = dict(value.items())  # a ModelOutput holds its set fields, in order
        else:
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return tracer.create_proxy("call_function", type(value), (), fields).node


def keep_output_class(value: Any) -> Any:
    """``value`` marked to be rebuilt as its own class by the graph when it is a dataclass (a
    Hugging Face ``ModelOutput``); anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _Rebuilt(value)
    return value
