"""``python -m recipes.compare A B [C ...] --seeds 3``: configs over seeds, with spread and
paired differences.

Each configuration (a registered name or a JSON file) is trained once per seed (``--seeds 3``:
seeds 0, 1, 2 through the config's ``seed`` field, which also draws the synthetic scenes, the
weights and the data order), every run in its own folder ``{out}/{label}/seed{s}``, with the
shared ``--set`` overrides. The report gives, per metric,

* ``mean ± std`` of each configuration over the seeds (sample standard deviation, n − 1);
* the paired difference ``B − A`` of every other configuration against the first one (paired by
  seed: same seed, same data), its mean, and a two-sided Student t interval (95 % by default);
  ``*`` marks an interval that excludes 0.

It is written as Markdown (``{out}/compare.md``, also printed) and JSON (``{out}/compare.json``).
The statistics are pure functions (:func:`mean`, :func:`sample_std`,
:func:`paired_differences`, :func:`t_quantile`, :func:`t_interval`); the t quantile is computed
here (regularised incomplete beta function, bisection), so neither scipy nor numpy is needed.

Example:
    >>> round(t_quantile(0.975, 2), 9)
    4.30265273
    >>> interval = t_interval([1.0, 2.0, 3.0])
    >>> round(interval.mean, 6), round(interval.low, 6), round(interval.high, 6)
    (2.0, -0.484138, 4.484138)
    >>> paired_differences([1.0, 2.0], [1.5, 2.5])
    [0.5, 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Interval",
    "LOWER_IS_BETTER",
    "mean",
    "sample_std",
    "paired_differences",
    "t_quantile",
    "t_interval",
    "flatten_metrics",
    "summarise",
    "format_cell",
    "format_markdown",
    "run_compare",
    "build_parser",
    "main",
]

#: Metrics (``task/metric``) where lower is better; every other metric: higher is better.
LOWER_IS_BETTER = frozenset(
    {"normal/mean", "normal/median", "normal/rmse", "age/mean_ae", "age/median_ae"}
)


# ----------------------------------------------------------------------------- statistics


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (``ValueError`` for no values).

    Example:
        >>> mean([1.0, 2.0, 4.0])
        2.3333333333333335
    """
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (divisor n − 1); ``nan`` for fewer than two values.

    Example:
        >>> sample_std([1.0, 2.0, 3.0]), sample_std([5.0])
        (1.0, nan)
    """
    if len(values) < 2:
        return math.nan
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``b[i] − a[i]`` for paired observations (same seed); the lengths must agree.

    Example:
        >>> paired_differences([10.0, 12.0, 11.0], [11.0, 12.5, 13.0])
        [1.0, 0.5, 2.0]
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return [y - x for x, y in zip(a, b, strict=True)]


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast below this
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * result / a


def _t_tail(t: float, df: float) -> float:
    """``P(T > t)`` for ``t ≥ 0`` (computed directly, not as ``1 − CDF``: exact far out)."""
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom.

    Example:
        >>> round(t_quantile(0.975, 1), 7), round(t_quantile(0.975, 4), 7)
        (12.7062047, 2.7764451)
        >>> t_quantile(0.5, 3)
        0.0
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1)")
    if not df > 0:
        raise ValueError(f"df={df} must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_tail(high, df) > tail:
        high *= 2.0
    for _ in range(2000):  # bisection to the last bit
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if _t_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided Student t confidence interval over ``n`` values."""

    mean: float
    std: float
    low: float
    high: float
    n: int
    confidence: float

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean ± ``t_{(1+c)/2, n−1} · s / √n`` (``nan`` bounds for fewer than two values).

    Example:
        >>> interval = t_interval([1.0, 0.5, 2.0])  # mean 7/6, s = 0.763763, t = 4.302653
        >>> round(interval.low, 6), round(interval.high, 6), interval.excludes_zero()
        (-0.730625, 3.063958, False)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    centre, spread, n = mean(values), sample_std(values), len(values)
    if n < 2:
        return Interval(centre, math.nan, math.nan, math.nan, n, confidence)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * spread / math.sqrt(n)
    return Interval(centre, spread, centre - half, centre + half, n, confidence)


# ----------------------------------------------------------------------------- reports


