"""Memory and time of building: ``fuse(copy=True)`` vs ``fuse(copy=False)``, and planning on
the meta device (``nddrify inspect``) vs planning models built with their weights.

* **fuse**: in a fresh process per variant, build the K models (random weights), collect
  garbage, read the resident set size (RSS), then fuse while a thread samples RSS every
  millisecond (``/proc/self/statm``); added peak = max RSS during ``fuse`` − RSS before. Reported
  beside the models' weight bytes (parameters and buffers).
* **inspect**: the command ``nddrify inspect SPEC SPEC`` (specs built on the meta device) in a
  fresh process, and the same plan made from models built with their weights
  (``nddrify.plan(nddrify.trace(specs))``, what ``inspect`` did before): wall time and peak RSS
  of the whole process (``ru_maxrss`` of the child, Python and torch included).

    python benchmarks/fuse_memory.py               # two VGG-16s; two ViT-L/16 (~2 min)
    python benchmarks/fuse_memory.py --preset ci   # resnet18 / vit_tiny (tests)

Writes ``fuse_memory.json`` and ``fuse_memory.md`` in ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import preset_main
from rss import PeakRSS

__all__ = ["PRESETS", "measure_fuse", "measure_inspect", "run", "markdown", "main"]

PRESETS = {
    "cpu": {"fuse_model": "vgg16", "inspect_spec": "timm:vit_large_patch16_224", "tasks": 2},
    "ci": {"fuse_model": "resnet18", "inspect_spec": "timm:vit_tiny_patch16_224", "tasks": 2},
}


def _fuse_child(model: str, tasks: int, copy: bool) -> dict[str, Any]:
    """Runs in the child: build, fuse with RSS sampling, report."""
    import gc

    import torch
    import torchvision

    import nddrify

    torch.manual_seed(0)
    models = [torchvision.models.get_model(model, weights=None).eval() for _ in range(tasks)]
    weights = sum(
        t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers())
    )
    gc.collect()
    start = time.perf_counter()
    with PeakRSS() as peak:
        fused = nddrify.fuse(models, copy=copy)
    seconds = time.perf_counter() - start
    fusion = sum(
        p.numel() * p.element_size()
        for name, p in fused.named_parameters()
        if name.startswith("nddr")
    )
    return {
        "model": model,
        "tasks": tasks,
        "copy": copy,
        "weights_bytes": weights,
        "fusion_layer_bytes": fusion,
        "rss_before_bytes": peak.before,
        "peak_added_bytes": peak.added,
        "peak_added_over_weights": peak.added / weights,
        "seconds": seconds,
    }


def measure_fuse(model: str, tasks: int, copy: bool) -> dict[str, Any]:
    """One fresh process fusing ``tasks`` × ``model`` with ``copy``."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import fuse_memory; "
        f"print(json.dumps(fuse_memory._fuse_child({model!r}, {tasks}, {copy})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_PEAK = "import resource, sys; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"


def _child_peak(code: str) -> dict[str, Any]:
    """Wall seconds and the process's own peak RSS (``ru_maxrss``) of ``python -c code``."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{_PEAK}"], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{code!r} failed: {done.stderr[-2000:]}")
    peak_kib = int(done.stderr.rsplit("PEAK", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_bytes": peak_kib * 1024}


def measure_inspect(spec: str) -> list[dict[str, Any]]:
    """The ``nddrify inspect SPEC SPEC`` command (meta device) and the same plan made from
    models built with their weights, each in a fresh process."""
    meta = (
        "import contextlib, io; from nddrify.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['inspect', {spec!r}, {spec!r}]) == 0"
    )
    real = f"import nddrify; nddrify.plan(nddrify.trace([{spec!r}, {spec!r}]))"
    return [
        {"variant": "nddrify inspect (meta device)", "spec": spec, **_child_peak(meta)},
        {"variant": "plan of models built with weights", "spec": spec, **_child_peak(real)},
    ]


def run(preset: dict[str, Any]) -> dict[str, Any]:
    import torch

    fuse_rows = [
        measure_fuse(preset["fuse_model"], preset["tasks"], copy) for copy in (True, False)
    ]
    return {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "date": date.today().isoformat(),
        },
        "preset": preset,
        "fuse": fuse_rows,
        "inspect": measure_inspect(preset["inspect_spec"]),
    }


def markdown(payload: dict[str, Any], command: str) -> str:
    env = payload["environment"]
    mib = 2**20
    lines = [
        "# Memory of fusing, and planning without weights",
        "",
        f"Machine: {env['cpu_cores']} cores; torch {env['torch']}; Python {env['python']}; "
        f"{env['platform']}; {env['date']}. Command: `{command}`.",
        "",
        "## `nddrify.fuse(models, copy=...)`",
        "",
        "Fresh process per row; RSS sampled every millisecond during `fuse`; added peak = max "
        "RSS during `fuse` − RSS after building the models.",
        "",
        "| models | copy | weights MiB | fusion layers MiB | added peak MiB | added peak / weights | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in payload["fuse"]:
        lines.append(
            f"| {row['tasks']} × {row['model']} | {row['copy']} | {row['weights_bytes'] / mib:.1f} | "
            f"{row['fusion_layer_bytes'] / mib:.1f} | {row['peak_added_bytes'] / mib:.1f} | "
            f"{row['peak_added_over_weights']:.3f} | {row['seconds']:.2f} |"
        )
    lines += [
        "",
        "## Planning: `nddrify inspect` (meta device) vs a plan of models built with weights",
        "",
        "Whole fresh process (interpreter, torch and timm imports included): wall seconds and "
        "peak RSS (`ru_maxrss`).",
        "",
        "| variant | specs | seconds | peak RSS MiB |",
        "|---|---|---:|---:|",
    ]
    for row in payload["inspect"]:
        lines.append(
            f"| {row['variant']} | 2 × `{row['spec']}` | {row['seconds']:.1f} | "
            f"{row['peak_rss_bytes'] / mib:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    return preset_main("fuse_memory", __doc__.split("\n\n")[0], PRESETS, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
