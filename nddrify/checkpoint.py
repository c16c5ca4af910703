"""Save and load fused models: weights plus what is needed to rebuild them, nothing executable.

:func:`save` writes, atomically, a ``torch.save`` file of plain values (task names, model specs,
fusion points, options), the state dict and a sha256 digest of both. :func:`load` reads it with
:func:`read_checkpoint` (``weights_only=True``; every zip member's CRC-32 checked, which torch's
reader skips; the digest verified; any failure a :class:`~nddrify.errors.CheckpointError`),
rebuilds the fused model from the recorded specs or the models you pass, and loads the weights.

Example:
    >>> import tempfile, torch, nddrify
    >>> fused = nddrify.fuse(["torchvision:resnet18", "torchvision:resnet18"])
    >>> path = tempfile.mkdtemp() + "/fused.pt"
    >>> nddrify.save(fused, path)
    >>> again = nddrify.load(path)
    >>> torch.equal(again.nddr1.convs[0].weight, fused.nddr1.convs[0].weight)
    True
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelsError, PlanError
from .files import atomic_save, atomic_write
from .meta import BUILD_META_KEY
from .plans import Plan
from .rewriting import FusedGraphModule, rewrite
from .tasks import TaskOptions, trace

__all__ = ["save", "load", "atomic_save", "atomic_write", "read_checkpoint"]

_FORMAT = "nddrify.fused/3"  # /3 adds "digest"; /2 (no digest) still loads
_READABLE = (_FORMAT, "nddrify.fused/2")
_WRITERS = {"nddrify.fused": "nddrify.save", "recipes.checkpoint": "the recipes' training runs"}
_LEGACY_HEAD = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # torch.save before 1.6
_DAMAGED = "the file was damaged (e.g. an interrupted copy): restore a backup or write it again"


def _digest(payload: Mapping[str, Any]) -> str:
    """sha256 over every value of ``payload`` but ``"digest"``: plain values by ``repr``, tensors
    by dtype, shape and bytes, in stored order (sets sorted, as their order is not kept)."""
    hasher = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            hasher.update(f"<{value.dtype}{tuple(value.shape)}>".encode())
            try:
                flat = value.detach().to("cpu").contiguous().reshape(-1)
                hasher.update(flat.view(torch.uint8).numpy())
            except (RuntimeError, TypeError):  # sparse, quantized: no raw bytes view
                hasher.update(repr(value).encode())
        elif isinstance(value, (Mapping, list, tuple)):
            mapping = isinstance(value, Mapping)
            hasher.update(b"{" if mapping else b"[")
            for item in [x for pair in value.items() for x in pair] if mapping else value:
                feed(item)
            hasher.update(b"}" if mapping else b"]")
        elif isinstance(value, (set, frozenset)):
            hasher.update(repr(sorted(map(repr, value))).encode())
        else:
            hasher.update(repr(value).encode() + b";")

    feed({key: value for key, value in payload.items() if key != "digest"})
    return "sha256:" + hasher.hexdigest()


def _version(fmt: str) -> int:
    tail = fmt.rpartition("/")[2]
    return int(tail) if tail.isdigit() else -1


def _sniff(head: bytes) -> str | None:
    """What a file that is not a zip archive is, from its first bytes (``None``: a zip)."""
    if head.startswith(b"PK") or b"PK\x03\x04".startswith(head):  # a zip, maybe damaged
        return None
    if head.startswith(_LEGACY_HEAD):
        return "a legacy torch.save file (the non-zip format torch wrote before 1.6)"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle, not a torch.save zip archive"
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file (load it with safetensors.torch.load_file(path))"
    text = head[:512].decode("utf-8", errors="replace").rstrip("\ufffd")  # cut mid-character
    if "\ufffd" not in text and all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return f"a text file (starting {text.strip()[:40]!r})"
    return f"binary data that is not a torch.save file (it starts with bytes {head[:8].hex(' ')})"


def _check_archive(name: str, size: int) -> tuple[str | None, int]:
    """What is wrong with the zip archive ``name`` (``None``: nothing) — its end record, duplicate
    or stray members, a missing data.pkl, every member's CRC-32 — and how many weight records
    (``data/`` members) it holds."""
    with open(name, "rb") as file:
        file.seek(max(0, size - 22))
        end = file.read(22)
    if not (end.startswith(b"PK\x05\x06") and end.endswith(b"\0\0")):
        return "it starts like a zip archive but does not end like one: it is truncated", 0
    try:
        with zipfile.ZipFile(name) as archive:
            names = archive.namelist()
            root = names[0].partition("/")[0] + "/" if names else ""
            twice = [n for n, count in Counter(names).items() if count > 1]
            stray = [n for n in names if not n.startswith(root) or n == root]
            problem = (
                f"its zip archive holds member(s) twice: {twice[:3]}"
                if twice
                else f"its zip archive holds member(s) outside its folder {root!r}: {stray[:3]}"
                if stray
                else f"its zip archive has no {root}data.pkl member (deleted or renamed)"
                if root + "data.pkl" not in names
                else None
            )
            for member in [] if problem else archive.infolist():
                with archive.open(member) as stream:
                    try:
                        while stream.read(1 << 20):
                            pass
                    except zipfile.BadZipFile:  # reading raises it for a CRC-32 mismatch only
                        problem = f"the file is corrupted ({member.filename!r} fails its CRC-32)"
                        break
    except zipfile.BadZipFile as err:
        return f"its zip archive is unreadable ({err})", 0
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as err:
        return f"its zip archive cannot be read ({type(err).__name__}: {err})", 0
    return problem, sum(n.startswith(root + "data/") for n in names)


def _storages(payload: Any) -> set[int]:
    """The storages ``payload``'s tensors use (torch.save writes one ``data/`` member each)."""
    if isinstance(payload, torch.Tensor | torch.storage.TypedStorage):  # sparse ones raise
        payload = payload.untyped() if hasattr(payload, "untyped") else payload.untyped_storage()
    if isinstance(payload, torch.UntypedStorage):
        return {payload._cdata}
    if isinstance(payload, (Mapping, list, tuple, set, frozenset)):
        items = payload.values() if isinstance(payload, Mapping) else payload
        return set().union(*map(_storages, items))
    return set()


