"""``python -m recipes.train CONFIG``: train one of the paper's setups (single-task or fused).

CONFIG is a registered name (``python -m recipes.train --list``) or a JSON file. Any field can be
overridden: ``--set key=value`` (repeatable; ``--set init_from.seg=PATH`` sets one entry) or its
own flag (``--steps 100 --batch-size 4 --data-root data/nyuv2``). The run folder
(``{out_dir}/{name}``, or ``run_dir``) receives:

* ``config.json`` — the resolved configuration;
* ``metrics.jsonl`` — one JSON record per logged step (``kind: "train"``: ``step``, ``loss``,
  ``loss/<task>``, ``lr``, ``images_per_s``) and per evaluation (``kind: "eval"``);
* ``checkpoint.pt`` — written atomically every ``checkpoint_every`` steps and at the end: model,
  optimizer, scheduler, step, every process's RNG states, the sampler state (``--resume``
  continues bit-exactly on CPU);
* ``model.pt`` — the final weights (a single-task run: the task model's own state dict, which
  the fused configs' ``init_from`` reads);
* ``curves.png`` (training curves) and ``results.md`` (the paper's table layout).

Training: SGD with :func:`nddrify.param_groups` (fusion layers 100× / 1000×, fc8 10× / 20×,
weight decay on weights only) and the per-step poly schedule (``LambdaLR``: the multipliers
survive). ``--set amp=bf16`` (CPU or CUDA autocast) or ``amp=fp16`` (CUDA, with GradScaler);
``--set channels_last=true``. Under ``torchrun --nproc_per_node=N`` the global batch is split over
the processes (gloo on CPU, NCCL on CUDA); per-task losses are normalised by the *global* number
of valid pixels/images so the gradient equals the one-process gradient; ``sync_bn=true``
synchronises BatchNorm statistics (on CPU too). Only rank 0 writes files.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> result = train(load_config("synthetic_demo_single_seg", [
    ...     "steps=2", "batch_size=2", "crop=32", "synthetic_size=32,32", "synthetic_images=4",
    ...     "synthetic_test_images=2", f"run_dir={run}", "progress=false", "log_every=1"]))
    >>> result.step, sorted(result.metrics["seg"])
    (2, ['mIoU', 'pixel_acc'])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nddrify.checkpoint import atomic_save
from nddrify.errors import NddrifyError

from .builders import (
    CHECKPOINT_FORMAT,
    DENSE_TASKS,
    Network,
    build_network,
    build_optimizer,
    set_train_mode,
)
from .configs import (
    CONFIGS,
    RecipeConfig,
    config_to_dict,
    field_types,
    load_config,
    registry,
)
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from .errors import ConfigError, RecipeError
from .results import append_jsonl, format_results, write_results
from .scoring import evaluate_network

__all__ = [
    "TrainResult",
    "train",
    "valid_counts",
    "build_parser",
    "parse_config",
    "main",
]


@dataclasses.dataclass
class TrainResult:
    """What a call to :func:`train` did.

    Attributes:
        run_dir: the run folder.
        step: optimizer steps completed (the run's total when it finished).
        records: the training records logged by this call (as in ``metrics.jsonl``).
        metrics: the final evaluation (task → metric → value), or None when skipped.
        network: the trained network (unwrapped from DDP).
    """

    run_dir: Path
    step: int
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, float]] | None
    network: nn.Module | None = None


# ----------------------------------------------------------------------------- files


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop records logged after ``keep_through_step`` (a resumed run re-logs them)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and int(json.loads(line).get("step", 0)) <= keep_through_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- RNG state


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _seed_process(seed: int, rank: int) -> None:
    """The RNG streams of a fresh run (dropout, …): one per process, from (seed, rank)."""
    from .data.transforms import sample_generator

    derived = int(sample_generator(seed, 3, rank).initial_seed())
    torch.manual_seed(derived)
    random.seed(derived)


# ----------------------------------------------------------------------------- losses


def valid_counts(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], at: str
) -> dict[str, float]:
    """How many pixels (dense tasks) or images each task's mean loss averages over, counted as
    :mod:`recipes.losses` does: labels nearest-resized to the prediction when ``at="output"``.

    Example:
        >>> import torch
        >>> outputs = {"seg": torch.zeros(1, 3, 1, 2), "age": torch.zeros(2, 100)}
        >>> batch = {"seg": torch.tensor([[[0, 255], [255, 1]]]), "age": torch.tensor([1, 2])}
        >>> valid_counts(outputs, batch, "output")  # seg at 1×2: rows 0 → [0, 255]
        {'seg': 1.0, 'age': 2.0}
    """
    from .losses import resize_labels

    counts = {}
    for task, prediction in outputs.items():
        if task in DENSE_TASKS:
            key = "seg" if task == "seg" else "normal_mask"
            labels = batch[key]
            if at == "output":
                labels = resize_labels(labels, tuple(prediction.shape[-2:]))
            valid = labels != 255 if task == "seg" else labels.bool()
            counts[task] = float(valid.sum())
        else:
            counts[task] = float(prediction.shape[0])
    return counts


# ----------------------------------------------------------------------------- training


def _autocast(config: RecipeConfig, device: torch.device) -> Any:
    if config.amp == "none":
        return nullcontext()
    if config.amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp='fp16' needs a CUDA device (GradScaler); use amp='bf16' on CPU.")
    dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _final_weights(network: nn.Module, config: RecipeConfig) -> dict[str, torch.Tensor]:
    state = network.state_dict()
    if config.method == "single":
        prefix = f"{config.tasks[0]}."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _check_fresh_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    checkpoint = run_dir / "checkpoint.pt"
    if resume:
        if not checkpoint.is_file():
            raise RecipeError(f"--resume: {checkpoint} does not exist; start the run without it.")
        return checkpoint
    if checkpoint.is_file() and not overwrite:
        raise RecipeError(
            f"{run_dir} already holds a checkpoint: continue it with --resume, start over with "
            "--overwrite, or choose another folder with --set run_dir=PATH."
        )
    return checkpoint


def _console(enabled: bool) -> Any:
    from rich.console import Console

    return Console(quiet=not enabled, stderr=True)


def train(
    config: RecipeConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    evaluate: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``config`` (in this process, or in each ``torchrun`` process).

    Args:
        config: the run's configuration.
        resume: continue from the run folder's ``checkpoint.pt`` (bit-exact on CPU).
        overwrite: start over even if the run folder holds a checkpoint (its logs are replaced).
        stop_at: stop after this many steps with a checkpoint, as an interrupted run would
            (``--resume`` continues it); the schedule still spans ``config.steps``.
        evaluate: score ``config.eval_split`` at the end (and every ``eval_every`` steps).
        log: where to print progress notes (default: a rich console on rank 0).

    Returns:
        A :class:`TrainResult`.
    """
    context = setup_distributed(config.device)
    try:
        return _train(config, context, resume, overwrite, stop_at, evaluate, log)
    finally:
        teardown_distributed(context)


def _train(
    config: RecipeConfig,
    context: DistContext,
    resume: bool,
    overwrite: bool,
    stop_at: int | None,
    evaluate: bool,
    log: Callable[[str], None] | None,
) -> TrainResult:
    from .losses import multitask_loss

    console = _console(config.progress and context.is_main)
    if log is None:
        log = console.print if context.is_main else (lambda text: None)
    run_dir = config.resolved_run_dir()
    checkpoint_path = _check_fresh_run_dir(run_dir, resume, overwrite)
    if config.batch_size % context.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} (global) is not divisible by the "
            f"{context.world_size} processes; choose a multiple."
        )
    device = context.device
    end_step = config.steps if stop_at is None else min(stop_at, config.steps)

    torch.manual_seed(config.seed)  # the same initial weights in every process
    network: Network = build_network(config, log=log)
    net = network.module
    if config.sync_bn:
        convert_sync_batchnorm(net, device)
    net.to(device)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(network, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

    start_step = 0
    rng_states: list[Any] | None = None
    if resume:
        payload = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise RecipeError(f"{checkpoint_path} is not a recipes training checkpoint.")
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start_step = int(payload["step"])
        rng_states = payload["rng"]
        changed = _changed_fields(payload.get("config", {}), config)
        if changed:
            log(f"[yellow]resuming with changed settings[/yellow] {changed}: not bit-exact")
        log(f"resumed from {checkpoint_path} at step {start_step}")
    from .loading import train_loader

    # the data is opened before anything is written: a missing dataset leaves no run folder
    loader, sampler = train_loader(
        config,
        start_step=start_step,
        end_step=end_step,
        rank=context.rank,
        world_size=context.world_size,
    )
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        jsonl = run_dir / "metrics.jsonl"
        if resume:
            _truncate_jsonl(jsonl, start_step)
        else:  # a fresh start: no stale outputs of an earlier run stay behind
            for name in ("metrics.jsonl", "model.pt", "curves.png", "results.md", "results.json"):
                (run_dir / name).unlink(missing_ok=True)
    barrier(context)

    model: nn.Module = net
    if context.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if rng_states is not None and len(rng_states) == context.world_size:
        _set_rng_state(rng_states[context.rank], device)
    else:
        if rng_states is not None:
            log(
                f"the checkpoint holds RNG states of {len(rng_states)} processes, this run has "
                f"{context.world_size}: RNG streams are reseeded (data order is unaffected)"
            )
        _seed_process(config.seed + start_step, context.rank)

    autocast = _autocast(config, device)
    set_train_mode(net, config.freeze_bn)
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] | None = None
    tasks = list(network.tasks)
    jsonl = run_dir / "metrics.jsonl"
    window_start, window_steps = time.perf_counter(), 0
    progress = _progress(config.progress and context.is_main, console)
    with progress:
        bar = progress.add_task(
            config.name, total=config.steps, completed=start_step, loss="", ips=""
        )
        step = start_step
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            images = batch["image"]
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                outputs = model(images)
            outputs = {t: outputs[t].float() for t in tasks}
            _, per_task = multitask_loss(outputs, batch, config.loss_weights, at=config.loss_at)
            if context.world_size > 1:
                counts = valid_counts(outputs, batch, config.loss_at)
                totals = all_reduce_sum(counts, context)
                # mean over the global batch: local mean × local count × W / global count
                scale = {
                    t: counts[t] * context.world_size / totals[t] if totals[t] else 0.0
                    for t in tasks
                }
                per_task_scaled = {t: per_task[t] * scale[t] for t in tasks}
            else:
                per_task_scaled = per_task
            total = torch.stack(
                [float(config.loss_weights.get(t, 1.0)) * per_task_scaled[t] for t in tasks]
            ).sum()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            lr_used = optimizer.param_groups[_base_group(optimizer)]["lr"]
            scheduler.step()
            step += 1
            window_steps += 1
            if step % config.log_every == 0 or step == end_step or step == start_step + 1:
                values = {f"loss/{t}": float(per_task[t].detach()) for t in tasks}
                if context.world_size > 1:
                    sums = all_reduce_sum(
                        {
                            **{f"{t}.sum": values[f"loss/{t}"] * counts[t] for t in tasks},
                            **{f"{t}.count": counts[t] for t in tasks},
                        },
                        context,
                    )
                    values = {
                        f"loss/{t}": sums[f"{t}.sum"] / sums[f"{t}.count"]
                        if sums[f"{t}.count"]
                        else 0.0
                        for t in tasks
                    }
                total_value = sum(
                    float(config.loss_weights.get(t, 1.0)) * values[f"loss/{t}"] for t in tasks
                )
                if not math.isfinite(total_value):  # the global value: every process stops
                    raise RecipeError(
                        f"the loss is {total_value} at step {step}: lower lr or loss weights."
                    )
                elapsed = time.perf_counter() - window_start
                record = {
                    "kind": "train",
                    "step": step,
                    "loss": total_value,
                    **values,
                    "lr": lr_used,
                    "images_per_s": config.batch_size * window_steps / max(elapsed, 1e-9),
                }
                window_start, window_steps = time.perf_counter(), 0
                records.append(record)
                if context.is_main:
                    append_jsonl(jsonl, record)
                progress.update(
                    bar,
                    loss=f"loss {total_value:.4f}",
                    ips=f"{record['images_per_s']:.1f} img/s",
                )
            progress.update(bar, completed=step)
            at_checkpoint = step % config.checkpoint_every == 0 or step == end_step
            if at_checkpoint:
                _save_checkpoint(
                    checkpoint_path,
                    net,
                    optimizer,
                    scheduler,
                    scaler,
                    step,
                    sampler,
                    config,
                    context,
                )
            if evaluate and config.eval_every and step % config.eval_every == 0 and step < end_step:
                metrics = _evaluate(net, config, context, step, jsonl, evaluate_network)
                set_train_mode(net, config.freeze_bn)
    finished = step >= config.steps
    if finished and evaluate:
        metrics = _evaluate(net, config, context, step, jsonl, evaluate_network)
    if context.is_main:
        if finished:
            atomic_save(_final_weights(net, config), run_dir / "model.pt")
            if metrics is not None:
                write_results(run_dir, config, metrics)
        if jsonl.is_file():
            from .plots import plot_curves

            plot_curves(jsonl, run_dir / "curves.png")
        log(f"{config.name}: {step} steps; files in {run_dir}")
    barrier(context)
    return TrainResult(run_dir=run_dir, step=step, records=records, metrics=metrics, network=net)


