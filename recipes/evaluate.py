"""Evaluate trained runs and write the paper's tables.

``python -m recipes.evaluate RUN_DIR [RUN_DIR ...]`` loads each run's ``config.json`` and weights
(``model.pt``, else the latest ``checkpoint.pt``), scores the test split with the paper's metrics
(:mod:`recipes.metrics`), appends an ``eval`` record to the run's ``metrics.jsonl`` and writes its
``results.md``; with several runs it prints one Markdown table in the paper's layout, one row per
``label`` (the single-task seg and normal runs share the row "Sing.": their metrics are merged).

Example:
    >>> rows = merge_rows([("Sing.", {"seg": {"mIoU": 33.5}}), ("Sing.", {"normal": {"mean": 15.6}}),
    ...                    ("Ours", {"seg": {"mIoU": 36.2}, "normal": {"mean": 13.9}})])
    >>> print(format_results(rows))
    | Method | Mean | mIoU |
    |:---|---:|---:|
    | Sing. | 15.6 | 33.5 |
    | Ours | 13.9 | 36.2 |
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import RecipeConfig, config_from_dict
from .distributed import DistContext
from .errors import RecipeError

__all__ = [
    "evaluate_network",
    "load_run",
    "evaluate_run",
    "merge_rows",
    "format_results",
    "main",
]

_SEG_COLUMNS = ("mIoU", "pixel_acc")
_NORMAL_COLUMNS = ("mean", "median", "within_11.25", "within_22.5", "within_30")


def _meters(config: RecipeConfig, tasks: Sequence[str]) -> dict[str, Any]:
    from .builders import num_outputs
    from .metrics import METERS, SegmentationMeter

    meters: dict[str, Any] = {}
    for task in tasks:
        if task == "seg":
            meters[task] = SegmentationMeter(
                num_classes=num_outputs(config, "seg"), absent=config.miou_absent
            )
        else:
            meters[task] = METERS[task]()
    return meters


@torch.no_grad()
def evaluate_network(
    network: nn.Module,
    config: RecipeConfig,
    context: DistContext | None = None,
    split: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``network`` (returning task → prediction) on ``split`` (default
    ``config.eval_split``): task → metric → value. Under DDP each process scores its shard and
    the meters are merged, so every process gets the same numbers. The network is left in eval
    mode."""
    from .loading import eval_loader
    from .metrics import sync_meter

    context = context or DistContext()
    split = split or config.eval_split
    tasks = list(config.tasks)
    meters = _meters(config, tasks)
    loader = eval_loader(config, split, rank=context.rank, world_size=context.world_size)
    network.eval()
    device = context.device
    autocast = _autocast(config, device)
    for batch in loader:
        images = batch["image"].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = network(images)
        for task in tasks:
            targets = {k: v.to(device) for k, v in batch.items() if k != "image"}
            meters[task].update_batch(outputs[task].float(), targets)
    results = {}
    for task in tasks:
        if context.initialized:
            sync_meter(meters[task])
        results[task] = meters[task].compute()
    return results


def _autocast(config: RecipeConfig, device: torch.device) -> Any:
    if config.amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def load_run(run_dir: str | Path) -> tuple[RecipeConfig, nn.Module]:
    """The config and trained network of a run folder (``model.pt``, else ``checkpoint.pt``)."""
    from .builders import CHECKPOINT_FORMAT, build_network

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise RecipeError(
            f"{run} holds no config.json: is it a run folder written by python -m recipes.train?"
        )
    values = json.loads(config_path.read_text())
    values["init_from"] = {}  # the trained weights replace every initialisation
    values["pretrained"] = ""
    config = config_from_dict(values)
    network = build_network(config).module
    model_path, checkpoint_path = run / "model.pt", run / "checkpoint.pt"
    if model_path.is_file():
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        if len(config.tasks) == 1 and config.method == "single":
            state = {f"{config.tasks[0]}.{k}": v for k, v in state.items()}
    elif checkpoint_path.is_file():
        payload = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise RecipeError(f"{checkpoint_path} is not a recipes checkpoint.")
        state = payload["model"]
    else:
        raise RecipeError(f"{run} holds neither model.pt nor checkpoint.pt: train it first.")
    network.load_state_dict(state)
    return config, network


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    max_images: int | None = None,
    device: str = "cpu",
) -> tuple[RecipeConfig, dict[str, dict[str, float]]]:
    """Evaluate a run folder, append the result to its ``metrics.jsonl`` and write its
    ``results.md``; returns the config and task → metric → value."""
    import dataclasses

    from .distributed import setup_distributed
    from .train import append_jsonl, write_results

    config, network = load_run(run_dir)
    changes: dict[str, Any] = {"device": device}
    if max_images is not None:
        changes["eval_max_images"] = max_images
    config = dataclasses.replace(config, **changes)
    context = setup_distributed(config.device)
    network.to(context.device)
    metrics = evaluate_network(network, config, context, split)
    run = Path(run_dir)
    step = _last_step(run / "metrics.jsonl")
    append_jsonl(
        run / "metrics.jsonl",
        {"kind": "eval", "step": step, "split": split or config.eval_split, "metrics": metrics},
    )
    write_results(run, config, metrics)
    return config, metrics


def _last_step(path: Path) -> int:
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                step = max(step, int(json.loads(line).get("step", 0)))
    return step


def merge_rows(
    results: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Group ``(label, task → metrics)`` by label, merging the tasks of runs that share one
    (the two single-task runs of a "Sing." row), in first-seen order."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, metrics in results:
        row = rows.setdefault(label, {})
        for task, values in metrics.items():
            row.setdefault(task, {}).update(values)
    return rows


def format_results(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The paper's layout: normals (Mean, Med., 11.25, 22.5, 30) then segmentation (mIoU,
    PAcc); age (Mean AE, Median AE) then gender (Acc.). Only metrics present are shown."""
    from .metrics import COLUMN_ORDER, format_table

    present = {k for row in rows.values() for task in row.values() for k in task}
    paper = [*_NORMAL_COLUMNS, *_SEG_COLUMNS, "mean_ae", "median_ae", "accuracy"]
    columns = [c for c in paper if c in present]
    columns += [c for c in COLUMN_ORDER if c in present and c not in columns and c != "rmse"]
    return format_table(rows, columns=columns)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.evaluate RUN_DIR [RUN_DIR ...] [--split test] [--output FILE]``."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes.evaluate",
        description="Evaluate training runs and print the paper's table (one row per label).",
    )
    parser.add_argument("runs", nargs="+", help="run folders written by python -m recipes.train")
    parser.add_argument("--split", default=None, choices=("train", "test"))
    parser.add_argument("--max-images", type=int, default=None, help="score the first N only")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--output", default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    results = []
    try:
        for run in args.runs:
            config, metrics = evaluate_run(
                run, split=args.split, max_images=args.max_images, device=args.device
            )
            results.append((config.label or config.name, metrics))
    except RecipeError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    table = format_results(merge_rows(results))
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
