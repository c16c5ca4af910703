"""Throughput and latency: K single-task models run in turn vs one fused multi-task model.

For every setting (model, K tasks, batch, input size, dtype, channels_last, torch.compile, mode)
each **variant** is timed on the same input:

* ``sequential`` — the K original models run one after the other (what a user does today);
* ``fused <kind>`` — ``nddrify.fuse(models, **kind)`` for each fusion kind;
* ``shared`` — hard parameter sharing, ``nddrify.share(models)`` (one trunk up to the last
  automatic point);
* ``batched <kind>`` — ``nddrify.batching.batch_tasks(fused)``, the batched same-architecture execution
  mode, when ``nddrify.batching`` is importable.

Modes: ``forward`` (eval, ``torch.no_grad``) and ``train`` (train mode; forward, a loss summing
the mean of every task output, backward, ``torch.optim.SGD(momentum=0.9)`` step; the gradients
are zeroed outside the timed region). Every setting is applied identically to the baseline and
the variants: bf16 = ``torch.autocast(dtype=torch.bfloat16)`` around forward and loss;
channels_last = module and input in ``torch.channels_last``; compile = ``torch.compile`` on every
module (each of the K baseline models separately).

Method (after timm's ``benchmark.py``): per variant, ``warmup`` untimed steps (the first one is
reported separately as ``first call``: it includes compilation), then ``repeats`` rounds in which
every variant of the setting runs one step (interleaved, the order rotating per round, so that
machine noise hits baseline and variants alike), each step timed alone with ``time.perf_counter``, synchronising the device (``torch.cuda.synchronize``) before
reading the clock on CUDA. Reported: median latency per batch and its spread (interquartile range
and min–max), images/s = batch / median latency, and the ratio fused/sequential = sequential
median latency / variant median latency (> 1: the variant is faster). Each ratio is shown with its
compute-bound ceiling: FLOPs(sequential) / FLOPs(variant), counted by
``torch.utils.flop_counter`` at batch 1 for the same mode (forward, or forward + backward); for a
fused model this is 1/(1+ε), ε = fusion FLOPs / the K backbones' FLOPs.

The hand-written check builds the same NDDR-VGG-16 by hand (:class:`HandwrittenNDDRVGG`: the K
torchvision VGG feature slices and the fused model's NDDR layers called explicitly, sharing the
exact same modules) and compares outputs (bit-exact expected) and latency (generated /
hand-written, measured interleaved; target ≤ 1.02).

Presets::

    python benchmarks/throughput.py --preset ci    # tiny (resnet18 at 64², < 30 s): tests
    python benchmarks/throughput.py --preset cpu   # committed CPU results (see --help for time)
    python benchmarks/throughput.py --preset gpu --device cuda   # the full matrix, CUDA only

Outputs in ``--out`` (default ``benchmarks/results``): ``throughput_<device>.json`` (every row),
``throughput_<device>.md`` (device, versions, settings, tables) and ``throughput_<device>.png``
(fused/sequential ratio against batch size, one line per variant, ceilings dashed).
Any flag overrides the preset, e.g.
``python benchmarks/throughput.py --preset cpu --models resnet50 --batches 1 --modes forward``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nddrify
from nddrify.meta import fused_plan

__all__ = [
    "KINDS",
    "PRESETS",
    "Setting",
    "Stats",
    "RunInTurn",
    "HandwrittenNDDRVGG",
    "build_models",
    "build_variants",
    "time_steps",
    "measure_setting",
    "compare_handwritten",
    "run",
    "write_reports",
    "main",
]

#: Fusion kinds: ``nddrify.fuse`` keyword arguments.
KINDS: dict[str, dict[str, Any]] = {
    "nddr": {},
    "nddr+shortcut": {"shortcut": True},
    "nddr rank 64": {"fusion": nddrify.NDDR(rank=64)},
    "nddr groups 8": {"fusion": nddrify.NDDR(groups=8)},
    "cross_stitch": {"fusion": "cross_stitch"},
    "cross_stitch per channel": {"fusion": nddrify.CrossStitch(per_channel=True)},
    "sluice (S=2)": {"fusion": "sluice", "subspaces": 2},
}

VARIANT_GROUPS = ("sequential", "fused", "shared", "batched")
#: Target for generated / hand-written NDDR-VGG latency.
HANDWRITTEN_TARGET = 1.02
DTYPES = ("fp32", "bf16")
MODES = ("forward", "train")


# --------------------------------------------------------------------------------------------
# Models and variants


class VGG16SmallHead(nn.Module):
    """torchvision's VGG-16 feature stack with a 1×1 pool and a 10-way linear head: the
    VGG-16 backbone without fc6/fc7's 120 M parameters, for quick checks (CI preset)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        cfg = torchvision.models.vgg.cfgs["D"]
        self.features = torchvision.models.vgg.make_layers(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _build_one(name: str) -> nn.Module:
    if name == "vgg16_small_head":
        return VGG16SmallHead()
    if name == "deeplab_vgg16":
        from recipes.models import deeplab_vgg16

        return deeplab_vgg16(40)
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False)
    return torchvision.models.get_model(name, weights=None)