_RUNTIME_FIELDS = {
    "progress",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "eval_split",
    "eval_batch_size",
    "eval_max_images",
    "num_workers",
    "device",
    "run_dir",
    "out_dir",
    "cache_data",
}


def _changed_fields(saved: Mapping[str, Any], config: RecipeConfig) -> dict[str, Any]:
    """Fields (other than runtime ones) whose value differs from the checkpoint's config."""
    current = config_to_dict(config)
    return {
        k: (saved[k], current[k])
        for k in current
        if k in saved and k not in _RUNTIME_FIELDS and saved[k] != current[k]
    }


def _base_group(optimizer: torch.optim.Optimizer) -> int:
    names = [g.get("name", "") for g in optimizer.param_groups]
    return names.index("base") if "base" in names else 0


def _evaluate(
    net: nn.Module,
    config: RecipeConfig,
    context: DistContext,
    step: int,
    jsonl: Path,
    evaluate_network: Callable[..., dict[str, dict[str, float]]],
) -> dict[str, dict[str, float]]:
    metrics = evaluate_network(net, config, context)
    if context.is_main:
        append_jsonl(
            jsonl, {"kind": "eval", "step": step, "split": config.eval_split, "metrics": metrics}
        )
    return metrics


def _save_checkpoint(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: int,
    sampler: Any,
    config: RecipeConfig,
    context: DistContext,
) -> None:
    rng = gather_objects(_rng_state(context.device), context)
    if context.is_main:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "config": config_to_dict(config),
                "step": step,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": rng,
                "sampler": {**sampler.state_dict(), "next_step": step},
                "world_size": context.world_size,
            },
            path,
        )
    barrier(context)


