"""Agreement benchmark: nddrify's automatic fusion points against timm's declared feature stages.

For every model in ``/work/shared/dev-zoo.txt`` (one timm model name a line, ``#`` comments skipped)
the script builds the model with random weights (``timm.create_model(name, pretrained=False)``,
eval mode), traces it with :func:`nddrify.tracing.trace_model`, and compares two lists of fx nodes:

* the **oracle**: ``traced.node(module)`` for every ``module`` declared in ``model.feature_info``
  (the stages timm's ``features_only`` wrapper returns);
* the **auto points**: :func:`nddrify.graph_analysis.auto_points` on the traced graph (stage ends, with token stages). That function
  reads the graph alone (op types, shapes, dominators, module nesting); it never sees
  ``feature_info`` nor any model-specific name, so the figure measures the heuristics, not a lookup.

Two agreement figures are reported, per level and per model:

* **strict**: the oracle node and the auto node are the same fx node, or *equivalent*: joined by a
  short chain of direct edges ``u -> v`` where ``v`` is a parameter-free op (identity, dropout,
  activation, ``contiguous``, ...) whose only tensor input is ``u``, ``u`` has no other user, and
  the shape is unchanged. Such nodes carry the same feature map up to a parameter-free,
  shape-preserving op, so fusing at either is the same cut.
* **adjacent**: strict, or the auto node is a parameter-free pooling op applied directly to the
  oracle node (or to a node strictly equivalent to it). This is the product owner's own example
  ("a parameter-free pool right after counts as agreement"): timm's ResNet family declares ``act1``
  where nddrify cuts at ``maxpool`` right after it (and DenseNet ``norm0`` against ``pool0``);
  torchvision ResNets must give ``maxpool``, so the two conventions cannot both hold by rule.

A second, oracle-free criterion asks whether the auto points are **sensible stage ends** (see
:func:`sensible`): every point ends a stage of the trunk, none lies inside a block, every
resolution of the trunk gets a point, none is in the head.

A model agrees when both lists have the same length and every level agrees. Declared stages may
be NCHW or NHWC image maps (compared by their logical N×C×H×W shape, ``feature_shape``); a model
whose declared stage is a 3-D token sequence (B, N, C) at the traced node cannot agree, since
nddrify offers image maps only, and its row says so. No model is ever counted as agreeing by hand.

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
from model_sweep import read_zoo  # benchmarks/ is on sys.path when run as a script

import nddrify
from nddrify.graph_analysis import (
    annotate,
    auto_points,
    enclosing_block,
    feature_shape,
    is_token_sequence,
    shape_of,
    spine,
    stage_module,
)
from nddrify.graph_analysis.nodes import is_pool
from nddrify.graph_analysis.spine import head_nodes, trunk_target
from nddrify.graph_analysis.tokens import token_area, token_blocks, token_spine

DEFAULT_ZOO = Path(__file__).resolve().parents[2] / "shared" / "dev-zoo.txt"  # ../shared
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

AGREEMENT_DEFINITION = (
    "**Strict**: a level agrees when the oracle node (`traced.node(m)` for each module `m` in "
    "timm's `model.feature_info`) and the auto node (`stage_ends(graph)`, graph alone) are the "
    "same fx node, or are joined by a chain of direct edges `u -> v` in which `v` is a "
    "parameter-free call (identity, dropout, activation, `contiguous`, ...) whose only tensor "
    "input is `u`, `u` has no other user, and the shape is unchanged (the same feature map up to "
    "a parameter-free shape-preserving op). **Adjacent**: strict, or the auto node is a "
    "parameter-free pooling op applied directly to the oracle node (or to a node strictly "
    "equivalent to it): the product owner's 'parameter-free pool right after' example, i.e. "
    "timm's ResNet-family `act1` against nddrify's `maxpool` (DenseNet `norm0` against `pool0`); "
    "torchvision ResNets must give `maxpool`, so rules cannot satisfy both conventions. A model "
    "agrees when both lists have the same length and every level agrees. NCHW and NHWC declared "
    "maps are both valid (compared by logical N×C×H×W shape); a model whose declared stage is a "
    "3-D token sequence at the traced node cannot agree (nddrify offers image maps only). No "
    "model is counted as agreeing by hand."
)


SENSIBLE_DEFINITION = (
    "**Sensible stage ends** (graph only, no oracle): on the spine (the dominator chain from the "
    "input to the trunk's deepest map), (a) every auto point is a stage end: the last spine node "
    "at its resolution before the next downsampling (spine nodes after it at that resolution may "
    "only belong to the module that performs the downsampling, e.g. the expansion conv of a "
    "strided inverted-residual block), a parameter-free pool applied to the spine (it closes the "
    "stage at its input's resolution: VGG pools, a ResNet stem's max-pool), or the end of the "
    "trunk; (b) no point lies strictly inside a block (`enclosing_block(point) is None`: not "
    "inside a residual, branch-merging, attention/SE/gating or pyramid branch); (c) every "
    "resolution of the trunk that holds a parametrised spine node gets a point (a pool's point "
    "also covers its input's resolution); (d) no point is in the head (the final prediction "
    "conv/linear and the pass-through ops after it, or anything after the trunk's deepest map). "
    "Models whose declared stages are token sequences are counted apart ('token stages'); where "
    "their automatic points include token sequences they are judged by the token criterion "
    "(`sensible_tokens`: every token point a block's output, one point per token stage, none "
    "inside a block or after the last block)."
)


def _resolution(node: fx.Node) -> tuple[int, int]:
    shape = feature_shape(node)
    return (shape[2], shape[3])


def _ancestor_modules(node: fx.Node) -> set[str]:
    parts = node.meta.get("qualname", "").split(".")
    if node.op != "call_module":
        parts = parts[:-1]
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def _internal(node: fx.Node, nodes: list[fx.Node], points: list[fx.Node]) -> bool:
    """True when ``node`` lies in a module that goes on to a lower resolution and holds no point
    before its output (a multi-resolution stem, a downsampling block): its resolution is a
    step inside that module, not a stage of the trunk."""
    later = nodes[nodes.index(node) + 1 :]
    for module in _ancestor_modules(node):
        members = [n for n in later if module in _ancestor_modules(n)]
        if not any(_resolution(n) != _resolution(node) for n in members):
            continue
        last = members[-1]
        inside = [p for p in points if module in _ancestor_modules(p) and p is not last]
        if not inside:
            return True
    return False


def sensible(graph: fx.Graph, points: list[fx.Node]) -> tuple[bool, list[str]]:
    """Whether ``points`` are sensible stage ends of ``graph`` (see ``SENSIBLE_DEFINITION``), and
    the reasons when not."""
    nodes = spine(graph)
    reasons: list[str] = []
    if not nodes:
        return (not points), ([] if not points else ["points but no image-map spine"])
    target = trunk_target(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    index = {n: i for i, n in enumerate(nodes)}
    head = head_nodes(graph)
    covered: set[tuple[int, int]] = set()
    for point in points:
        name = point.meta.get("qualname", point.name)
        if point in head or (target is not None and order[point] > order[target]):
            reasons.append(f"{name} is in the head")
            continue
        block = enclosing_block(point, graph)
        if block is not None:
            reasons.append(f"{name} lies inside block {block}")
        if point not in index:
            reasons.append(f"{name} is not on the spine")
            continue
        i = index[point]
        covered.add(_resolution(point))
        inputs = [n for n in point.all_input_nodes if n in index]
        if is_pool(point) and inputs:
            covered.add(_resolution(inputs[0]))
            continue
        if all(
            _resolution(n) == _resolution(point) and not _has_parameters(n) for n in nodes[i + 1 :]
        ):
            continue  # the end of the trunk (up to parameter-free ops)
        later = [n for n in nodes[i + 1 :] if _resolution(n) == _resolution(point)]
        down = next((n for n in nodes[i + 1 :] if _resolution(n) != _resolution(point)), None)
        if down is None:
            continue
        run = [n for n in later if order[n] < order[down] and not equivalent(point, n)]
        mine = _ancestor_modules(point)
        owner = _ancestor_modules(down) - mine
        if any(not (_ancestor_modules(n) & owner) for n in run):
            reasons.append(f"{name} is not the last node at its resolution before downsampling")
    for node in nodes:
        res = _resolution(node)
        if _has_parameters(node) and res not in covered and not _internal(node, nodes, points):
            reasons.append(f"resolution {'x'.join(map(str, res))} has no point")
            covered.add(res)
    return not reasons, reasons


def sensible_tokens(graph: fx.Graph, points: list[fx.Node]) -> tuple[bool, list[str]]:
    """The criterion for a trunk that runs on token sequences: (a) every token point is a
    block's output, (b) no point lies inside a block, (c) every token stage (token count of the
    blocks) gets a point (a token point, or its map at the same number of positions), (d) no
    point after the last block except that stage's output laid out as a map."""
    blocks = token_blocks(graph, token_spine(graph))
    ends = {node for _, node in blocks}
    order = {n: i for i, n in enumerate(graph.nodes)}
    reasons: list[str] = []
    areas = set()
    for point in points:
        name = point.meta.get("qualname", point.name)
        block = enclosing_block(point, graph)
        if block is not None:
            reasons.append(f"{name} lies inside block {block}")
        if is_token_sequence(point):
            areas.add(token_area(point))
            if ends and order[point] > max(order[n] for n in ends):
                reasons.append(f"{name} comes after the last block")
            elif point not in ends:
                reasons.append(f"{name} is not a block's output")
        else:
            shape = feature_shape(point)
            areas.add(shape[2] * shape[3])
    for _, node in blocks:
        if token_area(node) not in areas:
            reasons.append(f"token stage with {token_area(node)} positions has no point")
            areas.add(token_area(node))
    return not reasons, reasons


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