def build_models(name: str, num_tasks: int, device: torch.device | str = "cpu") -> list[nn.Module]:
    """``num_tasks`` copies of model ``name`` with different random weights (seeds 0..K−1).

    ``name``: a torchvision classification model (``vgg16``, ``resnet50``), ``timm/<name>``,
    ``deeplab_vgg16`` (``recipes.models.deeplab_vgg16(40)``) or ``vgg16_small_head``.

    Example:
        >>> [type(m).__name__ for m in build_models("resnet18", 2)]
        ['ResNet', 'ResNet']
    """
    models = []
    for seed in range(num_tasks):
        torch.manual_seed(seed)
        models.append(_build_one(name).to(device))
    return models


class RunInTurn(nn.Module):
    """The baseline: the K single-task models run one after the other on the same input.

    Example:
        >>> import torch
        >>> baseline = RunInTurn(build_models("resnet18", 2))
        >>> [tuple(y.shape) for y in baseline.eval()(torch.randn(1, 3, 32, 32))]
        [(1, 1000), (1, 1000)]
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> tuple[Any, ...]:
        return tuple(model(x) for model in self.models)


def _batch_tasks() -> Callable[[nn.Module], nn.Module] | None:
    """``nddrify.batching.batch_tasks`` when the batched mode exists in this checkout, else None."""
    function = getattr(nddrify, "batch_tasks", None)
    if function is not None:
        return function
    if importlib.util.find_spec("nddrify.batching") is None:
        return None
    from nddrify import batching

    return getattr(batching, "batch_tasks", None)


def build_variants(
    models: Sequence[nn.Module],
    kinds: Sequence[str],
    groups: Sequence[str],
    batched_kinds: Sequence[str],
    example_input: torch.Tensor,
) -> Iterator[tuple[str, nn.Module | None, str | None]]:
    """Yield ``(variant name, module, error)`` for the sequential baseline and each variant.

    ``module`` is None and ``error`` says why when a variant cannot be built (e.g. a kind the
    backbone's widths do not allow, or no batched mode in this checkout).
    """
    if "sequential" in groups:
        yield "sequential", RunInTurn(models), None
    batch_tasks = _batch_tasks()
    for kind in kinds:
        wanted = ["fused"] if "fused" in groups else []
        if "batched" in groups and kind in batched_kinds:
            wanted.append("batched")
        if not wanted:
            continue
        try:
            fused = nddrify.fuse(list(models), example_input=example_input, **KINDS[kind])
        except Exception as error:  # recorded in the row: one variant never stops the run
            for group in wanted:
                yield f"{group} {kind}", None, f"{type(error).__name__}: {error}"
            continue
        if "fused" in wanted:
            yield f"fused {kind}", fused, None
        if "batched" in wanted:
            if batch_tasks is None:
                yield f"batched {kind}", None, "nddrify.batching is not available"
            else:
                try:
                    batched = batch_tasks(fused)
                except Exception as error:  # recorded in the row: one variant never stops the run
                    yield f"batched {kind}", None, f"{type(error).__name__}: {error}"
                else:
                    yield f"batched {kind}", batched, None
        del fused
    if "shared" in groups:
        try:
            shared = nddrify.share(list(models), example_input=example_input)
        except Exception as error:  # recorded in the row: one variant never stops the run
            yield "shared", None, f"{type(error).__name__}: {error}"
        else:
            yield "shared", shared, None


# --------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Setting:
    """One point of the benchmark matrix."""

    model: str
    tasks: int
    batch: int
    size: int
    dtype: str
    channels_last: bool
    compile: bool
    mode: str
    cuda_graphs: bool = False  # forward on CUDA only: each variant replayed as a captured graph

    def label(self) -> str:
        flags = [self.dtype] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
        flags += ["cuda_graphs"] * self.cuda_graphs
        return (
            f"{self.model} ×{self.tasks} {self.mode} b{self.batch} {self.size}² {' '.join(flags)}"
        )


@dataclass(frozen=True)
class Stats:
    """Latency statistics of the timed steps, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = sorted(1000 * s for s in seconds)
        if len(ms) >= 2:
            q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q1 = q3 = ms[0]
        return cls(
            median_ms=statistics.median(ms),
            q1_ms=q1,
            q3_ms=q3,
            min_ms=ms[0],
            max_ms=ms[-1],
            mean_ms=statistics.fmean(ms),
            samples=len(ms),
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any],
    warmup: int,
    repeats: int,
    device: torch.device,
    before: Callable[[], Any] | None = None,
) -> tuple[float, list[float]]:
    """(first call seconds, per-step seconds of ``repeats`` timed steps after ``warmup``).

    ``before`` runs untimed before every step (e.g. ``optimizer.zero_grad``). The first warm-up
    call is timed on its own: with ``torch.compile`` it includes the compilation.

    Example:
        >>> first, steps = time_steps(lambda: sum(range(1000)), 1, 3, torch.device("cpu"))
        >>> len(steps)
        3
    """
    first = 0.0
    for index in range(warmup):
        if before is not None:
            before()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if index == 0:
            first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return first, seconds


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def _loss(output: Any) -> torch.Tensor:
    return sum(t.float().mean() for t in _tensors(output) if t.is_floating_point())


