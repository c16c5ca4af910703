"""Model sweep: fuse two copies of every zoo model with ``points="auto"`` and check the result.

The models are every timm model in ``/work/shared/dev-zoo.txt`` (``timm.create_model(name,
pretrained=False)``) and every torchvision classification and segmentation model
(``torchvision.models.list_models(module=torchvision.models)`` and ``module=
torchvision.models.segmentation``, built with ``weights=None`` and ``weights_backbone=None`` where
the builder takes it; googlenet and inception_v3 with ``init_weights=False``). For each model,
:func:`sweep_one` does:

1. **Two copies** with different random weights (``torch.manual_seed(0)`` and ``(1)`` before each).
2. **Input size**: a 2×3×S×S batch. timm models that declare ``fixed_input_size`` use their
   declared size; every other model gets the first S in 64, 96, 128, 160, 192, 224 (then its
   declared size, then 299) on which the original runs in both train and eval mode. So the fixed-
   size torchvision models (ViT, MaxViT) are found by trying. Shapes are propagated with
   ``x[:1]``.
3. **Stochastic in train mode?** Two signals, OR-ed: (a) *static*: a module of type
   ``nn.Dropout*``/``nn.AlphaDropout`` with ``p > 0``, timm ``DropPath``/``DropBlock2d`` with a
   drop probability > 0, or torchvision ``StochasticDepth`` with ``p > 0``; (b) *dynamic*: the
   original run twice in train mode on the same batch under two different RNG seeds gives
   different outputs (this catches functional ``F.dropout`` too). Train-mode identity is checked
   only when neither fires.
4. **Identity at init**: ``nddrify.fuse(models, points="auto", init=(1.0, 0.0), norm=None,
   activation=None)``; the largest absolute difference between each fused output and its
   original's (``tests.test_fuse.max_identity_diff``) in eval mode, and in train mode when the
   model is deterministic there. Must be ≤ 1e-5.
5. **Gradients**: the default fused model (default init, BatchNorm, auto activation) in train
   mode, ``loss = Σ mean(output)``, backward; every parameter must get a gradient, except those
   the original model itself leaves without one on the same loss (reported separately), and every
   fusion layer must get a non-zero gradient.
6. **Auto points**: names, nodes and shapes per task; at least one, the same list for both
   copies, the same list in the identity and the default fused model, and each a 4-D map of the
   example batch size. For information only, also whether ``get_fusion_candidates`` at the
   model's default size (224 or timm's declared size) picks the same names.

Named exclusions: :data:`TOO_SLOW` (skipped by the tests, attempted by this script unless
``--skip-slow``) and :data:`KNOWN_FAILURES` (expected failures, still attempted here; the tests mark
them ``xfail(strict=True)`` so a fix is noticed).

Usage::

    python benchmarks/model_sweep.py [--models a,b] [--source timm|torchvision|all]
        [--out benchmarks/results] [--skip-slow] [--isolate SECONDS]

``--models`` takes bare names or ``source/name``. It writes ``model_sweep.json`` (one row per
model) and ``model_sweep.md`` (table, summary, versions, date, device, command) into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import inspect
import json
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nddrify  # noqa: E402
from nddrify.layers import FusionLayer  # noqa: E402
from tests.test_fuse import _flatten, max_identity_diff  # noqa: E402

ZOO = Path(__file__).resolve().parents[2] / "shared" / "dev-zoo.txt"  # ../shared beside the repo
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SOURCES = ("timm", "torchvision")
ATOL = 1e-5
SIZES = (64, 96, 128, 160, 192, 224)
SEEDS = (0, 1)

#: Models the tests skip because one check takes minutes on a CI CPU (this script still runs them
#: unless ``--skip-slow``). Keys are ``source/name``.
TOO_SLOW: dict[str, str] = {
    "torchvision/vit_h_14": "too slow for CI CPU (632M parameters, fixed 224×224 input)",
    "torchvision/vit_l_16": "too slow for CI CPU (304M parameters, fixed 224×224 input)",
    "torchvision/regnet_y_128gf": "too slow for CI CPU (644M parameters)",
}

#: Models that fail a check, with the reason (the tests mark them ``xfail(strict=True)``).
KNOWN_FAILURES: dict[str, str] = {}


#: Plain ViTs swept beside the zoo (token fusion: four evenly spaced blocks).
PLAIN_VITS = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "eva02_tiny_patch14_224",
    "vit_small_patch14_reg4_dinov2",
)


def model_id(source: str, name: str) -> str:
    return f"{source}/{name}"


def read_zoo(path: Path = ZOO) -> list[str]:
    """timm model names in ``path``: one a line, blank lines and ``#`` comments skipped (none
    when the file is missing, as on a fresh clone without the shared folder)."""
    if not path.exists():
        return []
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _torchvision_modules() -> list[Any]:
    import torchvision

    return [torchvision.models, torchvision.models.segmentation]


def model_names(source: str) -> list[str]:
    """Every model name of ``source`` (``"timm"``: the zoo; ``"torchvision"``: classification
    then segmentation)."""
    if source == "timm":
        zoo = read_zoo()
        return zoo + [n for n in PLAIN_VITS if n not in zoo]
    if source == "torchvision":
        import torchvision

        names: list[str] = []
        for module in _torchvision_modules():
            names += [
                n
                for n in torchvision.models.list_models(module=module)
                if n not in names  # list order, no duplicates
            ]
        return names
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")


def all_models(source: str = "all") -> list[tuple[str, str]]:
    sources = SOURCES if source == "all" else (source,)
    return [(s, n) for s in sources for n in model_names(s)]


def build(source: str, name: str) -> nn.Module:
    """One randomly initialised model (never pretrained weights)."""
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False
    return builder(**kwargs)


def declared_size(model: nn.Module) -> tuple[int, int] | None:
    """H, W of a timm model's declared ``input_size`` (None for models that declare none)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            return int(cfg["input_size"][1]), int(cfg["input_size"][2])
    return None