_POOL_FUNCTIONS = {
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.adaptive_max_pool2d,
}


def _is_pool(node: fx.Node) -> bool:
    """A parameter-free pooling op (a ``torch.nn`` pooling module or functional pool)."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return type(module).__module__ == "torch.nn.modules.pooling" and not _has_parameters(node)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def adjacent(oracle: fx.Node, auto: fx.Node) -> bool:
    """Strictly :func:`equivalent`, or ``auto`` is a parameter-free pool applied directly to
    ``oracle`` or to a node strictly equivalent to it."""
    if equivalent(oracle, auto):
        return True
    if not _is_pool(auto):
        return False
    inputs = _tensor_inputs(auto)
    return len(inputs) == 1 and equivalent(oracle, inputs[0])


def _shape(node: fx.Node) -> list[int] | None:
    """Logical N×C×H×W shape of an image map (NCHW or NHWC), else the raw shape."""
    shape = feature_shape(node) or shape_of(node)
    return list(shape) if shape is not None else None


def _oracle_layout_problem(info: list[dict], nodes: list[fx.Node]) -> str | None:
    """Why the declared stage values are not image maps at the traced nodes (None when all are).

    A 3-D (or other non-4-D) value is a token sequence nddrify cannot fuse ("cannot agree"); a
    4-D value whose layout the annotation does not recognise is nddrify's own failure."""
    tokens, unknown = [], []
    for entry, node in zip(info, nodes):
        if feature_shape(node) is None:
            shape = shape_of(node)
            if shape is not None and len(shape) == 4:
                unknown.append(f"{entry['module']}: {shape}")
            else:
                dims = len(shape) if shape else 0
                tokens.append(f"{entry['module']}: {dims}-D value {shape}")
    if tokens:
        return "cannot agree: declared stages are token sequences, not image maps (" + (
            "; ".join(tokens) + ")"
        )
    if unknown:
        return "layout of declared 4-D maps not recognised (" + "; ".join(unknown) + ")"
    return None


