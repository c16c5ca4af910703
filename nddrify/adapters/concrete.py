"""Tracing with concrete metadata: every traced value also carries a fake tensor (shape, dtype,
device, no data), so Python control flow on metadata — ``if x.dtype != w.dtype``, ``for d in
x.shape[2:]``, ``if h % 8`` — is decided for the example input, while the values themselves stay
symbolic in the graph (``x.shape[2]`` is still a node, so other sizes and batch sizes run).

This is what transformers' own fx tracer did before version 5 removed it; adapters switch it on
with ``TraceAdapter(concrete_metadata=True)``. Values fake tensors cannot compute are unknown and
behave as in plain fx (control flow on them is a trace error).

Example:
    >>> import torch, torch.fx as fx
    >>> from nddrify.adapters.concrete import metadata_tracer
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         if x.dtype != torch.float32:  # plain fx: "cannot be used in control flow"
    ...             x = x.float()
    ...         size = [d // 2 for d in x.shape[2:]]
    ...         return torch.nn.functional.interpolate(x, size=size)
    >>> tracer = metadata_tracer(fx.Tracer)()
    >>> tracer.example_input = torch.randn(1, 3, 8, 8)
    >>> gm = fx.GraphModule(Net(), tracer.trace(Net()))
    >>> tuple(gm(torch.randn(2, 3, 16, 16)).shape)
    (2, 3, 8, 8)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.fx._symbolic_trace import _maybe_revert_all_patches

__all__ = ["metadata_tracer"]

_UNKNOWN = object()


class _Sized:
    """``len()`` of a proxy whose value is a known sequence (``x.shape``, ``x.shape[:-1]``), as
    ``(*x.shape[:-1], -1)`` needs."""

    tracer: Any

    def __len__(self) -> int:
        value = self.tracer._known(self)
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()  # type: ignore[misc]


class _MetaAttribute(_Sized, fx.proxy.Attribute):
    pass


class _MetaProxy(_Sized, fx.Proxy):
    def __getattr__(self, k: str) -> _MetaAttribute:
        return _MetaAttribute(self, k)


class _MetadataTracer:
    """Mixin over an fx tracer; set ``example_input`` before ``trace``."""

    example_input: torch.Tensor | None = None

    def trace(self, root: Any, *args: Any, **kwargs: Any) -> fx.Graph:
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._values: dict[fx.Node, Any] = {}
        self._fakes: dict[int, torch.Tensor] = {}
        return super().trace(root, *args, **kwargs)  # type: ignore[misc]

    # -- values ------------------------------------------------------------------------------

    def _fake(self, value: Any) -> Any:
        """A fake copy of a real tensor (cached), so nothing computes on or mutates real data."""
        if not isinstance(value, torch.Tensor):
            return value
        found = self._fakes.get(id(value))
        if found is None:
            found = self._fake_mode.from_tensor(value)
            self._fakes[id(value)] = found
        return found

    def _value_of(self, node: Any) -> Any:
        if node not in self._values and node.op == "get_attr":
            # fx writes a tensor attribute used as an argument as get_attr without a proxy
            self._values[node] = self._compute(node)
        value = self._values.get(node, _UNKNOWN)
        if value is _UNKNOWN:
            raise LookupError(node)
        return value

    def _compute(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            if self.example_input is None or any(n.op == "placeholder" for n in self._values):
                return _UNKNOWN
            return self._fake(self.example_input)
        root: nn.Module = self.root  # type: ignore[attr-defined]
        if node.op == "get_attr":
            value: Any = root
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return self._fake(value)
        args = fx.map_arg(node.args, self._value_of)
        kwargs = fx.map_arg(node.kwargs, self._value_of)
        with self._fake_mode, torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            if node.op == "call_method":
                return getattr(args[0], str(node.target))(*args[1:], **kwargs)
            if node.op == "call_module":
                module = root.get_submodule(str(node.target))
                state = {
                    name: self._fake(t)
                    for name, t in (*module.named_parameters(), *module.named_buffers())
                }
                return functional_call(module, state, tuple(args), kwargs)
        return _UNKNOWN

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)  # type: ignore[misc]
        if isinstance(proxy, fx.Proxy) and proxy.node not in self._values:
            try:
                # fx's patches (Module.__call__, __getattr__) off: compute, do not trace
                with _maybe_revert_all_patches():
                    self._values[proxy.node] = self._compute(proxy.node)
            except Exception:
                self._values[proxy.node] = _UNKNOWN
        return proxy

    # -- control flow ------------------------------------------------------------------------

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)  # type: ignore[arg-type]

    def _known(self, proxy: fx.Proxy) -> Any:
        value = self._values.get(proxy.node, _UNKNOWN)
        return _UNKNOWN if isinstance(value, torch.Tensor) else value

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._known(obj)
        if value is _UNKNOWN:
            return super().to_bool(obj)  # type: ignore[misc]
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self._known(obj)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)  # type: ignore[misc]


@functools.cache
def metadata_tracer(base: type[fx.Tracer]) -> type[fx.Tracer]:
    """``base`` (an fx tracer class) with concrete metadata; set ``example_input`` on the
    instance before tracing."""
    return type(f"Metadata{base.__name__}", (_MetadataTracer, base), {})
