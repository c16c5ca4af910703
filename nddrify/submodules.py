"""Fuse a named submodule of each model and hand back K task models sharing the fused trunk.

A model whose whole forward cannot be traced (a torchvision detector takes a list of images and
targets) can still be fused through a submodule that traces, such as its ``backbone``:
``nddrify.fuse(models, within="backbone")`` fuses the K submodules (``points``, ``fusion``,
``shortcut``, ``resize``, ``example_input`` and ``trace_options`` apply to them) and returns a
:class:`SharedTrunkModels`: task name → a deep copy of that task's model (the original is never
modified) whose submodule is replaced by a :class:`TrunkBranch`, a small module that runs the ONE
shared fused trunk and returns that task's output.

**Input contract.** A task's trunk output is the fused trunk's output for the tensor *that task*
feeds its submodule; the other tasks' branches run on that same tensor, because the fused trunk
computes all K branches from one input. Calling the trunks of all tasks with the same tensor (the
same object, or an equal one) runs the fused trunk once: the first call keeps the other tasks'
outputs and their calls take them. Tasks fed different tensors each run the whole fused trunk on
their own tensor: the results are still each task's exact output for its input, but the tasks
exchange features with branches that saw *their* tensor, and the trunk costs K times as much. So
feed every task the tensor its submodule sees: a torchvision detector's
``GeneralizedRCNNTransform`` resizes, normalises and pads the images before its ``backbone``,
so give the segmentation model ``det.transform(images)[0].tensors``.

**The cache** holds the outputs of the last fused-trunk run for the tasks that have not read
theirs yet, and a task takes a kept output only once. An output is reused only for the same
tensor object at the same version, or for an equal tensor (same shape, dtype, device and strides,
``torch.equal``) when neither requires grad, and only while the grad mode, inference mode,
autocast state, the trunk's train/eval flag and the version of every trunk parameter and buffer
are unchanged. Anything else runs the trunk again and replaces the kept outputs, so they never
outlive the next input. A backward pass through a served output drops them too (it frees the
graph the kept outputs hang from), so "forward A, backward A, forward B, backward B" recomputes for
B, while "forward A, forward B, backward (A + B)" runs the trunk once. ``clear_cache()`` drops them.

Example:
    >>> import torch, torchvision, nddrify
    >>> from torchvision.models.segmentation import lraspp_mobilenet_v3_large
    >>> a = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    >>> b = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=2).eval()
    >>> models = nddrify.fuse({"a": a, "b": b}, points=2, within="backbone",
    ...                       init=(1.0, 0.0), norm=None, activation=None)
    >>> models["a"].backbone
    TrunkBranch(task='a', trunk=NDDRFusedModel(tasks a, b; 2 fusion levels))
    >>> x = torch.randn(1, 3, 64, 64)
    >>> with torch.no_grad():
    ...     out = models(x)  # every task on x: the fused trunk runs once
    ...     bool(torch.equal(out["a"]["out"], a(x)["out"]))
    True
"""

from __future__ import annotations

import copy
import difflib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelsError
from .rewriting import FusedGraphModule
from .tasks import resolve_models

__all__ = ["Within", "SharedTrunkModels", "TrunkBranch", "fuse_within", "resolve_within"]

#: One submodule name for every task (``"backbone"``), one per task in task order, or a dict
#: task → name; a dotted name (``"backbone.body"``) reaches a nested submodule.
Within = str | Sequence[str] | Mapping[str, str]


def resolve_within(within: Within, tasks: Sequence[str]) -> tuple[str, ...]:
    """One submodule name per task, in task order.

    Raises:
        ModelsError: a list of the wrong length, a dict naming unknown tasks or missing one, or a
            name that is not a string.
    """
    if isinstance(within, str):
        names: list[Any] = [within] * len(tasks)
    elif isinstance(within, Mapping):
        unknown = sorted(str(k) for k in set(within) - set(tasks))
        missing = [t for t in tasks if t not in within]
        if unknown or missing:
            problem = f"names unknown task(s) {unknown}" if unknown else f"misses {missing}"
            raise ModelsError(
                f"within {problem}; the tasks are {list(tasks)}: give one submodule name for "
                "all tasks (within='backbone') or a dict with one name per task."
            )
        names = [within[t] for t in tasks]
    elif isinstance(within, Sequence):
        names = list(within)
        if len(names) != len(tasks):
            raise ModelsError(
                f"within gives {len(names)} submodule name(s) for {len(tasks)} tasks "
                f"{list(tasks)}; give one name for all tasks (within='backbone'), one per task, "
                "or a dict task → name."
            )
    else:
        raise ModelsError(
            f"within must be a submodule name, a list of names or a dict task → name, got "
            f"{type(within).__name__}."
        )
    for task, name in zip(tasks, names):
        if not isinstance(name, str):
            raise ModelsError(
                f"task {task!r}: within must name a submodule with a string such as "
                f"'backbone', got {type(name).__name__}."
            )
    return tuple(names)


