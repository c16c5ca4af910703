"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler).

:class:`StopSignals` catches both signals while training runs: the first one only records a
request, the loop finishes its current step, writes a checkpoint at that step and stops
(:class:`recipes.errors.TrainingInterrupted`); :func:`resume_command` rebuilds the command line
that continues the run. While evaluation runs in one process (:meth:`StopSignals.immediate`), the
first signal stops the evaluation at once (:class:`EvaluationStopped`): the weights do not change
during evaluation, so the checkpoint written afterwards is the one of that step.

A signal repeated within ``repeat_window`` seconds counts once (the same Ctrl-C reaches the run
from the terminal and from a launcher such as ``torchrun``); a later one aborts at once with
:class:`KeyboardInterrupt` — files are written atomically, so an aborted checkpoint write leaves
the previous checkpoint intact.

Example:
    >>> import os, signal
    >>> with StopSignals() as stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     stop.requested, stop.signal_number == signal.SIGTERM
    (True, True)
    >>> resume_command(["cfg", "--set", "steps=9", "--overwrite"], program=["python", "-m", "m"])
    'python -m m cfg --set steps=9 --resume'
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .distributed import DistContext, all_reduce_sum

__all__ = ["StopSignals", "EvaluationStopped", "agreed_signal", "resume_command", "STOP_SIGNALS"]

#: The signals that stop training cleanly.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class EvaluationStopped(BaseException):
    """Raised inside an evaluation (:meth:`StopSignals.immediate`) by the first stop signal.

    A :class:`BaseException`, as :class:`KeyboardInterrupt`: no ``except Exception`` on the way
    (data loading, metrics) swallows it.
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__(f"evaluation stopped by signal {signal_number}")
        self.signal_number = signal_number


class StopSignals:
    """Context manager catching SIGINT and SIGTERM while it is active (main thread only; in any
    other thread it installs nothing and :attr:`requested` stays False). The previous handlers
    come back on exit.

    Args:
        repeat_window: seconds after the first signal during which another one counts as the
            same request; a signal after that aborts with :class:`KeyboardInterrupt`.
    """

    def __init__(self, repeat_window: float = 1.0) -> None:
        self.repeat_window = repeat_window
        self.signal_number: int | None = None
        self._first_at = 0.0
        self._immediate = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signal_number is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @contextmanager
    def immediate(self) -> Iterator[None]:
        """While active, the first stop signal raises :class:`EvaluationStopped` at once (as
        does entering it after a signal arrived)."""
        if self.signal_number is not None:
            raise EvaluationStopped(self.signal_number)
        self._immediate = True
        try:
            yield
        finally:
            self._immediate = False

    def _handle(self, number: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal_number is None:
            self.signal_number, self._first_at = number, now
            if self._immediate:
                self._immediate = False
                raise EvaluationStopped(number)
            return
        if now - self._first_at < self.repeat_window:
            return
        raise KeyboardInterrupt(
            f"second stop signal ({signal.Signals(number).name}): aborted at once; files are "
            "written atomically, so the last checkpoint is intact"
        )


def agreed_signal(stop: StopSignals, context: DistContext) -> int | None:
    """The signal that stops training now, the same in every process (None: keep going). Under
    DDP one all-reduce: a signal that reached any process stops all of them (SIGINT first)."""
    number = stop.signal_number
    if context.world_size == 1:
        return number
    votes = all_reduce_sum(
        {
            "sigint": float(number == signal.SIGINT),
            "sigterm": float(number == signal.SIGTERM),
        },
        context,
    )
    if votes["sigint"]:
        return int(signal.SIGINT)
    return int(signal.SIGTERM) if votes["sigterm"] else None


def _python() -> str:
    """``python`` when that is this interpreter on PATH (not merely the same binary: a virtual
    environment's ``python`` links to the system one), else this interpreter's path."""
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    return sys.executable


def resume_command(argv: Sequence[str], *, program: Sequence[str] | None = None) -> str:
    """The shell command continuing the run started with arguments ``argv``: the same
    arguments without ``--overwrite``, with ``--resume`` (quoted with :func:`shlex.join`).

    Args:
        argv: the arguments after the program (``sys.argv[1:]`` of ``python -m recipes.train``).
        program: the program's words (default: ``python -m recipes.train``; under ``torchrun``,
            ``torchrun --nproc_per_node=N -m recipes.train`` with this run's process count).
    """
    if program is None:
        module = f"{__package__}.train"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            nodes = max(1, world // max(local, 1))
            launcher = ["torchrun", f"--nproc_per_node={local}"]
            if nodes > 1:
                launcher.append(f"--nnodes={nodes}")
            program = [*launcher, "-m", module]
        else:
            program = [_python(), "-m", module]
    words = [word for word in argv if word != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join([*program, *words])