def _autocast(setting: Setting, device: torch.device) -> contextlib.AbstractContextManager:
    if setting.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compiled(module: nn.Module) -> nn.Module:
    if isinstance(module, RunInTurn):  # the baseline: each model compiled on its own
        return RunInTurn([torch.compile(m) for m in module.models])
    return torch.compile(module)


def _graphed_forward(
    module: nn.Module, x: torch.Tensor, setting: Setting, device: torch.device
) -> Callable[[], Any]:
    """A forward step replaying a CUDA graph captured from ``module(x)`` (static input)."""
    static = x.clone()
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
        if setting.dtype == "bf16"
        else contextlib.nullcontext()
    )
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad(), autocast:
        for _ in range(3):  # warm-up outside the graph, as CUDA graphs require
            module(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), autocast, torch.cuda.graph(graph):
        module(static)
    return graph.replay


def peak_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one ``step`` above what was allocated before it (CUDA
    only; None elsewhere): activations, gradients and workspace, weights excluded."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _make_step(
    module: nn.Module, x: torch.Tensor, setting: Setting, device: torch.device
) -> tuple[Callable[[], Any], Callable[[], Any] | None, Any]:
    """(step, untimed before-step, optimizer) for this setting's mode."""
    if setting.cuda_graphs:
        if setting.mode != "forward" or device.type != "cuda":
            raise ValueError("cuda_graphs needs mode='forward' on a CUDA device")
        return _graphed_forward(module, x, setting, device), None, None
    if setting.mode == "forward":

        def forward_step() -> Any:
            with torch.no_grad(), _autocast(setting, device):
                return module(x)

        return forward_step, None, None
    params = [p for p in module.parameters() if p.requires_grad]
    # No momentum: the variants are timed interleaved, so all of them hold their optimizer state
    # at once; momentum buffers would add a full copy of every variant's weights.
    optimizer = torch.optim.SGD(params, lr=1e-6)

    def train_step() -> None:
        with _autocast(setting, device):
            loss = _loss(module(x))
        loss.backward()
        optimizer.step()

    return train_step, lambda: optimizer.zero_grad(set_to_none=True), optimizer


