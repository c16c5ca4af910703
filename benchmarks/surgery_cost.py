"""Wall time and peak memory of model surgery on CPU: ``nddrify.fuse``, ``nddrify.plan`` and the
``nddrify inspect`` command.

Each measurement runs in a fresh interpreter so that peak RSS is its own:

* ``fuse`` / ``plan``: within it, the two models are built, then the first call is reported as
  ``cold`` (caches empty) and the median of the next repeats as ``warm``; peak RSS increase is
  measured from after the models are built. Target: ``fuse`` of 2 × ResNet-101 ≤ 2 s.
* ``inspect``: ``python -m nddrify inspect torchvision:M torchvision:M --json`` run as a
  subprocess (what a user types: interpreter start, imports, model construction, planning); the
  wall time of the whole command and the child's peak RSS, plus the planning time the command
  reports itself (``seconds`` in its JSON output).

Commands that produced the committed results::

    python benchmarks/surgery_cost.py                      # writes benchmarks/results/surgery_cost.*
    python benchmarks/surgery_cost.py --preset ci --out /tmp/surgery   # resnet18, cold only

Other selections::

    python benchmarks/surgery_cost.py --models resnet101 --operations fuse,inspect --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "OPERATIONS", "PRESETS", "FUSE_TARGET_S", "measure", "run", "main"]

MODELS = ("resnet101", "vgg16")
OPERATIONS = ("fuse", "plan", "inspect")
#: The project's target for ``fuse()`` wall time (warm) on two models of this size.
FUSE_TARGET_S = 2.0
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"models": list(MODELS), "operations": list(OPERATIONS), "repeats": 3},
    "ci": {"models": ["resnet18"], "operations": ["fuse", "inspect"], "repeats": 0},
}


def _summary(times: list[float]) -> dict[str, float]:
    warm = times[1:] or times[:1]
    return {
        "cold_s": round(times[0], 3),
        "warm_median_s": round(statistics.median(warm), 3),
        "warm_min_s": round(min(warm), 3),
        "warm_max_s": round(max(warm), 3),
    }


def _measure_in_process(model: str, operation: str, repeats: int) -> dict[str, Any]:
    import torch
    import torchvision

    import nddrify

    torch.set_num_threads(os.cpu_count() or 1)
    models = [torchvision.models.get_model(model, weights=None) for _ in range(2)]
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_once = nddrify.fuse if operation == "fuse" else nddrify.plan
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = run_once(models)
        times.append(time.perf_counter() - start)
        del result
        gc.collect()  # fx graphs and their modules reference each other: free them now
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in models[0].parameters())
    return {
        **_summary(times),
        "peak_rss_increase_mib": round((peak_kib - baseline_kib) / 1024, 1),
        "model_params": params,
        "model_mib_fp32": round(params * 4 / 2**20, 1),
    }


def _measure_inspect(model: str, repeats: int) -> dict[str, Any]:
    spec = f"torchvision:{model}"
    command = [sys.executable, "-m", "nddrify", "inspect", spec, spec, "--json"]
    times, plan_times = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
        plan_times.append(json.loads(done.stdout)["seconds"])
    # This helper process has run only these children: their largest peak RSS is the command's.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        **_summary(times),
        "plan_in_command_s": round(statistics.median(plan_times), 3),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "command": " ".join(["python -m nddrify inspect", spec, spec, "--json"]),
    }


def measure(model: str, operation: str, repeats: int) -> dict[str, Any]:
    """One row, measured in a fresh interpreter (this function starts it).

    Example:
        >>> row = measure("resnet18", "fuse", 1)  # doctest: +SKIP
        >>> sorted(row)[:3]  # doctest: +SKIP
        ['cold_s', 'model', 'model_mib_fp32']
    """
    command = [sys.executable, __file__, "--one", model, operation, "--repeats", str(repeats)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {"model": model, "operation": operation, "repeats": repeats} | json.loads(
        out.strip().splitlines()[-1]
    )


def _target(row: dict[str, Any]) -> str:
    if row["operation"] != "fuse":
        return ""
    return "✓" if row["warm_median_s"] <= FUSE_TARGET_S else "✗"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report."""
    env, rows = payload["env"], payload["rows"]
    lines = [
        "# Surgery cost: `nddrify.fuse`, `nddrify.plan` and `nddrify inspect` on two copies of a "
        "model (CPU)",
        "",
        f"Device: {env['device']}; torch {env['torch']}; Python {env['python']}; {env['date']}.",
        f"Command: `{env['command']}`. Each row runs in a fresh process; `cold` is the first",
        "call, `warm` the median (min–max) of the next repeats; default input 1×3×224×224.",
        "`fuse`/`plan`: peak RSS increase measured after the models are built; target for "
        f"`fuse`: ≤ {FUSE_TARGET_S:g} s (warm). `inspect`: the whole command "
        "`python -m nddrify inspect torchvision:M torchvision:M --json` as a subprocess "
        "(interpreter start, imports, building both models, planning), its peak RSS, and the "
        "planning time it reports.",
        "",
        *(
            ["With 0 repeats the warm figures are the cold call's.", ""]
            if any(r["repeats"] == 0 for r in rows)
            else []
        ),
        "| models | operation | cold (s) | warm median (s) | warm min–max (s) "
        f"| fuse ≤ {FUSE_TARGET_S:g} s | peak RSS (MiB) | planning inside the command (s) "
        "| one model fp32 (MiB) |",
        "|---|---|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for r in rows:
        if r["operation"] == "inspect":
            rss = f"{r['peak_rss_mib']:.0f} (whole process)"
            inside = f"{r['plan_in_command_s']:.2f}"
            size = ""
        else:
            rss = f"+{r['peak_rss_increase_mib']:.0f}"
            inside = ""
            size = f"{r['model_mib_fp32']:.0f}"
        operation = "`nddrify inspect`" if r["operation"] == "inspect" else f"`{r['operation']}`"
        lines.append(
            f"| 2 × {r['model']} | {operation} | {r['cold_s']:.2f} | {r['warm_median_s']:.2f} "
            f"| {r['warm_min_s']:.2f}–{r['warm_max_s']:.2f} | {_target(r)} | {rss} | {inside} "
            f"| {size} |"
        )
    return "\n".join(lines) + "\n"


def run(
    models: list[str],
    operations: list[str],
    repeats: int,
    out_dir: str | Path,
    *,
    command: str = "",
    log: Any = print,
) -> dict[str, Any]:
    """Measure every (model, operation) in its own process; write ``surgery_cost.json``/``.md``."""
    import torch

    rows = []
    for model in models:
        for operation in operations:
            rows.append(measure(model, operation, repeats))
            log(rows[-1])
    env = {
        "date": date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command,
        "fuse_target_s": FUSE_TARGET_S,
    }
    payload = {"env": env, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "surgery_cost.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "surgery_cost.md").write_text(markdown(payload))
    return payload


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="presets: full (default; resnet101 and vgg16, fuse/plan/inspect, 3 repeats; "
        "about 2 minutes) and ci (resnet18, fuse and inspect, the cold call only; about 10 s).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--models", type=_csv, help="torchvision model names, e.g. resnet101")
    parser.add_argument("--operations", type=_csv, help=f"comma list of {', '.join(OPERATIONS)}")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPERATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    repeats = preset["repeats"] if args.repeats is None else args.repeats
    if args.one:
        model, operation = args.one
        if operation == "inspect":
            row = _measure_inspect(model, repeats)
        else:
            row = _measure_in_process(model, operation, repeats)
        print(json.dumps(row))
        return 0
    operations = args.operations or preset["operations"]
    unknown = sorted(set(operations) - set(OPERATIONS))
    if unknown:
        parser.error(f"unknown --operations {unknown}; choose from {list(OPERATIONS)}")
    run(
        args.models or preset["models"],
        operations,
        repeats,
        args.out,
        command=" ".join(["python benchmarks/surgery_cost.py", *argv]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
