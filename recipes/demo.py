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

``--seeds N`` repeats the whole pipeline for seeds ``seed … seed + N − 1`` (each seed draws its
own scenes, weights and data order; runs under ``{out}/seed{s}``) and prints ``mean ± std`` per
row and the paired difference of every fused row against the single-task row with a 95 % Student
t interval (:mod:`recipes.compare`). ``--labelled seg=0.125`` keeps the segmentation labels of
only 1/8 of the training scenes (``synthetic_labelled``), a setting where sharing should help;
``--report PATH.md`` also writes the table, the command, the settings and the versions to
``PATH.md`` and ``PATH.json``.

Example:
    >>> import tempfile
    >>> code = main(["--out", tempfile.mkdtemp(), "--size", "32", "--train-images", "8",
    ...              "--test-images", "4", "--single-steps", "2", "--fused-steps", "2",
    ...              "--batch-size", "2", "--quiet"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .configs import METHODS, RecipeConfig, load_config

__all__ = ["demo_configs", "run_demo", "run_seeds", "main"]

_LABELS = {
    "nddr": "NDDR",
    "cross_stitch": "cross-stitch",
    "sluice": "sluice",
    "mul": "hard sharing",
}


#: The table's columns: (task, metric, header).
_COLUMNS = [
    ("seg", "mIoU", "mIoU"),
    ("seg", "pixel_acc", "PAcc"),
    ("normal", "mean", "Mean°"),
    ("normal", "median", "Med.°"),
    ("normal", "within_11.25", "11.25"),
    ("normal", "within_22.5", "22.5"),
    ("normal", "within_30", "30"),
]


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
    if getattr(args, "labelled", ""):
        common.append(f"synthetic_labelled={args.labelled}")
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


def run_seeds(args: argparse.Namespace) -> dict[int, list[tuple[str, str, dict[str, Any], float]]]:
    """:func:`run_demo` once per seed ``args.seed … args.seed + args.seeds − 1``; one seed runs
    in ``args.out`` itself, several in ``{args.out}/seed{s}``. Returns seed → rows."""
    count = getattr(args, "seeds", 1)
    out: dict[int, list[tuple[str, str, dict[str, Any], float]]] = {}
    for seed in range(args.seed, args.seed + count):
        seed_args = copy.copy(args)
        seed_args.seed = seed
        if count > 1:
            seed_args.out = str(Path(args.out) / f"seed{seed}")
        out[seed] = run_demo(seed_args)
    return out


def summarise_seeds(
    per_seed: dict[int, list[tuple[str, str, dict[str, Any], float]]],
) -> dict[str, Any]:
    """:func:`recipes.compare.summarise` of the rows (reference: single-task), with ``steps``
    (row → steps per task) and ``seconds`` (row → seed → training seconds)."""
    from .compare import flatten_metrics, summarise

    runs: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, dict[int, float]] = {}
    steps: dict[str, str] = {}
    for seed, rows in per_seed.items():
        for label, row_steps, metrics, spent in rows:
            runs.setdefault(label, {})[seed] = flatten_metrics(metrics)
            seconds.setdefault(label, {})[seed] = spent
            steps[label] = row_steps
    summary = summarise(runs)
    summary.update(runs=runs, seconds=seconds, steps=steps)
    return summary


def _print_summary(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    from .compare import format_cell

    seeds = sorted({s for row in summary["runs"].values() for s in row})
    names = [f"{task}/{key}" for task, key, _ in _COLUMNS]
    table = Table(title=f"Synthetic scenes, test split: mean ± std over {len(seeds)} seeds {seeds}")
    table.add_column("model", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    for _, _, header in _COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for label, row in summary["configs"].items():
        cells = [format_cell(row[n], 1) if n in row else "–" for n in names]
        table.add_row(label, summary["steps"][label], *cells)
    width = console.width
    console.width = max(width, 200)  # not a terminal: rich's 80 columns would cut the cells
    console.print(table)
    reference = summary["reference"]
    diffs = Table(
        title=f"Paired difference vs {reference} (same seed): mean [95 % t interval], * excludes 0"
    )
    diffs.add_column("model", no_wrap=True)
    for _, _, header in _COLUMNS:
        diffs.add_column(header, justify="right", no_wrap=True)
    for label, row in summary["differences"].items():
        cells = [format_cell(row[n], 1, difference=True) if n in row else "–" for n in names]
        diffs.add_row(f"{label} − {reference}", *cells)
    console.print(diffs)
    console.width = width
    console.print(
        "Segmentation: mIoU and pixel accuracy (%, higher is better). Normals: mean and median "
        "angle error (°, lower is better: a negative difference is an improvement), % of pixels "
        "within 11.25°/22.5°/30° (higher is better)."
    )


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import nddrify

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": f"CPU ({cpu}), {torch.get_num_threads()} torch thread(s)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nddrify": getattr(nddrify, "__version__", "unknown"),
        "platform": platform.platform(),
    }


def write_report(
    path: str | Path,
    summary: dict[str, Any],
    args: argparse.Namespace,
    argv: Sequence[str],
    seconds: float,
) -> tuple[Path, Path]:
    """Write ``path`` (Markdown: command, settings, environment, the tables) and the same with a
    ``.json`` suffix (everything, per-seed values included); returns both paths."""
    from .compare import format_markdown

    markdown = Path(path).with_suffix(".md")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m recipes.demo " + shlex.join(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    env = _environment(args)
    names = [f"{task}/{key}" for task, key, _ in _COLUMNS]
    shown = {
        **summary,
        "configs": {k: {n: v[n] for n in names if n in v} for k, v in summary["configs"].items()},
        "differences": {
            k: {n: v[n] for n in names if n in v} for k, v in summary["differences"].items()
        },
    }
    steps = ", ".join(f"{label}: {value}" for label, value in summary["steps"].items())
    text = "\n".join(
        [
            "# Single-task vs fused on synthetic scenes, over seeds",
            "",
            f"Command: `{command}`",
            "",
            f"Device: {env['device']}; python {env['python']}, torch {env['torch']}, "
            f"nddrify {env['nddrify']}; {seconds:.0f} s in all.",
            "",
            "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
            "",
            f"Steps per task: {steps}.",
            "",
            format_markdown(shown, digits=2),
            "",
        ]
    )
    markdown.write_text(text)
    payload = {
        "command": command,
        "settings": settings,
        "environment": env,
        "seconds": seconds,
        **summary,
    }
    data = markdown.with_suffix(".json")
    data.write_text(json.dumps(payload, indent=2) + "\n")
    return markdown, data


def _print_table(
    rows: Sequence[tuple[str, str, dict[str, dict[str, float]], float]], console: Any
) -> None:
    from rich.table import Table

    columns = _COLUMNS
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
    parser.add_argument("--seed", type=int, default=0, help="(first) seed")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat for N seeds (seed … seed+N−1) and print mean ± std and paired differences "
        "vs single-task with 95%% t intervals (default 1: one run, plain numbers)",
    )
    parser.add_argument(
        "--labelled",
        default="",
        metavar="TASK=FRACTION,...",
        help="keep the labels of only this fraction of the training scenes for a task, e.g. "
        "seg=0.125 (the config field synthetic_labelled; default: all labels)",
    )
    parser.add_argument(
        "--report",
        default="",
        metavar="PATH.md",
        help="also write the table, command, settings and versions to PATH.md and PATH.json",
    )
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
    if args.seeds < 1:
        console.print(f"[red]error:[/red] --seeds {args.seeds} must be ≥ 1.")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        per_seed = run_seeds(args)
    except TrainingInterrupted as stopped:
        console.print(f"{stopped}; run the demo again to start over.", markup=False)
        return stopped.exit_code
    except NddrifyError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    summary = summarise_seeds(per_seed)
    if args.seeds == 1:
        _print_table(next(iter(per_seed.values())), console)
    else:
        _print_summary(summary, console)
    if args.report:
        argv_list = list(sys.argv[1:] if argv is None else argv)
        paths = write_report(args.report, summary, args, argv_list, time.perf_counter() - start)
        console.print(f"report: {paths[0]}, {paths[1]}")
    console.print(
        f"{time.perf_counter() - start:.0f} s in all; runs, curves and checkpoints in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
