"""Cheap fusion at its ceiling: fused / sequential latency of NDDR, low-rank and grouped NDDR on
two ResNet-50s (issue 14's setting: batch 8, 224², eval, fp32, one thread), before and after
the layers' arithmetic was rewritten, eager and ``torch.compile``, NCHW and channels-last, and
the inference form (``nddrify.inference.optimize_for_inference``).

Variants, each timed interleaved with the others of its group (one step of every variant per
round, the order rotating, medians of ``--rounds`` rounds, after one warm-up step):

* ``sequential`` — the two ResNet-50s run in turn (the baseline of every ratio);
* ``<kind>`` — ``nddrify.fuse(models, fusion=<kind>)`` in eval mode, as shipped: GEMMs
  accumulating over the tasks, in-place channel mixing, the eval BatchNorm folded on the fly;
* ``<kind> (plain ops)`` — the same fused model whose fusion layers run the textbook
  arithmetic the layers used before (concatenate, one ``conv2d`` per task or a padded
  multiply-add per task pair, BatchNorm, ReLU): the "before" of this change, same weights;
* ``<kind> inference`` — ``optimize_for_inference(fused)``: BatchNorms folded into the fusion
  layers' weights and into the backbones' convolutions; its baseline is
  ``sequential, conv-BN folded`` (``torch.fx.experimental.optimization.fuse`` on each model),
  so the ratio compares like with like.

Ceiling = FLOPs(sequential) / FLOPs(variant) at batch 1 (``torch.utils.flop_counter``): the
ratio a purely compute-bound run would reach (the folded variants against the folded baseline).

    python benchmarks/cheap_fusion.py                    # the committed results (~8 min)
    python benchmarks/cheap_fusion.py --preset ci        # resnet18 at 64², seconds (tests)

Writes ``cheap_fusion.json`` and ``cheap_fusion.md`` in ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse as fold_conv_bn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import command_line, write_reports
from throughput import (
    RunInTurn,
    Stats,
    _device_description,
    build_models,
    count_flops,
    time_steps,
)

import nddrify
from nddrify.inference import optimize_for_inference
from nddrify.layers import NDDRGroupedLayer, NDDRLayer, NDDRLowRankLayer

__all__ = ["PRESETS", "Preset", "plain_ops", "run", "markdown", "main"]

KINDS = {
    "nddr": lambda: nddrify.NDDR(),
    "nddr rank 64": lambda: nddrify.NDDR(rank=64),
    "nddr groups 8": lambda: nddrify.NDDR(groups=8),
}


@dataclass(frozen=True)
class Preset:
    model: str
    batch: int
    size: int
    threads: int
    rounds: int
    compile: bool
    channels_last: bool


PRESETS = {
    "cpu": Preset("resnet50", 8, 224, 1, 9, compile=True, channels_last=True),
    "ci": Preset("resnet18", 2, 64, 1, 2, compile=False, channels_last=True),
}


# ----------------------------------------------------------------------------- plain arithmetic


def _plain_nddr(self: NDDRLayer, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    stacked = torch.cat(inputs, 1)
    mixed = [conv(stacked) for conv in self.convs]
    return tuple(act(norm(m)) for m, norm, act in zip(mixed, self.norms, self.activations))


def _plain_low_rank(self: NDDRLowRankLayer, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    low = self.down(torch.cat(inputs, 1))
    outputs = []
    for i, (c_i, up) in enumerate(zip(self.in_channels, self.ups)):
        mixed = up(low)
        for j, x_j in enumerate(inputs):
            m = min(c_i, x_j.shape[1])
            term = self.diagonal[i][j, :m, None, None] * x_j[:, :m]
            mixed = mixed + (F.pad(term, (0, 0, 0, 0, 0, c_i - m)) if m < c_i else term)
        outputs.append(mixed)
    return tuple(act(norm(m)) for m, norm, act in zip(outputs, self.norms, self.activations))


def _plain_grouped(self: NDDRGroupedLayer, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    order = self.group_order.to(inputs[0].device)
    grouped = self.conv(torch.cat(inputs, 1).index_select(1, order))
    back = torch.argsort(order)
    bounds = list(itertools.accumulate(self.in_channels, initial=0))
    mixed = [grouped.index_select(1, back[a:b]) for a, b in itertools.pairwise(bounds)]
    return tuple(act(norm(m)) for m, norm, act in zip(mixed, self.norms, self.activations))


_PLAIN: dict[type, Callable[..., tuple[torch.Tensor, ...]]] = {
    NDDRLayer: _plain_nddr,
    NDDRLowRankLayer: _plain_low_rank,
    NDDRGroupedLayer: _plain_grouped,
}


def plain_ops(fused: nn.Module) -> nn.Module:
    """``fused`` with its NDDR layers running the textbook arithmetic (NCHW maps only).

    Example:
        >>> import torch, torchvision, nddrify
        >>> fused = nddrify.fuse([torchvision.models.resnet18()] * 2).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> with torch.no_grad():
        ...     a, b = fused(x)[0], plain_ops(fused)(x)[0]
        >>> bool((a - b).abs().max() < 1e-4)
        True
    """
    import copy

    plain = copy.deepcopy(fused)
    for module in plain.modules():
        forward = _PLAIN.get(type(module))
        if forward is not None:
            module.forward = types.MethodType(forward, module)
    return plain


# ----------------------------------------------------------------------------- measuring


class LayerTimer:
    """Wall time of every fusion layer call (``nddr1`` …) of the given fused models, by hooks."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.handles = []
        for variant, model in models.items():
            for name, layer in model.named_children():
                if name.startswith("nddr"):
                    key = (variant, name)
                    self.seconds[key] = []
                    self.handles.append(layer.register_forward_pre_hook(self._start))
                    self.handles.append(layer.register_forward_hook(self._stop(key)))

    @staticmethod
    def _start(module: nn.Module, args: Any) -> None:
        module._nddrify_started = time.perf_counter()

    def _stop(self, key: tuple[str, str]) -> Callable[..., None]:
        def stop(module: nn.Module, args: Any, output: Any) -> None:
            self.seconds[key].append(time.perf_counter() - module._nddrify_started)

        return stop

    def medians(self) -> dict[str, dict[str, float]]:
        """variant → level → median ms over the timed calls (the warm-up call left out)."""
        table: dict[str, dict[str, float]] = {}
        for (variant, level), seconds in self.seconds.items():
            if seconds:
                kept = seconds[1:] or seconds
                table.setdefault(variant, {})[level] = 1000 * statistics.median(kept)
        return table

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _time_group(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    rounds: int,
    flops: dict[str, int],
    baseline: dict[str, str],
    log: Callable[[str], None],
    default_baseline: str = "sequential",
) -> list[dict[str, Any]]:
    steps = {}
    first = {}
    for name, module in variants.items():

        def step(module: nn.Module = module) -> Any:
            with torch.no_grad():
                return module(x)

        first[name], _ = time_steps(step, 1, 0, torch.device("cpu"))
        steps[name] = step
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name] += time_steps(steps[name], 0, 1, torch.device("cpu"))[1]
    stats = {name: Stats.of(s) for name, s in seconds.items()}
    rows = []
    for name in names:
        base = baseline.get(name, default_baseline)
        paired = [b / v for b, v in zip(seconds[base], seconds[name])]  # round by round
        row = {
            "variant": name,
            "baseline": base,
            "latency": asdict(stats[name]),
            "first_call_s": first[name],
            "ratio": stats[base].median_ms / stats[name].median_ms,
            "paired_ratio": statistics.median(paired),
            "ceiling": flops[base] / flops[name],
            "flops_batch1": flops[name],
        }
        rows.append(row)
        log(
            f"  {name}: {stats[name].median_ms:.1f} ms [IQR {stats[name].q1_ms:.1f}–"
            f"{stats[name].q3_ms:.1f}], ratio {row['ratio']:.3f}, paired {row['paired_ratio']:.3f} "
            f"(ceiling {row['ceiling']:.3f})"
        )
    return rows