def _declares_tokens(info: list[dict], traced: nddrify.tracing.TracedModel) -> bool:
    """True when a declared stage is a token sequence (N×L×C), or a declared module has no traced
    node in a graph that runs mostly on token sequences (3-D values: MViTv2, Twins)."""
    for entry in info:
        try:
            node = traced.node(entry["module"])
        except KeyError:
            shapes = [shape_of(n) for n in traced.graph.nodes]
            shapes = [s for s in shapes if s is not None]
            return sum(len(s) == 3 for s in shapes) >= len(shapes) / 4
        shape = shape_of(node)
        if feature_shape(node) is None and (shape is None or len(shape) != 4):
            return True
    return False


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
        "agree_adjacent": False,
        "levels_agree": [],
        "levels_adjacent": [],
        "seconds": None,
        "stage_ends_ms": None,
        "note": "",
        "sensible": False,
        "sensible_reasons": [],
        "token_stages": False,
    }
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        info = list(getattr(model, "feature_info", None) or [])
        info = [dict(e) for e in info if isinstance(e, dict) and e.get("module")]
        try:
            traced = nddrify.tracing.trace_model(model)
        except Exception as err:
            row["note"] = f"trace failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            return row
        row["traced"] = True
        graph = annotate(traced.graph)
        t0 = time.perf_counter()
        auto_nodes = auto_points(graph)
        row["stage_ends_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        row["auto"] = [stage_module(n, auto_nodes, graph) for n in auto_nodes]
        row["auto_nodes"] = [n.meta["qualname"] for n in auto_nodes]
        row["auto_shapes"] = [_shape(n) for n in auto_nodes]
        if any(is_token_sequence(n) for n in auto_nodes):
            row["sensible"], row["sensible_reasons"] = sensible_tokens(graph, auto_nodes)
        else:
            row["sensible"], row["sensible_reasons"] = sensible(graph, auto_nodes)
        row["token_stages"] = _declares_tokens(info, traced)
        if not info:
            row["note"] = "no feature_info declared"
            return row
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

        levels = [
            i < len(auto_nodes) and equivalent(o, auto_nodes[i]) for i, o in enumerate(oracle_nodes)
        ]
        levels_adj = [
            i < len(auto_nodes) and adjacent(o, auto_nodes[i]) for i, o in enumerate(oracle_nodes)
        ]
        row["levels_agree"] = levels
        row["levels_adjacent"] = levels_adj
        layout = _oracle_layout_problem(info, oracle_nodes)
        if layout is not None:
            row["note"] = layout
            return row
        same_length = len(auto_nodes) == len(oracle_nodes)
        row["agree"] = same_length and all(levels)
        row["agree_adjacent"] = same_length and all(levels_adj)
        if not same_length:
            row["note"] = f"{len(auto_nodes)} auto points vs {len(oracle_nodes)} declared"
        elif not row["agree_adjacent"]:
            bad = [row["oracle"][i] for i, ok in enumerate(levels_adj) if not ok]
            row["note"] = f"levels differ at {', '.join(bad)}"
        elif not row["agree"]:
            bad = [row["oracle"][i] for i, ok in enumerate(levels) if not ok]
            row["note"] = f"adjacent only: auto pools right after {', '.join(bad)}"
    except Exception as err:
        row["note"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        row["traceback"] = traceback.format_exc(limit=3)
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _fmt_shapes(shapes: list) -> str:
    return ", ".join("x".join(str(s) for s in shape[1:]) if shape else "?" for shape in shapes)


def _figures(rows: list[dict], model_key: str, level_key: str) -> tuple[str, str]:
    n_agree = sum(r[model_key] for r in rows)
    total = len(rows)
    levels = [ok for r in rows for ok in r[level_key]]
    declared = sum(len(r["oracle"]) for r in rows)
    models = f"{n_agree}/{total} models ({100.0 * n_agree / total if total else 0.0:.1f} %)"
    level_line = (
        f"{sum(levels)}/{declared} declared levels "
        f"({100.0 * sum(levels) / declared if declared else 0.0:.1f} %)"
    )
    return models, level_line


def _sensible_mark(row: dict) -> str:
    mark = "yes" if row["sensible"] else "no"
    return f"{mark} (tokens)" if row["token_stages"] else mark


def _sensible_figures(rows: list[dict]) -> str:
    maps = [r for r in rows if not r["token_stages"]]
    tokens = len(rows) - len(maps)
    ok = sum(r["sensible"] for r in maps)
    inside = sum(
        1 for r in rows for reason in r["sensible_reasons"] if "lies inside block" in reason
    )
    head = sum(1 for r in rows for reason in r["sensible_reasons"] if "is in the head" in reason)
    return (
        f"{ok}/{len(maps)} image-map models, {sum(r['sensible'] for r in rows)}/{len(rows)} all "
        f"models ({tokens} with token stages); {inside} points inside blocks, "
        f"{head} points in the head"
    )


def write_markdown(rows: list[dict], path: Path, command: str) -> str:
    strict_models, strict_levels = _figures(rows, "agree", "levels_agree")
    adj_models, adj_levels = _figures(rows, "agree_adjacent", "levels_adjacent")
    sens = _sensible_figures(rows)
    summary = (
        f"strict: {strict_models}, {strict_levels}; "
        f"adjacent (pool right after counts): {adj_models}, {adj_levels}; sensible: {sens}"
    )
    import timm

    lines = [
        "# Automatic fusion points vs timm `feature_info`",
        "",
        f"- **Strict agreement: {strict_models}**; {strict_levels}.",
        f"- **Adjacent agreement (a parameter-free pool right after the declared node counts): "
        f"{adj_models}**; {adj_levels}.",
        f"- **Sensible stage ends: {sens}**.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}",
        f"- command: `{command}`",
        "- weights: random (`pretrained=False`), eval mode, each model's default input size",
        "- shapes: logical C×H×W for image maps (NHWC maps shown as C×H×W too), raw otherwise",
        "",
        "**Agreement.** " + AGREEMENT_DEFINITION,
        "",
        SENSIBLE_DEFINITION,
        "",
        "Columns: *strict* / *adjacent* say whether the model agrees under each definition; "
        "*levels* marks each declared level ✓ (strict), ≈ (adjacent only) or ✗; *sensible* is the "
        "oracle-free criterion (`tokens` when the declared stages are token sequences).",
        "",
        "| model | strict | adjacent | sensible | levels | oracle (`feature_info`) "
        "| auto (`stage_ends`) | shapes (oracle / auto) | s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        marks = [
            "✓" if ok else ("≈" if adj else "✗")
            for ok, adj in zip(r["levels_agree"], r["levels_adjacent"])
        ]
        lv = "".join(marks) or "-"
        lines.append(
            f"| {r['model']} | {'yes' if r['agree'] else 'no'} | "
            f"{'yes' if r['agree_adjacent'] else 'no'} | {_sensible_mark(r)} | {lv} | "
            f"{', '.join(r['oracle'])} | {', '.join(r['auto'])} | "
            f"{_fmt_shapes(r['oracle_shapes'])} / {_fmt_shapes(r['auto_shapes'])} | "
            f"{r['seconds']} | {r['note'].replace('|', '/')} |"
        )
    not_sensible = [r for r in rows if not r["sensible"] and not r["token_stages"]]
    tokens = [r for r in rows if r["token_stages"]]
    lines += [
        "",
        f"Models whose auto points are not sensible stage ends ({len(not_sensible)}):",
        "",
    ]
    lines += [
        f"- `{r['model']}`: {'; '.join(r['sensible_reasons']) or r['note']}" for r in not_sensible
    ]
    lines += [
        "",
        f"Token stages ({len(tokens)}): judged by the token criterion where their points are "
        "token sequences (see the definition above).",
        "",
    ]
    lines += [
        f"- `{r['model']}`: {'sensible' if r['sensible'] else '; '.join(r['sensible_reasons'])}"
        for r in tokens
    ]
    failing = [r for r in rows if not r["agree_adjacent"]]
    lines += ["", f"Models disagreeing under the adjacent definition ({len(failing)}):", ""]
    lines += [f"- `{r['model']}`: {r['note'] or 'see table'}" for r in failing]
    adjacent_only = [r for r in rows if r["agree_adjacent"] and not r["agree"]]
    lines += ["", f"Models agreeing only under the adjacent definition ({len(adjacent_only)}):", ""]
    lines += [f"- `{r['model']}`: {r['note']}" for r in adjacent_only]
    path.write_text("\n".join(lines) + "\n")
    return summary


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
        mark = "AGREE" if row["agree"] else ("ADJAC" if row["agree_adjacent"] else "-----")
        sens = "SENSIBLE" if row["sensible"] else "--------"
        print(f"{mark} {sens} {name:36s} {row['seconds']:>6}s  {row['note']}", flush=True)
        if not row["sensible"]:
            print(f"      sensible: {row['sensible_reasons']}")
        if not row["agree_adjacent"] and row["traced"]:
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
