"""Parameters and FLOPs each fusion kind adds to K copies of a backbone: analytic vs measured.

For every backbone, number of tasks K, fusion kind and shortcut setting, the K models are fused at
their automatic points (``points="auto"``) and four figures are measured on the built model:

* **fusion weights**: parameters of the fusion layers (``nddrify.layers.FusionLayer`` modules),
  outside their norms; **norm parameters**: those inside the fusion layers' norms;
* **parameters added**: parameters of the fused model − the K originals (must equal the sum);
* **FLOPs added**: ``torch.utils.flop_counter.FlopCounterMode`` on the fused model − on the K
  originals, batch 1 at the backbone's input size. The counter counts convolutions and matrix
  products (2 FLOPs per multiply-add), not elementwise ops (norm, activation, resize, the
  per-channel mixing of cross-stitch and of low-rank NDDR's diagonal: those are listed as
  "elementwise multiplies" instead).

Each is set next to its closed form, computed from the fused maps' shapes alone (per level, task i
with C_i channels on H×W, S = ΣC_j, K tasks, N = 1):

====================  =======================================  ============  =====================
kind                  fusion weights                           norm params   FLOPs
====================  =======================================  ============  =====================
NDDR                  Σ_i C_i·S = S² (= K·S·C, equal widths)   2·S           2·N·H·W·S²
NDDR rank r           K·S (diagonal) + r·S (down) + r·S (ups)  2·S           4·N·H·W·r·S
NDDR groups g         S²/g                                     2·S           2·N·H·W·S²/g
cross-stitch          K² (per channel: K²·C)                   0             0 (K²·C·H·W mults)
sluice, S subspaces   (K·S)² (+ K per stitched level)          0             2·(K·S)²·N·(C/S)·H·W
shortcut              Σ_i (Σ_l C_{l,i})·C_{L,i}                2·Σ_i C_L,i   2·N·H_L·W_L·weights
====================  =======================================  ============  =====================

(a 1×1 convolution costs 2·N·H·W·C_in·C_out FLOPs; sluice's mixing is a batched matmul over
(K·S) × (K·S); the shortcut reduces the concatenated levels of each task to the last level's
width C_L on the last level's H_L×W_L). The ``check`` columns say that analytic and measured agree
exactly. The plan's own count (``nddrify.training.overhead``) is recorded next to them.

Models are built on the ``meta`` device by default: nothing is allocated or computed, shapes and
FLOP counts are the same as on a real device (``--device cpu`` runs them for real; the test suite
checks that both give the same figures).

Commands that produced the committed results::

    python benchmarks/fusion_overhead.py                 # writes benchmarks/results/fusion_overhead.*
    python benchmarks/fusion_overhead.py --preset ci --out /tmp/overhead   # seconds, for tests

Other selections::

    python benchmarks/fusion_overhead.py --backbones vgg16,resnet50 --tasks 2 --kinds nddr,sluice
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nddrify
from nddrify.layers import FusionLayer

__all__ = [
    "Backbone",
    "Kind",
    "BACKBONES",
    "KINDS",
    "PRESETS",
    "analytic",
    "count_flops",
    "measure",
    "run",
    "main",
]

Shape = Sequence[int]


@dataclass(frozen=True)
class Backbone:
    """A model to fuse K copies of: how to build it, and its input size."""

    build: Callable[[], nn.Module]
    size: int = 224
    label: str = ""


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _deeplab_vgg16() -> nn.Module:
    """DeepLab-LargeFOV VGG-16 with BN as the official NDDR code, 40 outputs (NYUv2 classes)."""
    from recipes.models import deeplab_vgg16

    return deeplab_vgg16(40)


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None)


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone(_tv("vgg16"), 224, "torchvision VGG-16"),
    "deeplab_vgg16": Backbone(
        _deeplab_vgg16, 321, "recipes.models.deeplab_vgg16(40): DeepLab-LargeFOV VGG-16 + BN"
    ),
    "resnet18": Backbone(_tv("resnet18"), 224, "torchvision ResNet-18"),
    "resnet50": Backbone(_tv("resnet50"), 224, "torchvision ResNet-50"),
    "resnet101": Backbone(_tv("resnet101"), 224, "torchvision ResNet-101"),
    "alexnet": Backbone(_tv("alexnet"), 224, "torchvision AlexNet"),
    "timm/resnet50d": Backbone(_timm("resnet50d"), 224, "timm resnet50d"),
    "timm/convnext_tiny": Backbone(_timm("convnext_tiny"), 224, "timm convnext_tiny"),
    "timm/efficientnet_b0": Backbone(_timm("efficientnet_b0"), 224, "timm efficientnet_b0"),
    "timm/regnety_016": Backbone(_timm("regnety_016"), 224, "timm regnety_016"),
}


@dataclass(frozen=True)
class Kind:
    """A fusion kind: the ``nddrify.fuse`` arguments that build it."""

    fuse_kwargs: dict[str, Any] = field(default_factory=dict)


KINDS: dict[str, Kind] = {
    "nddr": Kind({}),
    "nddr rank 64": Kind({"fusion": nddrify.NDDR(rank=64)}),
    "nddr groups 8": Kind({"fusion": nddrify.NDDR(groups=8)}),
    "cross_stitch": Kind({"fusion": "cross_stitch"}),
    "cross_stitch per channel": Kind({"fusion": nddrify.CrossStitch(per_channel=True)}),
    "sluice (S=2)": Kind({"fusion": "sluice", "subspaces": 2}),
}

#: Named selections: backbones, task counts, kinds, shortcut settings.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "backbones": list(BACKBONES),
        "tasks": [2, 3, 4, 5],
        "kinds": list(KINDS),
        "shortcut": [False, True],
    },
    "ci": {
        "backbones": ["vgg16"],
        "tasks": [2],
        "kinds": list(KINDS),
        "shortcut": [False, True],
    },
}


@dataclass(frozen=True)
class Figures:
    """Fusion weights, norm parameters, FLOPs and elementwise multiplies of one fused model."""

    weights: int
    norm_params: int
    flops: int
    elementwise_mults: int


def _kind_figures(kind: str, shapes: Sequence[Shape]) -> Figures:
    """One level's closed-form figures for maps of ``shapes`` (one (N, C, H, W) per task)."""
    k = len(shapes)
    n, _, h, w = (int(v) for v in shapes[0])
    channels = [int(s[1]) for s in shapes]
    total = sum(channels)
    if kind == "nddr":
        return Figures(total * total, 2 * total, 2 * n * h * w * total * total, 0)
    if kind.startswith("nddr rank "):
        rank = int(kind.split()[-1])
        diagonal_mults = n * h * w * sum(min(ci, cj) for ci in channels for cj in channels)
        return Figures(
            k * total + 2 * rank * total, 2 * total, 4 * n * h * w * rank * total, diagonal_mults
        )
    if kind.startswith("nddr groups "):
        groups = int(kind.split()[-1])
        return Figures(
            total * total // groups, 2 * total, 2 * n * h * w * total * total // groups, 0
        )
    c = channels[0]
    if kind == "cross_stitch":
        return Figures(k * k, 0, 0, k * k * n * c * h * w)
    if kind == "cross_stitch per channel":
        return Figures(k * k * c, 0, 0, k * k * n * c * h * w)
    if kind.startswith("sluice"):
        subspaces = 2
        size = k * subspaces
        return Figures(size * size, 0, 2 * size * size * n * (c // subspaces) * h * w, 0)
    raise KeyError(kind)


def _shortcut_figures(level_shapes: Sequence[Sequence[Shape]]) -> Figures:
    last = level_shapes[-1]
    weights = norms = flops = 0
    for task, (n, width, h, w) in enumerate(last):
        incoming = sum(int(level[task][1]) for level in level_shapes)
        weights += incoming * int(width)
        norms += 2 * int(width)
        flops += 2 * int(n) * int(h) * int(w) * incoming * int(width)
    return Figures(weights, norms, flops, 0)


def _stitched_levels(level_shapes: Sequence[Sequence[Shape]]) -> int:
    """Levels whose maps have the last level's C×H×W: sluice's layer-stitch mixes them (≥ 2)."""
    last = [tuple(s[1:]) for s in level_shapes[-1]]
    same = sum([tuple(s[1:]) for s in level] == last for level in level_shapes)
    return same if same >= 2 else 0


def analytic(kind: str, shortcut: bool, level_shapes: Sequence[Sequence[Shape]]) -> Figures:
    """Closed-form figures of ``kind`` at these levels (level × task (N, C, H, W) shapes).

    Example:
        >>> shapes = [[(1, 64, 112, 112)] * 2, [(1, 128, 56, 56)] * 2]
        >>> analytic("nddr", False, shapes).weights  # S² per level: 128² + 256²
        81920
    """
    per_level = [_kind_figures(kind, level) for level in level_shapes]
    weights = sum(f.weights for f in per_level)
    norms = sum(f.norm_params for f in per_level)
    flops = sum(f.flops for f in per_level)
    mults = sum(f.elementwise_mults for f in per_level)
    if shortcut:
        extra = _shortcut_figures(level_shapes)
        weights, norms, flops = (
            weights + extra.weights,
            norms + extra.norm_params,
            flops + extra.flops,
        )
    elif kind.startswith("sluice"):
        weights += len(level_shapes[-1]) * _stitched_levels(level_shapes)  # layer-stitch betas
    return Figures(weights, norms, flops, mults)


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass as ``torch.utils.flop_counter`` counts them (convs, matmuls).

    Example:
        >>> conv = torch.nn.Conv2d(8, 4, 1, bias=False)
        >>> count_flops(conv, torch.empty(1, 8, 5, 5, device="meta"))  # 2·N·H·W·Cin·Cout
        1600
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())


def _fusion_parameters(fused: nn.Module) -> tuple[int, int]:
    """(weights, norm parameters) of the fusion layers, counted on the built model."""
    weights = norms = 0
    for module in fused.modules():
        if not isinstance(module, FusionLayer):
            continue
        norm_ids = {
            id(p)
            for m in module.modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            for p in m.parameters()
        }
        for p in module.parameters(recurse=False):
            weights += p.numel()
        for child in module.children():
            for p in child.parameters():
                if id(p) in norm_ids:
                    norms += p.numel()
                else:
                    weights += p.numel()
    return weights, norms


def _build(backbone: Backbone, device: str) -> nn.Module:
    with torch.device(device):
        return backbone.build().eval()


def measure(
    backbone_name: str, num_tasks: int, kind: str, shortcut: bool, device: str = "meta"
) -> dict[str, Any]:
    """One row: fuse ``num_tasks`` copies of ``backbone_name`` with ``kind`` and count.

    Example:
        >>> row = measure("vgg16", 2, "nddr", False)
        >>> row["measured"]["weights"], row["weights_per_task"], row["model_params"]
        (2441216, 1220608, 138357544)
    """
    backbone = BACKBONES[backbone_name]
    torch.manual_seed(0)
    models = [_build(backbone, device) for _ in range(num_tasks)]
    x = torch.randn(1, 3, backbone.size, backbone.size, device=device)
    row: dict[str, Any] = {
        "backbone": backbone_name,
        "tasks": num_tasks,
        "kind": kind,
        "shortcut": shortcut,
        "input": list(x.shape),
    }
    try:
        fused = nddrify.fuse(
            models, example_input=x, shortcut=shortcut, **KINDS[kind].fuse_kwargs
        ).eval()
    except (
        nddrify.errors.FusionConfigError
    ) as error:  # e.g. grouped NDDR on widths not divisible by g
        row["error"] = str(error)
        return row
    plan = nddrify.meta.fused_plan(fused)
    level_shapes = [[tuple(p.shape) for p in level.points] for level in plan.levels]
    model_params = sum(p.numel() for p in models[0].parameters())
    base_params = sum(p.numel() for m in models for p in m.parameters())
    base_flops = sum(count_flops(m, x) for m in models)
    fused_flops = count_flops(fused, x)
    weights, norms = _fusion_parameters(fused)
    expected = analytic(kind, shortcut, level_shapes)
    measured = {
        "weights": weights,
        "norm_params": norms,
        "params_added": sum(p.numel() for p in fused.parameters()) - base_params,
        "flops_added": fused_flops - base_flops,
    }
    row.update(
        {
            "points": [level.points[0].name for level in plan.levels],
            "level_shapes": [list(level[0][1:]) for level in level_shapes],
            "model_params": model_params,
            "model_flops": base_flops // num_tasks,
            "analytic": {
                "weights": expected.weights,
                "norm_params": expected.norm_params,
                "params_added": expected.weights + expected.norm_params,
                "flops_added": expected.flops,
                "elementwise_mults": expected.elementwise_mults,
            },
            "measured": measured,
            "plan": {
                "fusion_weights": plan.overhead.fusion_weights,
                "fusion_norm_params": plan.overhead.fusion_norm_params,
            },
            "weights_per_task": weights // num_tasks,
            "relative_weights_per_task": weights / num_tasks / model_params,
            "relative_params": measured["params_added"] / base_params,
            "relative_flops": measured["flops_added"] / base_flops,
        }
    )
    row["check"] = {
        key: row["analytic"][key] == measured[key]
        for key in ("weights", "norm_params", "params_added", "flops_added")
    }
    row["plan_agrees"] = (plan.overhead.fusion_weights, plan.overhead.fusion_norm_params) == (
        weights,
        norms,
    )
    return row


def run(
    backbones: Sequence[str],
    tasks: Sequence[int],
    kinds: Sequence[str],
    shortcut: Sequence[bool],
    out_dir: str | Path,
    *,
    device: str = "meta",
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every combination and write ``fusion_overhead.json`` and ``.md`` into ``out_dir``.

    Returns the JSON payload (``env`` and ``rows``).
    """
    rows = []
    for backbone in backbones:
        for num_tasks in tasks:
            for kind in kinds:
                for with_shortcut in shortcut:
                    row = measure(backbone, num_tasks, kind, with_shortcut, device)
                    rows.append(row)
                    log(_summary_line(row))
    env = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": _timm_version(),
        "python": platform.python_version(),
        "device": device,
        "command": command,
    }
    payload = {"env": env, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_overhead.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "fusion_overhead.md").write_text(markdown(payload))
    return payload


def _timm_version() -> str | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.__version__


def _kind_label(row: dict[str, Any]) -> str:
    return row["kind"] + (" + shortcut" if row["shortcut"] else "")


def _summary_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['backbone']} K={row['tasks']} {_kind_label(row)}: {row['error']}"
    ok = "ok" if all(row["check"].values()) else "MISMATCH"
    return (
        f"{row['backbone']} K={row['tasks']} {_kind_label(row)}: "
        f"+{row['measured']['params_added']:,} params, +{row['measured']['flops_added']:,} FLOPs "
        f"[{ok}]"
    )


def _tick(value: bool) -> str:
    return "✓" if value else "✗"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: a headline table (K = 2) and the full analytic-vs-measured table."""
    env, rows = payload["env"], payload["rows"]
    good = [r for r in rows if "error" not in r]
    lines = [
        "# Parameters and FLOPs added by each fusion kind (K copies of a backbone, auto points)",
        "",
        f"torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}, Python "
        f"{env['python']}, {env['date']}; models on `{env['device']}`. Command: "
        f"`{env['command']}`.",
        "",
        "Measured = counted on the fused model: fusion-layer weights and norm parameters; "
        "parameters added = fused model − the K originals; FLOPs added = "
        "`torch.utils.flop_counter` on the fused model − the K originals (2 FLOPs per "
        "multiply-add of convolutions and matrix products; batch 1 at the input size shown). "
        "Analytic = the closed forms in `benchmarks/fusion_overhead.py` from the fused maps' "
        "shapes. 'per task' = fusion weights / K; '% of one model' is against one original "
        "model's parameters; ε = FLOPs added / the K backbones' FLOPs, so the fused model's "
        "compute-bound throughput relative to running the K models is 1/(1+ε).",
        "",
        f"All {len(good)} rows: analytic = measured for weights, norm parameters, parameters "
        f"added and FLOPs added: {_tick(all(all(r['check'].values()) for r in good))}; the "
        f"plan's count (`nddrify.training.overhead`) = measured: "
        f"{_tick(all(r['plan_agrees'] for r in good))}.",
        "",
        *_headline(good),
        *FORMULAS,
        "## Two tasks",
        "",
        "| backbone | input | fusion | fusion weights | per task | % of one model | norm params "
        "| FLOPs added | ε | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in good:
        if r["tasks"] != 2:
            continue
        m = r["measured"]
        lines.append(
            f"| {r['backbone']} | {r['input'][-1]}² | {_kind_label(r)} | {m['weights']:,} "
            f"| {r['weights_per_task']:,} | {100 * r['relative_weights_per_task']:.2f}% "
            f"| {m['norm_params']:,} | {m['flops_added']:,} | {100 * r['relative_flops']:.2f}% "
            f"| {_tick(all(r['check'].values()))} |"
        )
    lines += [
        "",
        "## Every row: analytic vs measured",
        "",
        "| backbone | K | fusion | weights analytic | measured | norm analytic | measured "
        "| params added analytic | measured | FLOPs added analytic | measured "
        "| elementwise mults | ε | check |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in good:
        a, m = r["analytic"], r["measured"]
        lines.append(
            f"| {r['backbone']} | {r['tasks']} | {_kind_label(r)} | {a['weights']:,} "
            f"| {m['weights']:,} | {a['norm_params']:,} | {m['norm_params']:,} "
            f"| {a['params_added']:,} | {m['params_added']:,} | {a['flops_added']:,} "
            f"| {m['flops_added']:,} | {a['elementwise_mults']:,} "
            f"| {100 * r['relative_flops']:.2f}% | {_tick(all(r['check'].values()))} |"
        )
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "## Not buildable", ""]
        lines += [
            f"* {r['backbone']} K={r['tasks']} {_kind_label(r)}: {r['error']}" for r in errors
        ]
    lines += [
        "",
        "## Backbones",
        "",
        "| backbone | model | parameters | FLOPs (batch 1) | points |",
    ]
    lines.append("|---|---|---:|---:|---|")
    seen = set()
    for r in good:
        if r["backbone"] in seen:
            continue
        seen.add(r["backbone"])
        shapes = ", ".join(
            f"{p} {c}×{h}×{w}" for p, (c, h, w) in zip(r["points"], r["level_shapes"])
        )
        lines.append(
            f"| {r['backbone']} | {BACKBONES[r['backbone']].label} | {r['model_params']:,} "
            f"| {r['model_flops']:,} | {shapes} |"
        )
    return "\n".join(lines) + "\n"


#: The closed forms, as the report prints them (per level; task i has C_i channels on H×W,
#: S = ΣC_j, K tasks, N = 1; L = the last level).
FORMULAS = [
    "## Closed forms (per level)",
    "",
    "| kind | fusion weights | norm params | FLOPs (conv/matmul) | elementwise mults |",
    "|---|---|---|---|---|",
    "| NDDR | Σ_i C_i·S = S² (K·S·C for equal widths) | 2·S | 2·N·H·W·S² | – |",
    "| NDDR rank r | K·S + r·S + r·S | 2·S | 4·N·H·W·r·S | N·H·W·Σ_i Σ_j min(C_i, C_j) |",
    "| NDDR groups g | S²/g | 2·S | 2·N·H·W·S²/g | – |",
    "| cross-stitch | K² | 0 | 0 | K²·N·C·H·W |",
    "| cross-stitch per channel | K²·C | 0 | 0 | K²·N·C·H·W |",
    "| sluice, 2 subspaces | (2K)² (+ K per level stitched, if ≥ 2 levels share the last "
    "shape) | 0 | 2·(2K)²·N·(C/2)·H·W | – |",
    "| + shortcut (once) | Σ_i (Σ_l C_l,i)·C_L,i | 2·Σ_i C_L,i | 2·N·H_L·W_L·Σ_i (Σ_l C_l,i)·C_L,i "
    "| – |",
    "",
]


def _headline(rows: list[dict[str, Any]]) -> list[str]:
    vgg = next(
        (
            r
            for r in rows
            if (r["backbone"], r["tasks"], r["kind"], r["shortcut"]) == ("vgg16", 2, "nddr", False)
        ),
        None,
    )
    if vgg is None:
        return []
    return [
        f"Headline: NDDR at pool1..pool5 of 2 × VGG-16 adds {vgg['measured']['weights']:,} 1×1 "
        f"weights = {vgg['weights_per_task']:,} per task = "
        f"{100 * vgg['relative_weights_per_task']:.2f}% of one model's {vgg['model_params']:,} "
        f"parameters (+ {vgg['measured']['norm_params']:,} BN parameters), and "
        f"{vgg['measured']['flops_added']:,} FLOPs (ε = {100 * vgg['relative_flops']:.2f}%).",
        "",
    ]


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: full (default; every backbone, K=2..5, every kind, with and without "
        "shortcut; about 17 minutes on 2 shared CPU cores) and ci (vgg16, K=2; a few seconds).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--backbones", type=_csv, help=f"comma list of {', '.join(BACKBONES)}")
    parser.add_argument("--tasks", type=lambda t: [int(v) for v in _csv(t)], help="e.g. 2,3,4,5")
    parser.add_argument("--kinds", type=_csv, help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument(
        "--shortcut", choices=("off", "on", "both"), help="with/without the NDDR-Shortcut"
    )
    parser.add_argument("--device", default="meta", help="meta (default: nothing computed) or cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 if any row disagrees)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    shortcut = preset["shortcut"]
    if args.shortcut is not None:
        shortcut = {"off": [False], "on": [True], "both": [False, True]}[args.shortcut]
    for name, known in (("backbones", BACKBONES), ("kinds", KINDS)):
        unknown = sorted(set(getattr(args, name) or []) - set(known))
        if unknown:
            build_parser().error(f"unknown --{name} {unknown}; choose from {sorted(known)}")
    payload = run(
        args.backbones or preset["backbones"],
        args.tasks or preset["tasks"],
        args.kinds or preset["kinds"],
        shortcut,
        args.out,
        device=args.device,
        command=" ".join(["python benchmarks/fusion_overhead.py", *argv]),
    )
    good = [r for r in payload["rows"] if "error" not in r]
    return 0 if all(all(r["check"].values()) for r in good) else 1


if __name__ == "__main__":
    sys.exit(main())
