"""Evaluate trained runs and write the paper's tables.

``python -m recipes.evaluate RUN_DIR [RUN_DIR ...]`` loads each run's ``config.json`` and weights
(``model.pt``, else the latest ``checkpoint.pt``), scores the test split with the paper's metrics
(:mod:`recipes.metrics`), appends an ``eval`` record to the run's ``metrics.jsonl`` and writes its
``results.md``; with several runs it prints one Markdown table in the paper's layout, one row per
``label`` (the single-task seg and normal runs share the row "Sing.": their metrics are merged).

Example:
    >>> merge_rows([("Sing.", {"seg": {"mIoU": 33.5}}), ("Sing.", {"normal": {"mean": 15.6}})])
    {'Sing.': {'seg': {'mIoU': 33.5}, 'normal': {'mean': 15.6}}}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import RecipeConfig, config_from_dict
from .errors import RecipeError
from .results import append_jsonl, format_results, merge_rows, write_results
from .scoring import evaluate_network

__all__ = [
    "evaluate_network",
    "load_run",
    "evaluate_run",
    "merge_rows",
    "format_results",
    "main",
]


def load_run(run_dir: str | Path) -> tuple[RecipeConfig, nn.Module]:
    """The config and trained network of a run folder (``model.pt``, else ``checkpoint.pt``)."""
    from .builders import build_network
    from .models import read_state_dict
    from .runstate import read_training_checkpoint

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise RecipeError(
            f"{run} holds no config.json: is it a run folder written by python -m "
            f"{__package__}.train?"
        )
    values = json.loads(config_path.read_text())
    values["init_from"] = {}  # the trained weights replace every initialisation
    values["pretrained"] = ""
    values["start"] = "pretrained"  # nor the DeepLab VOC start (recipes.deeplab_weights)
    config = config_from_dict(values)
    network = build_network(config).module
    model_path, checkpoint_path = run / "model.pt", run / "checkpoint.pt"
    if model_path.is_file():
        state = read_state_dict(model_path, "trained weights", "train the run first")
        if len(config.tasks) == 1 and config.method == "single":
            state = {f"{config.tasks[0]}.{k}": v for k, v in state.items()}
    elif checkpoint_path.is_file():
        state = read_training_checkpoint(checkpoint_path)["model"]
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.evaluate RUN_DIR [RUN_DIR ...] [--split test] [--output FILE]
    [--threads N]``; returns the exit status (2 on a bad run folder or checkpoint)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.evaluate",
        description="Evaluate training runs and print the paper's table (one row per label).",
    )
    parser.add_argument(
        "runs", nargs="+", help=f"run folders written by python -m {__package__}.train"
    )
    parser.add_argument("--split", default=None, choices=("train", "test"))
    parser.add_argument("--max-images", type=int, default=None, help="score the first N only")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--output", default=None, help="also write the Markdown table here")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads (default: 0, torch's default of one per core); on a machine "
        "shared with other jobs one thread can be much faster than oversubscribed cores",
    )
    args = parser.parse_args(argv)
    from rich.console import Console

    from nddrify.errors import NddrifyError

    console = Console()
    if args.threads < 0:
        console.print(f"[red]error:[/red] --threads {args.threads} must be ≥ 0.")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    try:
        for run in args.runs:
            config, metrics = evaluate_run(
                run, split=args.split, max_images=args.max_images, device=args.device
            )
            results.append((config.label or config.name, metrics))
    except NddrifyError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    table = format_results(merge_rows(results))
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
