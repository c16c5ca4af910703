"""Pair the automatic fusion points of K tasks by resolution (output stride), not by position.

Two different models rarely end their stages at the same strides: a detector backbone's stage
ends sit at strides 4/8/16/32, a segmenter's at 2/4/8/16. Pairing them by position would fuse a
stride-4 map with a stride-2 one; :func:`pair_by_stride` pairs the maps of equal stride instead
and says which points have no partner at their stride in every task. When every task has the same
strides (two copies of one architecture, ResNet-18 + ResNet-34) the pairing is the positional one.

Within one stride, the k-th map from the end of one task pairs with the k-th map from the end of
the others (the deepest maps at a resolution pair first, as ``points=N`` takes the last N).

:func:`pair_by_stride` and :func:`output_stride` are pure; :func:`pair_points` is the planner's
use of them on traced graphs (strides on each task's own example input, the warnings, and the
checks that name what went wrong).

Example:
    >>> from nddrify.pairing import pair_by_stride
    >>> det = [("pool", 4), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
    >>> seg = [("stem", 2), ("down1", 4), ("down2", 8), ("down3", 16)]
    >>> pairing = pair_by_stride([det, seg])
    >>> pairing.levels
    (('layer1', 'down1'), ('layer2', 'down2'), ('layer3', 'down3'))
    >>> pairing.strides
    (4, 8, 16)
    >>> pairing.unpaired
    ((0, 'pool', 4), (0, 'layer4', 32), (1, 'stem', 2))
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from .errors import PointError, ShapeMismatchError
from .graph_analysis import point_shape, spatial_size
from .meta import QUALNAME

if TYPE_CHECKING:
    import torch.fx as fx

    from .tracing import TracedModel

__all__ = ["UnpairedPoint", "Pairing", "output_stride", "pair_by_stride", "pair_points"]

T = TypeVar("T")


@dataclass(frozen=True)
class UnpairedPoint:
    """An automatic point left out of the plan: no other task has a map at its stride.

    Attributes:
        task: the task's name.
        name: the point's readable name (the stage module ending there).
        node: its torchvision-style node name.
        stride: its output stride (input size / map size), or None when unknown.
    """

    task: str
    name: str
    node: str
    stride: int | None

    def describe(self) -> str:
        """``"seg 'stem' (stride 2)"``."""
        stride = "unknown stride" if self.stride is None else f"stride {self.stride}"
        return f"{self.task} {self.name!r} ({stride})"


@dataclass(frozen=True)
class Pairing(Generic[T]):
    """What :func:`pair_by_stride` found.

    Attributes:
        levels: one tuple per fusion level, holding one item per task (in task order); levels
            run in execution order in every task.
        strides: the output stride of each level.
        unpaired: ``(task index, item, stride)`` of every item left out, by task then position.
    """

    levels: tuple[tuple[T, ...], ...]
    strides: tuple[int, ...]
    unpaired: tuple[tuple[int, T, int], ...]


def _stride_1d(input_size: int, map_size: int) -> int | None:
    if input_size <= 0 or map_size <= 0:
        return None
    power, best = 1, 1
    while power <= 2 * input_size:
        if abs(input_size / power - map_size) < abs(input_size / best - map_size):
            best = power
        power *= 2
    if abs(input_size / best - map_size) <= 1:  # a power of two, up to padding and rounding
        return best
    if input_size % map_size == 0:  # an exact other stride (e.g. a 14×14 patch embedding)
        return input_size // map_size
    return None


def output_stride(input_hw: Sequence[int], map_hw: Sequence[int]) -> int | None:
    """The output stride of a feature map of H×W ``map_hw`` computed from an input of H×W
    ``input_hw``: the power of two that explains the size up to rounding (a map of 4×4 from a
    100×100 input is at stride 32), else an exact other ratio; None when H and W disagree or no
    stride explains the size.

    Example:
        >>> from nddrify.pairing import output_stride
        >>> output_stride((224, 224), (7, 7)), output_stride((100, 100), (13, 13))
        (32, 8)
        >>> output_stride((224, 224), (16, 16)), output_stride((64, 64), (8, 16))
        (14, None)
    """
    if len(input_hw) != 2 or len(map_hw) != 2:
        return None
    strides = {_stride_1d(int(i), int(m)) for i, m in zip(input_hw, map_hw)}
    return strides.pop() if len(strides) == 1 else None


def pair_by_stride(per_task: Sequence[Sequence[tuple[T, int]]]) -> Pairing[T]:
    """Pair the items of K tasks (each a list of ``(item, stride)`` in execution order) into
    levels of equal stride.

    A stride present in every task gives ``min(count)`` levels, the last occurrences of each
    task pairing from the end; the levels are ordered by execution, and a level that would run
    before an earlier level in some task (strides that go down and up again) is left out. Items
    of a stride that some task lacks, and the surplus of a stride, are unpaired. Tasks with the
    same strides pair by position.

    Example:
        >>> from nddrify.pairing import pair_by_stride
        >>> same = pair_by_stride([[("a", 4), ("b", 8)], [("x", 4), ("y", 8)]])
        >>> same.levels, same.unpaired
        ((('a', 'x'), ('b', 'y')), ())
        >>> dilated = pair_by_stride([[("l2", 8), ("l3", 16)], [("l2", 8), ("l3", 8), ("l4", 8)]])
        >>> dilated.levels, dilated.unpaired
        ((('l2', 'l4'),), ((0, 'l3', 16), (1, 'l2', 8), (1, 'l3', 8)))
    """
    positions: list[dict[int, list[int]]] = []
    for entries in per_task:
        by_stride: dict[int, list[int]] = {}
        for index, (_, stride) in enumerate(entries):
            by_stride.setdefault(stride, []).append(index)
        positions.append(by_stride)
    common = set.intersection(*(set(p) for p in positions)) if positions else set()
    candidates: list[tuple[int, ...]] = []
    for stride in common:
        count = min(len(p[stride]) for p in positions)
        for j in range(count):
            candidates.append(tuple(p[stride][len(p[stride]) - count + j] for p in positions))
    candidates.sort()
    kept: list[tuple[int, ...]] = []
    for indices in candidates:
        if not kept or all(i > last for i, last in zip(indices, kept[-1])):
            kept.append(indices)
    used = [{level[k] for level in kept} for k in range(len(per_task))]
    return Pairing(
        levels=tuple(tuple(per_task[k][i][0] for k, i in enumerate(level)) for level in kept),
        strides=tuple(per_task[0][level[0]][1] for level in kept),
        unpaired=tuple(
            (k, item, stride)
            for k, entries in enumerate(per_task)
            for index, (item, stride) in enumerate(entries)
            if index not in used[k]
        ),
    )


# -- the planner's use: traced graphs ----------------------------------------------------------


def _stride(node: fx.Node, traced: TracedModel) -> int | None:
    """A point's output stride on its task's own example input (a token sequence's from its
    patch grid); None without a known H×W or when no stride explains it."""
    size = spatial_size(node)
    if size is None:
        return None
    return output_stride(tuple(traced.example_input.shape[-2:]), size)


def _by_position(
    auto: Sequence[Sequence[fx.Node]], traced: Sequence[TracedModel], last: int | None
) -> list[list[fx.Node]]:
    """The automatic points paired by position (all of them, or the last N of each task)."""
    if last is not None:
        shortest = min(len(c) for c in auto)
        if not 1 <= last <= shortest:
            raise PointError(
                f"points={last} must be between 1 and {shortest}, the number of automatic "
                "points every task has."
            )
        return [list(c[-last:]) for c in auto]
    counts = {t.task: len(c) for t, c in zip(traced, auto)}
    if len(set(counts.values())) > 1:
        raise PointError(
            f"the tasks have different numbers of automatic points {counts} and their output "
            "strides are unknown, so they cannot be paired by resolution; pass points=N to fuse "
            "the last N of each, or one list of names per task."
        )
    return [list(c) for c in auto]


def _check_sizes(
    levels: Sequence[tuple[fx.Node, ...]],
    strides: Sequence[int],
    traced: Sequence[TracedModel],
    labels: Sequence[Mapping[fx.Node, str]],
) -> None:
    """Maps paired at one stride may still differ in H×W: by rounding (an input size the stride
    does not divide), or because the tasks' example inputs differ in size."""
    inputs = {t.task: tuple(t.example_input.shape[-2:]) for t in traced}
    for index, (level, stride) in enumerate(zip(levels, strides)):
        shapes = [point_shape(n) or () for n in level]
        if len({spatial_size(n) for n in level}) <= 1:
            continue
        detail = ", ".join(
            f"{t.task} {labels[k][n]!r} {'×'.join(map(str, shape[1:]))}"
            for k, (t, n, shape) in enumerate(zip(traced, level, shapes))
        )
        if len(set(inputs.values())) > 1:
            sizes = ", ".join(f"{task} {h}×{w}" for task, (h, w) in inputs.items())
            why = f"the tasks' example inputs differ in size ({sizes})"
        else:
            why = (
                f"of rounding (the input size is not a multiple of {stride}, so the models "
                "round the map size differently)"
            )
        raise ShapeMismatchError(
            f"fusion level {index + 1}: the tasks' feature maps have the same output stride "
            f"{stride} but differ in H×W ({detail}) because {why}; pass resize=True to resize "
            "each task's inputs to its own H×W inside the fusion layer."
        )


