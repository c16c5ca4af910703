"""Choosing a fusion kind: ``fuse(fusion=..., init=..., ...)`` resolved into one
:class:`~nddrify.protocol.FusionKind`, and the built-in kinds as plain records (what a
:class:`~nddrify.Plan` and a checkpoint store).

Example:
    >>> from nddrify.kinds import fusion_factory, kind_from_record, kind_record
    >>> kind = fusion_factory("cross_stitch", init=(0.8, 0.2))
    >>> kind
    CrossStitch(per_channel=False, init=(0.8, 0.2))
    >>> kind_record(kind)
    {'kind': 'cross_stitch', 'per_channel': False, 'init': [0.8, 0.2]}
    >>> kind_from_record(kind_record(kind)) == kind
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .baselines import CrossStitch, Sluice
from .errors import FusionConfigError, PlanError
from .layers import NDDR, Activation, Init, Norm, ResizeMode, Shortcut
from .protocol import FusionKind, check_fusion_kind

__all__ = [
    "FUSION_KINDS",
    "fusion_factory",
    "kind_record",
    "kind_from_record",
    "shortcut_record",
    "shortcut_from_record",
    "UNSET",
]

#: Built-in fusion kinds by name.
FUSION_KINDS = ("nddr", "cross_stitch", "sluice")
_CLASSES: dict[str, type] = {"nddr": NDDR, "cross_stitch": CrossStitch, "sluice": Sluice}

#: Marks an option the caller did not give.
UNSET: Any = object()


def fusion_factory(
    fusion: Any = None,
    *,
    init: Init = UNSET,
    norm: Norm = UNSET,
    activation: Activation = UNSET,
    resize: Any = False,
    subspaces: int | None = None,
) -> FusionKind:
    """The fusion kind ``fuse`` uses: a kind object as given, or one of the built-in kinds by
    name (``"nddr"``, ``"cross_stitch"``, ``"sluice"``) with the given options.

    Raises:
        FusionConfigError: an unknown name, options that do not belong to the kind, or an
            object that does not implement :class:`~nddrify.protocol.FusionKind`.
    """
    resize_mode: ResizeMode | None
    if resize is True:
        resize_mode = "align_corners_false"
    elif resize in (False, None):
        resize_mode = None
    else:
        resize_mode = resize
    given = {
        n: v
        for n, v in (("init", init), ("norm", norm), ("activation", activation))
        if v is not UNSET
    }
    if fusion is None or fusion == "nddr":
        if subspaces is not None:
            raise FusionConfigError("subspaces= belongs to fusion='sluice'.")
        return NDDR(
            init=given.get("init"),
            norm=given.get("norm", "batchnorm"),
            activation=given.get("activation", "auto"),
            resize=resize_mode,
        )
    if isinstance(fusion, str):
        if fusion not in FUSION_KINDS:
            raise FusionConfigError(
                f"fusion={fusion!r} is unknown; use one of {FUSION_KINDS} or a fusion kind "
                "such as nddrify.NDDR(rank=64)."
            )
        extra = sorted(set(given) - {"init"})
        if extra or resize_mode is not None:
            raise FusionConfigError(
                f"fusion={fusion!r} takes init= only (and subspaces= for sluice), not "
                f"{extra or ['resize']}; those options belong to NDDR layers."
            )
        if fusion == "cross_stitch":
            if subspaces is not None:
                raise FusionConfigError("subspaces= belongs to fusion='sluice'.")
            return CrossStitch(init=given.get("init"))
        return Sluice(subspaces=2 if subspaces is None else subspaces, init=given.get("init"))
    if given or subspaces is not None or resize_mode is not None:
        raise FusionConfigError(
            f"pass either fusion=... or the NDDR options {sorted(given)}, not both; e.g. "
            "fusion=nddrify.NDDR(init=(1.0, 0.0), norm=None)."
        )
    return check_fusion_kind(fusion)


def _plain(value: Any) -> Any:
    """``value`` as JSON-safe plain values, or raise TypeError (a callable option)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    raise TypeError(type(value).__name__)


def kind_record(kind: Any) -> dict[str, Any] | None:
    """A built-in fusion kind as plain values (``{"kind": "nddr", "init": [...], ...}``), or
    None for a kind of your own or one with a callable option (a custom norm)."""
    name = next((n for n, cls in _CLASSES.items() if type(kind) is cls), None)
    if name is None:
        return None
    try:
        return {"kind": name, **{k: _plain(v) for k, v in dataclasses.asdict(kind).items()}}
    except TypeError:
        return None


def _from_fields(cls: type, fields: Mapping[str, Any], what: str) -> Any:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise PlanError(f"the plan's {what} options {dict(fields)} are not valid: {err}.") from err


def kind_from_record(record: Mapping[str, Any]) -> FusionKind:
    """The fusion kind a :func:`kind_record` describes."""
    fields = dict(record)
    name = fields.pop("kind", None)
    if name not in _CLASSES:
        raise PlanError(f"the plan's fusion kind {name!r} is unknown; use one of {FUSION_KINDS}.")
    return _from_fields(_CLASSES[name], fields, f"fusion {name!r}")


def shortcut_record(shortcut: Shortcut | None) -> dict[str, Any] | None:
    """The shortcut options as plain values; None without a shortcut, ``{"custom": True}`` when
    an option is a callable (a custom norm) that plain values cannot hold."""
    if shortcut is None:
        return None
    try:
        return {k: _plain(v) for k, v in dataclasses.asdict(shortcut).items()}
    except TypeError:
        return {"custom": True}


def shortcut_from_record(record: Mapping[str, Any] | None) -> Shortcut | None:
    """The :class:`~nddrify.Shortcut` a :func:`shortcut_record` describes (None: no shortcut).

    Raises:
        PlanError: the record is of a shortcut with a callable option.
    """
    if record is None:
        return None
    if record.get("custom"):
        raise PlanError(
            "the plan's shortcut has a callable option that a plan cannot hold; pass it again: "
            "nddrify.rewrite(traced, plan, shortcut=nddrify.Shortcut(norm=...))."
        )
    return _from_fields(Shortcut, record, "shortcut")
