"""A training run's resumable state: RNG streams, the checkpoint file, the run folder's logs.

* :func:`rng_state` / :func:`set_rng_state` — every RNG a training step draws from (torch CPU,
  CUDA, Python's ``random``), saved per process in the checkpoint;
* :func:`save_checkpoint` — ``checkpoint.pt`` (model, optimizer, scheduler, scaler, step, every
  process's RNG state, sampler position), written atomically by rank 0;
* :func:`read_training_checkpoint` — reads it back safely (``weights_only=True``); a damaged or
  foreign file raises :class:`nddrify.errors.CheckpointError`;
* :func:`check_run_dir`, :func:`truncate_jsonl`, :func:`changed_fields` — the run folder's
  rules for fresh starts and resumes.

Example:
    >>> import torch
    >>> state = rng_state(torch.device("cpu"))
    >>> first = torch.rand(2)
    >>> set_rng_state(state, torch.device("cpu"))
    >>> torch.equal(torch.rand(2), first)
    True
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nddrify.checkpoint import atomic_save, read_checkpoint

from .configs import RecipeConfig, config_to_dict
from .distributed import DistContext, barrier, gather_objects
from .errors import RecipeError

__all__ = [
    "RUNTIME_FIELDS",
    "rng_state",
    "set_rng_state",
    "seed_process",
    "save_checkpoint",
    "read_training_checkpoint",
    "check_run_dir",
    "truncate_jsonl",
    "changed_fields",
]

#: Config fields that change how a run executes or reports, not what it computes: a resume with
#: other values is still bit-exact (no warning).
RUNTIME_FIELDS = frozenset(
    {
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
        "threads",
    }
)

# ----------------------------------------------------------------------------- RNG state


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: torch (CPU), Python ``random``, and CUDA on a CUDA device."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (after a checkpoint round trip too)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_process(seed: int, rank: int) -> None:
    """The RNG streams of a fresh run (dropout, …): one per process, from (seed, rank)."""
    from .data.transforms import sample_generator

    derived = int(sample_generator(seed, 3, rank).initial_seed())
    torch.manual_seed(derived)
    random.seed(derived)


# ----------------------------------------------------------------------------- checkpoint


def save_checkpoint(
    path: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: int,
    sampler: Any,
    config: RecipeConfig,
    context: DistContext,
    balancing: dict[str, Any] | None = None,
) -> None:
    """Write ``checkpoint.pt`` at ``step`` (rank 0, atomically; every process takes part: the
    RNG states are gathered). ``balancing``: the loss weighting's state (``recipes.balancing``)."""
    from .builders import CHECKPOINT_FORMAT

    rng = gather_objects(rng_state(context.device), context)
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
                "balancing": dict(balancing or {}),
            },
            path,
        )
    barrier(context)


def read_training_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a ``checkpoint.pt`` written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        nddrify.errors.CheckpointError: the file is empty, truncated, damaged, not a torch file,
            or not a recipes training checkpoint (the message names the file and what to do).
    """
    from .builders import CHECKPOINT_FORMAT

    return read_checkpoint(
        path,
        expected_format=CHECKPOINT_FORMAT,
        what="a recipes training checkpoint",
        map_location=device,
        required=("model", "optimizer", "scheduler", "step", "rng"),
    )


# ----------------------------------------------------------------------------- run folder


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path:
    """The run's checkpoint path, after checking that the folder suits the start: ``resume``
    needs a checkpoint; a fresh start refuses one unless ``overwrite``."""
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


def truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop records logged after ``keep_through_step`` (a resumed run re-logs them)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and int(json.loads(line).get("step", 0)) <= keep_through_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def changed_fields(saved: Mapping[str, Any], config: RecipeConfig) -> dict[str, Any]:
    """Fields (other than :data:`RUNTIME_FIELDS`) whose value differs from the checkpoint's."""
    current = config_to_dict(config)
    return {
        k: (saved[k], current[k])
        for k in current
        if k in saved and k not in RUNTIME_FIELDS and saved[k] != current[k]
    }
