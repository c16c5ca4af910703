"""Command line: ``nddrify inspect`` shows where models would be fused; ``nddrify demo`` fuses two
torchvision models end to end.

Examples::

    nddrify inspect torchvision:vgg16 torchvision:vgg16 --input 1,3,224,224
    nddrify inspect timm:resnet50 timm:resnet50 --points layer1,layer2 --all
    nddrify inspect "torchvision:resnet50(replace_stride_with_dilation=[False, True, True])" \\
        torchvision:resnet50 --json
    python -m nddrify demo

A SPEC is ``torchvision:NAME``, ``timm:NAME`` (built with ``pretrained=False``: nothing is
downloaded) or ``package.module:callable``, optionally followed by literal keyword arguments in
parentheses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .errors import NddrifyError, SpecError
from .specs import load_spec

__all__ = ["main", "build_parser"]


def _parse_input(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise SpecError(
            f"--input {text!r} must be comma-separated integers such as 1,3,224,224."
        ) from None
    if len(shape) != 4 or min(shape) < 1:
        raise SpecError(f"--input {text!r} must give four positive sizes N,C,H,W.")
    return shape


def _parse_points(text: str | None) -> Any:
    if text is None or text == "auto":
        return "auto"
    if text.isdigit():
        return int(text)
    if ";" in text:  # per-task lists: "a,b;c,d"
        return [[p for p in part.split(",") if p] for part in text.split(";")]
    return [p for p in text.split(",") if p]


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .kinds import fusion_factory
    from .layers import NDDR
    from .planning import candidate_list
    from .planning import plan as make_plan
    from .tasks import trace

    console = Console()
    models = [load_spec(spec) for spec in args.specs]
    example = torch.randn(*_parse_input(args.input)) if args.input else None
    start = time.perf_counter()
    factory = fusion_factory(
        None if args.fusion == "nddr" else args.fusion, subspaces=args.subspaces
    )
    if args.rank is not None or args.groups is not None:
        if args.fusion != "nddr":
            raise SpecError("--rank and --groups apply to --fusion nddr only.")
        factory = NDDR(rank=args.rank, groups=args.groups or 1)
    traced = trace(models, example_input=example)
    plan = make_plan(traced, _parse_points(args.points), fusion=factory)
    elapsed = time.perf_counter() - start
    candidates = {t.task: candidate_list(t) for t in traced} if args.all else {}
    if args.json:
        payload = {
            "specs": args.specs,
            "tasks": list(plan.tasks),
            "levels": [
                {
                    "level": lv.index + 1,
                    "weights": lv.weights,
                    "norm_params": lv.norm_params,
                    "points": [
                        {"task": p.task, "name": p.name, "node": p.node, "shape": list(p.shape)}
                        for p in lv.points
                    ],
                }
                for lv in plan.levels
            ],
            "overhead": {
                "fusion_weights": plan.overhead.fusion_weights,
                "fusion_norm_params": plan.overhead.fusion_norm_params,
                "model_params": list(plan.model_params),
                "relative_per_task": plan.overhead.relative_per_task,
            },
            "candidates": {
                task: [
                    {"name": c.name, "node": c.node, "shape": list(c.shape), "auto": c.auto}
                    for c in cands
                ]
                for task, cands in candidates.items()
            },
            "seconds": round(elapsed, 3),
        }
        print(json.dumps(payload, indent=2))
        return 0
    for task, spec in zip(plan.tasks, args.specs):
        if task in candidates:
            table = Table(title=f"{task} = {spec}: fusion candidates (spine feature maps)")
            for column in ("", "name", "node", "C×H×W"):
                table.add_column(column)
            chosen = set(plan.points(task))
            for c in candidates[task]:
                table.add_row(
                    "✓" if c.node in chosen else ("auto" if c.auto else ""),
                    c.name,
                    c.node,
                    "×".join(map(str, c.shape[1:])),
                )
            console.print(table)
    console.print(plan)
    console.print(f"planned in {elapsed:.2f} s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import fuse, plan
    from .training import overhead, task_state_dict

    console = Console(soft_wrap=True)
    torch.manual_seed(0)
    models = {"seg": load_spec(args.model), "normal": load_spec(args.model)}
    for model in models.values():
        model.eval()
    image = torch.randn(2, 3, args.size, args.size)
    console.rule(f"nddrify demo: two {args.model} models → one NDDR multi-task model")
    console.print(plan(models, example_input=image))

    start = time.perf_counter()
    identity = fuse(models, example_input=image, init=(1.0, 0.0), norm=None, activation=None).eval()
    fuse_seconds = time.perf_counter() - start
    with torch.no_grad():
        fused_out = identity(image)
        diffs = {t: float((fused_out[t] - m(image)).abs().max()) for t, m in models.items()}
    console.print(
        f"fuse() took {fuse_seconds:.2f} s. With init=(1, 0), norm=None, activation=None the fused "
        f"model reproduces each original: max |Δ| = {diffs}"
    )

    fused = fuse(models, example_input=image)
    fused.train()
    out = fused(image)
    loss = sum(o.float().pow(2).mean() for o in out.values())
    loss.backward()
    no_grad = [n for n, p in fused.named_parameters() if p.grad is None]
    console.print(
        f"Default fused model (init (0.9, 0.1), BatchNorm, auto activation): outputs "
        f"{ {t: tuple(o.shape) for t, o in out.items()} }, one backward pass, parameters without "
        f"gradient: {len(no_grad)}."
    )
    console.print(f"Overhead: {overhead(fused)}")
    seg_weights = task_state_dict(fused, "seg")
    console.print(
        f"task_state_dict(fused, 'seg') gives back {len(seg_weights)} tensors under the original keys."
    )
    console.print("\n[bold]Generated forward (print(fused.code)):[/bold]")
    console.print(fused.code.strip(), markup=False, highlight=False)
    worst = max(diffs.values())
    status = 0 if worst <= 1e-5 and not no_grad else 1
    if args.no_train:
        return status
    # The recipes' end-to-end run: single-task networks → NDDR-fused network on synthetic scenes.
    # The application plugs it in through the "nddrify.commands" entry point (pyproject.toml);
    # the library never imports the recipes.
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="nddrify.commands") if ep.name == "demo"]
    missing = (
        "the training part of nddrify demo comes from the recipes (the repository's recipes/ "
        "folder, installed as nddrify_recipes), which are not installed: from a clone of the "
        'repository run pip install -e ".[dev]", or skip it with --no-train.'
    )
    if not found:
        raise SpecError(missing)
    try:
        train_demo = found[0].load()
    except ModuleNotFoundError as err:
        if err.name and err.name.partition(".")[0] == found[0].module.partition(".")[0]:
            raise SpecError(missing) from err
        raise

    console.rule("Training on synthetic scenes: single-task networks → NDDR-fused network")
    return status or train_demo(["--out", args.out])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nddrify",
        description="Fuse single-task PyTorch models into one NDDR multi-task model.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = sub.add_parser(
        "inspect", help="show the candidate and chosen fusion points and the overhead"
    )
    inspect_cmd.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="torchvision:NAME, timm:NAME or package.module:callable, one per task",
    )
    inspect_cmd.add_argument("--input", help="example input shape N,C,H,W (default 1,3,224,224)")
    inspect_cmd.add_argument(
        "--points",
        help="'auto' (default), an int N, names 'a,b' for all tasks, or 'a,b;c,d' per task",
    )
    inspect_cmd.add_argument(
        "--all", action="store_true", help="list every candidate, not only the chosen"
    )
    inspect_cmd.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect_cmd.add_argument(
        "--fusion",
        default="nddr",
        choices=["nddr", "cross_stitch", "sluice"],
        help="fusion kind whose parameters are counted (default nddr)",
    )
    inspect_cmd.add_argument("--rank", type=int, help="low-rank NDDR: rank r (ΣC → r → C_i)")
    inspect_cmd.add_argument("--groups", type=int, help="grouped NDDR: number of groups")
    inspect_cmd.add_argument("--subspaces", type=int, help="sluice: subspaces per task (default 2)")
    inspect_cmd.set_defaults(run=_inspect)
    demo = sub.add_parser(
        "demo",
        help="fuse two torchvision models and check identity at init, then train single-task "
        "and NDDR-fused networks on synthetic scenes and compare their metrics",
    )
    demo.add_argument(
        "--model", default="torchvision:resnet18", help="model spec (default resnet18)"
    )
    demo.add_argument("--size", type=int, default=128, help="input height and width (default 128)")
    demo.add_argument(
        "--no-train",
        action="store_true",
        help="skip the training part (the recipes' demo; python -m nddrify_recipes.demo runs it "
        "with more options)",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the training runs (default runs/demo)"
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nddrify`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except NddrifyError as err:
        print(f"nddrify: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
