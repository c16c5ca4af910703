"""Errors raised by the recipes: every one is an :class:`nddrify.NddrifyError`."""

from __future__ import annotations

from pathlib import Path

from nddrify.errors import NddrifyError

__all__ = [
    "RecipeError",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "ConfigError",
    "TrainingInterrupted",
]


class RecipeError(NddrifyError):
    """Base class of the errors raised by ``recipes``."""


class DatasetNotFoundError(RecipeError, FileNotFoundError):
    """A dataset file or folder is missing: the message names the path expected and how to
    prepare it."""


class DatasetFormatError(RecipeError, ValueError):
    """A dataset file exists but does not hold what its format promises (wrong shape, dtype,
    fields)."""


class ConfigError(RecipeError, ValueError):
    """A training configuration or command-line override is invalid."""


class TrainingInterrupted(RecipeError):
    """Training stopped on SIGINT or SIGTERM after finishing its current step, with a checkpoint
    written at that step: ``--resume`` (``train(config, resume=True)``) continues bit-exactly.

    Attributes:
        step: the steps completed (the checkpoint's step).
        total: the run's total steps.
        checkpoint: the checkpoint written at ``step``.
        signal_number: the signal received (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, step: int, total: int, checkpoint: Path, signal_number: int) -> None:
        self.step = step
        self.total = total
        self.checkpoint = Path(checkpoint)
        self.signal_number = signal_number
        super().__init__(
            f"interrupted at step {step}/{total}; checkpoint written to {self.checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's status for death by this signal: 128 + its number (130, 143)."""
        return 128 + int(self.signal_number)