def _kind(payload: Any) -> tuple[str, str, str | None]:
    """What a loaded ``payload`` is, what to do with it, and its format string if it has one."""
    if not isinstance(payload, dict):
        return f"a {type(payload).__name__} saved with torch.save, not a dict", "", None
    fmt = payload.get("format")
    if isinstance(fmt, str):
        family = fmt.rpartition("/")[0]
        if family == "nddrify.fused":
            return f"an nddrify checkpoint (format {fmt!r})", "load it with nddrify.load(path)", fmt
        if family == "recipes.checkpoint":
            return (
                f"a recipes training checkpoint (format {fmt!r}): its 'model' entry holds weights",
                "resume it with the recipes' --resume, or load its weights with "
                "net.load_state_dict(torch.load(path, weights_only=True)['model'])",
                fmt,
            )
        return f"a checkpoint of format {fmt!r}", "", fmt
    tensors = [k for k, v in payload.items() if isinstance(v, torch.Tensor)]
    if payload and len(tensors) == len(payload):
        return (
            f"a plain state dict ({len(payload)} tensors, e.g. {tensors[0]!r})",
            "load it with model.load_state_dict(torch.load(path, weights_only=True))",
            None,
        )
    for key in ("state_dict", "model"):
        inner = payload.get(key)
        if isinstance(inner, dict) and inner and _kind(inner)[0].startswith("a plain state"):
            return (
                f"a training checkpoint whose {key!r} entry holds a state dict",
                f"load its weights with model.load_state_dict(torch.load(path, "
                f"weights_only=True)[{key!r}])",
                None,
            )
    return f"a dict with keys {sorted(map(str, payload))[:6]}", "", None


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    expected_format: str | tuple[str, ...],
    what: str,
    map_location: str | torch.device | None = "cpu",
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """The payload dict of a ``torch.save`` checkpoint whose ``"format"`` entry is
    ``expected_format`` (one of them, if a tuple), loaded with ``weights_only=True``.

    Any failure is a :class:`~nddrify.errors.CheckpointError` giving the file, its size and kind,
    what was expected (``what``, e.g. ``"a recipes training checkpoint"``) and what to do: a
    missing, empty, text, truncated or damaged file (each zip member's CRC-32 is checked), Python
    objects a safe load refuses, a file of another kind (a plain state dict, another format), a
    missing ``required`` key, a ``"digest"`` entry (see :func:`save`) that does not match.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/run.pt"
        >>> atomic_save({"format": "demo/1", "step": 3}, path)
        >>> read_checkpoint(path, expected_format="demo/1", what="a demo checkpoint")["step"]
        3
        >>> try:
        ...     read_checkpoint(path, expected_format="other/1", what="another checkpoint")
        ... except CheckpointError as err:
        ...     print(str(err).split(": ")[1].split(";")[0])
        it is a checkpoint of format 'demo/1'
    """
    name = os.fspath(path)
    formats = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    writer = _WRITERS.get(formats[0].rpartition("/")[0], f"the program that writes {formats[0]!r}")
    wanted = f"{what} (format {' or '.join(map(repr, formats))}, written by {writer})"

    def fail(problem: str, advice: str = _DAMAGED) -> CheckpointError:
        verb = "cannot be read as" if advice.endswith(_DAMAGED) else "is not"
        return CheckpointError(f"{name!r} ({size} bytes) {verb} {wanted}: {problem}; {advice}.")

    size = 0
    try:
        if os.path.isdir(name):
            inside = sorted(p.name for p in Path(name).glob("*.pt"))[:3]
            raise CheckpointError(
                f"{name!r} is a folder, not a file; expected {wanted}: pass the path of the file"
                + (f" (it holds {', '.join(inside)})." if inside else ".")
            )
        size = os.stat(name).st_size
        if size == 0:
            raise fail("it is empty", "its save was interrupted or the disk was full: save again")
        with open(name, "rb") as file:
            head = file.read(4096)
        kind = _sniff(head)
        problem, records = (None, 0) if kind else _check_archive(name, size)
    except FileNotFoundError:
        raise CheckpointError(
            f"{name!r} does not exist (the current folder is {os.getcwd()!r}); expected {wanted}: "
            "check the path."
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot read {name!r} ({err}); expected {wanted}.") from None
    if kind:
        raise fail(f"it is {kind}", f"pass a file written by {writer}")
    if problem:
        raise fail(problem)
    try:
        payload = torch.load(name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if "Unsupported global" in str(err) or found:
            raise fail(
                "it holds Python objects that a safe load (weights_only=True) refuses"
                + (f", such as {found.group(1)}" if found else "")
                + f", which {what} never holds, so it was not written by {writer}",
                "pass the file that program wrote; to keep your own data loadable, save plain "
                "values and tensors only (e.g. model.state_dict())",
            ) from None
        raise fail("its data.pkl is not a valid pickle of plain values") from None
    except Exception as err:  # torch reports damage as RuntimeError, ValueError, KeyError, ...
        first = str(err).split(". ")[0].strip()[:200]
        detail = type(err).__name__ + (
            f": {first}" if first and "weights_only" not in first else ""
        )
        where = "" if str(map_location) == "cpu" else f"check map_location={map_location!r}, or "
        raise fail(f"torch.load cannot read it ({detail})", where + _DAMAGED) from None
    description, advice, fmt = _kind(payload)
    if fmt not in formats:
        if (fmt or "").rpartition("/")[0] == formats[0].rpartition("/")[0]:
            advice = (
                "it was written by a newer version: upgrade the program that reads it"
                if _version(fmt) > max(map(_version, formats))
                else "it was written by an older version that this one cannot read: write it again"
            )
        raise fail(f"it is {description}", advice or f"pass a file written by {writer}")
    try:
        used = len(_storages(payload))
    except (RuntimeError, NotImplementedError):  # a layout without one storage: not counted
        used = records
    if records > used:
        raise fail(f"its zip archive holds {records} weight records, more than it uses")
    if "digest" in payload and payload["digest"] != _digest(payload):
        raise CheckpointError(
            f"{name!r} ({size} bytes) is {description}, but the file is corrupted (its weights or "
            f"build record do not match the digest written at save); {_DAMAGED}."
        )
    for key in required:
        if key not in payload:
            raise fail(f"it is {description} but has no {key!r} entry")
    return payload


def save(
    fused: nn.Module, path: str | os.PathLike[str], *, specs: Sequence[str] | None = None
) -> None:
    """Write ``fused`` to ``path``: its weights, how to rebuild it and a sha256 digest of both.

    Args:
        fused: a model returned by :func:`nddrify.fuse`.
        path: the file to write (its folder is created).
        specs: model specs of the tasks, in task order, when ``fuse`` was given modules rather
            than spec strings; without them :func:`load` needs the models.
    """
    build = dict(getattr(fused, "meta", {}).get(BUILD_META_KEY) or {})
    if not isinstance(fused, FusedGraphModule) or not build:
        raise CheckpointError(
            f"expected a model returned by nddrify.fuse, got {type(fused).__name__}; to save "
            "any module's weights use torch.save(model.state_dict(), path)."
        )
    stored = build["plan"]
    if stored["fusion"] is None or (stored["shortcut"] or {}).get("custom"):
        raise CheckpointError(
            "this fused model uses a fusion kind of your own or a callable option (a custom norm "
            "or activation) that cannot be stored without pickling code; save "
            "fused.state_dict() instead and rebuild with the same nddrify.fuse(...) call before "
            "load_state_dict."
        )
    if specs is not None:
        if len(specs) != len(stored["tasks"]):
            raise CheckpointError(
                f"specs has {len(specs)} entries but the model has tasks {stored['tasks']}."
            )
        build["specs"] = list(specs)
    payload: dict[str, Any] = {
        "format": _FORMAT,
        "build": build,
        "training": fused.training,
        "state_dict": fused.state_dict(),
    }
    payload["digest"] = _digest(payload)
    atomic_save(payload, path)


def _example_inputs(build: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor] | None:
    """Zeros of the recorded example input shape(s): one per task when they differ, else one
    (older checkpoints record ``example_input_shape`` only)."""
    shapes = build.get("example_input_shapes")
    if shapes and len({tuple(s) for s in shapes}) > 1:
        return [torch.zeros(shape) for shape in shapes]
    example = build.get("example_input_shape")
    return None if example is None else torch.zeros(example)


def _checked_build(payload: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``payload["build"]`` once the entries :func:`load` reads are there with the right types."""
    build, state = payload.get("build"), payload.get("state_dict")
    build = build if isinstance(build, dict) else {}
    plan, specs = build.get("plan"), build.get("specs")
    tasks = plan.get("tasks") if isinstance(plan, dict) else None
    problem = (
        "'digest' entry (a string)"
        if payload["format"] == _FORMAT and not isinstance(payload.get("digest"), str)
        else "'training' entry (a bool)"
        if not isinstance(payload.get("training"), bool)
        else "'state_dict' entry (a dict of tensors)"
        if not isinstance(state, dict)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
        else "'build' entry (a dict of 'plan', 'specs', 'as_dict')"
        if not isinstance(specs, list) or not isinstance(build.get("as_dict"), bool)
        else "plan's 'tasks' (a list of one task per spec)"
        if not isinstance(tasks, list) or len(tasks) != len(specs)
        else None
    )
    if problem:
        raise CheckpointError(
            f"{name!r} is an nddrify checkpoint (format {payload['format']!r}) but its {problem} "
            "is missing or wrong; it was damaged or edited after nddrify.save wrote it: save the "
            "model again."
        )
    return build


def _differ(name: str, rebuilt: bool, detail: str) -> CheckpointError:
    """The error for models that do not fit the checkpoint ``name``."""
    models = "the models the specs build now" if rebuilt else "the models given"
    return CheckpointError(
        f"{models} differ from the ones saved in {name!r}: {detail}; pass the same architectures "
        "as at save time (same classes and constructor arguments, such as num_classes), or let "
        "the checkpoint's specs rebuild them (nddrify.load(path) after nddrify.save(fused, path, "
        "specs=[...]))."
    )


def _weight_problems(own: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    problems = [f"{k!r} is not in the checkpoint" for k in own if k not in saved]
    problems += [f"{k!r} is in the checkpoint only" for k in saved if k not in own]
    return problems + [
        f"{k!r} is {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} here"
        for k, v in saved.items()
        if k in own and v.shape != own[k].shape
    ]


def load(
    path: str | os.PathLike[str],
    models: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
    trace_options: TaskOptions = None,
) -> FusedGraphModule:
    """Rebuild a fused model saved by :func:`save` and load its weights (``weights_only=True``).

    A file that is not an intact nddrify checkpoint (see :func:`read_checkpoint`) or ``models``
    whose weights do not fit the saved ones raise :class:`~nddrify.errors.CheckpointError`.

    Args:
        path: the checkpoint.
        models: the task models (list in task order, or dict by task name) when the checkpoint
            has no specs for them; their weights are replaced by the checkpoint's.
        map_location: where to load the tensors.
        trace_options: the :class:`~nddrify.TraceOptions` the model was fused with (they hold
            classes and functions, which a checkpoint does not store).
    """
    name = os.fspath(path)
    payload = read_checkpoint(
        path,
        expected_format=_READABLE,
        what="an nddrify checkpoint",
        map_location=map_location,
        required=("build", "training", "state_dict"),
    )
    build = _checked_build(payload, name)
    tasks = build["plan"]["tasks"]
    if models is None:
        missing = [t for t, s in zip(tasks, build["specs"]) if s is None]
        if missing:
            raise CheckpointError(
                f"the checkpoint has no model specs for task(s) {missing}; pass the models: "
                "nddrify.load(path, models=[...]), or save with specs=[...]."
            )
        chosen: list[Any] = list(build["specs"])
    elif isinstance(models, Mapping):
        if set(models) != set(tasks):
            raise ModelsError(f"models has tasks {sorted(models)}, the checkpoint {tasks}.")
        chosen = [models[t] for t in tasks]
    else:
        chosen = list(models)
        if len(chosen) != len(tasks):
            raise ModelsError(f"got {len(chosen)} models for the checkpoint's tasks {tasks}.")
    try:
        plan = Plan.from_dict(build["plan"])
    except PlanError as err:
        raise CheckpointError(
            f"{name!r} is an nddrify checkpoint but its fusion plan is invalid "
            f"({str(err).rstrip('.')}); it was edited after nddrify.save wrote it: save the model "
            "again."
        ) from err
    traced = trace(
        dict(zip(tasks, chosen)) if build["as_dict"] else chosen,
        example_input=_example_inputs(build),
        options=trace_options,
    )
    try:  # models built from the specs here are not the caller's: no copy of their weights
        fused = rewrite(traced, plan, copy=models is not None)
    except PlanError as err:  # the models lack the nodes the checkpoint fuses them at
        raise _differ(name, models is None, str(err).partition(";")[0]) from err
    problems = _weight_problems(fused.state_dict(), payload["state_dict"])
    if problems:
        detail = f"{len(problems)} weight(s) do not match (e.g. {'; '.join(problems[:3])})"
        raise _differ(name, models is None, detail)
    fused.load_state_dict(payload["state_dict"])
    return fused.train(payload["training"]) if fused.training != payload["training"] else fused
