"""The GPU matrix in one short slot: fused vs sequential (and batched) on one CUDA GPU within a
time budget (default 8 minutes, warm-up and building included), written as JSON + Markdown
named after the GPU.

Settings run in priority order, each timed with ``benchmarks/throughput.py``'s interleaved
method (warm-up steps, then rounds with one step of every variant, the order rotating; median
latency, IQR, ratio to sequential beside its FLOP ceiling) plus the peak memory each variant
allocates for one step above its weights (``torch.cuda.max_memory_allocated``):

1. forward, eager: VGG-16, ResNet-101 (NDDR and rank-64 NDDR) and ViT-B/16 (token fusion) at
   batch 1/8/32, fp32 and bf16 (autocast), the convnets also channels-last;
2. train step (forward, loss, backward, SGD), eager, bf16, batch 8/32;
3. batch 1 forward with CUDA graphs: sequential vs fused vs batched (``nddrify.batch_tasks``);
4. ``torch.compile`` (inductor), forward bf16 at batch 8/32 and a bf16 train step at batch 32.

A setting starts only while the elapsed time leaves ``--reserve-s`` of the budget; the ones
left out are listed as skipped (so the whole run ends within the budget). Models are built
once per architecture and every variant of it stays on the GPU.

    python benchmarks/gpu_suite.py                        # on a CUDA GPU (≤ 8 minutes)
    python benchmarks/gpu_suite.py --preset cpu-tiny      # the same code on the CPU, seconds

Outputs: ``gpu_suite_<gpu>.json`` and ``gpu_suite_<gpu>.md`` in ``--out`` (default
``benchmarks/results``), ``<gpu>`` from ``torch.cuda.get_device_name`` (``cpu`` for the tiny
preset).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import command_line, write_reports
from throughput import (
    Setting,
    _device_description,
    build_models,
    build_variants,
    measure_setting,
)

__all__ = ["SUITES", "Suite", "Block", "run", "markdown", "main"]


@dataclass(frozen=True)
class Block:
    """Settings of one model that share its built variants."""

    model: str
    size: int
    kinds: tuple[str, ...]
    variants: tuple[str, ...]  # throughput variant groups: sequential, fused, batched
    settings: tuple[Setting, ...]


@dataclass(frozen=True)
class Suite:
    device: str
    budget_s: float
    reserve_s: float
    warmup: int
    repeats: int
    blocks: tuple[Block, ...]


def _settings(model: str, size: int, **axes: Iterable[Any]) -> tuple[Setting, ...]:
    import itertools

    names = ("batch", "dtype", "channels_last", "compile", "mode", "cuda_graphs")
    values = [
        tuple(axes.get(n, default))
        for n, default in zip(names, ((1,), ("fp32",), (False,), (False,), ("forward",), (False,)))
    ]
    return tuple(
        Setting(model, 2, batch, size, dtype, cl, comp, mode, graphs)
        for batch, dtype, cl, comp, mode, graphs in itertools.product(*values)
    )


def _block(model: str, kinds: tuple[str, ...], variants: tuple[str, ...], **axes: Any) -> Block:
    """A block of ``model`` at 224² with every combination of ``axes`` (see :func:`_settings`)."""
    return Block(model, 224, kinds, variants, _settings(model, 224, **axes))


def _gpu_blocks() -> tuple[Block, ...]:
    fused = ("sequential", "fused")
    convnets = (("vgg16", ("nddr",)), ("resnet101", ("nddr", "nddr rank 64")))
    blocks = [  # 1: forward, eager
        _block(m, k, fused, batch=(1, 8, 32), dtype=("fp32", "bf16"), channels_last=(False, True))
        for m, k in convnets
    ]
    blocks.append(_block("vit_b_16", ("nddr",), fused, batch=(1, 8, 32), dtype=("fp32", "bf16")))
    blocks += [  # 2: train step
        _block(m, k, fused, batch=(8, 32), dtype=("bf16",), mode=("train",))
        for m, k in (*convnets, ("vit_b_16", ("nddr",)))
    ]
    blocks += [  # 3: batch 1 with CUDA graphs, the batched mode included
        _block(m, ("nddr",), (*fused, "batched"), dtype=("fp32", "bf16"), cuda_graphs=(True,))
        for m in ("vgg16", "resnet101")
    ]
    for model, kinds in convnets:  # 4: torch.compile, forward and a train step
        forward = _settings(model, 224, batch=(8, 32), dtype=("bf16",), compile=(True,))
        train = _settings(
            model, 224, batch=(32,), dtype=("bf16",), compile=(True,), mode=("train",)
        )
        blocks.append(Block(model, 224, kinds, fused, (*forward, *train)))
    return tuple(blocks)


SUITES = {
    "gpu": Suite("cuda", budget_s=480, reserve_s=45, warmup=3, repeats=10, blocks=_gpu_blocks()),
    "cpu-tiny": Suite(
        "cpu",
        budget_s=120,
        reserve_s=5,
        warmup=1,
        repeats=2,
        blocks=(
            Block(
                "resnet18",
                64,
                ("nddr", "nddr rank 64"),
                ("sequential", "fused", "batched"),
                _settings("resnet18", 64, batch=(2, 4), mode=("forward", "train")),
            ),
        ),
    ),
}


def run(suite: Suite, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every block in order while the budget lasts; the JSON payload."""
    device = torch.device(suite.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; use --preset cpu-tiny on the CPU")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    flops: dict[tuple[Any, ...], int] = {}
    for block in suite.blocks:
        if time.perf_counter() - start > suite.budget_s - suite.reserve_s:
            skipped += [s.label() for s in block.settings]
            continue
        models = build_models(block.model, 2, device)
        example = torch.randn(1, 3, block.size, block.size, device=device)
        variants = list(build_variants(models, block.kinds, block.variants, block.kinds, example))
        compiled: dict[tuple[Any, ...], Any] = {}
        for setting in block.settings:
            if time.perf_counter() - start > suite.budget_s - suite.reserve_s:
                skipped.append(setting.label())
                continue
            log(setting.label())
            block_rows = measure_setting(
                setting, variants, device, suite.warmup, suite.repeats, flops, log, compiled
            )
            rows += block_rows
        del variants, models, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "environment": _device_description(device),
        "suite": {k: v for k, v in asdict(suite).items() if k != "blocks"},
        "elapsed_s": time.perf_counter() - start,
        "rows": rows,
        "skipped": skipped,
    }


