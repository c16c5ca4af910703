"""Stage ends: where one stage of the backbone hands over to the next.

A stage ends at the last block before a block that reduces the resolution, after a pooling op,
and before a projection block that widens the network without striding (dilated ResNets); see
:func:`stage_ends` for the rules. :func:`stage_module` names a stage end after the module that
finishes there.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..tracing import QUALNAME
from .nodes import has_parameters, is_noop, is_pool, module_ancestors, module_of, tensor_inputs
from .spine import feature_shape, is_feature_map, spine

__all__ = ["stage_ends", "stage_module"]


class _Modules:
    """Which module each node ran in, and which modules end at which node."""

    def __init__(self, graph: fx.Graph) -> None:
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.first: dict[str, fx.Node] = {}
        self.last: dict[str, fx.Node] = {}
        self.size: dict[str, int] = {}
        self.calls: dict[str, int] = {}  # how often each leaf module is called
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
            if node.op in ("placeholder", "output"):
                continue
            for module in self.ancestors(node):
                self.first.setdefault(module, node)
                self.last[module] = node
                self.size[module] = self.size.get(module, 0) + 1

    @staticmethod
    def ancestors(node: fx.Node) -> list[str]:
        """Module paths containing ``node``, outermost first (a leaf module call included)."""
        return module_ancestors(node)

    @staticmethod
    def ancestors_of_module(module: str) -> list[str]:
        """The modules holding ``module``, root excluded (``a``, ``a.b`` for ``a.b.c``)."""
        parts = module.split(".")[:-1]
        return [".".join(parts[: i + 1]) for i in range(len(parts))]

    def ending_at(self, node: fx.Node) -> list[str]:
        return [m for m in self.ancestors(node) if self.last.get(m) is node]


def _stage_end(run: Sequence[fx.Node], transition: fx.Node | None, modules: _Modules) -> fx.Node:
    """The node in ``run`` (spine nodes at one resolution) where the stage before ``transition``
    ends. The largest module that finishes in the run and does not contain the transition names
    the level of the stages (``layer1``, ``blocks.0``, ``features.conv2_1``); the stage ends at the
    last node before the transition where a module of that level (a sibling) finishes: the last
    block before the next downsampling, not the strided first block of the run.
    ``transition=None`` means the end of the network."""
    around = set(modules.ancestors(transition)) if transition is not None else set()
    limit = modules.order[transition] if transition is not None else None
    before = [n for n in run if limit is None or modules.order[n] < limit]
    best, best_size, best_module = run[-1], 0, None
    for node in before:
        ended = [m for m in modules.ending_at(node) if m not in around]
        if not ended:
            continue
        module = max(ended, key=lambda m: (modules.size[m], -m.count(".")))
        if modules.size[module] >= best_size:
            best, best_size, best_module = node, modules.size[module], module
    if best_module is not None:
        level = _parent(best_module)
        # When the winner only ends here with the downsampling that produced this resolution
        # (its nodes in the run all lie in its last child), a run of residual blocks opening the
        # module that goes on to downsample ends the stage (EfficientViM's ``stages.1.blocks``
        # after ``stages.0.downsample`` and before ``stages.1.downsample``).
        mine = [n for n in before if best_module in modules.ancestors(n)]
        opening = _child(mine[0], best_module, modules) == _child(best, best_module, modules)
        for node in before[before.index(best) + 1 :]:
            for m in modules.ending_at(node):
                if m in around:
                    continue
                inner = opening and _parent(m) in around and _merges(m, modules) >= 2
                if _parent(m) == level or inner:
                    best = node
                    break
    return _skip_noops_backwards(best)


def _child(node: fx.Node, module: str, modules: _Modules) -> str | None:
    """The child of ``module`` holding ``node`` (None when ``node`` is ``module``'s own call)."""
    below = [m for m in modules.ancestors(node) if _parent(m) == module]
    return below[0] if below else None


def _merges(module: str, modules: _Modules) -> int:
    """How many sums, products or concats of two or more feature maps ``module`` holds."""
    lo, hi = modules.order[modules.first[module]], modules.order[modules.last[module]]
    count = 0
    for node in modules.first[module].graph.nodes:
        i = modules.order[node]
        if i > hi:
            break
        if i >= lo and (_is_add(node) or _is_merge(node)):
            count += sum(is_feature_map(n) for n in tensor_inputs(node)) >= 2
    return count


def _skip_noops_backwards(node: fx.Node) -> fx.Node:
    while is_noop(node) and node.args and isinstance(node.args[0], fx.Node):
        if not is_feature_map(node.args[0]):
            break
        node = node.args[0]
    return node


def _parent(module: str) -> str:
    return module.rpartition(".")[0]


def _stage_parents(points: Sequence[fx.Node], modules: _Modules) -> list[str]:
    """Modules whose children the points end, most voted first (then the deepest): the first is
    the module holding the stages (``"features"``, ``"backbone"``, ``""``)."""
    votes: dict[str, int] = {}
    for node in points:
        for parent in {_parent(m) for m in modules.ending_at(node)}:
            votes[parent] = votes.get(parent, 0) + 1
    return sorted(votes, key=lambda p: (votes[p], p.count(".")), reverse=True)


def _votes(parent: str, points: Sequence[fx.Node], modules: _Modules) -> int:
    """How many of the points end a child of ``parent``."""
    return sum(any(_parent(m) == parent for m in modules.ending_at(n)) for n in points)


def _stage_parent(points: Sequence[fx.Node], modules: _Modules) -> str | None:
    """The module whose children most of the points end (``"features"``, ``"backbone"``, ``""``)."""
    parents = _stage_parents(points, modules)
    return parents[0] if parents else None


def _final_stage_end(
    run: Sequence[fx.Node], points: Sequence[fx.Node], modules: _Modules
) -> fx.Node:
    """End of the deepest stage: the last module in ``run`` that is a sibling of the earlier
    stages (so a segmentation head after the backbone is not taken for a stage). When the modules
    ending at the earlier stage ends leave the level ambiguous (one earlier stage whose block,
    stage and stage list all end at one node: equal votes), the last node after the last stage
    end that ends a child of a tied level or of a module above them (the root excluded) wins."""
    parents = _stage_parents(points, modules)
    if parents:
        best = _votes(parents[0], points, modules)
        top = {p for p in parents if _votes(p, points, modules) == best}
        levels = top | {a for p in top for a in modules.ancestors_of_module(p)}
        if parents[0] in {_parent(m) for n in run[1:] for m in modules.ending_at(n)}:
            levels = {parents[0]}  # the stage list continues: its last child ends the trunk
        for node in reversed(run[1:]):
            if any(_parent(m) in levels for m in modules.ending_at(node)):
                return _skip_noops_backwards(node)
    if parents and run and any(_parent(m) == parents[0] for m in modules.ending_at(run[0])):
        return _skip_noops_backwards(run[0])
    return _stage_end(run, None, modules)


def _ending_with_noops(node: fx.Node, modules: _Modules) -> list[str]:
    """Modules ending at ``node`` or at the no-ops right after it (an ``aa`` Identity, a
    ``contiguous``), outermost first per node."""
    ended = modules.ending_at(node)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_noop(user) or tensor_inputs(user) != [node]:
            break
        ended += [m for m in modules.ending_at(user) if m not in ended]
        node = user
    return ended


def stage_module(node: fx.Node, points: Sequence[fx.Node], graph: fx.Graph) -> str:
    """A readable name for a stage end: the stage module that ends at ``node`` (``"layer1"`` for
    ``layer1.2.relu_2``), or the node's own name when no module ends there."""
    modules = _Modules(graph)
    # Only a module that ends exactly here names the point: its name must resolve back to this
    # node (a module ending in a dropout after it resolves to the dropout).
    ended = modules.ending_at(node)
    votes: dict[str, int] = {}
    for point in points:
        for parent in {_parent(m) for m in _ending_with_noops(point, modules)}:
            votes[parent] = votes.get(parent, 0) + 1
    if votes:
        parent = max(votes, key=lambda p: (votes[p], p.count(".")))
        for module in ended:
            if _parent(module) == parent:
                return module
    return ended[0] if ended else node.meta[QUALNAME]


def _region(start: fx.Node, end: fx.Node, modules: _Modules) -> list[fx.Node]:
    """Nodes strictly between two spine nodes in execution order that depend on ``start``."""
    lo, hi = modules.order[start], modules.order[end]
    inside: set[fx.Node] = {start}
    out = []
    for node in start.graph.nodes:
        i = modules.order[node]
        if i <= lo:
            continue
        if i > hi:
            break
        if any(n in inside for n in node.all_input_nodes):
            inside.add(node)
            out.append(node)
    return out


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function" and node.target in {operator.add, operator.iadd, torch.add}
    ) or (node.op == "call_method" and node.target in {"add", "add_"})


