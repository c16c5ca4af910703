"""Command line: ``nddrify inspect`` shows where models would be fused, ``nddrify fuse`` writes a
fused model, ``nddrify export`` turns one into ONNX or a torch.export program, ``nddrify demo``
fuses two torchvision models end to end.

Examples::

    nddrify inspect torchvision:vgg16 torchvision:vgg16 --input 1,3,224,224
    nddrify inspect timm:resnet50 timm:resnet50 --points layer1,layer2 --all
    nddrify fuse torchvision:resnet18 torchvision:resnet18 --tasks seg,depth -o fused.pt
    nddrify export fused.pt --onnx fused.onnx
    python -m nddrify demo

A SPEC is ``torchvision:NAME``, ``timm:NAME`` (built without pretrained weights: nothing is
downloaded) or ``module:callable`` (the working directory is importable, as with
``python -m``), optionally followed by literal keyword arguments in parentheses.

This module imports nothing heavy: ``nddrify --help`` and ``nddrify --version`` answer before
torch is loaded; the commands themselves live in :mod:`nddrify.cli_commands`.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    nddrify 0.1.0 (torch ..., Python ...)
    0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main", "build_parser", "cli_terms"]

# Python-API wording in library errors → the flags of this command line.
_CLI_TERMS = [
    (re.compile(r"\bpoints=N\b"), "--points N"),
    (re.compile(r"\bpoints=['\"]?(auto|declared)['\"]?"), r"--points \1"),
    (re.compile(r"\bpoints=(\d+)"), r"--points \1"),
    (re.compile(r"\bpass resize=True\b"), "pass --resize"),
    (re.compile(r"\bresize=True\b"), "--resize"),
    (re.compile(r"\bshortcut=True\b"), "--shortcut"),
    (re.compile(r"\bexample_input=(?!\{)\s*"), "--input "),
    (re.compile(r"\bexample_input=\{[^}]*\}"), "--input N,C,H,W once per task"),
    (re.compile(r"\bexample_input\b"), "--input"),
    (re.compile(r"\bsubspaces="), "--subspaces "),
    (re.compile(r"\bfusion=['\"](\w+)['\"]"), r"--fusion \1"),
    (re.compile(r"nddrify\.get_fusion_candidates\(model\)"), "nddrify inspect SPEC SPEC --all"),
]


def cli_terms(message: str) -> str:
    """A library error message in the command line's terms (``points=N`` → ``--points N``).

    Example:
        >>> cli_terms("pass points=N to fuse fewer levels, or resize=True")
        'pass --points N to fuse fewer levels, or --resize'
    """
    for pattern, replacement in _CLI_TERMS:
        message = pattern.sub(replacement, message)
    return message


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = "not installed"
    from . import __version__

    python = ".".join(map(str, sys.version_info[:3]))
    return f"nddrify {__version__} (torch {torch_version}, Python {python})"


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors come out as JSON under ``--json``."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            print(json.dumps({"error": {"type": "UsageError", "message": message}}))
            self.exit(2)
        super().error(message)


def _add_models(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="one model per task: torchvision:NAME, timm:NAME or module:callable, each "
        "optionally with literal keyword arguments, e.g. 'torchvision:resnet50(num_classes=21)'",
    )
    cmd.add_argument(
        "--tasks", metavar="A,B", help="task names in SPEC order (default task0, task1, …)"
    )
    cmd.add_argument(
        "--input",
        action="append",
        metavar="N,C,H,W",
        help="example input shape (default: the model's own, else 1,3,224,224); give it once "
        "per task when the tasks take inputs of different sizes",
    )
    cmd.add_argument(
        "--points",
        help="'auto' (default: stage ends found from the graph), 'declared' (timm's "
        "feature_info), an int N (the last N automatic levels), names 'a,b' for every task, or "
        "'a,b;c,d' per task",
    )
    cmd.add_argument(
        "--fusion",
        default="nddr",
        choices=["nddr", "cross_stitch", "sluice"],
        help="fusion kind (default nddr)",
    )
    cmd.add_argument("--rank", type=int, help="low-rank NDDR: rank r (ΣC → r → C_i)")
    cmd.add_argument("--groups", type=int, help="grouped NDDR: number of groups")
    cmd.add_argument("--subspaces", type=int, help="sluice: subspaces per task (default 2)")
    cmd.add_argument("--shortcut", action="store_true", help="add the NDDR-Shortcut (paper Fig. 3)")
    cmd.add_argument(
        "--resize",
        action="store_true",
        help="fuse maps of different sizes, each resized to the task's own (bilinear)",
    )
    _add_common(cmd)


def _add_common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true", help="print JSON (errors too)")
    _add_threads(cmd)


def _add_threads(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default torch's: one per core; on a machine shared with other "
        "work, 1 is often much faster)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``nddrify`` argument parser (building it imports nothing heavy)."""
    parser = _Parser(
        prog="nddrify",
        description="Fuse single-task PyTorch models into one NDDR multi-task model.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    inspect_cmd = sub.add_parser(
        "inspect", help="show the candidate and chosen fusion points and the overhead"
    )
    _add_models(inspect_cmd)
    inspect_cmd.add_argument(
        "--all", action="store_true", help="list every candidate, not only the chosen"
    )
    inspect_cmd.set_defaults(run="inspect_command")

    fuse_cmd = sub.add_parser(
        "fuse", help="fuse the models and write an nddrify checkpoint (nddrify.load reads it)"
    )
    _add_models(fuse_cmd)
    fuse_cmd.add_argument(
        "-o", "--output", default="fused.pt", metavar="FILE", help="checkpoint (default fused.pt)"
    )
    fuse_cmd.add_argument(
        "--init", metavar="A,B", help="NDDR / cross-stitch init (default 0.9,0.1)"
    )
    fuse_cmd.add_argument("--force", action="store_true", help="replace an existing FILE")
    fuse_cmd.set_defaults(run="fuse_command")

    export_cmd = sub.add_parser(
        "export",
        help="export a checkpoint written by 'nddrify fuse' (or nddrify.save) to ONNX or a "
        "torch.export program; outputs are named after the tasks",
    )
    export_cmd.add_argument("checkpoint", metavar="FILE", help="an nddrify checkpoint")
    export_cmd.add_argument("--onnx", metavar="OUT.onnx", help="write an ONNX model")
    export_cmd.add_argument(
        "--pt2", metavar="OUT.pt2", help="write a torch.export program (torch.export.load)"
    )
    export_cmd.add_argument(
        "--input",
        action="append",
        metavar="N,C,H,W",
        help="example input shape (default: the one the model was fused with); once per task "
        "when the model takes one input per task",
    )
    export_cmd.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export_cmd.add_argument("--force", action="store_true", help="replace existing outputs")
    export_cmd.add_argument(
        "--no-verify",
        action="store_true",
        help="skip running the export (ONNX Runtime / torch.export.load) against the model",
    )
    _add_common(export_cmd)
    export_cmd.set_defaults(run="export_command")

    demo = sub.add_parser(
        "demo",
        help="fuse two torchvision models and check identity at init, then train single-task "
        "and NDDR-fused networks on synthetic scenes and compare their metrics",
    )
    demo.add_argument(
        "--model",
        default="torchvision:resnet18",
        help="model spec; a bare name means torchvision (default torchvision:resnet18)",
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
    demo.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="S",
        help="train the single-task and fused networks over S seeds and show mean ± std and the "
        "paired difference with its 95%% interval (default 1)",
    )
    _add_threads(demo)
    demo.set_defaults(run="demo_command")
    return parser


def _report_error(kind: str, message: str, as_json: bool, warned: Sequence[str] = ()) -> None:
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message}, "warnings": list(warned)}))
    else:
        print(f"nddrify: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nddrify`` command; returns the exit status (2 on bad input, 130
    when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version())
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    as_json = bool(getattr(args, "json", False))
    from . import cli_commands
    from .errors import NddrifyError

    warned: list[str] = []
    try:
        return getattr(cli_commands, args.run)(args, warned)
    except NddrifyError as err:
        _report_error(type(err).__name__, cli_terms(str(err)), as_json, warned)
        return 2
    except KeyboardInterrupt:
        _report_error("Interrupted", "interrupted (Ctrl-C); nothing was written.", as_json)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
