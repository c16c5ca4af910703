"""Writing files so that nothing a user owns is lost: :func:`atomic_write` (any writer) and
:func:`atomic_save` (``torch.save``), used by checkpoints, exports and the recipes' runs."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["atomic_write", "atomic_save"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """``write(temporary)`` beside ``path``, then renamed over it: never truncated; mode 0o666−umask.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/notes.txt"
        >>> atomic_write(path, lambda temporary: temporary.write_text("done")).read_text()
        'done'
    """
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(
            f"cannot save to {os.fspath(path)!r}: it is a folder; pass a file path such as "
            f"{os.fspath(target / 'model.pt')!r}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # never through a symlink; 0o666 − umask:
    os.close(os.open(temporary, flags | getattr(os, "O_BINARY", 0), 0o666))
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write` (into an open file: the archive's
    folder is then ``archive``, not the temporary file's name).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/state.pt"
        >>> atomic_save({"step": 3}, path)
        >>> torch.load(path, weights_only=True)
        {'step': 3}
    """

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            torch.save(obj, file)

    atomic_write(path, write)
