"""Start-up cost of the command line and of ``import nddrify`` on CPU.

Each command runs in a fresh interpreter; the commands are interleaved (one of each per round,
``--rounds`` rounds) so that a busy machine slows them all alike, and the median wall time of
each is reported beside its target:

* ``nddrify --help`` and ``nddrify --version``: ≤ 0.5 s (nothing heavy is imported);
* ``import nddrify`` against ``import torch``: at most 0.3 s more;
* ``import nddrify`` + first use of ``nddrify.fuse`` (what a script pays: torch loads then; the
  public names import lazily) against ``import torch``: at most 0.3 s more as well.

Commands that produced the committed results::

    python benchmarks/cli_startup.py            # writes benchmarks/results/cli_startup.{json,md}
    python benchmarks/cli_startup.py --rounds 3 --out /tmp/startup
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "TARGETS", "measure", "markdown", "main"]

_PY = sys.executable
_CLI = shutil.which("nddrify", path=str(Path(sys.executable).parent)) or "nddrify"

#: name → argv, run in a fresh process each time
COMMANDS: dict[str, list[str]] = {
    "nddrify --help": [_CLI, "--help"],
    "nddrify --version": [_CLI, "--version"],
    "import torch": [_PY, "-c", "import torch"],
    "import nddrify": [_PY, "-c", "import nddrify"],
    "import nddrify; nddrify.fuse": [_PY, "-c", "import nddrify; nddrify.fuse"],
}

#: name → (ceiling in seconds, what it is measured against: None = absolute)
TARGETS: dict[str, tuple[float, str | None]] = {
    "nddrify --help": (0.5, None),
    "nddrify --version": (0.5, None),
    "import nddrify": (0.3, "import torch"),
    "import nddrify; nddrify.fuse": (0.3, "import torch"),
}


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(rounds: int = 5) -> dict[str, Any]:
    """Interleaved rounds; returns every time and each command's median."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the file cache once
        _time(argv)
    for _ in range(rounds):
        for name, argv in COMMANDS.items():
            times[name].append(_time(argv))
    medians = {name: statistics.median(values) for name, values in times.items()}
    checks = {}
    for name, (ceiling, against) in TARGETS.items():
        value = medians[name] - (medians[against] if against else 0.0)
        checks[name] = {
            "value_s": value,
            "ceiling_s": ceiling,
            "against": against,
            "ok": value <= ceiling,
        }
    return {"times_s": times, "median_s": medians, "checks": checks}


def markdown(payload: dict[str, Any]) -> str:
    env = payload["env"]
    lines = [
        "# Start-up cost of the command line and `import nddrify`",
        "",
        f"{env['device']}; Python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}; {env['rounds']} interleaved rounds, fresh process each; "
        f"{env['date']}. Command: `{env['command']}`.",
        "",
        "| command | median (s) | all runs (s) |",
        "|---|---:|---|",
    ]
    for name, values in payload["times_s"].items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| `{name}` | {payload['median_s'][name]:.3f} | {runs} |")
    lines += ["", "| target | measured (s) | ceiling (s) | met |", "|---|---:|---:|---|"]
    for name, check in payload["checks"].items():
        what = f"`{name}` − `{check['against']}`" if check["against"] else f"`{name}`"
        mark = "yes" if check["ok"] else "**no**"
        lines.append(f"| {what} | {check['value_s']:.3f} | {check['ceiling_s']} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    payload = measure(args.rounds)
    payload["env"] = {
        "date": date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "rounds": args.rounds,
        "command": "python benchmarks/cli_startup.py " + " ".join(argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "cli_startup.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0 if all(c["ok"] for c in payload["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