def _projection(start: fx.Node, end: fx.Node, modules: _Modules) -> fx.Node | None:
    """The first parametrised node of a residual block whose shortcut is a projection (two or more
    parametrised paths from ``start`` summed into ``end``) and that changes the width, else None."""
    if feature_shape(start)[1] == feature_shape(end)[1] or not _is_add(end):
        return None
    region = _region(start, end, modules)
    users = [u for u in start.users if u in set(region)]
    parametrised_paths = 0
    for user in users:
        reach = {user}
        for node in region:
            if node in reach or any(n in reach for n in node.all_input_nodes):
                reach.add(node)
        if any(has_parameters(n) for n in reach if n is not end):
            parametrised_paths += 1
    if parametrised_paths < 2:
        return None
    return next((n for n in region if has_parameters(n)), None)


def _first_downsampling(start: fx.Node, end: fx.Node, modules: _Modules) -> fx.Node:
    area = feature_shape(start)[2] * feature_shape(start)[3]
    for node in _region(start, end, modules):
        shape = feature_shape(node)
        if shape is not None and shape[2] * shape[3] < area:
            return node
    return end


def _pool_chain_end(node: fx.Node, spine_nodes: Sequence[fx.Node]) -> fx.Node:
    index = spine_nodes.index(node)
    while index + 1 < len(spine_nodes):
        nxt = spine_nodes[index + 1]
        if is_pool(nxt) and nxt.args and nxt.args[0] is spine_nodes[index]:
            index += 1
        else:
            break
    return spine_nodes[index]