def run(preset: Preset, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every group of ``preset``; the JSON payload."""
    torch.set_num_threads(preset.threads)
    models = [m.eval() for m in build_models(preset.model, 2)]
    example = torch.randn(1, 3, preset.size, preset.size)
    x = torch.randn(preset.batch, 3, preset.size, preset.size)
    sequential = RunInTurn(models).eval()
    folded_sequential = RunInTurn([fold_conv_bn(m) for m in models]).eval()
    fused = {
        k: nddrify.fuse(models, fusion=make(), example_input=example).eval()
        for k, make in KINDS.items()
    }
    eager: dict[str, nn.Module] = {"sequential": sequential}
    for kind, model in fused.items():
        eager[kind] = model
        eager[f"{kind} (plain ops)"] = plain_ops(model)
    eager["sequential, conv-BN folded"] = folded_sequential
    for kind in ("nddr", "nddr rank 64"):
        eager[f"{kind} inference"] = optimize_for_inference(fused[kind])
    folded_baseline = {f"{k} inference": "sequential, conv-BN folded" for k in KINDS}
    flops = {name: count_flops(module, example, "forward") for name, module in eager.items()}

    # Short groups (few variants, so a round is short against the machine's slow phases), each
    # with its own baseline, interleaved within the group.
    plan = [
        ("eager, NCHW: the issue's setting", ["sequential", *KINDS], preset.rounds + 2),
        (
            "eager, NCHW: before (plain ops) and after, same weights",
            ["sequential", *(v for k in KINDS for v in (f"{k} (plain ops)", k))],
            preset.rounds,
        ),
        (
            "eager, NCHW: inference form",
            ["sequential, conv-BN folded", "nddr inference", "nddr rank 64 inference"],
            preset.rounds,
        ),
    ]
    groups: list[dict[str, Any]] = []
    log(
        f"{preset.model} ×2, batch {preset.batch}, {preset.size}², eval fp32, "
        f"{preset.threads} thread(s)"
    )
    for name, names, rounds in plan:
        log(name)
        chosen = {n: eager[n] for n in names}
        timer = LayerTimer(chosen) if "before" in name else None
        rows = _time_group(chosen, x, rounds, flops, folded_baseline, log, names[0])
        group: dict[str, Any] = {"name": name, "rows": rows}
        if timer is not None:
            group["fusion_layer_ms"] = timer.medians()
            timer.remove()
        groups.append(group)
    if preset.channels_last:
        cl = {n: eager[n] for n in ("sequential", *KINDS)}
        cl = {n: m.to(memory_format=torch.channels_last) for n, m in cl.items()}
        log("eager, channels-last")
        rows = _time_group(
            cl, x.to(memory_format=torch.channels_last), preset.rounds, flops, {}, log
        )
        groups.append({"name": "eager, channels-last", "rows": rows})
        for module in cl.values():
            module.to(memory_format=torch.contiguous_format)
    if preset.compile:
        compiled = {
            "sequential": RunInTurn([torch.compile(m) for m in models]).eval(),
            "nddr": torch.compile(fused["nddr"]),
            "nddr rank 64": torch.compile(fused["nddr rank 64"]),
        }
        log("torch.compile (inductor), NCHW")
        rows = _time_group(compiled, x, preset.rounds, flops, {}, log)
        groups.append({"name": "torch.compile (inductor), NCHW", "rows": rows})
    return {
        "environment": _device_description(torch.device("cpu")),
        "settings": asdict(preset),
        "groups": groups,
    }


def markdown(payload: dict[str, Any], command: str) -> str:
    env, s = payload["environment"], payload["settings"]
    lines = [
        f"# Cheap fusion at its ceiling: fused / sequential on two {s['model']}s",
        "",
        f"Device: {env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch "
        f"thread(s)); torch {env['torch']}, torchvision {env['torchvision']}; Python "
        f"{env['python']}; {env['platform']}; {env['date']}.",
        f"Command: `{command}`.",
        "",
        f"Setting: 2 × {s['model']} (random weights), batch {s['batch']}, {s['size']}², eval, "
        f"fp32, `torch.no_grad`, {s['threads']} thread(s). Per group, one warm-up step per "
        f"variant, then {s['rounds']} interleaved rounds (one step of every variant per round, "
        "the order rotating); median latency, interquartile range. ratio = baseline median / "
        "variant median (> 1: faster than the baseline); paired ratio = the median over rounds "
        "of baseline step / variant step within the round (robust to the machine's slow "
        "phases); ceiling = FLOPs(baseline) / "
        "FLOPs(variant) at batch 1 (`torch.utils.flop_counter`). `(plain ops)` = the same "
        "weights through the textbook arithmetic the layers used before (concatenation, "
        "conv2d per task, padded multiply-adds, BatchNorm, ReLU); `inference` = "
        "`nddrify.inference.optimize_for_inference`, against the two models with their "
        "conv→BN pairs folded too.",
    ]
    for group in payload["groups"]:
        lines += [
            "",
            f"## {group['name']}",
            "",
            "| variant | baseline | latency ms (median) | IQR ms | ratio | paired ratio | ceiling | first call s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in group["rows"]:
            lat = row["latency"]
            lines.append(
                f"| {row['variant']} | {row['baseline']} | {lat['median_ms']:.1f} | "
                f"{lat['q1_ms']:.1f}–{lat['q3_ms']:.1f} | {row['ratio']:.3f} | "
                f"{row['paired_ratio']:.3f} | "
                f"{row['ceiling']:.3f} | {row['first_call_s']:.2f} |"
            )
        layers = group.get("fusion_layer_ms")
        if layers:
            levels = sorted({lv for table in layers.values() for lv in table})
            lines += [
                "",
                f"Fusion layers alone in `{group['name']}` (median ms per call, by hooks):",
                "",
                "| variant | " + " | ".join(levels) + " | total |",
                "|---|" + "---:|" * (len(levels) + 1),
            ]
            for variant, table in layers.items():
                cells = [f"{table.get(lv, 0.0):.1f}" for lv in levels]
                lines.append(f"| {variant} | {' | '.join(cells)} | {sum(table.values()):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    preset = PRESETS[args.preset]
    if args.rounds:
        preset = Preset(**{**asdict(preset), "rounds": args.rounds})
    payload = run(preset)
    payload["command"] = command = command_line("cheap_fusion", args.preset, default="cpu")
    for path in write_reports(args.out, "cheap_fusion", payload, markdown(payload, command)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
