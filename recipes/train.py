"""``python -m recipes.train CONFIG``: train one of the paper's setups (single-task or fused).

CONFIG is a registered name (``python -m recipes.train --list``) or a JSON file. Any field can be
overridden: ``--set key=value`` (repeatable; ``--set init_from.seg=PATH`` sets one entry) or its
own flag (``--steps 100 --batch-size 4 --data-root data/nyuv2``). The run folder
(``{out_dir}/{name}``, or ``run_dir``) receives:

* ``config.json`` — the resolved configuration;
* ``metrics.jsonl`` — one JSON record per logged step (``kind: "train"``: ``step``, ``loss``,
  ``loss/<task>``, ``lr``, ``images_per_s``) and per evaluation (``kind: "eval"``);
* ``checkpoint.pt`` — written atomically every ``checkpoint_every`` steps, at the end and when a
  signal stops the run: model, optimizer, scheduler, step, every process's RNG states, the
  sampler state (``--resume`` continues bit-exactly on CPU);
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

Long runs: SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes ``checkpoint.pt`` at it
and prints the exact command that resumes the run (exit status 130 / 143; :func:`train` raises
:class:`recipes.errors.TrainingInterrupted`; :mod:`recipes.interrupts`). ``--threads N`` sets
torch's CPU threads (on a shared machine one thread can be much faster). Progress is a rich bar on
a terminal, else one plain line every ``log_every`` steps (:mod:`recipes.progress`).

Example:
    >>> import tempfile
    >>> from recipes.configs import load_config
    >>> run = tempfile.mkdtemp()
    >>> result = train(load_config("synthetic_demo_single_seg", [
    ...     "steps=2", "batch_size=2", "crop=32", "synthetic_size=32,32", "synthetic_images=4",
    ...     "synthetic_test_images=2", f"run_dir={run}", "progress=false", "log_every=1"]))
    >>> result.step, sorted(result.metrics["seg"])
    (2, ['mIoU', 'pixel_acc'])
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nddrify.checkpoint import atomic_save
from nddrify.errors import NddrifyError

from .builders import (
    Network,
    build_network,
    build_optimizer,
    set_train_mode,
)
from .configs import (
    RecipeConfig,
    config_to_dict,
)
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    convert_sync_batchnorm,
    setup_distributed,
    teardown_distributed,
)
from .errors import ConfigError, RecipeError, TrainingInterrupted
from .interrupts import EvaluationStopped, StopSignals, agreed_signal, resume_command
from .progress import TrainingProgress, make_console
from .results import append_jsonl, format_results, write_results
from .runstate import (
    changed_fields,
    check_run_dir,
    read_training_checkpoint,
    rng_state,
    save_checkpoint,
    seed_process,
    set_rng_state,
    truncate_jsonl,
)
from .scoring import evaluate_network
from .step_losses import autocast_for, global_means, recomputed_losses, valid_counts
from .train_cli import build_parser, list_configs, parse_config

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


# ----------------------------------------------------------------------------- training


def _final_weights(network: nn.Module, config: RecipeConfig) -> dict[str, torch.Tensor]:
    state = network.state_dict()
    if config.method == "single":
        prefix = f"{config.tasks[0]}."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


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

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM arrived (handlers are installed while this runs,
            in the main thread only, and restored afterwards): the current step finished, a
            checkpoint was written at it and ``resume=True`` continues bit-exactly. Under DDP
            every process stops at the same step. A second signal (a second later or more)
            aborts at once with :class:`KeyboardInterrupt`; the checkpoint on disk stays whole.
    """
    context = setup_distributed(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with StopSignals() as stop:
            return _train(config, context, resume, overwrite, stop_at, evaluate, log, stop)
    finally:
        if config.threads:
            torch.set_num_threads(threads)
        teardown_distributed(context)


def _train(
    config: RecipeConfig,
    context: DistContext,
    resume: bool,
    overwrite: bool,
    stop_at: int | None,
    evaluate: bool,
    log: Callable[[str], None] | None,
    stop: StopSignals,
) -> TrainResult:
    from .losses import multitask_loss

    console = make_console(config.progress and context.is_main)
    if log is None:
        log = console.print if context.is_main else (lambda text: None)
    run_dir = config.resolved_run_dir()
    checkpoint_path = check_run_dir(run_dir, resume, overwrite)
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
    from .balancing import Balancer, steps_per_epoch

    balancer = Balancer(config, net, network.tasks, context, epoch_steps=1)
    optimizer, scheduler = build_optimizer(network, config, extra=balancer.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

    start_step = 0
    rng_states: list[Any] | None = None
    if resume:
        payload = read_training_checkpoint(checkpoint_path, device)
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        balancer.load_state_dict(payload.get("balancing"))
        start_step = int(payload["step"])
        rng_states = payload["rng"]
        changed = changed_fields(payload.get("config", {}), config)
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
    balancer.epoch_steps = steps_per_epoch(sampler.num_samples, config.batch_size)
    if config.weighting != "fixed" or config.aggregator != "none":
        log(balancer.describe())
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        jsonl = run_dir / "metrics.jsonl"
        if resume:
            truncate_jsonl(jsonl, start_step)
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
        set_rng_state(rng_states[context.rank], device)
    else:
        if rng_states is not None:
            log(
                f"the checkpoint holds RNG states of {len(rng_states)} processes, this run has "
                f"{context.world_size}: RNG streams are reseeded (data order is unaffected)"
            )
        seed_process(config.seed + start_step, context.rank)

    autocast = autocast_for(config, device)
    set_train_mode(net, config.freeze_bn)
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] | None = None
    tasks = list(network.tasks)
    jsonl = run_dir / "metrics.jsonl"
    window_start, window_steps = time.perf_counter(), 0
    progress = TrainingProgress(
        enabled=config.progress and context.is_main,
        name=config.name,
        total=config.steps,
        start=start_step,
        end=end_step,
        console=console,
    )

    def save(at: int) -> int:
        """Write the checkpoint of step ``at`` (every process takes part); returns ``at``."""
        save_checkpoint(
            checkpoint_path, net, optimizer, scheduler, scaler, at, sampler, config, context,
            balancing=balancer.state_dict(),
        )  # fmt: skip
        return at

    saved_step = start_step if resume else -1  # the step of the checkpoint on disk
    stopped_by = agreed_signal(stop, context)  # a signal during setup: stop before step one
    with progress:
        step = start_step
        for batch in loader if stopped_by is None else ():
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            images = batch["image"]
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            balancer.prepare(images)
            with autocast:
                outputs = model(images)
            outputs = {t: outputs[t].float() for t in tasks}
            _, per_task = multitask_loss(
                outputs,
                batch,
                config.loss_weights,
                at=config.loss_at,
                losses=config.losses,
                resize=config.eval_resize,
            )
            if context.world_size > 1:
                counts = valid_counts(outputs, batch, config.loss_at, config.losses)
                totals = all_reduce_sum(counts, context)
                # mean over the global batch: local mean × local count × W / global count
                scale = {
                    t: counts[t] * context.world_size / totals[t] if totals[t] else 0.0
                    for t in tasks
                }
                per_task_scaled = {t: per_task[t] * scale[t] for t in tasks}
            else:
                per_task_scaled = per_task
            observed = balancer.global_means(per_task, counts) if balancer.needs_observed else None
            optimizer.zero_grad(set_to_none=True)
            balancer.backward(per_task_scaled, observed, scaler, images)
            scaler.step(optimizer)
            scaler.update()
            lr_used = optimizer.param_groups[_base_group(optimizer)]["lr"]
            scheduler.step()
            step += 1
            window_steps += 1
            balancer.after_step(
                step, partial(recomputed_losses, net, images, batch, config, context)
            )
            if step % config.log_every == 0 or step == end_step or step == start_step + 1:
                values = {f"loss/{t}": float(per_task[t].detach()) for t in tasks}
                if context.world_size > 1:
                    means = global_means(per_task, counts, context)
                    values = {f"loss/{t}": means[t] for t in tasks}
                total_value = sum(
                    float(config.loss_weights.get(t, 1.0)) * values[f"loss/{t}"] for t in tasks
                )
                if not math.isfinite(total_value):  # the global value: every process stops
                    raise RecipeError(
                        f"the loss is {total_value} at step {step}: lower lr or loss weights."
                    )
                elapsed = time.perf_counter() - window_start
                if balancer.weighting is not None:
                    weights = balancer.weighting.last_weights.tolist()
                    values.update({f"weight/{t}": w for t, w in zip(tasks, weights)})
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
                progress.logged(record)
            progress.advance(step)
            stopped_by = agreed_signal(stop, context)  # every process stops at the same step
            if stopped_by is not None:
                log(f"{signal.Signals(stopped_by).name}: writing the checkpoint of step {step}")
            if step % config.checkpoint_every == 0 or step == end_step or stopped_by is not None:
                saved_step = save(step)
            if stopped_by is not None:
                break
            if evaluate and config.eval_every and step % config.eval_every == 0 and step < end_step:
                metrics, stopped_by = _evaluate(net, config, context, step, stop, progress)
                if stopped_by is not None:
                    break
                set_train_mode(net, config.freeze_bn)
    finished = step >= config.steps and stopped_by is None
    if finished and evaluate:
        metrics, stopped_by = _evaluate(net, config, context, step, stop, progress)
        finished = stopped_by is None
    if stopped_by is not None and saved_step != step:
        saved_step = save(step)  # evaluation stopped: the weights are those of this step
    if context.is_main:
        if finished:
            atomic_save(_final_weights(net, config), run_dir / "model.pt")
            if metrics is not None:
                write_results(run_dir, config, metrics)
        if jsonl.is_file() and stopped_by is None:  # a stopped run exits promptly
            from .plots import plot_curves

            plot_curves(jsonl, run_dir / "curves.png")
        if stopped_by is None:
            log(f"{config.name}: {step} steps; files in {run_dir}")
    barrier(context)
    if stopped_by is not None:
        raise TrainingInterrupted(step, config.steps, checkpoint_path, stopped_by)
    return TrainResult(run_dir=run_dir, step=step, records=records, metrics=metrics, network=net)


def _base_group(optimizer: torch.optim.Optimizer) -> int:
    names = [g.get("name", "") for g in optimizer.param_groups]
    return names.index("base") if "base" in names else 0


def _evaluate(
    net: nn.Module,
    config: RecipeConfig,
    context: DistContext,
    step: int,
    stop: StopSignals,
    progress: TrainingProgress,
) -> tuple[dict[str, dict[str, float]] | None, int | None]:
    """Score ``config.eval_split`` at ``step`` and log it: ``(metrics, None)``. In one process a
    stop signal ends the evaluation at once: ``(None, signal)``, nothing logged (under DDP the
    evaluation completes and the next step's vote stops training). The RNG streams are restored
    afterwards, so evaluating never changes what training computes."""
    state = rng_state(context.device)
    try:
        with stop.immediate() if context.world_size == 1 else nullcontext():
            metrics = evaluate_network(net, config, context)
    except EvaluationStopped as stopped:
        return None, stopped.signal_number
    finally:
        set_rng_state(state, context.device)
    if context.is_main:
        record = {"kind": "eval", "step": step, "split": config.eval_split, "metrics": metrics}
        append_jsonl(config.resolved_run_dir() / "metrics.jsonl", record)
    progress.evaluated(step, config.eval_split, metrics)
    return metrics, None


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0, 2 on a configuration, data or
    checkpoint error, 130 / 143 when SIGINT / SIGTERM stopped training (a checkpoint is written
    at the step reached and the exact command resuming the run is printed)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)  # paths and commands stay on one line
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_configs())
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
    except TrainingInterrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            command = resume_command(sys.argv[1:] if argv is None else argv)
            print(f"{stopped}. Resume with: {command}", file=sys.stderr, flush=True)
        return stopped.exit_code
    except KeyboardInterrupt as error:  # a second signal while stopping, or one before training
        print(f"aborted: {error or 'interrupted before training'}", file=sys.stderr, flush=True)
        return 128 + int(signal.SIGINT)
    except NddrifyError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        return 2
    if result.metrics is not None and int(os.environ.get("RANK", "0")) == 0:
        print(format_results({config.label or config.name: result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
