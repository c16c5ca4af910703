"""Save and load fused models: weights plus what is needed to rebuild them, nothing executable.

:func:`save` writes a ``torch.save`` file holding plain values only (task names, model specs,
fusion points, options) and the state dict, atomically (a temporary file renamed over the
target, so an interrupted save never leaves a truncated checkpoint). :func:`load` reads it with
``weights_only=True``, rebuilds the fused model with :func:`nddrify.fuse` — from the recorded
specs (``"torchvision:vgg16"``, ``"timm:resnet50"``) or from the models you pass — and loads the
weights strictly.

Example:
    >>> import tempfile, torch, nddrify
    >>> fused = nddrify.fuse(["torchvision:resnet18", "torchvision:resnet18"])
    >>> path = tempfile.mkdtemp() + "/fused.pt"
    >>> nddrify.save(fused, path)
    >>> again = nddrify.load(path)
    >>> torch.equal(again.nddr1.convs[0].weight, fused.nddr1.convs[0].weight)
    True
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelsError
from .meta import BUILD_META_KEY
from .plans import Plan
from .rewriting import FusedGraphModule, rewrite
from .tasks import TaskOptions, trace

__all__ = ["save", "load", "atomic_save"]

_FORMAT = "nddrify.fused/2"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save(
    fused: nn.Module, path: str | os.PathLike[str], *, specs: Sequence[str] | None = None
) -> None:
    """Write ``fused`` to ``path``: its weights and how to rebuild it.

    Args:
        fused: a model returned by :func:`nddrify.fuse`.
        path: the file to write (its folder is created).
        specs: model specs of the tasks, in task order, when ``fuse`` was given modules rather
            than spec strings; without them :func:`load` needs the models.
    """
    build = dict(getattr(fused, "meta", {}).get(BUILD_META_KEY) or {})
    if not isinstance(fused, FusedGraphModule) or not build:
        raise CheckpointError(
            f"expected a model returned by nddrify.fuse, got {type(fused).__name__}; to save "
            "any module's weights use torch.save(model.state_dict(), path)."
        )
    stored = build["plan"]
    if stored["fusion"] is None or (stored["shortcut"] or {}).get("custom"):
        raise CheckpointError(
            "this fused model uses a fusion kind of your own or a callable option (a custom norm "
            "or activation) that cannot be stored without pickling code; save "
            "fused.state_dict() instead and rebuild with the same nddrify.fuse(...) call before "
            "load_state_dict."
        )
    if specs is not None:
        if len(specs) != len(stored["tasks"]):
            raise CheckpointError(
                f"specs has {len(specs)} entries but the model has tasks {stored['tasks']}."
            )
        build["specs"] = list(specs)
    atomic_save(
        {
            "format": _FORMAT,
            "build": build,
            "training": fused.training,
            "state_dict": fused.state_dict(),
        },
        path,
    )


def _example_inputs(build: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor] | None:
    """Zeros of the recorded example input shape(s): one per task when the tasks' differed
    (the fused model then takes one input per task), else one for all (older checkpoints record
    ``example_input_shape`` only)."""
    shapes = build.get("example_input_shapes")
    if shapes and len({tuple(s) for s in shapes}) > 1:
        return [torch.zeros(shape) for shape in shapes]
    example = build.get("example_input_shape")
    return None if example is None else torch.zeros(example)


def load(
    path: str | os.PathLike[str],
    models: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
    trace_options: TaskOptions = None,
) -> FusedGraphModule:
    """Rebuild a fused model saved by :func:`save` and load its weights (``weights_only=True``).

    Args:
        path: the checkpoint.
        models: the task models (list in task order, or dict by task name) when the checkpoint
            has no specs for them; their weights are replaced by the checkpoint's.
        map_location: where to load the tensors.
        trace_options: the :class:`~nddrify.TraceOptions` the model was fused with (they hold
            classes and functions, which a checkpoint does not store).
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not an nddrify checkpoint (expected format {_FORMAT!r}); "
            "a plain state dict loads with fused.load_state_dict(torch.load(path, "
            "weights_only=True))."
        )
    build = payload["build"]
    tasks = build["plan"]["tasks"]
    if models is None:
        missing = [t for t, s in zip(tasks, build["specs"]) if s is None]
        if missing:
            raise CheckpointError(
                f"the checkpoint has no model specs for task(s) {missing}; pass the models: "
                "nddrify.load(path, models=[...]), or save with specs=[...]."
            )
        chosen: list[Any] = list(build["specs"])
    elif isinstance(models, Mapping):
        if set(models) != set(tasks):
            raise ModelsError(f"models has tasks {sorted(models)}, the checkpoint {tasks}.")
        chosen = [models[t] for t in tasks]
    else:
        chosen = list(models)
        if len(chosen) != len(tasks):
            raise ModelsError(f"got {len(chosen)} models for the checkpoint's tasks {tasks}.")
    traced = trace(
        dict(zip(tasks, chosen)) if build["as_dict"] else chosen,
        example_input=_example_inputs(build),
        options=trace_options,
    )
    fused = rewrite(traced, Plan.from_dict(build["plan"]))
    fused.load_state_dict(payload["state_dict"])
    return fused.train(payload["training"]) if fused.training != payload["training"] else fused
