"""Agreement benchmark: nddrify's automatic fusion points against timm's declared feature stages.

For every model in ``/work/shared/dev-zoo.txt`` (one timm model name a line, ``#`` comments skipped)
the script builds the model with random weights (``timm.create_model(name, pretrained=False)``,
eval mode), traces it with :func:`nddrify.trace_model`, and compares two lists of fx nodes:

* the **oracle**: ``traced.node(module)`` for every ``module`` declared in ``model.feature_info``
  (the stages timm's ``features_only`` wrapper returns);
* the **auto points**: :func:`nddrify.graph_analysis.stage_ends` on the traced graph. That function
  reads the graph alone (op types, shapes, dominators, module nesting); it never sees
  ``feature_info`` nor any model-specific name, so the figure measures the heuristics, not a lookup.

Agreement (per level): the oracle node and the auto node are the same fx node, or *equivalent*:
joined by a short chain of direct edges ``u -> v`` where ``v`` is a parameter-free op (pool,
identity, dropout, activation, ``contiguous``, ...) whose only tensor input is ``u``, ``u`` has no
other user, and the shape is unchanged. Such nodes carry the same feature map up to a
parameter-free, shape-preserving op, so fusing at either is the same cut.

A model **agrees** when both lists have the same length and every level agrees. A model whose
declared stages are not N×C×H×W maps at the traced node (NHWC Swin stages, token sequences) counts
as *not* agreeing: nddrify never offers non-NCHW points by design, so such a model can only be
matched by declining it, and the row says why.

Usage::

    python benchmarks/auto_points_zoo.py [--models a,b] [--out benchmarks/results] [--zoo FILE]

It writes ``auto_points_zoo.json`` (one row per model) and ``auto_points_zoo.md`` (a table, the
agreement figure, versions, date, command and the definition above) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.fx as fx

import nddrify
from nddrify.graph_analysis import shape_of, stage_ends, stage_module

DEFAULT_ZOO = Path("/work/shared/dev-zoo.txt")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

AGREEMENT_DEFINITION = (
    "A level agrees when the oracle node (`traced.node(m)` for each module `m` in timm's "
    "`model.feature_info`) and the auto node (`stage_ends(graph)`, graph alone) are the same fx "
    "node, or are joined by a chain of direct edges `u -> v` in which `v` is a parameter-free "
    "call (pool, identity, dropout, activation, ...) whose only tensor input is `u`, `u` has no "
    "other user, and the shape is unchanged (the same feature map up to a parameter-free "
    "shape-preserving op). A model agrees when both lists have the same length and every level "
    "agrees. Models whose declared stages are not NCHW maps at the traced node (NHWC or token "
    "stages) count as not agreeing: nddrify never offers non-NCHW points by design."
)


def read_zoo(path: Path) -> list[str]:
    """Model names in ``path``: one a line, blank lines and ``#`` comments skipped."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _has_parameters(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_module":
        return False
    module = node.graph.owning_module.get_submodule(node.target)
    return any(True for _ in module.parameters())


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if shape_of(n) is not None]


def _same_map_step(u: fx.Node, v: fx.Node) -> bool:
    """``v`` is a parameter-free, shape-preserving op applied to ``u`` alone, ``u``'s only user."""
    return (
        shape_of(u) is not None
        and shape_of(u) == shape_of(v)
        and list(u.users) == [v]
        and _tensor_inputs(v) == [u]
        and not _has_parameters(v)
    )


def equivalent(a: fx.Node, b: fx.Node, max_steps: int = 4) -> bool:
    """True when ``a`` is ``b`` or they are joined by a short chain of :func:`_same_map_step`."""
    if a is b:
        return True
    for first, second in ((a, b), (b, a)):
        node = first
        for _ in range(max_steps):
            users = list(node.users)
            if len(users) != 1 or not _same_map_step(node, users[0]):
                break
            node = users[0]
            if node is second:
                return True
    return False


def _shape(node: fx.Node) -> list[int] | None:
    shape = shape_of(node)
    return list(shape) if shape is not None else None


def _oracle_layout_problem(info: list[dict], nodes: list[fx.Node]) -> str | None:
    """Why the declared stage maps are not NCHW at the traced nodes (None when they are)."""
    problems = []
    for entry, node in zip(info, nodes):
        shape = shape_of(node)
        chs = entry.get("num_chs")
        if shape is None or len(shape) != 4:
            problems.append(f"{entry['module']}: {len(shape) if shape else 0}-D value {shape}")
        elif chs is not None and shape[1] != chs and shape[3] == chs:
            problems.append(f"{entry['module']}: NHWC {tuple(shape)}")
    return "; ".join(problems) if problems else None