def _is_dilated(node: fx.Node) -> bool:
    module = module_of(node)
    if isinstance(module, nn.Conv2d):
        return any(d > 1 for d in module.dilation)
    if node.op == "call_function" and node.target in {F.conv2d, torch.conv2d}:
        dilation = node.args[5] if len(node.args) > 5 else node.kwargs.get("dilation", 1)
        return any(d > 1 for d in (dilation if isinstance(dilation, (tuple, list)) else [dilation]))
    return False


def _outermost_ended(node: fx.Node, modules: _Modules) -> str | None:
    """The outermost module that ends at ``node`` or at the no-ops right after it."""
    ended = list(modules.ending_at(node))
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not is_noop(user) or tensor_inputs(user) != [node]:
            break
        ended += modules.ending_at(user)
        node = user
    return min(ended, key=lambda m: m.count(".")) if ended else None


def _has_skip_merge(module: str, modules: _Modules) -> bool:
    """True when ``module`` holds a block with a skip connection: a sum, product or concat of
    feature maps one of which feeds the other (a residual or dense block), as opposed to a plain
    conv chain or parallel conv branches summed together."""
    lo, hi = modules.order[modules.first[module]], modules.order[modules.last[module]]
    for node in modules.first[module].graph.nodes:
        i = modules.order[node]
        if i < lo:
            continue
        if i > hi:
            break
        inputs = [n for n in tensor_inputs(node) if is_feature_map(n)]
        if len(inputs) < 2 or not (_is_add(node) or _is_merge(node)):
            continue
        for later in inputs:
            seen, stack = set(), [later]
            while stack:
                current = stack.pop()
                if current in seen or modules.order.get(current, -1) < lo - 1:
                    continue
                seen.add(current)
                if current is not later and current in inputs:
                    return True
                stack.extend(current.all_input_nodes)
    return False


