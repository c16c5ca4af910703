"""The plan value: where the tasks are fused and what it costs, as plain data.

A :class:`Plan` holds names, shapes and costs only (no traces, no modules), so it can be
printed, compared, saved as JSON (:meth:`Plan.to_dict`), edited, loaded
(:meth:`Plan.from_dict`) and handed to :func:`nddrify.rewrite`.

Example:
    >>> import json, torchvision, nddrify
    >>> from nddrify.plans import Plan
    >>> p = nddrify.plan([torchvision.models.vgg11(), torchvision.models.vgg11()], points=2)
    >>> again = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    >>> again == p, [lv.points[0].name for lv in again.levels]
    (True, ['features.15', 'features.20'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError
from .layers.base import FeatureLayout
from .pairing import UnpairedPoint

__all__ = ["Candidate", "FusionPoint", "FusionLevel", "Overhead", "Plan", "PLAN_FORMAT"]

#: Version of :meth:`Plan.to_dict`'s format.
PLAN_FORMAT = 1


@dataclass(frozen=True)
class Candidate:
    """A node of one model that can be fused: a spine feature map.

    Attributes:
        name: the readable name (the stage module ending there, else the node name).
        node: the torchvision-style node name.
        shape: the feature map's (N, C, H, W) on the example input, whatever its layout.
        auto: whether ``points="auto"`` picks it.
    """

    name: str
    node: str
    shape: tuple[int, ...]
    auto: bool

    def __repr__(self) -> str:
        mark = "*" if self.auto else " "
        return f"{mark} {self.name:<28} {self.node:<32} {'×'.join(map(str, self.shape[1:]))}"


@dataclass(frozen=True)
class FusionPoint:
    """One task's feature at one fusion level.

    For an image map, ``shape`` is (N, C, H, W) whatever the layout and ``layout`` says how the
    tensor is stored (``"NHWC"`` for channels-last stages such as Swin's). For a token sequence
    (``layout="NLC"``, a transformer block's N × L × C output), ``shape`` is (N, C, L) and
    ``tokens`` is ``(prefix,)`` or, when the patch grid is known, ``(prefix, H, W)``: ``prefix``
    extra tokens (class, distillation, registers) before H·W patch tokens in raster order.
    ``nonnegative`` says whether the original value was ≥ 0 (after a ReLU, or a pool of one).
    """

    task: str
    name: str
    node: str
    shape: tuple[int, ...]
    nonnegative: bool
    layout: str = "NCHW"
    tokens: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def grid(self) -> tuple[int, int] | None:
        """A token sequence's patch grid (H, W) when known, else None."""
        return (self.tokens[1], self.tokens[2]) if len(self.tokens) == 3 else None

    @property
    def spatial(self) -> tuple[int, ...]:
        """(H, W) of a map or of a token sequence's patch grid; (L,) for tokens without a grid."""
        if self.layout == "NLC":
            return self.grid or (self.shape[2],)
        return (self.shape[2], self.shape[3])

    @property
    def channels_last(self) -> bool:
        return self.layout == "NHWC"

    @property
    def feature_layout(self) -> FeatureLayout:
        """What a fusion layer needs to know about this feature's layout."""
        prefix = self.tokens[0] if self.tokens else 0
        return FeatureLayout(self.layout, prefix, self.grid)

    def describe_shape(self) -> str:
        """``"512×7×7"`` (C×H×W), ``" NHWC"`` appended for channels-last maps; tokens as
        ``"192×197 NLC (1+14×14)"`` (C×L, extra tokens + grid)."""
        text = "×".join(map(str, self.shape[1:]))
        if self.layout == "NLC":
            grid = "×".join(map(str, self.grid)) if self.grid else "?"
            prefix = self.tokens[0] if self.tokens else 0
            return f"{text} NLC ({prefix}+{grid})"
        return text if self.layout == "NCHW" else f"{text} {self.layout}"


@dataclass(frozen=True)
class FusionLevel:
    """The K points fused by one layer, and the parameters that layer adds.

    Fusion kinds build their layer from a level (:meth:`nddrify.NDDR.build`), reading
    ``shapes``, ``nonnegative`` and ``layouts`` (or ``channels_last``).
    """

    index: int
    points: tuple[FusionPoint, ...]
    weights: int = 0
    norm_params: int = 0

    @property
    def parameters(self) -> int:
        return self.weights + self.norm_params

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(p.shape for p in self.points)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(p.channels for p in self.points)

    @property
    def nonnegative(self) -> tuple[bool, ...]:
        return tuple(p.nonnegative for p in self.points)

    @property
    def channels_last(self) -> tuple[bool, ...]:
        return tuple(p.channels_last for p in self.points)

    @property
    def layouts(self) -> tuple[FeatureLayout, ...]:
        return tuple(p.feature_layout for p in self.points)

    def describe(self) -> str:
        """``"level 2 (seg 'layer1', normal 'layer1')"`` for error messages."""
        names = ", ".join(f"{p.task} {p.name!r}" for p in self.points)
        return f"level {self.index + 1} ({names})"


@dataclass(frozen=True)
class Overhead:
    """Parameters the fusion adds, absolute and relative to the original models.

    Attributes:
        fusion_weights: 1×1 conv weights of all fusion layers (and the shortcut).
        fusion_norm_params: affine parameters of their norms.
        model_params: parameters of each original model, in task order.
        kind: the fusion kind's display name.
        weights_by_task: each task's share of ``fusion_weights`` (see
            :attr:`relative_by_task`), in task order.
        tasks: the task names, in order.

    Example:
        >>> print(Overhead(1000, 10, (10_000, 40_000), weights_by_task=(400, 600),
        ...                tasks=("seg", "depth")))
        1,000 fusion 1×1 weights (seg 400 = 4.00% of its 10,000, depth 600 = 1.50% of its 40,000) + 10 norm parameters
    """

    fusion_weights: int
    fusion_norm_params: int
    model_params: tuple[int, ...]
    kind: str = "NDDR"
    weights_by_task: tuple[int, ...] = ()
    tasks: tuple[str, ...] = ()

    @property
    def fusion_params(self) -> int:
        return self.fusion_weights + self.fusion_norm_params

    @property
    def weights_per_task(self) -> float:
        return self.fusion_weights / len(self.model_params)

    @property
    def relative_per_task(self) -> float:
        """Fusion weights per task over the mean size of one original model."""
        return self.weights_per_task / (sum(self.model_params) / len(self.model_params))

    @property
    def relative_by_task(self) -> tuple[float, ...]:
        """Each task's share of the fusion weights over that task's own model size (the share
        of a layer is the part producing the task's channels: exact for NDDR's per-task 1×1
        convs, split by output channels for layers mixing all tasks at once)."""
        shares = self.weights_by_task or (self.weights_per_task,) * len(self.model_params)
        return tuple(w / max(m, 1) for w, m in zip(shares, self.model_params))

    def __str__(self) -> str:
        what = "fusion 1×1 weights" if self.kind == "NDDR" else f"{self.kind} weights"
        norms = f" + {self.fusion_norm_params:,} norm parameters"
        if len(set(self.model_params)) <= 1 or not self.weights_by_task:
            return (
                f"{self.fusion_weights:,} {what} ({self.weights_per_task:,.0f} per task = "
                f"{100 * self.relative_per_task:.2f}% of one model's "
                f"{sum(self.model_params) // len(self.model_params):,}){norms}"
            )
        names = self.tasks or tuple(f"task{i}" for i in range(len(self.model_params)))
        parts = ", ".join(
            f"{name} {w:,} = {100 * r:.2f}% of its {m:,}"
            for name, w, r, m in zip(
                names, self.weights_by_task, self.relative_by_task, self.model_params
            )
        )
        return f"{self.fusion_weights:,} {what} ({parts}){norms}"


def _split_by_channels(total: int, channels: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``channels``, in integers that sum to ``total``."""
    whole = sum(channels)
    shares = [total * c // whole for c in channels]
    shares[-1] += total - sum(shares)
    return shares


@dataclass(frozen=True)
class Plan:
    """Where the tasks are fused and what it costs. Build it with :func:`nddrify.plan`.

    Attributes:
        tasks: task names in order.
        levels: one :class:`FusionLevel` per fusion point.
        model_params: parameter count of each original model.
        shortcut_weights, shortcut_norm_params: parameters of the layer that spans the levels
            (the NDDR-Shortcut, or sluice's layer-stitch); 0 without one.
        fusion_kind: the fusion kind's display name (``"NDDR"``, ``"CrossStitch"``, ...).
        fusion, shortcut: the options of a built-in fusion kind and of the shortcut as plain
            values (what :func:`nddrify.rewrite` rebuilds the layers from); ``fusion`` is None
            for a kind of your own (pass it to ``rewrite(..., fusion=...)``).
        unpaired: the automatic points left out because no other task has a map at their
            output stride (``points="auto"`` or an int pairs levels by stride when the models
            differ), as :class:`~nddrify.pairing.UnpairedPoint` records; empty otherwise.
    """

    tasks: tuple[str, ...]
    levels: tuple[FusionLevel, ...]
    model_params: tuple[int, ...] = ()
    shortcut_weights: int = 0
    shortcut_norm_params: int = 0
    fusion_kind: str = "NDDR"
    fusion: Mapping[str, Any] | None = field(default=None, compare=False)
    shortcut: Mapping[str, Any] | None = field(default=None, compare=False)
    unpaired: tuple[UnpairedPoint, ...] = ()

    def points(self, task: str) -> list[str]:
        """The node names fused in ``task``, in level order."""
        return [level.points[self.tasks.index(task)].node for level in self.levels]

    @property
    def overhead(self) -> Overhead:
        return Overhead(
            fusion_weights=sum(lv.weights for lv in self.levels) + self.shortcut_weights,
            fusion_norm_params=sum(lv.norm_params for lv in self.levels)
            + self.shortcut_norm_params,
            model_params=self.model_params,
            kind=self.fusion_kind,
            weights_by_task=self._weights_by_task(),
            tasks=self.tasks,
        )

    def _weights_by_task(self) -> tuple[int, ...]:
        if not self.levels:
            return ()
        by_task = [0] * len(self.tasks)
        for level in self.levels:
            for i, share in enumerate(_split_by_channels(level.weights, level.channels)):
                by_task[i] += share
        last = self.levels[-1].channels
        for i, share in enumerate(_split_by_channels(self.shortcut_weights, last)):
            by_task[i] += share
        return tuple(by_task)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-safe values (lists, dicts, strings, numbers, booleans, None)."""
        return {
            "format": PLAN_FORMAT,
            "tasks": list(self.tasks),
            "levels": [
                {
                    "points": [
                        {
                            "task": p.task,
                            "name": p.name,
                            "node": p.node,
                            "shape": list(p.shape),
                            "nonnegative": p.nonnegative,
                            "layout": p.layout,
                            "tokens": list(p.tokens),
                        }
                        for p in level.points
                    ],
                    "weights": level.weights,
                    "norm_params": level.norm_params,
                }
                for level in self.levels
            ],
            "model_params": list(self.model_params),
            "shortcut_weights": self.shortcut_weights,
            "shortcut_norm_params": self.shortcut_norm_params,
            "fusion_kind": self.fusion_kind,
            "fusion": _plain_copy(self.fusion),
            "shortcut": _plain_copy(self.shortcut),
            "unpaired": [
                {"task": u.task, "name": u.name, "node": u.node, "stride": u.stride}
                for u in self.unpaired
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The plan :meth:`to_dict` described (after ``json.loads``, or edited by hand).

        Raises:
            PlanError: a key is missing or holds a value of the wrong kind.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan must be a dict (Plan.to_dict()), got {type(data).__name__}.")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"plan format {data.get('format')!r} is not supported; this nddrify reads format "
                f"{PLAN_FORMAT} (make the plan again with nddrify.plan(...).to_dict())."
            )
        try:
            tasks = tuple(str(t) for t in data["tasks"])
            levels = []
            for index, level in enumerate(data["levels"]):
                points = tuple(
                    FusionPoint(
                        task=str(p["task"]),
                        name=str(p["name"]),
                        node=str(p["node"]),
                        shape=tuple(int(s) for s in p["shape"]),
                        nonnegative=bool(p["nonnegative"]),
                        layout=str(p.get("layout", "NCHW")),
                        tokens=tuple(int(t) for t in p.get("tokens", ())),
                    )
                    for p in level["points"]
                )
                if tuple(p.task for p in points) != tasks:
                    raise PlanError(
                        f"plan level {index + 1} lists tasks {[p.task for p in points]}, the plan "
                        f"{list(tasks)}; every level needs one point per task, in task order."
                    )
                levels.append(
                    FusionLevel(
                        index,
                        points,
                        int(level.get("weights", 0)),
                        int(level.get("norm_params", 0)),
                    )
                )
            return cls(
                tasks=tasks,
                levels=tuple(levels),
                model_params=tuple(int(n) for n in data.get("model_params", ())),
                shortcut_weights=int(data.get("shortcut_weights", 0)),
                shortcut_norm_params=int(data.get("shortcut_norm_params", 0)),
                fusion_kind=str(data.get("fusion_kind", "NDDR")),
                fusion=data.get("fusion"),
                shortcut=data.get("shortcut"),
                unpaired=tuple(
                    UnpairedPoint(
                        task=str(u["task"]),
                        name=str(u["name"]),
                        node=str(u["node"]),
                        stride=None if u.get("stride") is None else int(u["stride"]),
                    )
                    for u in data.get("unpaired", ())
                ),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(
                f"the plan dict is malformed ({type(err).__name__}: {err}); start from "
                "nddrify.plan(...).to_dict() and edit point names only."
            ) from err

    def __repr__(self) -> str:
        lines = [
            f"Plan({len(self.tasks)} tasks: {', '.join(self.tasks)}; {len(self.levels)} levels)"
        ]
        for level in self.levels:
            for point in level.points:
                added = f"+{level.parameters:,} params" if point is level.points[0] else ""
                lines.append(
                    f"  level {level.index + 1}  {point.task:<10} {point.name:<24} "
                    f"{point.node:<32} {point.describe_shape():<19}{added}".rstrip()
                )
        if self.shortcut_weights:
            lines.append(
                f"  shortcut   +{self.shortcut_weights + self.shortcut_norm_params:,} params"
            )
        if self.unpaired:
            lines.append("  left out (no map at the same output stride in every task):")
            for u in self.unpaired:
                stride = "stride ?" if u.stride is None else f"stride {u.stride}"
                lines.append(f"           {u.task:<10} {u.name:<24} {u.node:<32} {stride}")
        if self.model_params:
            lines.append(f"  overhead: {self.overhead}")
        return "\n".join(lines)

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title=f"NDDR fusion plan: {', '.join(self.tasks)}")
        for column in ("level", "task", "point", "node", "shape (C×H×W)", "params added"):
            table.add_column(
                column, justify="right" if column in ("level", "params added") else "left"
            )
        for level in self.levels:
            for point in level.points:
                first = point is level.points[0]
                table.add_row(
                    str(level.index + 1) if first else "",
                    point.task,
                    point.name,
                    point.node,
                    point.describe_shape(),
                    f"{level.parameters:,}" if first else "",
                    end_section=point is level.points[-1],
                )
        if self.shortcut_weights:
            params = self.shortcut_weights + self.shortcut_norm_params
            table.add_row("", "all", "shortcut", "", "", f"{params:,}")
        if self.unpaired:
            for u in self.unpaired:
                stride = "?" if u.stride is None else str(u.stride)
                table.add_row("-", u.task, u.name, u.node, f"left out: stride {stride}", "")
        if self.model_params:
            table.caption = str(self.overhead)
        return table


def _plain_copy(value: Any) -> Any:
    """A JSON-safe deep copy (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value
