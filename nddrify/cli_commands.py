"""What the ``nddrify`` commands do (:mod:`nddrify.cli` parses the command line and calls one
of these with the parsed arguments and a list collecting the warnings shown to the user).

Every command returns the exit status; bad input raises an :class:`~nddrify.NddrifyError`,
which :func:`nddrify.cli.main` prints in the command line's terms (as JSON under ``--json``).

Example:
    >>> import contextlib, io, tempfile
    >>> from nddrify.cli import main
    >>> out = tempfile.mkdtemp() + "/fused.pt"
    >>> with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    ...     code = main(["fuse", "tests.models:TinyCNN", "tests.models:TinyCNN", "--tasks",
    ...                  "a,b", "--input", "1,3,32,32", "-o", out])
    >>> code
    0
    >>> import nddrify
    >>> sorted(nddrify.load(out)(__import__("torch").zeros(1, 3, 32, 32)))
    ['a', 'b']
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, FusionConfigError, SpecError
from .plans import Plan

__all__ = ["inspect_command", "fuse_command", "export_command", "demo_command"]


# ----------------------------------------------------------------------------- shared parsing


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → a 4-D shape; :class:`SpecError` otherwise."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise SpecError(
            f"--input {text!r} must be comma-separated integers such as 1,3,224,224."
        ) from None
    if len(shape) != 4 or min(shape) < 1:
        raise SpecError(f"--input {text!r} must give four positive sizes N,C,H,W.")
    return shape


def parse_points(text: str | None) -> Any:
    """``--points`` → what :func:`nddrify.plan` takes."""
    if text is None or text in ("auto", "declared"):
        return text or "auto"
    if text.isdigit():
        return int(text)
    if ";" in text:  # per-task lists: "a,b;c,d"
        return [[p for p in part.split(",") if p] for part in text.split(";")]
    return [p for p in text.split(",") if p]


def _tasks(args: argparse.Namespace) -> list[str] | None:
    if not args.tasks:
        return None
    names = [t.strip() for t in args.tasks.split(",")]
    if len(names) != len(args.specs) or not all(names) or len(set(names)) != len(names):
        raise SpecError(
            f"--tasks {args.tasks!r} must give {len(args.specs)} distinct names, one per SPEC "
            f"({len(args.specs)} given)."
        )
    return names


def _models(args: argparse.Namespace) -> list[str] | dict[str, str]:
    for spec in args.specs:
        if ":" not in spec:
            raise SpecError(
                f"model spec {spec!r} must look like 'torchvision:NAME', 'timm:NAME' or "
                f"'module:callable' (a torchvision model: 'torchvision:{spec}')."
            )
    names = _tasks(args)
    return dict(zip(names, args.specs)) if names else list(args.specs)


def _example_input(
    shapes: list[str] | None, tasks: int
) -> torch.Tensor | list[torch.Tensor] | None:
    if not shapes:
        return None
    tensors = [torch.randn(*parse_shape(s)) for s in shapes]
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) != tasks:
        raise SpecError(
            f"--input is given {len(tensors)} times for {tasks} tasks; give it once for all "
            "tasks or once per task, in task order."
        )
    return tensors


def _fusion(args: argparse.Namespace) -> Any:
    """The fusion kind the flags ask for (``--fusion``, ``--rank``, ``--groups``, …)."""
    from .kinds import fusion_factory
    from .layers import NDDR

    init = getattr(args, "init", None)
    options: dict[str, Any] = {}
    if init:
        try:
            options["init"] = tuple(float(v) for v in init.split(","))
        except ValueError:
            raise FusionConfigError(
                f"--init {init!r} must be two numbers such as 0.9,0.1."
            ) from None
    if args.rank is not None or args.groups is not None:
        if args.fusion != "nddr":
            raise FusionConfigError("--rank and --groups apply to --fusion nddr only.")
        return NDDR(rank=args.rank, groups=args.groups or 1, **options)
    return fusion_factory(
        None if args.fusion == "nddr" else args.fusion, subspaces=args.subspaces, **options
    )


@contextlib.contextmanager
def _collect_warnings(warned: list[str], as_json: bool) -> Iterator[None]:
    """Warnings of the library, shown as one ``nddrify: warning:`` line each (kept for the
    JSON output under ``--json``)."""
    from .cli import cli_terms

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            for item in caught:
                if not issubclass(item.category, UserWarning):
                    continue
                text = cli_terms(str(item.message).removeprefix("nddrify: "))
                warned.append(text)
                if not as_json:
                    print(f"nddrify: warning: {text}", file=sys.stderr)


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise SpecError(f"--threads {threads} must be at least 1.")
        torch.set_num_threads(threads)


def _point_record(p: Any) -> dict[str, Any]:
    return {"task": p.task, "name": p.name, "node": p.node, "shape": list(p.shape)}


def plan_payload(plan: Plan) -> dict[str, Any]:
    """The plan as the JSON the commands print: levels, points, overhead per task."""
    overhead = plan.overhead
    return {
        "tasks": list(plan.tasks),
        "levels": [
            {
                "level": lv.index + 1,
                "weights": lv.weights,
                "norm_params": lv.norm_params,
                "points": [_point_record(p) for p in lv.points],
            }
            for lv in plan.levels
        ],
        "unpaired": [
            {"task": u.task, "name": u.name, "node": u.node, "stride": u.stride}
            for u in plan.unpaired
        ],
        "overhead": {
            "fusion_weights": overhead.fusion_weights,
            "fusion_norm_params": overhead.fusion_norm_params,
            "model_params": list(plan.model_params),
            "relative_per_task": overhead.relative_per_task,
            "weights_by_task": list(overhead.weights_by_task),
            "relative_by_task": list(overhead.relative_by_task),
        },
    }


# ----------------------------------------------------------------------------- inspect


def inspect_command(args: argparse.Namespace, warned: list[str]) -> int:
    """``nddrify inspect``: the candidates, the chosen points and what fusing them costs."""
    from .planning import candidate_list
    from .planning import plan as make_plan
    from .tasks import trace

    _set_threads(args)
    start = time.perf_counter()
    with _collect_warnings(warned, args.json):
        traced = trace(
            _models(args),
            example_input=_example_input(args.input, len(args.specs)),
            spec_device="meta",  # shapes only: no weights are built
        )
        plan = make_plan(
            traced,
            parse_points(args.points),
            fusion=_fusion(args),
            shortcut=args.shortcut,
            resize=args.resize,
        )
    elapsed = time.perf_counter() - start
    candidates = {t.task: candidate_list(t) for t in traced} if args.all else {}
    if args.json:
        payload = {
            "specs": args.specs,
            **plan_payload(plan),
            "candidates": {
                task: [
                    {"name": c.name, "node": c.node, "shape": list(c.shape), "auto": c.auto}
                    for c in cands
                ]
                for task, cands in candidates.items()
            },
            "warnings": warned,
            "seconds": round(elapsed, 3),
        }
        print(json.dumps(payload, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
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


# ----------------------------------------------------------------------------- fuse


def _refuse_overwrite(path: Path, force: bool, flag: str) -> None:
    if path.exists() and not force:
        raise CheckpointError(
            f"{path} already exists; pass --force to replace it, or choose another {flag}."
        )


def fuse_command(args: argparse.Namespace, warned: list[str]) -> int:
    """``nddrify fuse``: fuse the models and write an :func:`nddrify.save` checkpoint."""
    from .checkpoint import save
    from .fusion import fuse
    from .meta import fused_plan

    _set_threads(args)
    output = Path(args.output)
    _refuse_overwrite(output, args.force, "-o FILE")
    start = time.perf_counter()
    with _collect_warnings(warned, args.json):
        fused = fuse(
            _models(args),
            parse_points(args.points),
            fusion=_fusion(args),
            shortcut=args.shortcut,
            resize=args.resize,
            example_input=_example_input(args.input, len(args.specs)),
            copy=False,  # the models are built from the specs for this fusion alone
        )
    save(fused, output)
    elapsed = time.perf_counter() - start
    plan = fused_plan(fused)
    size = output.stat().st_size
    if args.json:
        payload = {"output": str(output), "bytes": size, **plan_payload(plan)}
        print(json.dumps({**payload, "warnings": warned, "seconds": round(elapsed, 3)}, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(plan)
    console.print(
        f"wrote {output} ({size / 2**20:.1f} MiB) in {elapsed:.2f} s: "
        f"nddrify.load({str(output)!r}) rebuilds it; nddrify export {output} --onnx OUT.onnx "
        "exports it.",
        soft_wrap=True,  # a long path stays on one line, copyable
        markup=False,
        highlight=False,
    )
    return 0


# ----------------------------------------------------------------------------- export


def export_command(args: argparse.Namespace, warned: list[str]) -> int:
    """``nddrify export``: ONNX (``--onnx``) and/or torch.export (``--pt2``) of a checkpoint,
    outputs named after the tasks, each run once against the eager model."""
    from .checkpoint import load
    from .exporting import export_onnx, export_program

    if not args.onnx and not args.pt2:
        raise SpecError("nddrify export needs --onnx OUT.onnx and/or --pt2 OUT.pt2.")
    for flag, value in (("--onnx", args.onnx), ("--pt2", args.pt2)):
        if value:
            _refuse_overwrite(Path(value), args.force, flag + " path")
    _set_threads(args)
    fused = load(args.checkpoint).eval()
    inputs = None
    if args.input:
        given = _example_input(args.input, len(args.input))
        inputs = tuple(given) if isinstance(given, list) else (given,)
    results = []
    if args.onnx:
        results.append(
            export_onnx(fused, args.onnx, inputs, opset=args.opset, verify=not args.no_verify)
        )
    if args.pt2:
        results.append(export_program(fused, args.pt2, inputs, verify=not args.no_verify))
    if args.json:
        payload = [dataclasses.asdict(r) | {"verified": r.verified} for r in results]
        print(json.dumps({"exports": payload, "warnings": warned}, indent=2))
    else:
        for result in results:
            print(result)
    failed = [r.format for r in results if r.verified is False]
    if failed:
        print(
            f"nddrify: error: the {', '.join(failed)} export differs from the model by more than "
            "1e-4 (relative to the output's largest value); please report it with the specs.",
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------- demo


def demo_command(args: argparse.Namespace, warned: list[str]) -> int:
    """``nddrify demo``: fuse two models, check identity at init, then (unless ``--no-train``)
    the recipes' training demo."""
    from rich.console import Console

    from .fusion import fuse
    from .planning import plan
    from .specs import load_spec
    from .training import overhead, task_state_dict

    _set_threads(args)
    spec = args.model if ":" in args.model else f"torchvision:{args.model}"
    console = Console(soft_wrap=True)
    torch.manual_seed(0)
    models = {"seg": load_spec(spec), "normal": load_spec(spec)}
    for model in models.values():
        model.eval()
    image = torch.randn(2, 3, args.size, args.size)
    console.rule(f"nddrify demo: two {spec} models → one NDDR multi-task model")
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
    threads = ["--threads", str(args.threads)] if args.threads else []
    seeds = ["--seeds", str(args.seeds)] if args.seeds != 1 else []
    return status or train_demo(["--out", args.out, *threads, *seeds])
