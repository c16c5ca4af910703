"""The NDDR-Shortcut in the recipes (paper Table 6): splicing it into a single-task network,
carrying a single-task run's reducer into a fused one, one shared reducer for hard sharing, and
the reducers' own learning-rate multiplier.

The official code (shared REFERENCE §3, §5) differs from a uniform "every shortcut reducer is a
100× fusion layer" reading in three places, each a config option (defaults: the official form):

* ``shortcut_lr_mult``: the single-task and Mult. reducers train at 1× (NDDR-Shortcut: 100×);
  :func:`shortcut_param_groups` moves the reducers' parameters into ``shortcut`` groups;
* ``mul_shortcut="shared"``: Mult. has one reducer on the shared trunk; :func:`tie_reducers`
  makes the per-task reducers of the tied-trunk model one set of parameters;
* the NDDR-Shortcut starts a fresh reducer on top of the non-shortcut single-task runs (the
  ``init_from`` of the paper rows; a single-task shortcut run's reducer is carried over when
  ``init_from`` points at one: :func:`load_shortcut_extras`).

Example:
    >>> import torch
    >>> from recipes.builders import demo_cnn
    >>> net = add_single_shortcut(demo_cnn(3), "auto", torch.zeros(1, 3, 32, 32))
    >>> groups = shortcut_param_groups(net, [], lr=0.01, weight_decay=2.5e-4, lr_mult=1.0)
    >>> [(g["name"], g["lr"], sum(p.numel() for p in g["params"])) for g in groups]
    [('shortcut', 0.01, 7168), ('shortcut_no_decay', 0.01, 128)]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

import nddrify
from nddrify.layers import NDDRShortcutLayer
from nddrify.rewriting.emit import GraphWriter
from nddrify.rewriting.ir import Junction, RewriteIR, task_segments
from nddrify.tasks import TracedSet
from nddrify.tracing import trace_model

from .errors import RecipeError

__all__ = [
    "add_single_shortcut",
    "load_shortcut_extras",
    "tie_modules",
    "tie_reducers",
    "shortcut_layers",
    "shortcut_param_groups",
]

_DECAYED = (nn.modules.conv._ConvNd, nn.Linear)


def add_single_shortcut(
    model: nn.Module,
    points: Any,
    example_input: torch.Tensor,
    resize_mode: str = "align_corners_false",
) -> fx.GraphModule:
    """``model`` as a GraphModule with the NDDR-Shortcut spliced in after its last point: the
    maps at ``points`` are resized to the last one's H×W, concatenated and reduced to its width
    (1×1 conv, BN, ReLU where the map was non-negative), and the result replaces the last map.

    Example:
        >>> import torch
        >>> from recipes.builders import demo_cnn
        >>> net = add_single_shortcut(demo_cnn(3), "auto", torch.zeros(1, 3, 32, 32))
        >>> net.shortcut.convs[0].weight.shape  # 16 + 32 + 64 channels → 64
        torch.Size([64, 112, 1, 1])
        >>> tuple(net(torch.randn(2, 3, 32, 32)).shape)
        (2, 3, 8, 8)
    """
    single = trace_model(model, example_input=example_input)
    if single.train_graph_module is not None:
        raise RecipeError(
            f"{type(model).__name__} traces to different train and eval graphs; the single-task "
            "shortcut needs one graph (use nn.Dropout modules instead of F.dropout)."
        )
    # planning pairs tasks: the one traced model stands in for both (traced once)
    traced = TracedSet((single, replace(single, task="task1")))
    plan = nddrify.plan(traced, points)
    level_points = [level.points[0] for level in plan.levels]
    segments = task_segments(
        single, plan.points("task0"), [p.name for p in level_points], train=False
    )
    last = len(plan.levels) - 1
    ir = RewriteIR((segments,), (Junction("across", last, "shortcut"),), as_dict=False, single=True)
    root = copy.deepcopy(model)
    layer = nddrify.Shortcut(
        resize_mode=resize_mode  # type: ignore[arg-type]
    ).build_across([replace(level, points=level.points[:1]) for level in plan.levels])
    root.add_module("shortcut", layer)
    graph = GraphWriter(ir, collapse=True, prefixes=[""]).emit()
    return fx.GraphModule(root, graph, class_name=type(model).__name__)


def load_shortcut_extras(
    target: nn.Module,
    extras: Mapping[str, torch.Tensor],
    index: int,
    note: Callable[[str], None],
    prefix: str = "shortcut.",
) -> int:
    """Copy a single-task shortcut's reducer (``shortcut.convs.0.…``) into task ``index``'s
    reducer of ``target`` (a single-task graph, or a fused model's shortcut layer with
    ``prefix=""``); returns the number of tensors copied (0: the reducer stays fresh, as when
    ``init_from`` is a non-shortcut single-task run).

    Example:
        >>> import torch
        >>> from recipes.builders import demo_cnn
        >>> net = add_single_shortcut(demo_cnn(3), "auto", torch.zeros(1, 3, 32, 32))
        >>> extras = {"shortcut.convs.0.weight": torch.ones(64, 112, 1, 1)}
        >>> load_shortcut_extras(net, extras, 0, print)
        task 0: 1 shortcut tensors from its single-task run
        1
        >>> bool(net.shortcut.convs[0].weight.eq(1).all())
        True
    """
    own = target.state_dict()
    loaded = 0
    for key, value in extras.items():
        if not key.startswith("shortcut."):
            continue
        parts = key[len("shortcut.") :].split(".")
        if len(parts) < 3 or parts[1] != "0":
            continue
        name = prefix + ".".join([parts[0], str(index), *parts[2:]])
        if name in own and own[name].shape == value.shape:
            own[name].copy_(value)
            loaded += 1
    if loaded:
        note(f"task {index}: {loaded} shortcut tensors from its single-task run")
    return loaded


def tie_modules(modules: Sequence[nn.Module], mode: str = "first") -> int:
    """Make the direct parameters of ``modules[1:]`` the same ``nn.Parameter`` objects as
    ``modules[0]``'s (``mode="average"``: set to the average of all first); buffers are copied
    (each module keeps its own: equal inputs keep them equal, and BatchNorm running statistics
    are updated once per module call, as one shared module's would be). Returns the number of
    parameters now shared.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> tie_modules([a, b]), a.weight is b.weight
        (6, True)
    """
    shared = 0
    for param_name, param in list(modules[0].named_parameters(recurse=False)):
        if mode == "average":
            with torch.no_grad():
                param.copy_(torch.stack([getattr(m, param_name) for m in modules]).mean(dim=0))
        for other in modules[1:]:
            setattr(other, param_name, param)
        shared += param.numel()
    for buffer_name, buffer in modules[0].named_buffers(recurse=False):
        for other in modules[1:]:
            getattr(other, buffer_name).copy_(buffer)
    return shared


def shortcut_layers(module: nn.Module) -> list[NDDRShortcutLayer]:
    """The NDDR-Shortcut layers inside ``module`` (one in a single-task or fused network)."""
    return [m for m in module.modules() if isinstance(m, NDDRShortcutLayer)]


def tie_reducers(layer: NDDRShortcutLayer, mode: str = "first") -> int:
    """Make ``layer``'s per-task reducers (1×1 conv and norm) one set of parameters, task 0's
    (or the average): the official Mult.-Shortcut's one reducer on the shared trunk. With tied
    trunks every task's reducer sees the same maps, so every task gets the same reduced map.
    Returns the number of parameters of the one reducer.

    Example:
        >>> layer = NDDRShortcutLayer([[8, 8], [16, 16]])
        >>> tie_reducers(layer), layer.convs[0].weight is layer.convs[1].weight
        (416, True)
        >>> sum(p.numel() for p in layer.parameters())  # (8 + 16) × 16 + 2 × 16
        416
    """
    shared = tie_modules(list(layer.convs), mode)
    return shared + tie_modules(list(layer.norms), mode)


def shortcut_param_groups(
    module: nn.Module,
    groups: Sequence[dict[str, Any]],
    *,
    lr: float,
    weight_decay: float,
    lr_mult: float,
) -> list[dict[str, Any]]:
    """``groups`` (from :func:`nddrify.param_groups`) with the shortcut reducers' parameters
    moved into their own groups at ``lr_mult`` × ``lr``: ``shortcut`` (1×1 weights, decayed)
    and ``shortcut_no_decay`` (norm affine). Emptied groups are dropped; fusion groups lose
    their ``_x<mult>`` suffix when one multiplier is left among them.

    Example: see the module docstring (``groups=[]``: only the reducers' groups).
    """
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in shortcut_layers(module):
        for sub in layer.modules():
            for name, param in sub.named_parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                is_decayed = isinstance(sub, _DECAYED) and name == "weight"
                (decayed if is_decayed else undecayed).append(param)
    kept = []
    for group in groups:
        params = [p for p in group["params"] if id(p) not in seen]
        if params:
            kept.append({**group, "params": params})
    fusion = [g for g in kept if g["name"].startswith("fusion")]
    if len({g["lr_mult"] for g in fusion}) == 1:
        for group in fusion:
            group["name"] = group["name"].split("_x")[0]
    for name, params, decay in (
        ("shortcut", decayed, weight_decay),
        ("shortcut_no_decay", undecayed, 0.0),
    ):
        if params:
            kept.append(
                {
                    "params": params,
                    "lr": lr * lr_mult,
                    "weight_decay": decay,
                    "lr_mult": lr_mult,
                    "name": name,
                }
            )
    return kept
