"""What every benchmark script does last: record its command and write its JSON and Markdown.

Example:
    >>> import tempfile
    >>> from reporting import command_line, write_reports
    >>> command_line("cheap_fusion", "ci", default="cpu")
    'python benchmarks/cheap_fusion.py --preset ci'
    >>> paths = write_reports(tempfile.mkdtemp(), "demo", {"x": 1}, "# demo\\n")
    >>> [p.name for p in paths]
    ['demo.json', 'demo.md']
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["command_line", "write_reports", "preset_main"]


def command_line(script: str, preset: str, *, default: str) -> str:
    """The command that reproduces a run (the preset named unless it is the default)."""
    flag = f" --preset {preset}" if preset != default else ""
    return f"python benchmarks/{script}.py{flag}"


def write_reports(out_dir: str | Path, stem: str, payload: dict[str, Any], text: str) -> list[Path]:
    """Write ``<stem>.json`` (the payload) and ``<stem>.md`` (``text``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    paths[1].write_text(text)
    return paths


def preset_main(
    script: str,
    description: str,
    presets: Mapping[str, Any],
    run: Callable[[Any], dict[str, Any]],
    markdown: Callable[[dict[str, Any], str], str],
    argv: Iterable[str] | None = None,
    default: str = "cpu",
) -> int:
    """The ``main`` of a benchmark with presets: ``--preset``, ``--out``; run, write
    ``<script>.json`` and ``<script>.md``, print the Markdown."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), default=default)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    payload = run(presets[args.preset])
    payload["command"] = command = command_line(script, args.preset, default=default)
    text = markdown(payload, command)
    write_reports(args.out, script, payload, text)
    print(text)
    return 0