def count_flops(module: nn.Module, x: torch.Tensor, mode: str) -> int:
    """FLOPs of one forward (``mode="forward"``, eval) or forward + backward (``"train"``), as
    ``torch.utils.flop_counter`` counts them (convolutions and matrix products).

    Example:
        >>> conv = torch.nn.Conv2d(8, 4, 1, bias=False)
        >>> count_flops(conv, torch.randn(1, 8, 5, 5), "forward"), count_flops(conv, torch.randn(1, 8, 5, 5), "train")
        (1600, 3200)
    """
    counter = FlopCounterMode(display=False)
    was_training = module.training
    module.train(mode == "train")
    try:
        if mode == "forward":
            with torch.no_grad(), counter:
                module(x)
        else:
            with counter:
                _loss(module(x)).backward()
            module.zero_grad(set_to_none=True)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def measure_setting(
    setting: Setting,
    variants: Sequence[tuple[str, nn.Module | None, str | None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    flops_cache: dict[tuple[Any, ...], int],
    log: Callable[[str], None] = print,
    compiled_cache: dict[tuple[Any, ...], nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Time every variant in one setting; one row per variant (``error`` rows included).

    All variants are warmed up first, then timed in interleaved rounds (one step of each variant
    per round, the order rotating from round to round), so that a slow phase of the machine
    (frequency, a neighbour's load) hits the baseline and the variants alike instead of whichever
    ran at that moment. ``flops_cache`` keeps the batch-1 FLOP counts; ``compiled_cache`` the
    ``torch.compile`` wrappers, reused across batch sizes (dynamo recompiles for a new shape as it
    needs)."""
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    x = torch.randn(setting.batch, 3, setting.size, setting.size, device=device)
    x = x.contiguous(memory_format=memory_format)
    rows: list[dict[str, Any]] = []
    ready: list[tuple[dict[str, Any], nn.Module, Callable[[], Any], Any, Any]] = []
    for name, module, error in variants:
        row: dict[str, Any] = {**asdict(setting), "variant": name}
        rows.append(row)
        if module is None:
            row["error"] = error
            log(f"  {setting.label()} | {name}: not built ({error})")
            continue
        module.to(memory_format=memory_format)
        module.train(setting.mode == "train")
        key = (setting.model, setting.tasks, setting.size, setting.mode, name)
        if key not in flops_cache:
            flops_cache[key] = count_flops(module, x[:1].contiguous(), setting.mode)
        row["flops_batch1"] = flops_cache[key]
        runnable = module
        if setting.compile:
            compiled_key = (name, setting.dtype, setting.channels_last, setting.mode)
            cache = compiled_cache if compiled_cache is not None else {}
            if compiled_key not in cache:
                cache[compiled_key] = _compiled(module)
            runnable = cache[compiled_key]
        try:
            step, before, optimizer = _make_step(runnable, x, setting, device)
            row["first_call_s"], _ = time_steps(step, warmup, 0, device, before)
            if device.type == "cuda":
                if before is not None:
                    before()
                row["peak_memory_bytes"] = peak_memory(step, device)
                row["weights_bytes"] = sum(
                    t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
                )
        except Exception as error:  # a backend failure (e.g. compile) is recorded, not fatal
            row["error"] = f"{type(error).__name__}: {error}"
            log(f"  {setting.label()} | {name}: failed ({type(error).__name__}: {error})")
            module.zero_grad(set_to_none=True)
            continue
        ready.append((row, module, step, before, optimizer))
    seconds: dict[int, list[float]] = {index: [] for index in range(len(ready))}
    for round_index in range(repeats):
        shift = round_index % max(len(ready), 1)
        for index in [*range(shift, len(ready)), *range(shift)]:
            _, _, step, before, _ = ready[index]
            seconds[index] += time_steps(step, 0, 1, device, before)[1]
            if before is not None:
                before()  # free this variant's gradients before the next one runs
    for index, (row, module, _, _, _) in enumerate(ready):
        module.zero_grad(set_to_none=True)
        stats = Stats.of(seconds[index])
        report = getattr(module, "report", None)  # the batched mode says what runs batched
        if report is not None:
            row["batching_report"] = str(report).splitlines()[0]
        row.update(
            {
                "latency": asdict(stats),
                "images_per_s": setting.batch / (stats.median_ms / 1000),
                "warmup": warmup,
                "repeats": repeats,
            }
        )
        log(
            f"  {setting.label()} | {row['variant']}: {stats.median_ms:.2f} ms "
            f"[IQR {stats.q1_ms:.2f}–{stats.q3_ms:.2f}], {row['images_per_s']:.1f} img/s"
        )
    ready.clear()
    baseline = next((r for r in rows if r["variant"] == "sequential" and "latency" in r), None)
    for row in rows:
        if baseline is not None and "latency" in row:
            row["ratio"] = baseline["latency"]["median_ms"] / row["latency"]["median_ms"]
            row["ceiling"] = baseline["flops_batch1"] / row["flops_batch1"]
    return rows


# --------------------------------------------------------------------------------------------
# Hand-written NDDR-VGG


class HandwrittenNDDRVGG(nn.Module):
    """The NDDR-VGG a person would write: each task's torchvision VGG feature slices and the
    NDDR layers called explicitly, level by level. It holds the very modules of ``fused`` (no
    copies), so both compute with the same weights.

    ``fused`` must come from ``nddrify.fuse`` on torchvision-style VGGs (``features`` an
    ``nn.Sequential``, then ``avgpool`` and ``classifier``) with points ``features.<i>`` and no
    shortcut.

    Example:
        >>> import torch, nddrify
        >>> fused = nddrify.fuse(build_models("vgg16_small_head", 2)).eval()
        >>> hand = HandwrittenNDDRVGG(fused).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> all(torch.equal(a, b) for a, b in zip(fused(x), hand(x)))
        True
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        plan = fused_plan(fused)
        if plan.shortcut_weights or hasattr(fused, "shortcut"):
            raise nddrify.errors.ModelsError(
                "the hand-written NDDR-VGG has no shortcut; fuse without one."
            )
        cuts = []
        for level in plan.levels:
            names = {p.name for p in level.points}
            if len(names) != 1 or not next(iter(names)).startswith("features."):
                raise nddrify.errors.ModelsError(
                    f"the hand-written NDDR-VGG needs points features.<i> shared by all tasks, "
                    f"got {sorted(names)}; fuse torchvision VGGs with points='auto'."
                )
            cuts.append(int(next(iter(names)).split(".")[1]))
        self.tasks = list(plan.tasks)
        self.slices = nn.ModuleList()
        self.heads = nn.ModuleList()
        for task in self.tasks:
            model = getattr(fused, task)
            bounds = [0, *(c + 1 for c in cuts), len(model.features)]
            self.slices.append(
                nn.ModuleList(
                    nn.Sequential(*model.features[start:end])
                    for start, end in itertools.pairwise(bounds)
                )
            )
            self.heads.append(nn.ModuleList([model.avgpool, model.classifier]))
        self.nddr = nn.ModuleList(getattr(fused, f"nddr{i + 1}") for i in range(len(cuts)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = [x] * len(self.tasks)
        for level, layer in enumerate(self.nddr):
            features = [slices[level](f) for slices, f in zip(self.slices, features)]
            features = list(layer(*features))
        outputs = []
        for slices, (avgpool, classifier), f in zip(self.slices, self.heads, features):
            f = slices[-1](f)  # layers after the last point (none for VGG-16's pool5)
            outputs.append(classifier(torch.flatten(avgpool(f), 1)))
        return tuple(outputs)


def compare_handwritten(
    model: str,
    size: int,
    batches: Sequence[int],
    device: torch.device,
    warmup: int,
    repeats: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Generated vs hand-written NDDR-VGG: outputs (eval) and forward latency per batch size.

    The two are timed interleaved (one step each per round, alternating which goes first) so
    that machine noise hits both alike.
    """
    models = build_models(model, 2, device)
    fused = nddrify.fuse(models, example_input=torch.randn(1, 3, size, size, device=device))
    del models
    fused.eval()
    hand = HandwrittenNDDRVGG(fused).eval()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, size, size, device=device)
        with torch.no_grad():
            generated, written = fused(x), hand(x)
        diff = max(float((a - b).abs().max()) for a, b in zip(generated, written))
        equal = all(torch.equal(a, b) for a, b in zip(generated, written))

        def step(module: nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            def run_once() -> Any:
                with torch.no_grad():
                    return module(x)

            return run_once

        for module in (fused, hand):
            time_steps(step(module), warmup, 0, device)
        times: dict[str, list[float]] = {"generated": [], "handwritten": []}
        pair = [("generated", fused), ("handwritten", hand)]
        for round_index in range(repeats):  # ABBA order: neither always runs first
            for name, module in pair if round_index % 2 == 0 else pair[::-1]:
                times[name] += time_steps(step(module), 0, 1, device)[1]
        generated_stats, written_stats = (
            Stats.of(times["generated"]),
            Stats.of(times["handwritten"]),
        )
        row = {
            "model": model,
            "size": size,
            "batch": batch,
            "outputs_equal": equal,
            "max_abs_diff": diff,
            "generated": asdict(generated_stats),
            "handwritten": asdict(written_stats),
            "ratio": generated_stats.median_ms / written_stats.median_ms,
            "repeats": repeats,
        }
        rows.append(row)
        log(
            f"  hand-written {model} b{batch} {size}²: generated {generated_stats.median_ms:.2f} ms, "
            f"hand-written {written_stats.median_ms:.2f} ms, ratio {row['ratio']:.3f}, "
            f"outputs equal {equal} (max |Δ| {diff:.1e})"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Presets and the run


@dataclass(frozen=True)
class Group:
    """A product of settings: every combination of the listed values."""

    models: tuple[str, ...]
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...] = ("fp32",)
    channels_last: tuple[bool, ...] = (False,)
    compile: tuple[bool, ...] = (False,)
    modes: tuple[str, ...] = MODES
    kinds: tuple[str, ...] = ("nddr",)
    variants: tuple[str, ...] = VARIANT_GROUPS
    batched_kinds: tuple[str, ...] = ("nddr",)
    tasks: tuple[int, ...] = (2,)

    def settings(self) -> list[Setting]:
        return [
            Setting(model, tasks, batch, size, dtype, cl, comp, mode)
            for model, tasks, size, dtype, cl, comp, mode, batch in itertools.product(
                self.models,
                self.tasks,
                self.sizes,
                self.dtypes,
                self.channels_last,
                self.compile,
                self.modes,
                self.batches,
            )
        ]


@dataclass(frozen=True)
class Preset:
    """Groups of settings, timing parameters and the hand-written check."""

    groups: tuple[Group, ...]
    warmup: int
    repeats: int
    threads: int | None = None  # None: all cores
    handwritten: dict[str, Any] | None = None
    estimate: str = ""
    notes: tuple[str, ...] = field(default=())


_CPU_KINDS = ("nddr", "nddr rank 64", "nddr groups 8", "cross_stitch")
PRESETS: dict[str, Preset] = {
    "ci": Preset(
        groups=(Group(models=("resnet18",), sizes=(64,), batches=(1, 2)),),
        warmup=1,
        repeats=3,
        threads=1,
        handwritten={"model": "vgg16_small_head", "size": 32, "batches": (1,)},
        estimate="about 15 s",
    ),
    "cpu": Preset(
        groups=(
            # fp32: forward and train step, batch 1 and 8, four kinds, sharing, batched
            Group(models=("vgg16", "resnet50"), sizes=(224,), batches=(1, 8), kinds=_CPU_KINDS),
            # bf16 autocast at batch 8 (its fp32 counterpart is above)
            Group(
                models=("vgg16", "resnet50"),
                sizes=(224,),
                batches=(8,),
                dtypes=("bf16",),
                kinds=("nddr", "nddr rank 64"),
            ),
            # batch 32, forward only
            Group(
                models=("resnet50",),
                sizes=(224,),
                batches=(32,),
                modes=("forward",),
                kinds=("nddr", "nddr rank 64"),
            ),
            # channels_last on (its "off" counterpart is in the first group)
            Group(
                models=("resnet50",),
                sizes=(224,),
                batches=(8,),
                channels_last=(True,),
                modes=("forward",),
                kinds=_CPU_KINDS,
            ),
            # torch.compile on (its "off" counterpart is in the first group)
            Group(
                models=("vgg16",),
                sizes=(224,),
                batches=(1,),
                compile=(True,),
                modes=("forward",),
                kinds=("nddr",),
                variants=("sequential", "fused", "batched"),
            ),
        ),
        warmup=1,
        repeats=5,
        handwritten={"model": "vgg16", "size": 224, "batches": (1, 8)},
        estimate="about 16 minutes on a quiet 2-core AVX-512 CPU (estimated: single-step "
        "times of each model × variants × 6 steps, plus building and one compile per variant)",
    ),
    "gpu": Preset(
        groups=(
            # every kind, sequential / fused / batched / shared, without compile
            Group(
                models=("vgg16", "deeplab_vgg16", "resnet50", "resnet101"),
                sizes=(224, 321),
                batches=(1, 8, 32),
                dtypes=DTYPES,
                channels_last=(False, True),
                kinds=tuple(KINDS),
                batched_kinds=tuple(KINDS),
            ),
            # torch.compile on, NDDR only (the compiled wrapper is reused across batch sizes)
            Group(
                models=("vgg16", "resnet50"),
                sizes=(224,),
                batches=(1, 8, 32),
                dtypes=DTYPES,
                compile=(True,),
                kinds=("nddr",),
            ),
        ),
        warmup=10,
        repeats=40,
        handwritten={"model": "vgg16", "size": 224, "batches": (1, 8, 32)},
        estimate="roughly 3 to 4 hours on one H100-class GPU (a guess: not measured, no GPU "
        "here), about 3/4 of it in the uncompiled matrix",
    ),
}


def _device_description(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "batched_mode": _batch_tasks() is not None,
        "date": date.today().isoformat(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def run(
    preset: Preset,
    out_dir: str | Path,
    device: str = "cpu",
    *,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every setting of ``preset`` (and its hand-written check) and write the reports.

    Returns the JSON payload: ``env``, ``settings`` (the preset), ``rows``, ``handwritten``.
    """
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads_before = torch.get_num_threads()
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    try:
        env = {**_device_description(torch_device), "command": command}
        rows: list[dict[str, Any]] = []
        flops_cache: dict[tuple[Any, ...], int] = {}
        # Settings of every group, by model: each model's variants are built once (the union
        # of what its groups ask for) and every setting times the ones its group names.
        by_models: dict[tuple[str, int, int], list[tuple[Setting, Group]]] = {}
        for group in preset.groups:
            for setting in group.settings():
                key = (setting.model, setting.tasks, setting.size)
                by_models.setdefault(key, []).append((setting, group))
        for (model, tasks, size), chosen in by_models.items():
            log(f"{model} ×{tasks} at {size}²: building")
            models = build_models(model, tasks, torch_device)
            groups = [g for _, g in chosen]
            variants = list(
                build_variants(
                    models,
                    _union(g.kinds for g in groups),
                    _union(g.variants for g in groups),
                    _union(g.batched_kinds for g in groups),
                    torch.randn(1, 3, size, size, device=torch_device),
                )
            )
            compiled_cache: dict[tuple[Any, ...], nn.Module] = {}
            for setting, group in chosen:
                wanted = _variant_names(group)
                rows += measure_setting(
                    setting,
                    [v for v in variants if v[0] in wanted],
                    torch_device,
                    preset.warmup,
                    preset.repeats,
                    flops_cache,
                    log,
                    compiled_cache,
                )
            del variants, models, compiled_cache
            gc.collect()
        handwritten = []
        if preset.handwritten is not None:
            spec = preset.handwritten
            handwritten = compare_handwritten(
                spec["model"],
                spec["size"],
                spec["batches"],
                torch_device,
                max(preset.warmup, 1),
                max(preset.repeats, 3),
                log,
            )
        env["torch_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    payload = {
        "env": env,
        "settings": _preset_json(preset),
        "rows": rows,
        "handwritten": handwritten,
    }
    write_reports(payload, out_dir)
    return payload


def _union(values: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(itertools.chain.from_iterable(values)))


def _variant_names(group: Group) -> set[str]:
    names = {"sequential", "shared"} & set(group.variants)
    if "fused" in group.variants:
        names |= {f"fused {kind}" for kind in group.kinds}
    if "batched" in group.variants:
        names |= {f"batched {kind}" for kind in group.batched_kinds if kind in group.kinds}
    return names


def _preset_json(preset: Preset) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(preset)))


def _device_tag(env: dict[str, Any]) -> str:
    return "cuda" if env["device"].startswith("cuda") else "cpu"


# --------------------------------------------------------------------------------------------
# Reports


def _fmt_ratio(row: dict[str, Any]) -> str:
    if "ratio" not in row:
        return ""
    return f"{row['ratio']:.2f}"


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown summary of a run."""
    env, rows = payload["env"], payload["rows"]
    preset = payload["settings"]
    lines = [
        f"# Throughput and latency: K models in turn vs fused ({_device_tag(env).upper()})",
        "",
        f"Device: {env.get('gpu') or env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} "
        f"torch threads); torch {env['torch']}, torchvision {env['torchvision']}, CUDA "
        f"{env['cuda'] or 'none'}; Python {env['python']}; {env['platform']}; {env['date']}.",
        f"Command: `{env['command']}`. Batched mode (`nddrify.batching.batch_tasks`) available: "
        f"{'yes' if env['batched_mode'] else 'no'}.",
        "",
        f"Method (timm `benchmark.py` style): per variant {preset['warmup']} warm-up step(s), then "
        f"{preset['repeats']} rounds in which every variant of the setting runs one step "
        "(interleaved, the order rotating per round, so machine noise hits all variants alike), "
        "each step timed alone (`time.perf_counter`, device synchronised); "
        "latency = median per batch, spread = interquartile range [q1–q3] and min–max; img/s = "
        "batch / median. `forward` = eval + `torch.no_grad`; `train` = forward + loss (sum of "
        "the outputs' means) + backward + SGD step (no momentum: interleaved variants hold their optimizer state at once), gradients zeroed untimed. "
        "ratio = sequential median / variant median (> 1 = faster than running the K models in "
        "turn); ceiling = FLOPs(sequential) / FLOPs(variant) at batch 1 in the same mode "
        "(`torch.utils.flop_counter`): the ratio a purely compute-bound run would reach, "
        "1/(1+ε) for a fused model. bf16 = `torch.autocast(bfloat16)`; every setting applies "
        "to the baseline and the variants alike (compile: each baseline model compiled on its "
        "own).",
        "",
    ]
    by_table: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        by_table.setdefault((row["model"], row["tasks"], row["mode"]), []).append(row)
    for (model, tasks, mode), table in by_table.items():
        lines += [
            f"## {model}, K = {tasks}, {mode}",
            "",
            "| batch | size | dtype | channels_last | compile | variant | latency ms (median) "
            "| IQR ms | min–max ms | img/s | ratio | ceiling | first call s |",
            "|---:|---:|---|:-:|:-:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in table:
            head = (
                f"| {r['batch']} | {r['size']} | {r['dtype']} | {'✓' if r['channels_last'] else ''} "
                f"| {'✓' if r['compile'] else ''} | {r['variant']} "
            )
            if "latency" not in r:
                lines.append(head + f"| not built: {r['error']} | | | | | | |")
                continue
            lat = r["latency"]
            ceiling = f"{r['ceiling']:.2f}" if "ceiling" in r else ""
            lines.append(
                head + f"| {lat['median_ms']:.2f} | {lat['q1_ms']:.2f}–{lat['q3_ms']:.2f} "
                f"| {lat['min_ms']:.2f}–{lat['max_ms']:.2f} | {r['images_per_s']:.1f} "
                f"| {_fmt_ratio(r)} | {ceiling} | {r['first_call_s']:.2f} |"
            )
        lines.append("")
    if payload["handwritten"]:
        lines += [
            "## Generated vs hand-written NDDR-VGG (forward, eval)",
            "",
            "`HandwrittenNDDRVGG` calls the same modules as the generated GraphModule (no "
            "copies); the two are timed interleaved. Target: generated / hand-written ≤ 1.02.",
            "",
            "| model | size | batch | generated ms | hand-written ms | ratio | ≤ 1.02 "
            "| outputs equal | max abs diff |",
            "|---|---:|---:|---:|---:|---:|:-:|:-:|---:|",
        ]
        for h in payload["handwritten"]:
            lines.append(
                f"| {h['model']} | {h['size']} | {h['batch']} | {h['generated']['median_ms']:.2f} "
                f"| {h['handwritten']['median_ms']:.2f} | {h['ratio']:.3f} "
                f"| {'✓' if h['ratio'] <= HANDWRITTEN_TARGET else '✗'} "
                f"| {'✓' if h['outputs_equal'] else '✗'} | {h['max_abs_diff']:.1e} |"
            )
        lines.append("")
    lines.append(f"Plot: `throughput_{_device_tag(env)}.png`.")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: str | Path) -> None:
    """Ratio (variant / sequential throughput) against batch size: one panel per model, size and
    mode at the reference setting (first dtype, channels_last off, compile off); one line per
    variant, its compute-bound ceiling dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in payload["rows"]
        if "ratio" in r
        and r["variant"] != "sequential"
        and not r["channels_last"]
        and not r["compile"]
    ]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    rows = [r for r in rows if dtypes and r["dtype"] == dtypes[0]]
    panels = list(dict.fromkeys((r["model"], r["tasks"], r["size"], r["mode"]) for r in rows))
    columns = max(1, min(2, len(panels)))
    lines_count = max(1, -(-len(panels) // columns))
    figure, axes = plt.subplots(
        lines_count, columns, figsize=(6.5 * columns, 4 * lines_count), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, panel in zip(axes.flat, panels):
        chosen = [r for r in rows if (r["model"], r["tasks"], r["size"], r["mode"]) == panel]
        variants = list(dict.fromkeys(r["variant"] for r in chosen))
        for index, variant in enumerate(variants):
            points = sorted(
                (r["batch"], r["ratio"], r["ceiling"]) for r in chosen if r["variant"] == variant
            )
            batches = [p[0] for p in points]
            colour = colours[index % len(colours)]
            axis.plot(batches, [p[1] for p in points], "o-", color=colour, label=variant)
            axis.plot(batches, [p[2] for p in points], "--", color=colour, alpha=0.6)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel("throughput / sequential")
        model, tasks, size, mode = panel
        axis.set_title(f"{model} ×{tasks}, {size}², {mode}, {dtypes[0]} (dashed: ceiling)")
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_reports(payload: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``throughput_<device>.json``, ``.md`` and ``.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = _device_tag(payload["env"])
    paths = {ext: out / f"throughput_{tag}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    paths["md"].write_text(markdown(payload))
    plot(payload, paths["png"])
    return paths


# --------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(text))


def _switch(text: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[text]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (every one overrides the preset's value in all its groups)."""
    estimates = "; ".join(f"{name}: {p.estimate}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"estimated run time: {estimates}.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    parser.add_argument("--models", type=_csv, help="e.g. vgg16,resnet50,timm/convnext_tiny")
    parser.add_argument("--tasks", type=_ints, help="K, e.g. 2,3")
    parser.add_argument("--kinds", type=_csv, help=f"fusion kinds: {', '.join(KINDS)}")
    parser.add_argument("--variants", type=_csv, help=f"groups: {', '.join(VARIANT_GROUPS)}")
    parser.add_argument("--batched-kinds", type=_csv, help="kinds to run in the batched mode")
    parser.add_argument("--batches", type=_ints, help="e.g. 1,8,32")
    parser.add_argument("--sizes", type=_ints, help="square input sizes, e.g. 224,321")
    parser.add_argument("--dtypes", type=_csv, help="fp32,bf16")
    parser.add_argument("--channels-last", type=_switch, help="off, on or both")
    parser.add_argument("--compile", type=_switch, help="off, on or both")
    parser.add_argument("--modes", type=_csv, help="forward,train")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: the preset's)")
    parser.add_argument("--no-handwritten", action="store_true", help="skip the hand-written check")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--list", action="store_true", help="print the settings and variants, run nothing"
    )
    return parser


def _overridden(preset: Preset, args: argparse.Namespace) -> Preset:
    overrides = {
        name: getattr(args, name)
        for name in (
            "models",
            "tasks",
            "kinds",
            "variants",
            "batched_kinds",
            "batches",
            "sizes",
            "dtypes",
            "channels_last",
            "compile",
            "modes",
        )
        if getattr(args, name) is not None
    }
    for name, allowed in (
        ("kinds", KINDS),
        ("batched_kinds", KINDS),
        ("variants", VARIANT_GROUPS),
        ("dtypes", DTYPES),
        ("modes", MODES),
    ):
        unknown = sorted(set(overrides.get(name, ())) - set(allowed))
        if unknown:
            raise SystemExit(
                f"--{name.replace('_', '-')}: unknown {unknown}; choose from {list(allowed)}"
            )
    groups = tuple(dict.fromkeys(replace(g, **overrides) for g in preset.groups))
    return replace(
        preset,
        groups=groups,
        warmup=preset.warmup if args.warmup is None else args.warmup,
        repeats=preset.repeats if args.repeats is None else args.repeats,
        threads=preset.threads if args.threads is None else args.threads,
        handwritten=None if args.no_handwritten else preset.handwritten,
    )


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = _overridden(PRESETS[args.preset], args)
    if args.list:
        total = 0
        for group in preset.groups:
            names = sorted(_variant_names(group))
            for setting in group.settings():
                print(f"{setting.label()}: {', '.join(names)}")
                total += len(names)
        steps = total * (preset.warmup + preset.repeats)
        print(f"{total} timed variant-settings, {steps} steps")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (--preset cpu).")
    run(preset, args.out, args.device, command=" ".join(["python benchmarks/throughput.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