def device_tag(payload: dict[str, Any]) -> str:
    """``h100_80gb_hbm3`` from the GPU's name, ``cpu`` on the CPU."""
    name = payload["environment"].get("gpu", "cpu")
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")


def markdown(payload: dict[str, Any], command: str) -> str:
    env = payload["environment"]
    device = env.get("gpu", env.get("cpu", "cpu"))
    lines = [
        f"# GPU suite: fused vs sequential on {device}",
        "",
        f"torch {env['torch']}, torchvision {env['torchvision']}, CUDA {env['cuda']}; Python "
        f"{env['python']}; {env['date']}. Command: `{command}`. Elapsed "
        f"{payload['elapsed_s']:.0f} s (budget {payload['suite']['budget_s']:.0f} s), "
        f"{payload['suite']['warmup']} warm-up steps and {payload['suite']['repeats']} "
        "interleaved rounds per setting. ratio = sequential median / variant median; ceiling "
        "= FLOPs(sequential) / FLOPs(variant); peak MiB = memory allocated by one step above "
        "the weights.",
        "",
        "| setting | variant | median ms | IQR ms | ratio | ceiling | peak MiB | first call s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        setting = Setting(**{k: row[k] for k in Setting.__dataclass_fields__})
        if "latency" not in row:
            lines.append(
                f"| {setting.label()} | {row['variant']} | – | – | – | – | – | {row.get('error', '')} |"
            )
            continue
        lat = row["latency"]
        peak = row.get("peak_memory_bytes")
        lines.append(
            f"| {setting.label()} | {row['variant']} | {lat['median_ms']:.2f} | "
            f"{lat['q1_ms']:.2f}–{lat['q3_ms']:.2f} | {row.get('ratio', float('nan')):.2f} | "
            f"{row.get('ceiling', float('nan')):.2f} | "
            f"{'–' if peak is None else f'{peak / 2**20:.0f}'} | {row['first_call_s']:.2f} |"
        )
    if payload["skipped"]:
        lines += [
            "",
            f"Skipped for the budget ({len(payload['skipped'])}): " + "; ".join(payload["skipped"]),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(SUITES), default="gpu")
    parser.add_argument("--budget-s", type=float, help="override the preset's time budget")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    suite = SUITES[args.preset]
    if args.budget_s:
        suite = Suite(**{**suite.__dict__, "budget_s": args.budget_s})
    payload = run(suite)
    payload["command"] = command = command_line("gpu_suite", args.preset, default="gpu")
    stem = f"gpu_suite_{device_tag(payload)}"
    for path in write_reports(args.out, stem, payload, markdown(payload, command)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