class _Quiet:
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *args: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress(enabled: bool, console: Any) -> Any:
    if not enabled:
        return _Quiet()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[ips]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``recipes.train`` argument parser: one ``--<field>`` flag per config field."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__package__}.train",
        description="Train one of the NDDR-CNN paper's setups (see recipes/README.md).",
    )
    parser.add_argument("config", nargs="?", help="a registered config name or a JSON file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable; init_from.seg=PATH sets one dict entry)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over in the run folder")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="stop early")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    parser.add_argument("--list", action="store_true", help="list the registered configs")
    parser.add_argument("--show", action="store_true", help="print the resolved config, exit")
    parser.add_argument("--plan", action="store_true", help="build the network, print it, exit")
    fields = parser.add_argument_group("config fields (each also settable with --set)")
    for name, kind in field_types().items():
        flag = "--" + name.replace("_", "-")
        fields.add_argument(
            flag,
            dest=f"field_{name}",
            default=None,
            metavar=_metavar(kind),
            nargs="?" if kind is bool else None,
            const="true" if kind is bool else None,
        )
    return parser


def _metavar(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is dict:
        return "K=V,..."
    if origin is tuple:
        return "A,B,..."
    return getattr(kind, "__name__", "VALUE").upper()


def parse_config(argv: Sequence[str] | None = None) -> tuple[RecipeConfig, argparse.Namespace]:
    """Parse the command line into a validated config (flags are applied after ``--set``)."""
    args = build_parser().parse_args(argv)
    if not args.config:
        raise ConfigError(f"name a config (python -m {__package__}.train --list shows them).")
    overrides = list(args.overrides)
    for name in field_types():
        value = getattr(args, f"field_{name}")
        if value is not None:
            overrides.append(f"{name}={value}")
    return load_config(args.config, overrides), args


def _list_configs() -> str:
    """One line per registered config: name, method, model, dataset, paper row."""
    registry()
    width = max(len(name) for name in CONFIGS)
    lines = []
    for name, cfg in CONFIGS.items():
        method = cfg.method + ("+shortcut" if cfg.shortcut else "")
        lines.append(
            f"{name:<{width}}  {method:<21} {cfg.model:<18} {cfg.dataset:<10} {cfg.paper or '-'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a configuration or data error)."""
    from rich.console import Console

    console = Console(stderr=True)
    args = build_parser().parse_args(argv)
    if args.list:
        print(_list_configs())
        return 0
    try:
        config, args = parse_config(argv)
        if args.show:
            print(json.dumps(config_to_dict(config), indent=2))
            return 0
        if args.plan:
            network = build_network(config)
            for line in network.notes:
                print(line)
            print(getattr(network.module, "code", network.module))
            return 0
        result = train(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_at=args.stop_at,
            evaluate=not args.no_eval,
        )
    except NddrifyError as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    if result.metrics is not None and int(os.environ.get("RANK", "0")) == 0:
        print(format_results({config.label or config.name: result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