def evaluate(name: str) -> dict:
    """One row of the benchmark for the timm model ``name``."""
    import timm

    row: dict = {
        "model": name,
        "traced": False,
        "oracle": [],
        "oracle_shapes": [],
        "auto": [],
        "auto_shapes": [],
        "agree": False,
        "levels_agree": [],
        "seconds": None,
        "stage_ends_ms": None,
        "note": "",
    }
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        info = list(getattr(model, "feature_info", None) or [])
        info = [dict(e) for e in info if isinstance(e, dict) and e.get("module")]
        if not info:
            row["note"] = "no feature_info declared"
            return row
        try:
            traced = nddrify.trace_model(model)
        except Exception as err:
            row["note"] = f"trace failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return row
        row["traced"] = True
        graph = traced.graph
        oracle_nodes = []
        for entry in info:
            try:
                oracle_nodes.append(traced.node(entry["module"]))
            except KeyError:
                row["note"] = f"oracle module {entry['module']!r} has no traced node"
                return row
        row["oracle"] = [e["module"] for e in info]
        row["oracle_nodes"] = [n.meta["qualname"] for n in oracle_nodes]
        row["oracle_shapes"] = [_shape(n) for n in oracle_nodes]

        t0 = time.perf_counter()
        auto_nodes = stage_ends(graph)
        row["stage_ends_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        row["auto"] = [stage_module(n, auto_nodes, graph) for n in auto_nodes]
        row["auto_nodes"] = [n.meta["qualname"] for n in auto_nodes]
        row["auto_shapes"] = [_shape(n) for n in auto_nodes]

        levels = [
            i < len(auto_nodes) and equivalent(o, auto_nodes[i]) for i, o in enumerate(oracle_nodes)
        ]
        row["levels_agree"] = levels
        layout = _oracle_layout_problem(info, oracle_nodes)
        if layout is not None:
            row["note"] = f"oracle stages are not NCHW maps ({layout})"
            return row
        row["agree"] = len(auto_nodes) == len(oracle_nodes) and all(levels)
        if not row["agree"]:
            if len(auto_nodes) != len(oracle_nodes):
                row["note"] = f"{len(auto_nodes)} auto points vs {len(oracle_nodes)} declared"
            else:
                bad = [row["oracle"][i] for i, ok in enumerate(levels) if not ok]
                row["note"] = f"levels differ at {', '.join(bad)}"
    except Exception as err:
        row["note"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc(limit=3)
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _fmt_shapes(shapes: list) -> str:
    return ", ".join("x".join(str(s) for s in shape[1:]) if shape else "?" for shape in shapes)


def write_markdown(rows: list[dict], path: Path, command: str) -> str:
    n_agree = sum(r["agree"] for r in rows)
    total = len(rows)
    levels = [ok for r in rows for ok in r["levels_agree"]]
    declared = sum(len(r["oracle"]) for r in rows)
    pct = 100.0 * n_agree / total if total else 0.0
    summary = f"{n_agree}/{total} models agree ({pct:.1f} %)"
    level_line = (
        f"{sum(levels)}/{declared} declared levels agree "
        f"({100.0 * sum(levels) / declared if declared else 0.0:.1f} %)"
    )
    import timm

    lines = [
        "# Automatic fusion points vs timm `feature_info`",
        "",
        f"**{summary}**; {level_line}.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        f"- command: `{command}`",
        "- weights: random (`pretrained=False`), eval mode, each model's default input size",
        "",
        "**Agreement.** " + AGREEMENT_DEFINITION,
        "",
        "| model | agree | levels | oracle (`feature_info`) | auto (`stage_ends`) | shapes (oracle / auto) | s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lv = "".join("✓" if ok else "✗" for ok in r["levels_agree"]) or "-"
        lines.append(
            f"| {r['model']} | {'yes' if r['agree'] else 'no'} | {lv} | "
            f"{', '.join(r['oracle'])} | {', '.join(r['auto'])} | "
            f"{_fmt_shapes(r['oracle_shapes'])} / {_fmt_shapes(r['auto_shapes'])} | "
            f"{r['seconds']} | {r['note'].replace('|', '/')} |"
        )
    failing = [r for r in rows if not r["agree"]]
    lines += ["", f"Disagreeing models ({len(failing)}):", ""]
    lines += [f"- `{r['model']}`: {r['note'] or 'see table'}" for r in failing]
    path.write_text("\n".join(lines) + "\n")
    return f"{summary}; {level_line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm model names (default: the zoo)")
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="model list file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    args = parser.parse_args(argv)

    names = args.models.split(",") if args.models else read_zoo(args.zoo)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    rows = []
    for name in names:
        row = evaluate(name)
        rows.append(row)
        mark = "AGREE" if row["agree"] else "-----"
        print(f"{mark} {name:36s} {row['seconds']:>6}s  {row['note']}", flush=True)
        if not row["agree"] and row["traced"]:
            print(
                f"      oracle {row.get('oracle_nodes', [])}\n      auto   {row.get('auto_nodes', [])}"
            )

    args.out.mkdir(parents=True, exist_ok=True)
    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = f"python benchmarks/auto_points_zoo.py {argv_shown}".strip()
    (args.out / "auto_points_zoo.json").write_text(json.dumps(rows, indent=1) + "\n")
    summary = write_markdown(rows, args.out / "auto_points_zoo.md", command)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
