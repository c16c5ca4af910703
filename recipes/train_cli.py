"""The command line of ``python -m recipes.train``: one ``--<field>`` flag per config field, each
with its help text (:data:`recipes.config_help.FIELD_HELP`) and :class:`RecipeConfig` default.

:func:`build_parser` and :func:`parse_config` are also importable from :mod:`recipes.train`.

Example:
    >>> config, args = parse_config(["synthetic_demo_nddr", "--steps", "5", "--threads", "1"])
    >>> config.steps, config.threads, args.resume
    (5, 1, False)
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Any

from .config_help import FIELD_HELP, field_defaults, format_default
from .configs import CONFIGS, RecipeConfig, field_types, load_config, registry
from .errors import ConfigError

__all__ = ["build_parser", "parse_config", "list_configs"]

_PROG = f"python -m {__package__}.train"


def build_parser() -> argparse.ArgumentParser:
    """The ``recipes.train`` argument parser: one ``--<field>`` flag per config field."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        usage="%(prog)s [CONFIG] [--set KEY=VALUE ...] [--resume | --overwrite] [options] "
        "[--FIELD VALUE ...]",
        description="Train one of the NDDR-CNN paper's setups (see recipes/README.md).",
        epilog="Ctrl-C (SIGINT) or SIGTERM: the current step finishes, checkpoint.pt is written at "
        "it and the exact command resuming the run is printed (exit status 130 / 143). When "
        "stdout is not a terminal, progress is one plain line every log_every steps.",
    )
    parser.add_argument("config", nargs="?", help="a registered config name or a JSON file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable; init_from.seg=PATH sets one dict entry)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from checkpoint.pt (bit-exact on CPU)"
    )
    parser.add_argument("--overwrite", action="store_true", help="start over in the run folder")
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after STEP steps with a checkpoint (--resume continues; default: run to steps)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    parser.add_argument("--list", action="store_true", help="list the registered configs")
    parser.add_argument("--show", action="store_true", help="print the resolved config, exit")
    parser.add_argument("--plan", action="store_true", help="build the network, print it, exit")
    fields = parser.add_argument_group(
        "config fields",
        "Each is also --set FIELD=VALUE. The defaults shown are RecipeConfig's; a registered "
        "config sets its own (--show prints the resolved values). A flag given overrides the "
        "config; one not given leaves it.",
    )
    defaults = field_defaults()
    for name, kind in field_types().items():
        text = FIELD_HELP.get(name, "(no help text yet)")
        fields.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"field_{name}",
            default=None,  # None: not given (the config's value stays)
            metavar=_metavar(kind),
            nargs="?" if kind is bool else None,
            const="true" if kind is bool else None,
            help=f"{text} (default: {format_default(defaults[name])})".replace("%", "%%"),
        )
    return parser


def _metavar(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # float | None
        return _metavar(next(a for a in typing.get_args(kind) if a is not type(None)))
    if origin is dict:
        return "K=V,..."
    if origin is tuple:
        return "A,B,..."
    return getattr(kind, "__name__", "VALUE").upper()


def parse_config(argv: Sequence[str] | None = None) -> tuple[RecipeConfig, argparse.Namespace]:
    """Parse the command line into a validated config (flags are applied after ``--set``)."""
    args = build_parser().parse_args(argv)
    if not args.config:
        raise ConfigError(f"name a config ({_PROG} --list shows them).")
    overrides = list(args.overrides)
    for name in field_types():
        value = getattr(args, f"field_{name}")
        if value is not None:
            overrides.append(f"{name}={value}")
    return load_config(args.config, overrides), args


def list_configs() -> str:
    """One line per registered config (name, method, model, dataset, paper row), then the
    bring-your-own templates (``recipes.custom.TEMPLATES``)."""
    from .custom import TEMPLATES

    registry()
    width = max(len(name) for name in [*CONFIGS, *TEMPLATES])
    lines = []
    for name, cfg in CONFIGS.items():
        method = cfg.method + ("+shortcut" if cfg.shortcut else "")
        lines.append(
            f"{name:<{width}}  {method:<21} {cfg.model:<18} {cfg.dataset:<10} {cfg.paper or '-'}"
        )
    for name, cfg in TEMPLATES.items():
        what = "your models (--models) on your data (--dataset), see recipes/README.md"
        lines.append(f"{name:<{width}}  {cfg.method:<21} {what}")
    return "\n".join(lines)
