"""Cost of a training step with each loss weighting and gradient aggregator, relative to fixed
loss weights, on one fused model.

Setting: two ResNet-18s fused with NDDR (random weights, 3 and 5 classes), batch 8, 64²,
cross-entropy per task, SGD; one thread. Per method, a step is: forward, the method's backward
(weighting: the weighted total's ``backward``; aggregator: ``nddrify.aggregation.
aggregate_backward`` on the shared parameters found once), the optimiser's step, and the
method's bookkeeping (FAMO: the losses recomputed on the same batch after the step, as in the
paper, then ``after_step``).

* **time**: every method's step timed interleaved with the others (one step each per round,
  the order rotating), median over ``--rounds`` rounds; ratio = method / fixed weights;
* **memory**: in a fresh process per method, the peak resident memory added by its first 3
  steps above the built model (RSS sampled every millisecond: activations, gradients,
  optimiser state, Jacobians), and the difference from fixed weights.

    python benchmarks/mtl_step_cost.py               # committed results (~3 min)
    python benchmarks/mtl_step_cost.py --preset ci   # two methods, one round (tests)
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import preset_main
from rss import PeakRSS

import nddrify
from nddrify.aggregation import aggregate_backward, make_aggregator, shared_parameters
from nddrify.weighting import make_weighting

__all__ = ["PRESETS", "build_step", "run", "markdown", "main"]

TASKS = ("a", "b")
WEIGHTINGS = ("fixed", "equal", "uncertainty", "dwa", "rlw", "gradnorm", "famo")
AGGREGATORS = ("upgrad", "mgda", "pcgrad", "imtlg", "alignedmtl", "graddrop")
PRESETS = {
    "cpu": {"methods": WEIGHTINGS + AGGREGATORS, "rounds": 7, "batch": 8, "size": 64},
    "ci": {"methods": ("fixed", "upgrad"), "rounds": 1, "batch": 2, "size": 32},
}


def build_step(method: str, batch: int, size: int) -> Callable[[], None]:
    """One training step of ``method`` on a fresh fused model (seeded)."""
    torch.manual_seed(0)
    models = {
        "a": torchvision.models.resnet18(num_classes=3),
        "b": torchvision.models.resnet18(num_classes=5),
    }
    fused = nddrify.fuse(models, example_input=torch.randn(1, 3, size, size), copy=False)
    fused.train()
    x = torch.randn(batch, 3, size, size)
    labels = {"a": torch.randint(0, 3, (batch,)), "b": torch.randint(0, 5, (batch,))}

    def losses() -> dict[str, torch.Tensor]:
        out = fused(x)
        return {t: F.cross_entropy(out[t], labels[t]) for t in TASKS}

    if method in AGGREGATORS:
        aggregator, shared = make_aggregator(method), shared_parameters(fused)
        optimizer = torch.optim.SGD(fused.parameters(), lr=1e-3)

        def aggregate_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            aggregate_backward(list(losses().values()), fused, aggregator, shared=shared)
            optimizer.step()

        return aggregate_step
    options: dict[str, Any] = {}
    if method == "fixed":
        options["weights"] = {"a": 1.0, "b": 20.0}
    if method == "gradnorm":  # the last shared layer: layer4's last conv of each backbone
        options["shared"] = [fused.a.layer4[1].conv2.weight, fused.b.layer4[1].conv2.weight]
    weighting = make_weighting(method, TASKS, **options)
    optimizer = torch.optim.SGD([*fused.parameters(), *weighting.parameters()], lr=1e-3)

    def weighted_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        weighting(losses()).backward()
        optimizer.step()
        if method == "famo":
            with torch.no_grad():
                weighting.after_step(losses())

    return weighted_step


def _memory_child(method: str, batch: int, size: int) -> int:
    import gc

    step = build_step(method, batch, size)
    gc.collect()
    with PeakRSS() as peak:  # from the built model: activations, gradients, Jacobians, state
        for _ in range(3):
            step()
    return peak.added


def _memory(method: str, batch: int, size: int) -> int:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        "import torch; torch.set_num_threads(1); import mtl_step_cost; "
        f"print(mtl_step_cost._memory_child({method!r}, {batch}, {size}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def run(preset: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(1)
    methods = list(preset["methods"])
    steps = {m: build_step(m, preset["batch"], preset["size"]) for m in methods}
    for step in steps.values():
        step()  # warm-up
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for index in range(preset["rounds"]):
        shift = index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            start = time.perf_counter()
            steps[method]()
            seconds[method].append(time.perf_counter() - start)
    rows = []
    base = statistics.median(seconds[methods[0]])
    base_memory = None
    for method in methods:
        median = statistics.median(seconds[method])
        memory = _memory(method, preset["batch"], preset["size"])
        base_memory = memory if base_memory is None else base_memory
        rows.append(
            {
                "method": method,
                "kind": "aggregator" if method in AGGREGATORS else "weighting",
                "step_ms": 1000 * median,
                "time_ratio": median / base,
                "peak_added_bytes": memory,
                "memory_above_fixed_bytes": memory - base_memory,
            }
        )
        log(f"{method}: {1000 * median:.1f} ms ({median / base:.2f}×), +{memory / 2**20:.0f} MiB")
    return {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "date": date.today().isoformat(),
        },
        "preset": preset,
        "rows": rows,
    }


def markdown(payload: dict[str, Any], command: str) -> str:
    p, env = payload["preset"], payload["environment"]
    lines = [
        "# Cost of a training step per loss weighting and gradient aggregator",
        "",
        f"2 × ResNet-18 fused with NDDR, batch {p['batch']}, {p['size']}², SGD, one thread; "
        f"{env['cpu_cores']} cores, torch {env['torch']}, Python {env['python']}, {env['date']}. "
        f"Command: `{command}`. Time: median of {p['rounds']} interleaved rounds; memory: peak "
        "RSS added by the first 3 steps above the built model, in a fresh process per method. "
        f"Ratios and differences against `{payload['rows'][0]['method']}`.",
        "",
        "| method | kind | step ms | time × | peak added MiB | MiB above fixed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['method']} | {row['kind']} | {row['step_ms']:.1f} | {row['time_ratio']:.2f} | "
            f"{row['peak_added_bytes'] / 2**20:.0f} | "
            f"{row['memory_above_fixed_bytes'] / 2**20:+.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    return preset_main("mtl_step_cost", __doc__.split("\n\n")[0], PRESETS, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