def pair_points(
    auto: Sequence[Sequence[fx.Node]],
    traced: Sequence[TracedModel],
    labels: Sequence[Mapping[fx.Node, str]],
    *,
    last: int | None = None,
    resize: bool = False,
) -> tuple[list[list[fx.Node]], tuple[UnpairedPoint, ...]]:
    """Pair every task's automatic points (``auto``, in execution order; ``labels`` names them)
    into levels by output stride on each task's own example input: per task the chosen nodes,
    and the points left out.

    ``last`` keeps the last N paired levels. When a point's stride is unknown (no N×C×H×W map,
    or H and W give different strides) the points pair by position, with a ``UserWarning`` if
    the tasks' strides differ; points left out by stride are named in a ``UserWarning``.

    Raises:
        PointError: no stride is common to every task, ``last`` is out of range, or (by
            position) the tasks have different numbers of points.
        ShapeMismatchError: maps of one stride differ in H×W and ``resize`` is False.

    Example:
        >>> import torch, torchvision, nddrify
        >>> from nddrify.pairing import pair_points
        >>> traced = nddrify.trace([torchvision.models.resnet18(), torchvision.models.resnet34()],
        ...                        example_input=torch.zeros(1, 3, 64, 64))
        >>> names = ["layer1", "layer2", "layer3", "layer4"]
        >>> auto = [[t.node(name) for name in names] for t in traced]
        >>> labels = [dict(zip(a, names)) for a in auto]
        >>> chosen, unpaired = pair_points(auto, traced.traced, labels, last=2)
        >>> [n.meta["qualname"] for n in chosen[1]], unpaired
        (['layer3.5.relu_1', 'layer4.2.relu_1'], ())
    """
    strides = [[_stride(n, t) for n in c] for t, c in zip(traced, auto)]
    unknown = [
        f"{t.task} {labels[k][n]!r}"
        for k, (t, c, s) in enumerate(zip(traced, auto, strides))
        for n, stride in zip(c, s)
        if stride is None
    ]
    if unknown:
        if len({tuple(s) for s in strides}) > 1:
            warnings.warn(
                f"nddrify: the output stride of point(s) {', '.join(unknown)} is unknown (no "
                "N×C×H×W map whose H×W gives it), so the automatic points are paired by "
                "position, not by resolution; check the plan, or give points by name.",
                UserWarning,
                stacklevel=5,
            )
        return _by_position(auto, traced, last), ()
    known: list[list[tuple[fx.Node, int]]] = [
        [(n, stride) for n, stride in zip(c, s) if stride is not None]
        for c, s in zip(auto, strides)
    ]
    pairing = pair_by_stride(known)
    levels, level_strides = list(pairing.levels), list(pairing.strides)
    if not levels:
        listing = "; ".join(f"{t.task} {sorted(set(s))}" for t, s in zip(traced, strides))
        raise PointError(
            f"the tasks' automatic points share no output stride ({listing}), so no level can "
            "be paired by resolution; give one list of point names per task (and resize=True)."
        )
    if last is not None:
        if not 1 <= last <= len(levels):
            raise PointError(
                f"points={last} must be between 1 and {len(levels)}, the number of automatic "
                f"levels every task has (paired by output stride: {level_strides})."
            )
        levels, level_strides = levels[-last:], level_strides[-last:]
    unpaired = tuple(
        UnpairedPoint(traced[k].task, labels[k][node], node.meta[QUALNAME], stride)
        for k, node, stride in pairing.unpaired
    )
    if unpaired:
        pairs = ", ".join(
            f"stride {stride}: "
            + " + ".join(f"{t.task} {labels[k][n]!r}" for k, (t, n) in enumerate(zip(traced, lv)))
            for lv, stride in zip(levels, level_strides)
        )
        warnings.warn(
            f"nddrify: the tasks' automatic points are paired by output stride ({pairs}); left "
            "out, with no map at the same stride in every task: "
            f"{', '.join(u.describe() for u in unpaired)} (listed in plan.unpaired).",
            UserWarning,
            stacklevel=5,
        )
    if not resize:
        _check_sizes(levels, level_strides, traced, labels)
    return [list(column) for column in zip(*levels)], unpaired
