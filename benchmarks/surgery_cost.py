"""Wall time and peak memory of model surgery on CPU: ``nddrify.fuse`` and ``nddrify.plan``.

Each measurement runs in a fresh interpreter so that peak RSS is its own. Within it, the first
call is reported as ``cold`` (caches empty) and the median of the next repeats as ``warm``.

    python benchmarks/surgery_cost.py                      # writes benchmarks/results/surgery_cost.*
    python benchmarks/surgery_cost.py --models resnet101 --repeats 5
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

MODELS = ("resnet101", "vgg16")
OPERATIONS = ("fuse", "plan")


def _measure(model: str, operation: str, repeats: int) -> dict:
    import torch
    import torchvision

    import nddrify

    torch.set_num_threads(os.cpu_count() or 1)
    models = [torchvision.models.get_model(model, weights=None) for _ in range(2)]
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = nddrify.fuse if operation == "fuse" else nddrify.plan
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = run(models)
        times.append(time.perf_counter() - start)
        del result
        gc.collect()  # fx graphs and their modules reference each other: free them now
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in models[0].parameters())
    return {
        "model": model,
        "operation": operation,
        "cold_s": round(times[0], 3),
        "warm_median_s": round(statistics.median(times[1:]), 3),
        "warm_min_s": round(min(times[1:]), 3),
        "warm_max_s": round(max(times[1:]), 3),
        "repeats": repeats,
        "peak_rss_increase_mib": round((peak_kib - baseline_kib) / 1024, 1),
        "model_params": params,
        "model_mib_fp32": round(params * 4 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPERATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.one[0], args.one[1], args.repeats)))
        return 0

    import torch

    rows = []
    for model in args.models.split(","):
        for operation in OPERATIONS:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                model,
                operation,
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1])
    env = {
        "date": date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/surgery_cost.py " + " ".join(argv or sys.argv[1:]),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "surgery_cost.json").write_text(
        json.dumps({"env": env, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Surgery cost: `nddrify.fuse` and `nddrify.plan` on two copies of a model (CPU)",
        "",
        f"Device: {env['device']}; torch {env['torch']}; Python {env['python']}; {env['date']}.",
        f"Command: `{env['command'].strip()}`. Each row runs in a fresh process; `cold` is the first",
        "call, `warm` the median (min–max) of the next repeats; default input 1×3×224×224;",
        "peak RSS increase is measured after the models are built.",
        "",
        "| models | operation | cold (s) | warm median (s) | warm min–max (s) | peak RSS increase (MiB) | one model fp32 (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| 2 × {r['model']} | `{r['operation']}` | {r['cold_s']:.2f} | {r['warm_median_s']:.2f} "
            f"| {r['warm_min_s']:.2f}–{r['warm_max_s']:.2f} | {r['peak_rss_increase_mib']:.0f} "
            f"| {r['model_mib_fp32']:.0f} |"
        )
    (out_dir / "surgery_cost.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