def _is_merge(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in {operator.mul, torch.mul, torch.cat, torch.concat}
    return node.op == "call_method" and node.target in {"mul", "mul_"}


def _deep_modules(
    nodes: Sequence[fx.Node], first: Sequence[fx.Node], modules: _Modules
) -> set[str]:
    """Lists of stages: modules holding a spine node at the final stage end's resolution and a
    first-pass stage end at another resolution (``stages``, ``features``). They reach the deepest
    stage even when the final stage end lies outside them (a ``conv_head`` after ``stages``); a
    stem does not, nor does a module that only pools into the deepest resolution (DenseNet's
    last ``transition``)."""
    deep = feature_shape(first[-1])[2:]
    reach = {m for n in nodes if feature_shape(n)[2:] == deep for m in modules.ancestors(n)}
    earlier = {m for n in first if feature_shape(n)[2:] != deep for m in modules.ancestors(n)}
    return reach & earlier


def _is_inner_part(
    node: fx.Node, final: fx.Node, modules: _Modules, deep: Collection[str] = frozenset()
) -> bool:
    """True when ``node`` ends only a piece of a module that stops short of the final stage
    (a conv inside a multi-conv stem, the pool that opens a stage): the outermost module ending
    at ``node`` (for a pool, the pool itself) sits in a parent other than the root that does not
    reach the final stage end nor its resolution (a stem, not a list of stages followed by a
    ``conv_head``), and is not itself a block with a skip connection."""
    outer = _outermost_ended(node, modules)
    if is_pool(node) and node.op == "call_module":
        outer = str(node.target)
        parent = _parent(outer)
        if parent and modules.first.get(parent) is node and modules.last.get(parent) is not node:
            return True  # the pool that opens a stage (VoVNet's ``stages.1.pool``)
        if modules.calls.get(outer, 0) > 1:
            return True  # a pool module shared by several stages (a U-Net's ``pool``)
    if outer is None:
        return False
    parent = _parent(outer)
    if parent == "" or parent in modules.ancestors(final) or parent in deep:
        return False
    return not _has_skip_merge(outer, modules)


def _collect_stage_ends(
    nodes: Sequence[fx.Node],
    modules: _Modules,
    final: fx.Node | None,
    dilated: bool,
    deep: Collection[str] = frozenset(),
) -> list[fx.Node]:
    points: list[fx.Node] = []

    def run_before(index: int) -> list[fx.Node]:
        """Spine nodes at the resolution of ``nodes[index]`` since the last stage end."""
        shape = feature_shape(nodes[index])[2:]
        start = index
        while (
            start > 0
            and feature_shape(nodes[start - 1])[2:] == shape
            and nodes[start - 1] not in points
        ):
            start -= 1
        return list(nodes[start : index + 1])

    def accept(node: fx.Node | None) -> bool:
        if node is None or node.op == "placeholder":
            return False
        return final is None or not _is_inner_part(node, final, modules, deep)

    for i in range(len(nodes) - 1):
        a, b = nodes[i], nodes[i + 1]
        area_a = feature_shape(a)[2] * feature_shape(a)[3]
        area_b = feature_shape(b)[2] * feature_shape(b)[3]
        direct_pool = is_pool(b) and bool(b.args) and b.args[0] is a
        candidate = None
        if direct_pool:
            candidate = _pool_chain_end(b, nodes)
            if not accept(candidate) and area_b < area_a:
                candidate = _stage_end(run_before(i), b, modules)
        elif area_b < area_a:
            transition = _first_downsampling(a, b, modules)
            run = run_before(i)
            candidate = _stage_end(run, transition, modules)
            while not accept(candidate) and candidate in run[:-1]:
                # A piece of a stem won; look for a stage end after it.
                run = run[run.index(candidate) + 1 :]
                candidate = _stage_end(run, transition, modules)
        elif area_b == area_a and dilated:
            projection = _projection(a, b, modules)
            if projection is not None:
                candidate = _stage_end(run_before(i), projection, modules)
        if accept(candidate) and candidate not in points:
            points.append(candidate)
    final_run = list(nodes[nodes.index(points[-1]) :]) if points else list(nodes)
    points.append(_final_stage_end(final_run, points, modules))
    return points


def stage_ends(graph: fx.Graph) -> list[fx.Node]:
    """The automatic fusion points: the end of every backbone stage, in execution order.

    A stage ends (1) before a block that lowers the resolution, or right after the lowering when
    it is a parameter-free pool on the spine (VGG's pools); (2) after any pooling op on the spine,
    even one with stride 1 (DeepLab's pool4 and pool5); (3) in networks with dilated convolutions,
    before a block that changes the width through two or more parametrised paths (the projection
    blocks of dilated ResNets, which replace a stride); (4) at the end of the deepest stage. Where
    a stage end falls inside a run of same-resolution nodes, the largest module that finishes there
    names the level of the stages (``layer1`` rather than its last ReLU's neighbours; ``stages.0``
    rather than the next stage's leading norm) and the stage ends at the last module of that level
    before the next downsampling (DPN's ``conv2_3``, not the strided ``conv2_1``). The spine
    excludes padding ops, side branches (gates, SE, attention maps, pyramids) and the head
    (:mod:`.spine`), so none of them yields a stage end.

    A candidate is dropped when the outermost module ending there is only a piece of a non-root
    module that stops short of the final stage (the first conv of a two-conv ``stem``, the pool
    that opens ``stages.1``): stages are cut between modules of the backbone's own level, not
    inside a stem or a stage. A dropped pool falls back to the stage end before it.
    """
    nodes = spine(graph)
    if not nodes:
        return []
    modules = _Modules(graph)
    dilated = any(_is_dilated(n) for n in graph.nodes)
    first = _collect_stage_ends(nodes, modules, None, dilated)
    deep = _deep_modules(nodes, first, modules)
    points = _collect_stage_ends(nodes, modules, first[-1], dilated, deep)

    seen: set[fx.Node] = set()
    ordered = []
    for node in sorted(points, key=modules.order.__getitem__):
        if node not in seen and node.op != "placeholder":
            seen.add(node)
            ordered.append(node)
    return ordered
