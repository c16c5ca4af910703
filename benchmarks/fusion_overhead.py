"""Parameters and FLOPs each fusion kind adds to two copies of a backbone.

Parameters come from the plan (the analytic count, asserted equal to the built layers in the
tests) and from counting the fused model; FLOPs are measured with
``torch.utils.flop_counter.FlopCounterMode`` as (fused model) − (the two original models), at
batch 1 and each model's default input size, next to the analytic MACs of the fusion layers
(1×1 weights × H × W per level).

    python benchmarks/fusion_overhead.py                 # writes benchmarks/results/fusion_overhead.*
    python benchmarks/fusion_overhead.py --models vgg16 --kinds nddr,cross_stitch
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import nddrify

MODELS = {
    "vgg16": "torchvision:vgg16",
    "resnet50": "torchvision:resnet50",
}
KINDS: dict[str, dict[str, Any]] = {
    "nddr": {},
    "nddr+shortcut": {"shortcut": True},
    "nddr rank 64": {"fusion": nddrify.NDDR(rank=64)},
    "nddr groups 8": {"fusion": nddrify.NDDR(groups=8)},
    "cross_stitch": {"fusion": "cross_stitch"},
    "cross_stitch per channel": {"fusion": nddrify.CrossStitch(per_channel=True)},
    "sluice (S=2)": {"fusion": "sluice", "subspaces": 2},
}


def _flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return counter.get_total_flops()


def measure(model: str, kind: str) -> dict[str, Any]:
    spec = MODELS[model]
    models = [nddrify.load_spec(spec).eval() for _ in range(2)]
    x = nddrify.default_example_input(models[0])
    fused = nddrify.fuse(models, example_input=x, **KINDS[kind]).eval()
    plan = nddrify.training.fused_plan(fused)
    base_params = sum(p.numel() for m in models for p in m.parameters())
    fused_params = sum(p.numel() for p in fused.parameters())
    base_flops = sum(_flops(m, x) for m in models)
    fused_flops = _flops(fused, x)
    analytic_macs = sum(
        lv.weights * lv.points[0].spatial[0] * lv.points[0].spatial[1] for lv in plan.levels
    )
    return {
        "model": model,
        "kind": kind,
        "points": [lv.points[0].name for lv in plan.levels],
        "plan_weights": plan.overhead.fusion_weights,
        "plan_norm_params": plan.overhead.fusion_norm_params,
        "measured_added_params": fused_params - base_params,
        "relative_params_per_task": plan.overhead.fusion_params / base_params,
        "analytic_level_macs": analytic_macs,
        "measured_added_flops": fused_flops - base_flops,
        "relative_flops": (fused_flops - base_flops) / base_flops,
        "input": list(x.shape),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for kind in args.kinds.split(","):
            rows.append(measure(model, kind))
            print(json.dumps(rows[-1]))
    env = {
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/fusion_overhead.py " + " ".join(argv or sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_overhead.json").write_text(
        json.dumps({"env": env, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "# Parameters and FLOPs added by each fusion kind (two copies of a backbone, auto points)",
        "",
        f"torch {env['torch']}, Python {env['python']}, {env['date']}; command: "
        f"`{env['command'].strip()}`. FLOPs: `torch.utils.flop_counter` (2 × MACs of convs and "
        "matmuls), batch 1 at the default 224×224, fused model minus the two originals. "
        "'relative' is against the two original models together. 'weights × H × W' is the "
        "analytic MAC count of the 1×1 convolutions for the NDDR kinds (for low-rank it also "
        "counts the per-channel diagonal, which the flop counter does not: elementwise); for "
        "cross-stitch and sluice the mixing is elementwise and FlopCounterMode counts the einsum "
        "as a batched matmul.",
        "",
        "| backbone | fusion | params added (plan) | measured | relative | weights × H × W | measured FLOPs added | relative FLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        plan_params = r["plan_weights"] + r["plan_norm_params"]
        lines.append(
            f"| 2 × {r['model']} | {r['kind']} | {plan_params:,} | {r['measured_added_params']:,} "
            f"| {100 * r['relative_params_per_task']:.2f}% | {r['analytic_level_macs']:,} "
            f"| {r['measured_added_flops']:,} | {100 * r['relative_flops']:.2f}% |"
        )
    (out / "fusion_overhead.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