def fixed_size(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return bool(isinstance(cfg, dict) and cfg.get("fixed_input_size"))


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            for train in (True, False):
                model.train(train)
                _flatten(model(x))
        return True
    except Exception:
        return False


def choose_input(model: nn.Module) -> tuple[torch.Tensor, str]:
    """A 2×3×S×S batch the model accepts, and how S was chosen.

    Train-mode trial runs change BatchNorm running statistics; they run before fusing, so the fused
    copies and the originals start from the same state.
    """
    declared = declared_size(model)
    if declared is not None and fixed_size(model):
        return torch.randn(2, 3, *declared), "declared fixed size"
    candidates = [(s, s) for s in SIZES]
    for extra in (declared, (299, 299)):
        if extra is not None and extra not in candidates:
            candidates.append(extra)
    for size in candidates:
        x = torch.randn(2, 3, *size)
        if _runs(model, x):
            return x, "smallest size that runs"
    raise RuntimeError(f"the model runs on none of the sizes {candidates}")


_STOCHASTIC_ATTRS = ("p", "drop_prob", "drop_rate")


def stochastic_modules(model: nn.Module) -> list[str]:
    """Types of modules that are random in train mode (dropout, drop-path, stochastic depth)."""
    found = set()
    for module in model.modules():
        kind = type(module).__name__
        is_dropout = isinstance(module, nn.modules.dropout._DropoutNd)
        is_droppath = kind in ("DropPath", "DropBlock2d", "StochasticDepth")
        if not (is_dropout or is_droppath):
            continue
        prob = next(
            (getattr(module, a) for a in _STOCHASTIC_ATTRS if hasattr(module, a)),
            1.0,
        )
        if isinstance(prob, (int, float)) and prob > 0:
            found.add(kind)
    return sorted(found)


def random_in_train(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two train-mode runs on the same batch under different RNG seeds differ."""
    model.train()
    outputs = []
    with torch.no_grad():
        for seed in (1234, 4321):
            torch.manual_seed(seed)
            outputs.append(_flatten(model(x)))
    return any(not torch.equal(a, b) for a, b in zip(*outputs))


def _points(fused: nn.Module) -> list[list[dict]]:
    """Per task, its auto points (name, node, C×H×W shape, layout)."""
    fusion_plan = nddrify.meta.fused_plan(fused)
    per_task: list[list[dict]] = [[] for _ in fusion_plan.tasks]
    for level in fusion_plan.levels:
        for i, point in enumerate(level.points):
            per_task[i].append(
                {
                    "name": point.name,
                    "node": point.node,
                    "shape": list(point.shape),
                    "layout": point.layout,
                }
            )
    return per_task


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _new_row(source: str, name: str) -> dict:
    return {
        "id": model_id(source, name),
        "source": source,
        "model": name,
        "input": None,
        "input_choice": "",
        "traced": False,
        "points": [],
        "points_task1": [],
        "points_default_fuse": [],
        "points_at_default_size": None,
        "stochastic_modules": [],
        "random_in_train": None,
        "identity_eval": None,
        "identity_train": None,
        "params": None,
        "fusion_params": None,
        "params_without_grad": None,
        "params_unused_by_original": [],
        "fusion_layers_zero_grad": None,
        "stem_gets_gradient": None,
        "error": None,
        "error_stage": None,
        "seconds": None,
        "stage_seconds": {},
    }


def sweep_one(source: str, name: str, *, informational: bool = True) -> dict:
    """Fuse two copies of ``source/name`` and measure every check (see the module docstring).

    ``informational=False`` skips the step that checks nothing (auto points at the default size).

    Never raises: an exception is recorded in ``row["error"]`` with the stage it happened in
    (``row["error_stage"]``). :func:`failures` turns a row into the list of failed checks.
    """
    row = _new_row(source, name)
    start = time.perf_counter()
    stage = "build"
    tick = start

    def lap(label: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        row["stage_seconds"][label] = round(now - tick, 2)
        tick = now

    models: list[nn.Module] = []
    fused = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for seed in SEEDS:
                torch.manual_seed(seed)
                models.append(build(source, name))
            row["params"] = sum(p.numel() for p in models[0].parameters())
            lap("build")

            stage = "input"
            torch.manual_seed(0)
            x, row["input_choice"] = choose_input(models[0])
            row["input"] = list(x.shape)
            lap("input")

            stage = "stochastic"
            row["stochastic_modules"] = stochastic_modules(models[0])
            if not row[
                "stochastic_modules"
            ]:  # the dynamic test only where the static one is silent
                row["random_in_train"] = random_in_train(models[0], x)
            lap("stochastic")

            stage = "fuse identity"
            fused = nddrify.fuse(
                models,
                points="auto",
                init=(1.0, 0.0),
                norm=None,
                activation=None,
                example_input=x[:1],
            )
            row["traced"] = True
            row["points"], row["points_task1"] = _points(fused)
            lap("fuse identity")

            stage = "identity eval"
            row["identity_eval"] = max_identity_diff(models, fused, x, train=False)
            lap("identity eval")
            if not row["stochastic_modules"] and not row["random_in_train"]:
                stage = "identity train"
                row["identity_train"] = max_identity_diff(models, fused, x, train=True)
                lap("identity train")
            del fused
            fused = None
            gc.collect()

            stage = "fuse default"
            fused = nddrify.fuse(models, points="auto", example_input=x[:1])
            row["points_default_fuse"] = _points(fused)[0]
            overhead = nddrify.training.overhead(fused)
            row["fusion_params"] = overhead.fusion_params
            lap("fuse default")

            stage = "gradients"
            fused.train()
            loss = sum(t.float().mean() for t in _flatten(fused(x)))
            loss.backward()
            missing = [n for n, p in fused.named_parameters() if p.requires_grad and p.grad is None]
            zero = [
                n
                for n, m in fused.named_modules()
                if isinstance(m, FusionLayer)
                and not any(
                    p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.parameters()
                )
            ]
            row["stem_gets_gradient"] = _stem_gets_gradient(fused)
            # Every fusion point lies on the spine between the stem and the output, so a gradient
            # that reaches the stem passes through every fusion layer. Where none reaches the stem
            # (a zero-initialised head, as in torchvision's ViT), zero gradients are expected.
            row["fusion_layers_zero_grad"] = zero if row["stem_gets_gradient"] else []
            del fused, loss
            fused = None
            gc.collect()
            if missing:
                unused = _unused_by_originals(models, x, ["task0", "task1"])
                row["params_unused_by_original"] = sorted(set(missing) & unused)
                missing = [n for n in missing if n not in unused]
            row["params_without_grad"] = missing
            lap("gradients")

            stage = "points at default size"
            size = declared_size(models[0]) or (224, 224)
            if not informational:
                pass
            elif list(x.shape[2:]) != list(size):
                candidates = nddrify.get_fusion_candidates(
                    models[0], example_input=torch.randn(1, 3, *size)
                )
                row["points_at_default_size"] = [c.name for c in candidates if c.auto]
            else:
                row["points_at_default_size"] = [p["name"] for p in row["points"]]
            lap("points at default size")
    except Exception as err:
        row["error"] = _first_line(err)
        row["error_stage"] = stage
        row["traceback"] = traceback.format_exc(limit=-4)
    finally:
        del fused
        models.clear()
        gc.collect()
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _stem_gets_gradient(fused: nn.Module) -> bool:
    """Whether the first parameterised op of task 0 in the fused graph gets a non-zero gradient."""
    for node in fused.graph.nodes:
        target = str(node.target)
        if not target.startswith("task0."):
            continue
        if node.op == "call_module":
            params = list(fused.get_submodule(target).parameters())
        elif node.op == "get_attr":
            try:
                params = [fused.get_parameter(target)]
            except AttributeError:
                params = []
        else:
            params = []
        if params:
            return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    return False


def _unused_by_originals(models: list[nn.Module], x: torch.Tensor, tasks: list[str]) -> set[str]:
    """``task.param`` names that get no gradient in the original models on the same loss."""
    unused = set()
    for task, model in zip(tasks, models):
        model = copy.deepcopy(model).train()
        loss = sum(t.float().mean() for t in _flatten(model(x)))
        loss.backward()
        unused |= {
            f"{task}.{n}" for n, p in model.named_parameters() if p.requires_grad and p.grad is None
        }
    return unused


def failures(row: dict) -> list[str]:
    """The failed checks of one :func:`sweep_one` row (empty when the model passes)."""
    if row["error"] is not None:
        return [f"{row['error_stage']}: {row['error']}"]
    problems = []
    points, other = row["points"], row["points_task1"]
    if not points:
        problems.append("no auto points")
    if [(p["name"], p["shape"]) for p in points] != [(p["name"], p["shape"]) for p in other]:
        problems.append("the two copies got different auto points")
    if row["points_default_fuse"] != points:
        problems.append("the default fuse chose other points than the identity fuse")
    if any(len(p["shape"]) not in (3, 4) or p["shape"][0] != 1 for p in points):
        problems.append("an auto point is not a map or token sequence of the example batch")
    if row["identity_eval"] is None or row["identity_eval"] > ATOL:
        problems.append(f"identity eval max diff {row['identity_eval']} > {ATOL}")
    deterministic = not row["stochastic_modules"] and not row["random_in_train"]
    if deterministic and (row["identity_train"] is None or row["identity_train"] > ATOL):
        problems.append(f"identity train max diff {row['identity_train']} > {ATOL}")
    if row["params_without_grad"]:
        shown = ", ".join(row["params_without_grad"][:5])
        problems.append(f"{len(row['params_without_grad'])} parameters without gradient: {shown}")
    if row["fusion_layers_zero_grad"]:
        problems.append(f"fusion layers with zero gradient: {row['fusion_layers_zero_grad']}")
    return problems


def status(row: dict) -> str:
    problems = failures(row)
    key = row["id"]
    if not problems:
        return "ok" if key not in KNOWN_FAILURES else "ok (listed as known failure: fixed?)"
    if key in KNOWN_FAILURES:
        return f"known failure: {KNOWN_FAILURES[key]}"
    return "FAIL: " + "; ".join(problems)


# ----------------------------------------------------------------------------------------------
# Script


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def _fmt_points(row: dict) -> str:
    return ", ".join(
        f"{p['name']} ({'×'.join(map(str, p['shape'][1:]))}"
        + (" NHWC)" if p["layout"] == "NHWC" else ")")
        for p in row["points"]
    )


def _versions() -> str:
    import timm
    import torchvision

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}"
    )


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} torch threads"


def write_markdown(rows: list[dict], path: Path, command: str, date: str | None = None) -> str:
    ok = [r for r in rows if not failures(r)]
    per_source = {
        s: (sum(1 for r in ok if r["source"] == s), sum(1 for r in rows if r["source"] == s))
        for s in SOURCES
    }
    diffs = [d for r in rows for d in (r["identity_eval"], r["identity_train"]) if d is not None]
    worst = max(diffs) if diffs else None
    failing = [r for r in rows if failures(r)]
    summary = (
        f"fused and passing all checks: {len(ok)}/{len(rows)} ("
        + ", ".join(f"{s} {a}/{b}" for s, (a, b) in per_source.items() if b)
        + f"); max identity diff {_fmt(worst)}; {len(failing)} failing"
    )
    total_s = sum(r["seconds"] or 0 for r in rows)
    lines = [
        '# Model sweep: two copies fused with `points="auto"`',
        "",
        f"**{summary}.**",
        "",
        f"- date: {date or datetime.date.today().isoformat()}",
        f"- {_versions()}",
        f"- device: {_device()}",
        f"- command: `{command}`",
        f"- total time: {total_s / 60:.1f} min",
        "- weights: random, two copies seeded 0 and 1; input 2×3×S×S (see the module docstring of "
        "`benchmarks/model_sweep.py` for how S is chosen and what each check does)",
        "",
        "Columns: *traced*: fused without error; *#pts* / *points*: auto points of task 0 "
        "(C×H×W on the example batch); *id eval* / *id train*: identity-at-init max abs diff "
        f"(must be ≤ {ATOL:g}; train is `-` where the model is random in train mode: dropout or "
        "drop-path); *no grad*: parameters of the default fused model without gradient "
        "(excluding those the original leaves unused); *s*: seconds for all checks.",
        "",
        "| source | model | input | traced | #pts | points | id eval | id train | no grad | s "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "×".join(map(str, r["input"][2:])) if r["input"] else "-"
        no_grad = "-" if r["params_without_grad"] is None else str(len(r["params_without_grad"]))
        lines.append(
            f"| {r['source']} | {r['model']} | {size} | {'yes' if r['traced'] else 'no'} | "
            f"{len(r['points'])} | {_fmt_points(r)} | {_fmt(r['identity_eval'])} | "
            f"{_fmt(r['identity_train'])} | {no_grad} | {r['seconds']} | "
            f"{status(r).replace('|', '/')} |"
        )
    expected = [model_id(*m) for m in all_models()]
    seen = {r["id"] for r in rows}
    missing = [k for k in expected if k not in seen]
    if missing:
        lines[2:2] = [
            f"**Partial sweep: {len(missing)} of {len(expected)} models not run yet** "
            f"({', '.join(missing)}).",
            "",
        ]
    lines += ["", f"## Failing models ({len(failing)})", ""]
    lines += [f"- `{r['id']}`: {'; '.join(failures(r))}" for r in failing] or ["none"]
    lines += ["", "## Named exclusions", ""]
    lines += [f"- `{k}` (skipped by the tests): {v}" for k, v in TOO_SLOW.items()]
    lines += [f"- `{k}` (xfail in the tests): {v}" for k, v in KNOWN_FAILURES.items()]
    if not TOO_SLOW and not KNOWN_FAILURES:
        lines.append("none")
    unused = [r for r in rows if r["params_unused_by_original"]]
    lines += ["", "## Parameters the original model itself leaves without gradient", ""]
    lines += [
        f"- `{r['id']}`: {len(r['params_unused_by_original'])} "
        f"({', '.join(r['params_unused_by_original'][:4])}, ...)"
        for r in unused
    ] or ["none"]
    moved = [
        r
        for r in rows
        if r["points_at_default_size"] is not None
        and r["points_at_default_size"] != [p["name"] for p in r["points"]]
    ]
    lines += [
        "",
        "## Auto points that depend on the input size (information, not a failure)",
        "",
        "Models whose auto points on the sweep's small input differ from those at the default "
        "size (224, or timm's declared size):",
        "",
    ]
    lines += [
        f"- `{r['id']}`: {[p['name'] for p in r['points']]} at "
        f"{'×'.join(map(str, r['input'][2:]))} vs {r['points_at_default_size']}"
        for r in moved
    ] or ["none"]
    path.write_text("\n".join(lines) + "\n")
    return summary


def _select(args: argparse.Namespace) -> list[tuple[str, str]]:
    models = all_models(args.source)
    if not args.models:
        return models
    wanted = [w.strip() for w in args.models.split(",") if w.strip()]
    chosen = []
    for w in wanted:
        if "/" in w:
            source, name = w.split("/", 1)
            chosen.append((source, name))
        else:
            hits = [(s, n) for s, n in models if n == w]
            chosen += hits or [("timm", w)]
    return chosen


def _run_isolated(source: str, name: str, timeout: float) -> dict:
    """:func:`sweep_one` in a child process, so a crash or a hang costs one row only."""
    cmd = [sys.executable, __file__, "--one", model_id(source, name)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            return json.loads(lines[-1])
        error = f"child process exited with {done.returncode}: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    row = _new_row(source, name)
    row.update(error=error, error_stage="isolated run", seconds=timeout)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (bare or source/name)")
    parser.add_argument("--source", choices=[*SOURCES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--skip-slow", action="store_true", help="skip the TOO_SLOW models")
    parser.add_argument(
        "--slow-timeout",
        type=float,
        default=1200,
        metavar="SECONDS",
        help="TOO_SLOW models run last, each in a child process with this time limit",
    )
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="only rewrite the results from earlier model_sweep.json files (rows concatenated, "
        "statuses recomputed), e.g. the parts of a sweep run in parallel",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --out/model_sweep.json and run only the missing models",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    command = f"python benchmarks/model_sweep.py {argv_shown}".strip()

    if args.one:
        source, name = args.one.split("/", 1)
        print(json.dumps(sweep_one(source, name)))
        return 0
    if args.render:
        parts = [json.loads(path.read_text()) for path in args.render]
        rows = [row for part in parts for row in part["rows"]]
        commands = "; ".join([*dict.fromkeys(part["command"] for part in parts), command])
        _write(rows, args.out, commands, parts[0].get("date"))
        return 0

    selected = _select(args)
    selected.sort(key=lambda m: model_id(*m) in TOO_SLOW)  # the slow ones last
    rows: list[dict] = []
    previous = args.out / "model_sweep.json"
    if args.resume and previous.exists():
        rows = json.loads(previous.read_text())["rows"]
    done = {row["id"] for row in rows}
    for source, name in selected:
        key = model_id(source, name)
        if (args.skip_slow and key in TOO_SLOW) or key in done:
            continue
        if key in TOO_SLOW:
            row = _run_isolated(source, name, args.slow_timeout)
        else:
            row = sweep_one(source, name)
        rows.append(row)
        problems = failures(row)
        mark = "ok  " if not problems else "FAIL"
        print(
            f"{mark} {key:48s} {row['seconds']:>7}s  {len(row['points'])} pts  "
            f"{'; '.join(problems)[:200]}",
            flush=True,
        )
        _write(rows, args.out, command, quiet=True)  # a stopped sweep keeps its rows

    _write(rows, args.out, command)
    return 0


def _write(
    rows: list[dict], out: Path, command: str, date: str | None = None, quiet: bool = False
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row["status"] = status(row)
        row["failures"] = failures(row)
    data = {
        "command": command,
        "date": date or datetime.date.today().isoformat(),
        "versions": _versions(),
        "device": _device(),
        "rows": rows,
    }
    (out / "model_sweep.json").write_text(json.dumps(data, indent=1) + "\n")
    summary = write_markdown(rows, out / "model_sweep.md", command, date)
    if not quiet:
        print(summary)


if __name__ == "__main__":
    raise SystemExit(main())
