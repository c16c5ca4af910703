"""Estimated cost of every paper row: FLOPs per training step, CPU step time, GPU-hours.

For each paper model family (DeepLab VGG-16, VGG-16-Shortcut, ResNet-101, AlexNet FCN-32s, the
VGG-16 classifier of IMDB-WIKI) and each row's configuration (``recipes.configs``, random weights:
``pretrained=``, ``init_from={}``):

* **FLOPs per image-step**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
  backward pass of the built network at batch 1 on the ``meta`` device (nothing computed;
  convolutions and matrix products, 2 FLOPs per multiply-add; elementwise ops, the loss and the
  SGD update are not counted: they are a few % of a conv net). A step of the config's batch
  ``B`` costs ``B ×`` that (exact for these networks: every op is per sample).
* **CPU s/step**: forward + backward (a surrogate loss: the mean of every output; the network's
  cost does not depend on the loss) + the recipe's SGD step (``recipes.builders.build_optimizer``)
  at batch ``--batch`` (default 1), timed over ``--repeats`` steps after one warm-up step, the
  minimum kept, then scaled linearly to the config's batch. Measured for the single-task (first
  task) and the NDDR row of each family only (``--timed``), to keep it cheap.
* **GPU-hours** on one modern GPU: ``steps × B × FLOPs per image-step / sustained FLOP/s``, with
  ``--gpu-tflops`` sustained (default 100 TFLOP/s: about 20 % of an H100 SXM's dense TF32 peak of
  ~495 TFLOP/s, PyTorch's default precision for convolutions; see recipes/README.md for why).
  Equivalently ``steps × CPU s/step / factor`` with ``factor = GPU FLOP/s ÷ measured CPU FLOP/s``
  (both written out).

Command that produced the committed results (a shared 2-core machine: the big networks are timed
once, single-task only)::

    python benchmarks/paper_step_time.py --threads 1 --repeats 1 --warmup 0 \
        --timed single,nyuv2_alexnet_nddr,imdb_vgg16_nddr

Quick check (seconds; used by no test)::

    python benchmarks/paper_step_time.py --families alexnet --out /tmp/cost
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: family key → (label, config prefix, tasks, paper table)
FAMILIES: dict[str, tuple[str, str, tuple[str, str], str]] = {
    "vgg16": ("DeepLab VGG-16", "nyuv2_vgg16", ("seg", "normal"), "Table 4 (and 1, 2, 3, A2)"),
    "vgg16_shortcut": ("VGG-16-Shortcut", "nyuv2_vgg16_shortcut", ("seg", "normal"), "Table 6"),
    "resnet101": ("ResNet-101", "nyuv2_resnet101", ("seg", "normal"), "Table 5"),
    "alexnet": ("AlexNet FCN-32s", "nyuv2_alexnet", ("seg", "normal"), "Table A1"),
    "imdb_vgg16": ("VGG-16 classifier", "imdb_vgg16", ("age", "gender"), "Table 7"),
}
METHODS = ("mul", "cross_stitch", "sluice", "nddr")
_OVERRIDES = ["pretrained=", "init_from={}", "device=cpu", "progress=false"]


def _config(name: str) -> Any:
    from recipes.configs import load_config

    return load_config(name, _OVERRIDES)


def _surrogate_loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([o.float().mean() for o in outputs.values()]).sum()


def _example(config: Any, batch: int, device: str) -> torch.Tensor:
    return torch.randn(batch, 3, config.crop, config.crop, device=device)


def count_flops(config: Any) -> int:
    """FLOPs of one forward + backward pass at batch 1 (meta device)."""
    from recipes.builders import build_network

    network = build_network(config).module.to("meta")
    network.train()
    with FlopCounterMode(display=False) as counter:
        _surrogate_loss(network(_example(config, 1, "meta"))).backward()
    return int(counter.get_total_flops())


def time_step(config: Any, batch: int, repeats: int, warmup: int = 1) -> float:
    """Seconds of one training step (forward, backward, SGD) at ``batch``: the minimum of
    ``repeats`` steps after ``warmup`` steps."""
    from recipes.builders import build_network, build_optimizer

    torch.manual_seed(0)
    network = build_network(config)
    module = network.module
    module.train()
    optimizer, _ = build_optimizer(network, config)
    images = _example(config, batch, "cpu")
    times = []
    for _ in range(repeats + warmup):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _surrogate_loss(module(images)).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[warmup:])


def rows_for(family: str) -> list[str]:
    """The config names of a family: the two single-task runs, then the fused methods."""
    _, prefix, tasks, _ = FAMILIES[family]
    return [f"{prefix}_single_{t}" for t in tasks] + [f"{prefix}_{m}" for m in METHODS]


def measure(
    families: Sequence[str],
    batch: int,
    repeats: int,
    timed: Sequence[str],
    warmup: int = 1,
    log: Any = print,
) -> list[dict[str, Any]]:
    """One record per config: FLOPs, steps, batch, and CPU time for the ``timed`` methods
    (``single``: the first task's run) and config names."""
    records = []
    for family in families:
        label, _, tasks, table = FAMILIES[family]
        for name in rows_for(family):
            config = _config(name)
            kind = "single" if config.method == "single" else config.method
            flops = count_flops(config)
            record: dict[str, Any] = {
                "family": family,
                "family_label": label,
                "table": table,
                "config": name,
                "method": config.method,
                "steps": config.steps,
                "batch": config.batch_size,
                "crop": config.crop,
                "flops_per_image": flops,
                "flops_per_step": flops * config.batch_size,
            }
            by_kind = kind in timed and (kind != "single" or config.tasks[0] == tasks[0])
            wanted = by_kind or name in timed
            if wanted:
                seconds = time_step(config, batch, repeats, warmup)
                record["cpu_measured_batch"] = batch
                record["cpu_s_per_step_measured"] = seconds
                record["cpu_s_per_step"] = seconds * config.batch_size / batch
                record["cpu_flops_per_s"] = flops * batch / seconds
            log(
                f"{name}: {flops / 1e9:.1f} GFLOP/image-step"
                + (
                    f", {record['cpu_s_per_step_measured']:.2f} s/step at batch {batch}"
                    if wanted
                    else ""
                )
            )
            records.append(record)
    return records


def estimate(records: list[dict[str, Any]], gpu_tflops: float) -> list[dict[str, Any]]:
    """Add ``gpu_hours`` (own run) and ``cpu_factor`` (GPU FLOP/s ÷ the family's measured CPU
    FLOP/s) to every record; fused rows also get ``gpu_hours_with_single`` (+ both single-task
    runs their ``init_from`` needs)."""
    gpu = gpu_tflops * 1e12
    for family in dict.fromkeys(r["family"] for r in records):
        rows = [r for r in records if r["family"] == family]
        measured = [r["cpu_flops_per_s"] for r in rows if "cpu_flops_per_s" in r]
        cpu = sum(measured) / len(measured) if measured else float("nan")
        singles = sum(
            r["steps"] * r["flops_per_step"] / gpu / 3600 for r in rows if r["method"] == "single"
        )
        for r in rows:
            r["gpu_hours"] = r["steps"] * r["flops_per_step"] / gpu / 3600
            r["cpu_factor"] = gpu / cpu
            if r["method"] != "single":
                r["gpu_hours_with_single"] = r["gpu_hours"] + singles
    return records


def _markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Estimated cost per paper row",
        "",
        f"`{meta['command']}` on {meta['device']}, torch {meta['torch']}, {meta['date']}.",
        "",
        f"GPU-hours = steps × batch × FLOPs per image-step / {meta['gpu_tflops']:g} TFLOP/s "
        "sustained (assumed; one modern GPU, see recipes/README.md). CPU s/step: measured at "
        f"batch {meta['batch']} (min of {meta['repeats']} step(s) after {meta['warmup']} "
        "warm-up step(s)), scaled "
        "linearly to the config's batch; — = not timed. factor = GPU FLOP/s ÷ the family's "
        "measured CPU FLOP/s (GPU-hours = steps × CPU s/step / factor).",
        "",
        "| config | table | steps | batch | GFLOP/step | CPU s/step | factor | GPU-h (run) "
        "| GPU-h (+ Sing.) |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        cpu = f"{r['cpu_s_per_step']:.1f}" if "cpu_s_per_step" in r else "—"
        total = f"{r['gpu_hours_with_single']:.2f}" if "gpu_hours_with_single" in r else "—"
        lines.append(
            f"| `{r['config']}` | {r['table']} | {r['steps']} | {r['batch']} | "
            f"{r['flops_per_step'] / 1e9:,.0f} | {cpu} | {r['cpu_factor']:,.0f} | "
            f"{r['gpu_hours']:.2f} | {total} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    parser.add_argument("--batch", type=int, default=1, help="CPU timing batch (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after a warm-up")
    parser.add_argument(
        "--timed", default="single,nddr", help="methods or config names timed on the CPU"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="sustained TFLOP/s")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; use {list(FAMILIES)}")
    start = time.perf_counter()
    records = measure(families, args.batch, args.repeats, args.timed.split(","), args.warmup)
    records = estimate(records, args.gpu_tflops)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    meta = {
        "command": "python benchmarks/paper_step_time.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "device": f"CPU {cpu}, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date.today().isoformat(),
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "gpu_tflops": args.gpu_tflops,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_step_time.json").write_text(
        json.dumps({"meta": meta, "rows": records}, indent=2) + "\n"
    )
    text = _markdown(records, meta)
    (out / "paper_step_time.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
