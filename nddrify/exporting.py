"""Export a fused model for deployment: ONNX (:func:`export_onnx`) or a ``torch.export``
program (:func:`export_program`), its outputs named after the tasks, checked once against the
eager model.

Files are written atomically (a temporary file in the same folder renamed over the target) with
the umask's default mode. The check runs the exported file (ONNX Runtime, ``torch.export.load``)
on the example inputs and records each task's largest difference relative to the output's
largest magnitude in the returned :class:`Exported`.

Example:
    >>> import tempfile, torch, nddrify
    >>> from nddrify.exporting import export_program
    >>> fused = nddrify.fuse({"seg": "tests.models:TinyCNN", "depth": "tests.models:TinyCNN"},
    ...                      example_input=torch.zeros(1, 3, 32, 32)).eval()
    >>> result = export_program(fused, tempfile.mkdtemp() + "/fused.pt2")
    >>> result.outputs, result.verified
    (('seg', 'depth'), True)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ExportError
from .files import atomic_write
from .meta import BUILD_META_KEY, fused_plan

__all__ = ["Exported", "export_onnx", "export_program", "recorded_inputs", "TOLERANCE"]

#: Largest accepted difference between an export and the eager model, relative to the largest
#: magnitude of each task's output.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Exported:
    """One exported file and how it compared with the eager model.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"pt2"``.
        outputs: the exported outputs' names: the task names, in task order.
        bytes: the file's size.
        max_relative_difference: task → max |export − eager| / max |eager| on the example
            inputs; None when not checked.
        note: why it was not checked, if it was not.
    """

    path: str
    format: str
    outputs: tuple[str, ...]
    bytes: int
    max_relative_difference: Mapping[str, float] | None = None
    note: str = ""

    @property
    def verified(self) -> bool | None:
        """Whether every output is within :data:`TOLERANCE` (None: not checked)."""
        diff = self.max_relative_difference
        return None if diff is None else all(d <= TOLERANCE for d in diff.values())

    def __str__(self) -> str:
        if self.max_relative_difference is None:
            check = self.note or "not checked"
        else:
            worst = ", ".join(f"{t} {d:.1e}" for t, d in self.max_relative_difference.items())
            check = f"max |Δ|/max|y| vs the model: {worst}"
        return (
            f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB, {self.format}): outputs "
            f"{list(self.outputs)}; {check}"
        )


def recorded_inputs(fused: nn.Module) -> tuple[torch.Tensor, ...]:
    """Random inputs of the shapes ``fused`` was traced with: one tensor, or one per task when
    the tasks took inputs of different shapes."""
    build = getattr(fused, "meta", {}).get(BUILD_META_KEY) or {}
    shapes = build.get("example_input_shapes") or [build.get("example_input_shape")]
    if len({tuple(s) for s in shapes if s}) <= 1:
        shapes = shapes[:1]
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*(s or (1, 3, 224, 224)), generator=generator) for s in shapes)


def _prepare(
    fused: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor | None
) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    tasks = list(fused_plan(fused).tasks)  # FusedModelError for anything else
    if inputs is None:
        inputs = recorded_inputs(fused)
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    with torch.no_grad():
        outputs = fused(*inputs)
    if not isinstance(outputs, Mapping) or list(outputs) != tasks:
        raise ExportError(
            f"the model returns {type(outputs).__name__}, not a dict of the tasks {tasks}; "
            "export the model nddrify.fuse returned (or nddrify.load rebuilt)."
        )
    return tasks, inputs, {t: v.detach().float() for t, v in outputs.items()}


def _differences(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any]) -> dict[str, float]:
    return {
        task: float(
            (torch.as_tensor(got[task]).float() - value).abs().max()
            / value.abs().max().clamp_min(1e-12)
        )
        for task, value in expected.items()
    }


def export_onnx(
    fused: nn.Module,
    path: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    opset: int | None = None,
    verify: bool = True,
) -> Exported:
    """Export ``fused`` to ONNX with the dynamo exporter: inputs ``image`` (or ``<task>_image``
    when it takes one input per task), one output per task named after it.

    Args:
        fused: a model returned by :func:`nddrify.fuse` or :func:`nddrify.load` (put it in eval
            mode first for inference).
        path: the ``.onnx`` file to write.
        inputs: example inputs (default: random ones of the shapes it was traced with).
        opset: the ONNX opset (default: the exporter's).
        verify: run the file in ONNX Runtime and compare with the eager model.
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ExportError(
            "exporting to ONNX needs onnx and onnxscript: pip install 'nddrify[onnx]'."
        ) from None
    tasks, args, expected = _prepare(fused, inputs)
    input_names = ["image"] if len(args) == 1 else [f"{t}_image" for t in tasks]
    options = {"opset_version": opset} if opset else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                fused,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=tasks,
                verbose=False,
                **options,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    target = atomic_write(path, program.save)
    result = {"path": str(target), "format": "onnx", "outputs": tuple(tasks)}
    size = target.stat().st_size
    if not verify:
        return Exported(**result, bytes=size, note="not checked (verify=False)")
    try:
        import onnxruntime
    except ImportError:
        return Exported(**result, bytes=size, note="not checked (onnxruntime not installed)")
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = tuple(o.name for o in session.get_outputs())
    if names != tuple(tasks):
        raise ExportError(f"the ONNX file's outputs are {list(names)}, not the tasks {tasks}.")
    values = session.run(None, {n: x.numpy() for n, x in zip(input_names, args)})
    diff = _differences(expected, dict(zip(names, values)))
    return Exported(**result, bytes=size, max_relative_difference=diff)


def export_program(
    fused: nn.Module,
    path: str | os.PathLike[str],
    inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    verify: bool = True,
) -> Exported:
    """``torch.export.export`` of ``fused`` saved with ``torch.export.save`` (a ``.pt2`` file;
    ``torch.export.load(path).module()`` runs it and returns the dict task → output).

    Args:
        fused: a model returned by :func:`nddrify.fuse` or :func:`nddrify.load`.
        path: the ``.pt2`` file to write.
        inputs: example inputs (default: random ones of the shapes it was traced with).
        verify: load the file back, run it and compare with the eager model.
    """
    tasks, args, expected = _prepare(fused, inputs)
    try:
        program = torch.export.export(fused, args)
    except Exception as err:
        raise ExportError(f"torch.export.export failed: {type(err).__name__}: {err}") from err
    target = atomic_write(path, lambda temporary: torch.export.save(program, temporary))
    result = {"path": str(target), "format": "pt2", "outputs": tuple(tasks)}
    size = target.stat().st_size
    if not verify:
        return Exported(**result, bytes=size, note="not checked (verify=False)")
    with torch.no_grad():
        got = torch.export.load(str(target)).module()(*args)
    return Exported(**result, bytes=size, max_relative_difference=_differences(expected, got))