def flatten_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{task: {metric: v}}`` → ``{"task/metric": v}``.

    Example:
        >>> flatten_metrics({"seg": {"mIoU": 50.0}, "normal": {"mean": 30.0}})
        {'seg/mIoU': 50.0, 'normal/mean': 30.0}
    """
    return {f"{task}/{name}": float(v) for task, row in metrics.items() for name, v in row.items()}


def summarise(
    runs: Mapping[str, Mapping[int, Mapping[str, float]]], confidence: float = 0.95
) -> dict[str, Any]:
    """Statistics of ``runs`` (label → seed → ``task/metric`` → value; the first label is the
    reference A): per label and metric the values, mean and std; per other label B and metric
    the paired difference ``B − A`` over the seeds both have, as an :class:`Interval` dict plus
    ``verdict`` (``better``, ``worse`` or ``no difference`` at this confidence).

    Example:
        >>> s = summarise({"A": {0: {"seg/mIoU": 10.0}, 1: {"seg/mIoU": 12.0}, 2: {"seg/mIoU": 11.0}},
        ...                "B": {0: {"seg/mIoU": 11.0}, 1: {"seg/mIoU": 12.5}, 2: {"seg/mIoU": 13.0}}})
        >>> s["configs"]["B"]["seg/mIoU"]["mean"], s["differences"]["B"]["seg/mIoU"]["mean"]
        (12.166666666666666, 1.1666666666666667)
        >>> s["differences"]["B"]["seg/mIoU"]["verdict"]
        'no difference'
    """
    labels = list(runs)
    if not labels:
        raise ValueError("no runs to summarise")
    metric_names = list(
        dict.fromkeys(k for label in labels for seed in runs[label] for k in runs[label][seed])
    )
    configs: dict[str, dict[str, Any]] = {}
    for label in labels:
        configs[label] = {}
        for name in metric_names:
            values = [runs[label][s][name] for s in sorted(runs[label]) if name in runs[label][s]]
            if values:
                configs[label][name] = {
                    "values": values,
                    "mean": mean(values),
                    "std": sample_std(values),
                    "n": len(values),
                }
    reference = labels[0]
    differences: dict[str, dict[str, Any]] = {}
    for label in labels[1:]:
        differences[label] = {}
        for name in metric_names:
            seeds = [
                s
                for s in sorted(runs[label])
                if s in runs[reference] and name in runs[label][s] and name in runs[reference][s]
            ]
            if not seeds:
                continue
            diffs = paired_differences(
                [runs[reference][s][name] for s in seeds], [runs[label][s][name] for s in seeds]
            )
            interval = t_interval(diffs, confidence)
            sign = -1.0 if name in LOWER_IS_BETTER else 1.0
            verdict = "no difference"
            if interval.excludes_zero():
                verdict = "better" if sign * interval.mean > 0 else "worse"
            differences[label][name] = {
                **asdict(interval),
                "seeds": seeds,
                "differences": diffs,
                "verdict": verdict,
            }
    return {
        "reference": reference,
        "confidence": confidence,
        "lower_is_better": sorted(n for n in metric_names if n in LOWER_IS_BETTER),
        "configs": configs,
        "differences": differences,
    }


def _number(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def format_cell(values: Mapping[str, Any], digits: int = 2, difference: bool = False) -> str:
    """One table cell: ``mean ± std``, or for a difference ``+mean [low, high]`` (``*`` when the
    interval excludes 0); a lone value without ``±``.

    Example:
        >>> format_cell({"mean": 1.5, "std": 0.25, "n": 3})
        '1.50 ± 0.25'
        >>> format_cell({"mean": 1.0, "low": 0.2, "high": 1.8, "n": 3}, difference=True)
        '+1.00 [0.20, 1.80]*'
    """
    if difference:
        star = "*" if values["low"] > 0 or values["high"] < 0 else ""
        return (
            f"{values['mean']:+.{digits}f} "
            f"[{_number(values['low'], digits)}, {_number(values['high'], digits)}]{star}"
        )
    if values.get("n", 1) < 2:
        return _number(values["mean"], digits)
    return f"{_number(values['mean'], digits)} ± {_number(values['std'], digits)}"


def format_markdown(summary: Mapping[str, Any], digits: int = 2) -> str:
    """The report as two Markdown tables: ``mean ± std`` per configuration, then the paired
    differences against the reference with their t intervals.

    Example:
        >>> s = summarise({"A": {0: {"seg/mIoU": 10.0}, 1: {"seg/mIoU": 12.0}},
        ...                "B": {0: {"seg/mIoU": 11.0}, 1: {"seg/mIoU": 13.5}}})
        >>> print(format_markdown(s, digits=1))
        | config | n | seg/mIoU ↑ |
        |:---|---:|---:|
        | A | 2 | 11.0 ± 1.4 |
        | B | 2 | 12.2 ± 1.8 |
        <BLANKLINE>
        Paired difference B − A (same seed), mean [95 % t interval]; * excludes 0:
        <BLANKLINE>
        | difference | n | seg/mIoU ↑ |
        |:---|---:|---:|
        | B − A | 2 | +1.2 [-1.9, 4.4] |
    """
    configs, differences = summary["configs"], summary["differences"]
    names = list(dict.fromkeys(n for row in configs.values() for n in row))
    arrows = [f"{n} {'↓' if n in LOWER_IS_BETTER else '↑'}" for n in names]
    lines = [
        "| config | n | " + " | ".join(arrows) + " |",
        "|:---|---:|" + "---:|" * len(names),
    ]
    for label, row in configs.items():
        n = max((v["n"] for v in row.values()), default=0)
        cells = [format_cell(row[name], digits) if name in row else "–" for name in names]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    if differences:
        reference = summary["reference"]
        percent = f"{summary['confidence'] * 100:g}"
        lines += [
            "",
            f"Paired difference B − {reference} (same seed), mean [{percent} % t interval]; "
            "* excludes 0:",
            "",
            "| difference | n | " + " | ".join(arrows) + " |",
            "|:---|---:|" + "---:|" * len(names),
        ]
        for label, row in differences.items():
            n = max((v["n"] for v in row.values()), default=0)
            cells = [
                format_cell(row[name], digits, difference=True) if name in row else "–"
                for name in names
            ]
            lines.append(f"| {label} − {reference} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def _labels(configs: Sequence[str], given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != len(configs):
            raise ValueError(f"--labels has {len(given)} names for {len(configs)} configs")
        names = list(given)
    else:
        names = [Path(c).stem if c.endswith(".json") else c for c in configs]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def run_compare(
    configs: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    out: str | Path = "runs/compare",
    labels: Sequence[str] | None = None,
    confidence: float = 0.95,
    log: Any = None,
) -> dict[str, Any]:
    """Train every config for every seed (folder ``{out}/{label}/seed{s}``) and return the
    :func:`summarise` dict plus ``runs`` (label → seed → metrics), ``seconds`` and ``settings``.
    Every config is loaded (and validated) before the first run starts."""
    from .configs import load_config
    from .train import train

    names = _labels(configs, labels)
    loaded = {
        label: {
            seed: load_config(
                source, [*overrides, f"seed={seed}", f"run_dir={Path(out) / label / f'seed{seed}'}"]
            )
            for seed in seeds
        }
        for label, source in zip(names, configs, strict=True)
    }
    runs: dict[str, dict[int, dict[str, float]]] = {}
    seconds: dict[str, dict[int, float]] = {}
    for label, per_seed in loaded.items():
        for seed, config in per_seed.items():
            if log:
                log(f"{label}, seed {seed}: {config.steps} steps → {config.resolved_run_dir()}")
            start = time.perf_counter()
            result = train(config, overwrite=True)
            seconds.setdefault(label, {})[seed] = time.perf_counter() - start
            runs.setdefault(label, {})[seed] = flatten_metrics(result.metrics or {})
    summary = summarise(runs, confidence)
    summary["runs"] = runs
    summary["seconds"] = seconds
    summary["settings"] = {
        "configs": dict(zip(names, configs, strict=True)),
        "seeds": list(seeds),
        "overrides": list(overrides),
        "out": str(out),
    }
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m recipes.compare``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.compare",
        description="Train configs over several seeds; report mean ± std and paired differences "
        "against the first config with t intervals (Markdown and JSON).",
    )
    parser.add_argument("configs", nargs="+", help="registered config names or JSON files")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every config (repeatable)",
    )
    parser.add_argument("--out", default="runs/compare", help="folder of the run folders")
    parser.add_argument(
        "--labels", type=lambda t: [s for s in t.split(",") if s], default=None, help="A,B,..."
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level")
    parser.add_argument("--digits", type=int, default=2, help="decimals in the Markdown tables")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads of every run (the config field threads; default torch's: one "
        "per core, on a shared machine 1 is often much faster)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print the Markdown and write ``compare.{md,json}`` under ``--out``."""
    from .errors import RecipeError

    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds} must be ≥ 1", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    overrides = [*args.overrides, *([f"threads={args.threads}"] if args.threads else [])]
    try:
        summary = run_compare(
            args.configs,
            seeds,
            overrides,
            args.out,
            args.labels,
            args.confidence,
            log=lambda text: print(text, flush=True),
        )
    except (RecipeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = format_markdown(summary, args.digits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
