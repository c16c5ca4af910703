"""Batch-1 inference latency: the K original models one after another (sequential), the fused
GraphModule, and the fused model with its tasks batched (``nddrify.batching.batch_tasks``).

Every variant computes the two heads of the paper's pairs (40-class segmentation, 3-channel
normals: the heads differ, the backbones match). ``sequential`` runs the two originals without any
fusion layer, so it does less work than ``fused`` and ``batched`` (which include the NDDR layers at
the five automatic points); ``batched`` vs ``fused`` is the same computation. The variants are
timed interleaved (one call of each per round, in a shuffled order) so that machine load affects all alike; the table
gives the median and the minimum over the rounds, in eval mode under ``torch.inference_mode``.

Commands that produced the committed results::

    python benchmarks/batched_latency.py                 # CPU, writes benchmarks/results/batched_latency.*
    python benchmarks/batched_latency.py --device cuda --out benchmarks/results/batched_latency_cuda
    python benchmarks/batched_latency.py --device cuda --compile reduce-overhead   # CUDA graphs

Quick check::

    python benchmarks/batched_latency.py --models resnet18 --size 64 --repeats 5 --out /tmp/bl
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torchvision

import nddrify
from nddrify.batching import batch_tasks

__all__ = ["VARIANTS", "build_variants", "measure", "main"]

VARIANTS = ("sequential", "fused", "batched", "batched_grouped", "batched_split")
HEADS = {"seg": 40, "normal": 3}  # the paper's NYUv2 pair


def build_variants(name: str, device: str, compile_mode: str | None) -> dict[str, Callable]:
    make = getattr(torchvision.models, name)
    models = {task: make(num_classes=c).eval().to(device) for task, c in HEADS.items()}
    fused = nddrify.fuse(models).eval()
    variants: dict[str, Callable] = {
        "sequential": lambda x: [m(x) for m in models.values()],
        "fused": fused,
        "batched": batch_tasks(fused),
        "batched_grouped": batch_tasks(fused, conv_mode="grouped"),
        "batched_split": batch_tasks(fused, conv_mode="split"),
    }
    if compile_mode is not None:
        mode = None if compile_mode == "default" else compile_mode
        compiled = {
            k: torch.compile(v, mode=mode) for k, v in variants.items() if k != "sequential"
        }
        originals = [torch.compile(m, mode=mode) for m in models.values()]
        compiled["sequential"] = lambda x: [m(x) for m in originals]
        variants = {k: compiled[k] for k in variants}
    return variants


def measure(
    variants: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(warmup):
                fn(x)
        sync()
        order = list(variants.items())
        shuffle = random.Random(0).shuffle
        for _ in range(repeats):
            shuffle(order)  # no variant always runs right after another
            for key, fn in order:
                start = time.perf_counter()
                fn(x)
                sync()
                times[key].append(time.perf_counter() - start)
    return times


def _device_text(device: str) -> str:
    if device == "cuda":
        return f"CUDA ({torch.cuda.get_device_name()})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"]
    )
    parser.add_argument("--out", default="benchmarks/results/batched_latency")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        variants = build_variants(name, args.device, args.compile)
        x = torch.randn(1, 3, args.size, args.size, device=args.device)
        times = measure(variants, x, args.repeats)
        sequential = statistics.median(times["sequential"])
        fused = statistics.median(times["fused"])
        for key, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "model": name,
                    "variant": key,
                    "median_ms": round(median * 1e3, 2),
                    "min_ms": round(min(values) * 1e3, 2),
                    "speedup_vs_sequential": round(sequential / median, 2),
                    "speedup_vs_fused": round(fused / median, 2),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "device": _device_text(args.device),
        "torch": torch.__version__,
        "date": str(date.today()),
        "size": args.size,
        "repeats": args.repeats,
        "compile": args.compile,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Batch-1 latency: sequential vs fused vs batched tasks",
        "",
        f"Device: {result['device']}; torch {result['torch']}; {result['date']}; input "
        f"1×3×{args.size}×{args.size}; eval mode, `torch.inference_mode`; "
        f"compile: {args.compile or 'no'}; {args.repeats} interleaved rounds.",
        "",
        "| models | variant | median (ms) | min (ms) | × vs sequential | × vs fused |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| 2 × {row['model']} | {row['variant']} | {row['median_ms']:.2f} | "
            f"{row['min_ms']:.2f} | {row['speedup_vs_sequential']:.2f} | "
            f"{row['speedup_vs_fused']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
