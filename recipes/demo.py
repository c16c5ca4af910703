"""``python -m recipes.demo``: the paper's pipeline end to end on built-in synthetic scenes.

1. Train a single-task segmentation network and a single-task surface-normal network (a small
   DeepLab-style CNN, :class:`recipes.builders.DemoCNN`) on synthetic indoor scenes
   (:class:`recipes.data.SyntheticScenes`) for ``single_steps + fused_steps`` steps each, and keep
   their weights at step ``single_steps``.
2. Fuse those step-``single_steps`` networks with NDDR layers (:func:`nddrify.fuse`) and train the
   fused network for ``fused_steps`` steps.
3. Score all of them on held-out scenes and print single-task vs fused metrics.

The comparison is fair in steps: every task's weights get ``single_steps + fused_steps`` updates
in both arms, with the same batches (the data order is a function of the seed and the step).
Whatever the numbers, they are printed as measured.

Example:
    >>> import tempfile
    >>> code = main(["--out", tempfile.mkdtemp(), "--size", "32", "--train-images", "8",
    ...              "--test-images", "4", "--single-steps", "2", "--fused-steps", "2",
    ...              "--batch-size", "2", "--quiet"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .configs import METHODS, RecipeConfig, load_config

__all__ = ["demo_configs", "run_demo", "main"]

_LABELS = {
    "nddr": "NDDR",
    "cross_stitch": "cross-stitch",
    "sluice": "sluice",
    "mul": "hard sharing",
}


def demo_configs(args: argparse.Namespace) -> dict[str, RecipeConfig]:
    """The runs of the demo: ``single_seg``, ``single_normal`` and one per fusion method."""
    side = args.size
    common = [
        f"synthetic_size={side},{side}",
        f"crop={side}",
        f"synthetic_images={args.train_images}",
        f"synthetic_test_images={args.test_images}",
        f"batch_size={args.batch_size}",
        f"eval_batch_size={args.batch_size}",
        f"out_dir={args.out}",
        f"seed={args.seed}",
        f"threads={args.threads}",
        "num_workers=0",
        "cache_data=true",
        "progress=false" if args.quiet else "progress=true",
        f"log_every={max(1, (args.single_steps + args.fused_steps) // 20)}",
    ]
    total = args.single_steps + args.fused_steps
    configs = {
        f"single_{task}": load_config(
            f"synthetic_demo_single_{task}", [*common, f"steps={total}", f"lr={args.lr}"]
        )
        for task in ("seg", "normal")
    }
    fused_lr = args.fused_lr
    if fused_lr is None:  # poly: (1 − (S + t)/(S + F))^p = (F/(S + F))^p · (1 − t/F)^p
        fused_lr = args.lr * (args.fused_steps / total) ** 0.9
    for method in args.methods:
        snapshot = {t: str(_snapshot(args, t)) for t in ("seg", "normal")}
        configs[method] = load_config(
            f"synthetic_demo_{method}",
            [
                *common,
                f"steps={args.fused_steps}",
                f"lr={fused_lr}",
                f"fusion_lr_mult={args.fusion_lr_mult}",
                f"init_from=seg={snapshot['seg']},normal={snapshot['normal']}",
            ],
        )
    return configs


def _snapshot(args: argparse.Namespace, task: str) -> Path:
    return Path(args.out) / f"synthetic_demo_single_{task}" / f"step{args.single_steps}.pt"


def run_demo(args: argparse.Namespace) -> list[tuple[str, str, dict[str, dict[str, float]], float]]:
    """Train and evaluate every run; returns ``(row label, steps per task, metrics, training
    seconds)`` per row."""
    from .train import train

    configs = demo_configs(args)
    rows: list[tuple[str, str, dict[str, dict[str, float]], float]] = []
    single_metrics: dict[str, dict[str, float]] = {}
    single_seconds = 0.0
    for task in ("seg", "normal"):
        config = configs[f"single_{task}"]
        start = time.perf_counter()
        train(config, overwrite=True, stop_at=args.single_steps, evaluate=False)
        run_dir = config.resolved_run_dir()
        shutil.copyfile(run_dir / "checkpoint.pt", _snapshot(args, task))
        result = train(config, resume=True)
        single_seconds += time.perf_counter() - start
        single_metrics.update(result.metrics or {})
    total = args.single_steps + args.fused_steps
    rows.append(("single-task", f"{total}", single_metrics, single_seconds))
    for method in args.methods:
        start = time.perf_counter()
        result = train(configs[method], overwrite=True)
        steps = f"{args.single_steps}+{args.fused_steps}"
        rows.append((_LABELS[method], steps, result.metrics or {}, time.perf_counter() - start))
    return rows


def _print_table(
    rows: Sequence[tuple[str, str, dict[str, dict[str, float]], float]], console: Any
) -> None:
    from rich.table import Table

    columns = [
        ("seg", "mIoU", "mIoU"),
        ("seg", "pixel_acc", "PAcc"),
        ("normal", "mean", "Mean°"),
        ("normal", "median", "Med.°"),
        ("normal", "within_11.25", "11.25"),
        ("normal", "within_22.5", "22.5"),
        ("normal", "within_30", "30"),
    ]
    table = Table(title="Synthetic scenes, test split: single-task vs fused")
    table.add_column("model", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    for _, _, header in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for label, steps, metrics, _ in rows:
        cells = [f"{metrics.get(task, {}).get(key, float('nan')):.1f}" for task, key, _ in columns]
        table.add_row(label, steps, *cells)
    console.print(table)
    console.print(
        "steps: updates per task (single + fused for the fused rows). Segmentation: mIoU and "
        "pixel accuracy (%, higher is better). Normals: mean and median angle error (°, lower "
        "is better), % of pixels within 11.25°/22.5°/30° (higher is better)."
    )
    console.print(
        "training time: " + ", ".join(f"{label} {seconds:.0f} s" for label, _, _, seconds in rows)
    )


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m recipes.demo`` (defaults: a few minutes on 2 CPU cores)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.demo",
        description="Single-task networks → NDDR-fused network on synthetic scenes, evaluated.",
    )
    parser.add_argument("--out", default="runs/demo", help="folder for the runs")
    parser.add_argument("--size", type=int, default=64, help="image side (pixels)")
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--single-steps", type=int, default=300)
    parser.add_argument("--fused-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="single-task base lr")
    parser.add_argument(
        "--fused-lr",
        type=float,
        default=None,
        help="fused base lr (default: the single-task schedule's lr at single_steps, so the "
        "fused stage follows the same lr curve as the single-task runs' last fused_steps)",
    )
    parser.add_argument(
        "--fusion-lr-mult",
        type=float,
        default=10.0,
        help="fusion-layer lr multiplier (the paper's 100× goes with its base lr 1e-3; the "
        "demo's base lr is ~27× higher)",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: [m for m in text.split(",") if m],
        default=["nddr"],
        help=f"comma-separated fusion methods to compare ({', '.join(METHODS[1:])})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads for every run (default: 0, torch's default of one per core); on a "
        "machine shared with other jobs one thread can be much faster than oversubscribed cores",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    from rich.console import Console

    from nddrify.errors import NddrifyError

    from .errors import TrainingInterrupted

    args = build_parser().parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS[1:]]
    console = Console()
    if unknown:
        console.print(f"[red]error:[/red] unknown method(s) {unknown}; use {list(METHODS[1:])}.")
        return 2
    if args.threads < 0:
        console.print(f"[red]error:[/red] --threads {args.threads} must be ≥ 0.")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        rows = run_demo(args)
    except TrainingInterrupted as stopped:
        console.print(f"{stopped}; run the demo again to start over.", markup=False)
        return stopped.exit_code
    except NddrifyError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    _print_table(rows, console)
    console.print(
        f"{time.perf_counter() - start:.0f} s in all; runs, curves and checkpoints in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