def _submodule(model: nn.Module, name: str, task: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        pass
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        hint = f"did you mean {' or '.join(map(repr, close))}?"
    else:
        children = [n for n, _ in model.named_children()]
        hint = f"its direct submodules are {children}."
    raise ModelsError(
        f"task {task!r} ({type(model).__name__}) has no submodule {name!r} to fuse within; {hint}"
    )


class _Entry:
    """One fused-trunk run: its input, its state, and the outputs no task has read yet."""

    def __init__(self, x: torch.Tensor, state: tuple[Any, ...], pending: dict[str, Any]) -> None:
        # an inference tensor has no version counter: keep a copy to compare with instead
        self.version = None if x.is_inference() else x._version
        self.input = x.clone() if self.version is None else x
        self.state, self.pending = state, pending

    def matches(self, x: torch.Tensor) -> bool:
        seen = self.input
        if self.version is not None:
            if seen._version != self.version:  # modified in place since the run
                return False
            if x is seen:
                return True
        if x.requires_grad or seen.requires_grad:  # gradients must reach the caller's tensor
            return False
        return (
            x.shape == seen.shape
            and x.dtype == seen.dtype
            and x.device == seen.device
            and x.stride() == seen.stride()
            and bool(torch.equal(x, seen))
        )


def _autocast(device_type: str) -> tuple[Any, ...]:
    try:
        return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know
        return ()


def _state(trunk: nn.Module, x: torch.Tensor) -> tuple[Any, ...]:
    """Everything besides the input that a trunk output depends on and that may change."""
    tensors = (*trunk.parameters(), *trunk.buffers())
    return (
        trunk.training,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        _autocast(x.device.type),
        tuple((id(t), -1 if t.is_inference() else t._version) for t in tensors),
    )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class _TrunkCache:
    """The last fused-trunk run's outputs for the tasks that have not read them (one per model)."""

    def __init__(self) -> None:
        self.entry: _Entry | None = None

    def clear(self) -> None:
        self.entry = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _TrunkCache:
        return _TrunkCache()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entry = None

    def run(self, trunk: nn.Module, task: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return trunk(x)[task]
        entry = self.entry
        hit = entry is not None and task in entry.pending and entry.matches(x)
        if hit and entry is not None and entry.state == _state(trunk, x):
            out = entry.pending.pop(task)
            if not entry.pending:
                self.entry = None
            self._watch(entry, out)
            return out
        self.entry = None  # free the kept outputs before running again
        outputs = trunk(x)
        out = outputs[task]
        pending = {t: value for t, value in outputs.items() if t != task}
        if pending:
            self.entry = _Entry(x, _state(trunk, x), pending)
            self._watch(self.entry, out)
        return out

    def _watch(self, entry: _Entry, out: Any) -> None:
        """Drop ``entry`` when a backward pass goes through ``out`` (it frees their graph)."""
        if not torch.is_grad_enabled():
            return
        cache, kept = weakref.ref(self), weakref.ref(entry)

        def drop(grad: torch.Tensor) -> None:
            owner = cache()
            if owner is not None and owner.entry is not None and owner.entry is kept():
                owner.entry = None

        for tensor in _tensors(out):
            if tensor.requires_grad:
                tensor.register_hook(drop)


class TrunkBranch(nn.Module):
    """Stands in for one task's fused submodule: runs the shared fused trunk, returns this task's
    output (see the module docstring for when outputs are shared between tasks).

    Attributes the original submodule had and this module lacks (a detector backbone's
    ``out_channels``, ``body``) are read from the fused trunk's copy of it, ``trunk.<task>``,
    whose weights are the ones that run.
    """

    def __init__(self, trunk: FusedGraphModule, task: str, cache: _TrunkCache) -> None:
        super().__init__()
        self.trunk = trunk
        self.task = task
        self._cache = cache

    def forward(self, x: torch.Tensor) -> Any:
        return self._cache.run(self.trunk, self.task, x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules, task = self.__dict__.get("_modules"), self.__dict__.get("task")
            if name.startswith("__") or modules is None or "trunk" not in modules:
                raise
            original = getattr(modules["trunk"], str(task), None)
            if original is None or not hasattr(original, name):
                raise
            return getattr(original, name)

    def _apply(self, fn: Any, recurse: bool = True) -> TrunkBranch:
        self._cache.clear()  # .to(), .half(), ...: kept outputs are of the old weights
        return super()._apply(fn, recurse)

    def __repr__(self) -> str:
        tasks = getattr(self.trunk.meta.get("nddrify_plan"), "tasks", ())
        levels = len(getattr(self.trunk.meta.get("nddrify_plan"), "levels", ()))
        return (
            f"TrunkBranch(task={self.task!r}, trunk={type(self.trunk).__name__}(tasks "
            f"{', '.join(tasks)}; {levels} fusion levels))"
        )


class SharedTrunkModels(nn.ModuleDict):
    """K task models sharing one fused trunk: task name → model, what ``fuse(..., within=...)``
    returns.

    Each task model is a deep copy of the user's model whose fused submodule is a
    :class:`TrunkBranch`; all branches hold the same fused trunk (``.trunk``), so
    ``parameters()`` counts it once, and ``to()``, ``train()``/``eval()`` (of this object or of
    any task model: the trunk's mode is shared), ``state_dict()``/``load_state_dict()`` (the
    trunk's tensors appear under every task's key prefix, all the same tensors) and
    ``copy.deepcopy`` work as for any module. ``models[0]`` is the first task's model.
    Calling it runs every task: ``models(x)`` feeds ``x`` to each task model,
    ``models({"det": images, "seg": batch})`` one input per task; it returns a dict by task, or
    a tuple in task order when the models were given as a list.
    """

    def __init__(self, models: Mapping[str, nn.Module], *, as_dict: bool = True) -> None:
        super().__init__(models)
        self.as_dict = as_dict

    def __getitem__(self, key: str | int) -> nn.Module:  # type: ignore[override]
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def branches(self) -> dict[str, TrunkBranch]:
        """Each task's :class:`TrunkBranch`."""
        found = {}
        for task, model in self.items():
            branch = next(m for m in model.modules() if isinstance(m, TrunkBranch))
            found[task] = branch
        return found

    @property
    def trunk(self) -> FusedGraphModule:
        """The fused trunk (a :class:`~nddrify.rewriting.FusedGraphModule`; its ``meta`` holds
        the plan, and ``trunk(x)`` gives every task's submodule output)."""
        return next(iter(self.branches().values())).trunk

    @property
    def pending(self) -> tuple[str, ...]:
        """The tasks whose output of the last fused-trunk run is kept, not yet read."""
        cache = next(iter(self.branches().values()))._cache
        return tuple(cache.entry.pending) if cache.entry is not None else ()

    def clear_cache(self) -> None:
        """Drop the kept fused-trunk outputs."""
        for branch in self.branches().values():
            branch._cache.clear()

    def forward(self, inputs: Any) -> dict[str, Any] | tuple[Any, ...]:
        if isinstance(inputs, Mapping) and set(inputs) <= set(self.keys()) and inputs:
            missing = [t for t in self.keys() if t not in inputs]
            if missing:
                raise ModelsError(f"no input for task(s) {missing}; the tasks are {list(self)}.")
            out = {task: model(inputs[task]) for task, model in self.items()}
        else:
            out = {task: model(inputs) for task, model in self.items()}
        return out if self.as_dict else tuple(out.values())


def _task_copy(model: nn.Module, sub: nn.Module, branch: TrunkBranch) -> nn.Module:
    """A deep copy of ``model`` whose every reference to ``sub`` is ``branch``; the modules,
    parameters and buffers inside ``sub`` map to the fused trunk's copies (tied weights stay
    tied), so nothing of ``sub`` is copied twice."""
    fused_copy = getattr(branch.trunk, branch.task)
    memo: dict[int, Any] = {id(sub): branch}
    for kind in ("named_modules", "named_parameters", "named_buffers"):
        theirs = dict(getattr(fused_copy, kind)(remove_duplicate=False))
        for name, value in getattr(sub, kind)(remove_duplicate=False):
            if name and name in theirs and type(theirs[name]) is type(value):
                memo.setdefault(id(value), theirs[name])
    return copy.deepcopy(model, memo)


def fuse_within(
    models: Sequence[nn.Module | str] | Mapping[str, nn.Module | str],
    within: Within,
    points: Any = "auto",
    **options: Any,
) -> SharedTrunkModels:
    """Fuse the submodule ``within`` names in each model; return K task models sharing it.

    What ``nddrify.fuse(models, points, within=..., **options)`` calls; ``options`` are
    :func:`nddrify.fuse`'s (``fusion``, ``shortcut``, ``resize``, ``example_input``,
    ``trace_options``, ...), and they and ``points`` apply to the submodules (point names are
    relative to the submodule: ``"body.3"``, not ``"backbone.body.3"``).

    Raises:
        ModelsError: a name that is not a submodule of its task (the message suggests close
            names), or the wrong number of names.
        InputError: a fused trunk taking more than one input (per-task example inputs).
        And whatever :func:`nddrify.fuse` raises.
    """
    from .fusion import fuse  # fusion imports this module

    resolved = resolve_models(models)
    names = resolve_within(within, resolved.names)
    subs = {
        task: _submodule(model, name, task)
        for task, model, name in zip(resolved.names, resolved.modules, names)
    }
    trunk = fuse(subs, points, **options)
    inputs = [str(n.target) for n in trunk.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:  # e.g. example inputs of different sizes: one input per task
        raise InputError(
            f"within needs a fused trunk that takes one tensor shared by all tasks, but this one "
            f"takes {inputs}; give one example_input for all tasks."
        )
    cache = _TrunkCache()
    tasks = {}
    for task, model in zip(resolved.names, resolved.modules):
        branch = TrunkBranch(trunk, task, cache)
        tasks[task] = _task_copy(model, subs[task], branch)
    return SharedTrunkModels(tasks, as_dict=resolved.as_dict)
