"""Property-based tests: fuse random small CNNs and check fuse's invariants on each.

A hypothesis strategy draws a *specification* of a small CNN (:class:`NetSpec`: a stem, stages of
blocks, a head) and :class:`GeneratedCNN` builds a real, fx-traceable ``nn.Module`` from it. The
blocks cover conv-norm-act (1×1, 3×3, 5×5, dilated, depthwise, channel changes), residual blocks
(identity or projection shortcut, post- or pre-activation), branching blocks (two or three parallel
paths merged by add, ``sum`` or concat), pooling (max/avg, stride 1 or 2, module or functional) and
no-ops (``nn.Identity``, a same-size adaptive pool); stages may start with a stride-2 transition,
and the head is a global pool + linear or a 1×1 conv dense head, returning one tensor, a tuple, a
list or a dict.

For every drawn net, K ∈ {2, 3} models are built with different seeds (or, in the heterogeneous
property, from different specs sharing one stride schedule) and fused, and we check:

1. identity at init (``init=(1, 0)``, no norm, no activation) in eval and train mode;
2. gradients: the default fusion in train mode gives every parameter a gradient and every fusion
   layer's 1×1 weights a nonzero one; the originals get none;
3. the fused outputs have the originals' structure (types, keys, shapes);
4. ``nddrify.plan`` is deterministic, its automatic points are the candidates marked ``auto``, in
   execution order, with one spatial size per level;
5. neither planning nor fusing nor running the fused model touches the originals (weights,
   buffers, per-module train/eval flags).

A failed auto plan (PointError) is accepted only for a net without any spatial feature map.
Three nddrify bugs these properties found (an in-place op on a fused map broke training; the graph
output was offered as a candidate; fusion outputs were views, so identity at init was not
bit-exact) are fixed; regression tests for them are at the end of this file.

The default run draws 25 nets per property; ``-m slow`` runs 300.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import nddrify
from nddrify.layers import NDDRLayer
from nddrify.pairing import output_stride, pair_by_stride

from .test_fuse import _flatten, max_identity_diff

ATOL = 1e-5
IDENTITY = {"init": (1.0, 0.0), "norm": None, "activation": None}
DICT_TASKS = ("seg", "depth", "normal")
ACTIVATIONS = ("relu", "relu_inplace", "f_relu", "relu6", "gelu", "none")

FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
SLOW = settings(FAST, max_examples=300)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run much faster on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Specifications
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    """Conv → optional BatchNorm → activation. ``depthwise`` means groups = cin = out."""

    cin: int
    out: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    depthwise: bool = False
    norm: bool = True
    act: str = "relu"


@dataclass(frozen=True)
class PoolSpec:
    cin: int
    op: str  # "max" | "avg"
    kernel: int  # 3 (padding 1) or 2 (stride 2, even sizes only)
    stride: int
    functional: bool

    @property
    def out(self) -> int:
        return self.cin


@dataclass(frozen=True)
class NoopSpec:
    cin: int
    kind: str  # "identity" | "adaptive" (an adaptive average pool to the same size)
    size: int

    @property
    def out(self) -> int:
        return self.cin


@dataclass(frozen=True)
class ResidualSpec:
    """A basic residual block: two 3×3 convs plus a shortcut.

    ``preact``: BN-act before each conv and no activation after the sum (ResNet v2), else conv-BN
    with the activation after the sum (ResNet v1). The shortcut is a 1×1 conv (+BN) projection when
    ``projection`` is set or the stride or width changes, else the identity.
    """

    cin: int
    out: int
    mid: int
    stride: int
    preact: bool
    projection: bool
    norm: bool
    act: str
    add: str  # "operator" | "torch"

    @property
    def projects(self) -> bool:
        return self.projection or self.stride != 1 or self.cin != self.out


@dataclass(frozen=True)
class BranchSpec:
    """Two or three parallel paths from one input, merged by ``add``, ``sum`` or ``cat``.

    An empty path is the identity.
    """

    cin: int
    paths: tuple[tuple[ConvSpec | PoolSpec, ...], ...]
    merge: str  # "add" | "sum" | "cat"
    act: str

    @property
    def out(self) -> int:
        widths = [path[-1].out if path else self.cin for path in self.paths]
        return sum(widths) if self.merge == "cat" else widths[0]


BlockSpec = ConvSpec | PoolSpec | NoopSpec | ResidualSpec | BranchSpec


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # "linear" (global pool + linear) | "dense" (1×1 conv map)
    pool: str  # "module" | "functional" | "mean" | "max" (for "linear")
    outputs: str  # "tensor" | "tuple" | "list" | "dict"
    aux_from: str  # "final" | "stage" (the first stage's features: a skip to the output)
    classes: int


@dataclass(frozen=True)
class Schedule:
    """What two heterogeneous nets share: input size and where the resolution drops."""

    size: int
    stem_stride: int
    strides: tuple[int, ...]  # stride of each stage's first block


@dataclass(frozen=True)
class NetSpec:
    size: int
    stem: tuple[ConvSpec, ...]
    stages: tuple[tuple[BlockSpec, ...], ...]
    head: HeadSpec
    flat: bool  # one nn.Sequential "features" (VGG-style) instead of stem + stages


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

WIDTHS = st.integers(2, 16)
ACTS = st.sampled_from(ACTIVATIONS)


def _down(size: int, stride: int) -> int:
    """Output size of every strided op the strategy uses (they all round up)."""
    return math.ceil(size / stride)


@st.composite
def conv_specs(draw, cin: int, stride: int, kind: str | None = None) -> ConvSpec:
    kind = kind or draw(st.sampled_from(["conv", "dilated", "depthwise", "pointwise"]))
    norm, act = draw(st.booleans()), draw(ACTS)
    if kind == "depthwise":
        return ConvSpec(cin, cin, 3, stride, 1, True, norm, act)
    out = draw(WIDTHS)
    if kind == "dilated":
        return ConvSpec(cin, out, 3, stride, draw(st.sampled_from([2, 3])), False, norm, act)
    kernel = 1 if kind == "pointwise" else draw(st.sampled_from([1, 3, 5]))
    return ConvSpec(cin, out, kernel, stride, 1, False, norm, act)


@st.composite
def pool_specs(draw, cin: int, stride: int, size: int) -> PoolSpec:
    op, functional = draw(st.sampled_from(["max", "avg"])), draw(st.booleans())
    kernel = 3
    if stride == 2 and size % 2 == 0 and draw(st.booleans()):
        kernel = 2  # floor(size / 2) == ceil(size / 2) only for even sizes
    return PoolSpec(cin, op, kernel, stride, functional)


@st.composite
def residual_specs(draw, cin: int, stride: int) -> ResidualSpec:
    out = cin if draw(st.booleans()) else draw(WIDTHS)
    return ResidualSpec(
        cin=cin,
        out=out,
        mid=draw(WIDTHS),
        stride=stride,
        preact=draw(st.booleans()),
        projection=draw(st.booleans()),
        norm=draw(st.booleans()),
        act=draw(ACTS),
        add=draw(st.sampled_from(["operator", "torch"])),
    )


@st.composite
def branch_specs(draw, cin: int, stride: int) -> BranchSpec:
    merge = draw(st.sampled_from(["add", "sum", "cat"]))
    count = draw(st.integers(2, 3))
    width = draw(st.integers(2, 8))
    paths = []
    for _ in range(count):
        kinds = ["conv", "dilated", "conv-conv", "pool-conv", "depthwise-pointwise"]
        if stride == 1 and (merge == "cat" or width == cin):
            kinds.append("identity")
        kind = draw(st.sampled_from(kinds))
        if kind == "identity":
            paths.append(())
            continue
        if kind == "pool-conv":
            first: ConvSpec | PoolSpec = PoolSpec(
                cin, draw(st.sampled_from(["max", "avg"])), 3, stride, False
            )
        elif kind == "depthwise-pointwise":
            first = draw(conv_specs(cin, stride, "depthwise"))
        else:
            first = draw(conv_specs(cin, stride, "dilated" if kind == "dilated" else "conv"))
        path = [first]
        if kind != "conv" and kind != "dilated":
            path.append(
                draw(conv_specs(first.out, 1, "conv" if kind == "conv-conv" else "pointwise"))
            )
        if merge != "cat" and path[-1].out != width:
            path[-1] = dataclasses.replace(path[-1], out=width, depthwise=False)
        paths.append(tuple(path))
    return BranchSpec(cin, tuple(paths), merge, draw(ACTS))


@st.composite
def block_specs(draw, cin: int, stride: int, size: int) -> BlockSpec:
    kinds = ["conv", "residual", "branch", "pool", "dilated", "depthwise", "widen"]
    if stride == 1:
        kinds.append("noop")
    kind = draw(st.sampled_from(kinds))
    if kind == "residual":
        return draw(residual_specs(cin, stride))
    if kind == "branch":
        return draw(branch_specs(cin, stride))
    if kind == "pool":
        return draw(pool_specs(cin, stride, size))
    if kind == "noop":
        return NoopSpec(cin, draw(st.sampled_from(["identity", "adaptive"])), size)
    conv_kind = {"conv": "conv", "dilated": "dilated", "depthwise": "depthwise"}.get(kind)
    return draw(conv_specs(cin, stride, conv_kind or "pointwise"))


@st.composite
def schedules(draw) -> Schedule:
    size = draw(st.integers(16, 32))
    stem_stride = draw(st.sampled_from([1, 2]))
    current, strides = _down(size, stem_stride), []
    for _ in range(draw(st.integers(1, 4))):
        stride = draw(st.sampled_from([1, 2])) if current >= 2 else 1
        strides.append(stride)
        current = _down(current, stride)
    return Schedule(size, stem_stride, tuple(strides))


@st.composite
def head_specs(draw) -> HeadSpec:
    outputs = draw(st.sampled_from(["tensor", "tensor", "tuple", "list", "dict"]))
    return HeadSpec(
        kind=draw(st.sampled_from(["linear", "dense"])),
        pool=draw(st.sampled_from(["module", "functional", "mean", "max"])),
        outputs=outputs,
        aux_from=draw(st.sampled_from(["final", "stage"])),
        classes=draw(st.integers(1, 5)),
    )


@st.composite
def net_specs(draw, schedule: Schedule | None = None) -> NetSpec:
    schedule = schedule or draw(schedules())
    cin, size = 3, schedule.size
    stem = []
    for i in range(draw(st.integers(1, 2))):
        spec = draw(conv_specs(cin, schedule.stem_stride if i == 0 else 1, "conv"))
        if i == 0 and spec.kernel == 1:  # a 1×1 stride-2 stem would skip pixels; keep it 3×3
            spec = dataclasses.replace(spec, kernel=3)
        stem.append(spec)
        cin = spec.out
    size = _down(size, schedule.stem_stride)
    stages = []
    for stride in schedule.strides:
        blocks = []
        for j in range(draw(st.integers(1, 3))):
            block = draw(block_specs(cin, stride if j == 0 else 1, size))
            blocks.append(block)
            cin = block.out
            size = _down(size, stride if j == 0 else 1)
        stages.append(tuple(blocks))
    head = draw(head_specs())
    return NetSpec(schedule.size, tuple(stem), tuple(stages), head, draw(st.booleans()))


@dataclass(frozen=True)
class SameSpecCase:
    spec: NetSpec
    k: int
    as_dict: bool
    batch: int
    seed: int


@st.composite
def same_spec_cases(draw) -> SameSpecCase:
    return SameSpecCase(
        spec=draw(net_specs()),
        k=draw(st.sampled_from([2, 2, 3])),
        as_dict=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class MixedCase:
    specs: tuple[NetSpec, ...]
    as_dict: bool
    batch: int
    seed: int


@st.composite
def mixed_cases(draw) -> MixedCase:
    schedule = draw(schedules())
    k = draw(st.sampled_from([2, 2, 3]))
    return MixedCase(
        specs=tuple(draw(net_specs(schedule)) for _ in range(k)),
        as_dict=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------


def _activation(name: str) -> nn.Module | None:
    return {
        "relu": nn.ReLU,
        "relu_inplace": lambda: nn.ReLU(inplace=True),
        "relu6": nn.ReLU6,
        "gelu": nn.GELU,
    }.get(name, lambda: None)()


class Act(nn.Module):
    """Applies a named activation; ``f_relu`` calls ``F.relu`` (a function node, not a module)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.module = _activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        if self.name == "f_relu":
            return F.relu(x)
        return x


class ConvNormAct(nn.Module):
    """Conv-BN-activation with the activation called as a function (``F.relu``)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module | None, act: str) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, norm, Act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


def build_conv(spec: ConvSpec) -> nn.Module:
    padding = spec.dilation * (spec.kernel - 1) // 2
    conv = nn.Conv2d(
        spec.cin,
        spec.out,
        spec.kernel,
        spec.stride,
        padding,
        dilation=spec.dilation,
        groups=spec.cin if spec.depthwise else 1,
        bias=not spec.norm,
    )
    norm = nn.BatchNorm2d(spec.out) if spec.norm else None
    if spec.act == "f_relu":
        return ConvNormAct(conv, norm, spec.act)
    layers = [conv, norm, _activation(spec.act)]
    layers = [m for m in layers if m is not None]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class FunctionalPool(nn.Module):
    def __init__(self, spec: PoolSpec) -> None:
        super().__init__()
        self.op, self.kernel, self.stride = spec.op, spec.kernel, spec.stride
        self.padding = 1 if spec.kernel == 3 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding)


def build_pool(spec: PoolSpec) -> nn.Module:
    if spec.functional:
        return FunctionalPool(spec)
    padding = 1 if spec.kernel == 3 else 0
    cls = nn.MaxPool2d if spec.op == "max" else nn.AvgPool2d
    return cls(spec.kernel, spec.stride, padding)


class ResidualBlock(nn.Module):
    def __init__(self, spec: ResidualSpec) -> None:
        super().__init__()
        self.spec = spec
        s = spec

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if s.norm else nn.Identity()

        self.conv1 = nn.Conv2d(s.cin, s.mid, 3, s.stride, 1, bias=not s.norm)
        self.conv2 = nn.Conv2d(s.mid, s.out, 3, 1, 1, bias=not s.norm)
        if s.preact:
            self.bn1, self.bn2 = norm(s.cin), norm(s.mid)
        else:
            self.bn1, self.bn2 = norm(s.mid), norm(s.out)
        self.act = Act(s.act)  # one module called twice, like torchvision's ResNet
        self.shortcut = None
        if s.projects:
            layers = [nn.Conv2d(s.cin, s.out, 1, s.stride, bias=not s.norm)]
            if s.norm:
                layers.append(nn.BatchNorm2d(s.out))
            self.shortcut = nn.Sequential(*layers)

    def _add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.add(a, b) if self.spec.add == "torch" else a + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.preact:
            out = self.act(self.bn1(x))
            identity = x if self.shortcut is None else self.shortcut(out)
            out = self.conv2(self.act(self.bn2(self.conv1(out))))
            return self._add(out, identity)
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(self._add(out, identity))


class BranchBlock(nn.Module):
    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        self.merge = spec.merge
        self.paths = nn.ModuleList(
            nn.Sequential(*(build_block(op) for op in path)) if path else nn.Identity()
            for path in spec.paths
        )
        self.act = Act(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [path(x) for path in self.paths]
        if self.merge == "cat":
            merged = torch.cat(outs, dim=1)
        elif self.merge == "sum":
            merged = sum(outs)
        else:
            merged = outs[0]
            for out in outs[1:]:
                merged = merged + out
        return self.act(merged)


def build_block(spec: BlockSpec) -> nn.Module:
    if isinstance(spec, ConvSpec):
        return build_conv(spec)
    if isinstance(spec, PoolSpec):
        return build_pool(spec)
    if isinstance(spec, NoopSpec):
        return nn.Identity() if spec.kind == "identity" else nn.AdaptiveAvgPool2d(spec.size)
    if isinstance(spec, ResidualSpec):
        return ResidualBlock(spec)
    return BranchBlock(spec)


class Head(nn.Module):
    def __init__(self, spec: HeadSpec, width: int, tap_width: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "linear":
            if spec.pool == "module":
                self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            elif spec.pool == "max":
                self.pool = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Linear(width, spec.classes)
        else:
            self.classifier = nn.Conv2d(width, spec.classes, 1)
        if spec.outputs != "tensor":
            aux_width = tap_width if spec.aux_from == "stage" else width
            if spec.kind == "linear":
                self.aux = nn.Linear(aux_width, 2)
            else:
                self.aux = nn.Conv2d(aux_width, 2, 1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.pool == "module":
            return self.pool(x)
        if self.spec.pool == "max":
            return self.pool(x).flatten(1)
        if self.spec.pool == "functional":
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor, tapped: torch.Tensor):
        main = self.fc(self._pool(x)) if self.spec.kind == "linear" else self.classifier(x)
        if self.spec.outputs == "tensor":
            return main
        source = tapped if self.spec.aux_from == "stage" else x
        aux = self.aux(source.mean((2, 3))) if self.spec.kind == "linear" else self.aux(source)
        if self.spec.outputs == "tuple":
            return main, aux
        if self.spec.outputs == "list":
            return [main, aux]
        return {"out": main, "aux": aux}


class GeneratedCNN(nn.Module):
    """The nn.Module a :class:`NetSpec` describes; its forward has no data-dependent control flow."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.flat = spec.flat
        stem = [build_conv(c) for c in spec.stem]
        stages = [[build_block(b) for b in blocks] for blocks in spec.stages]
        width = (spec.stages[-1][-1] if spec.stages else spec.stem[-1]).out
        tap_width = spec.stages[0][-1].out
        if spec.flat:
            layers: list[nn.Module] = []
            for module in [*stem, *stages[0]]:
                layers += list(module) if type(module) is nn.Sequential else [module]
            self.tap = len(layers) - 1  # the end of the first stage feeds the auxiliary head
            for blocks in stages[1:]:
                for module in blocks:
                    layers += list(module) if type(module) is nn.Sequential else [module]
            self.features = nn.Sequential(*layers)
        else:
            self.stem = stem[0] if len(stem) == 1 else nn.Sequential(*stem)
            self.stages = nn.Sequential(*(nn.Sequential(*blocks) for blocks in stages))
        self.head = Head(spec.head, width, tap_width)

    def forward(self, x: torch.Tensor):
        tapped = x
        if self.flat:
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i == self.tap:
                    tapped = x
        else:
            x = self.stem(x)
            for i, stage in enumerate(self.stages):
                x = stage(x)
                if i == 0:
                    tapped = x
        return self.head(x, tapped)


def build(spec: NetSpec, seed: int) -> GeneratedCNN:
    """Build ``spec`` with weights drawn from ``seed``; BatchNorm gets non-trivial statistics."""
    torch.manual_seed(seed)
    model = GeneratedCNN(spec)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def randomise_modes(models: list[nn.Module], seed: int) -> None:
    """Give every submodule a random train/eval flag (fuse must restore them exactly)."""
    rng = random.Random(seed)
    for model in models:
        for module in model.modules():
            module.training = rng.random() < 0.5


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def snapshot(models: list[nn.Module]) -> list[tuple[dict[str, torch.Tensor], dict[str, bool]]]:
    return [
        (
            {k: v.detach().clone() for k, v in m.state_dict().items()},
            {name: sub.training for name, sub in m.named_modules()},
        )
        for m in models
    ]


def assert_unchanged(models: list[nn.Module], before) -> None:
    for task, (model, (state, modes)) in enumerate(zip(models, before)):
        now = model.state_dict()
        assert list(now) == list(state), f"task {task}: state_dict keys changed"
        changed = [k for k, v in now.items() if not torch.equal(v, state[k])]
        assert changed == [], f"task {task}: fuse/plan changed {changed}"
        flags = {name: sub.training for name, sub in model.named_modules()}
        assert flags == modes, f"task {task}: train/eval flags changed"
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert grads == [], f"task {task}: the original got gradients {grads}"


def structure(value):
    """Type, keys and shapes of a (nested) model output."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return ("dict", tuple((k, structure(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(structure(v) for v in value))
    return (type(value).__name__,)


def has_spatial_feature_map(model: nn.Module, x: torch.Tensor) -> bool:
    """Independently of nddrify: does any conv/norm/pool output have more than one position?"""
    found = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            found.append(output.shape[-2] * output.shape[-1] > 1)

    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    model = copy.deepcopy(model).eval()
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return any(found)


def execution_order(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    traced = nddrify.tracing.trace_model(model, example_input=x)
    return {n.meta["qualname"]: i for i, n in enumerate(traced.graph.nodes)}


def point_nodes(plan: nddrify.Plan, task: int) -> list[str]:
    return [level.points[task].node for level in plan.levels]


def check_auto_plan(plan: nddrify.Plan, models: list[nn.Module], x: torch.Tensor) -> list:
    """Invariant 4 for ``points="auto"``; returns each task's candidates."""
    all_candidates = []
    assert len(plan.levels) >= 1
    for level in plan.levels:
        assert len({p.spatial for p in level.points}) == 1, level
        assert all(p.shape[2] * p.shape[3] > 1 for p in level.points), level
    for task, model in enumerate(models):
        candidates = nddrify.get_fusion_candidates(model, example_input=x)
        all_candidates.append(candidates)
        order = execution_order(model, x)
        positions = [order[c.node] for c in candidates]
        assert positions == sorted(positions) and len(set(positions)) == len(positions)
        auto = [c for c in candidates if c.auto]
        points = [level.points[task] for level in plan.levels]
        assert [(p.name, p.node, p.shape) for p in points] == [
            (c.name, c.node, c.shape) for c in auto
        ]
    return all_candidates


def backward(model: nn.Module, x: torch.Tensor) -> RuntimeError | None:
    """Train-mode forward and backward of a squared loss (so that a train-mode BatchNorm followed
    by a global average does not cancel the gradient); the error autograd raised, if any."""
    model.train()
    try:
        loss = sum(t.float().pow(2).mean() for t in _flatten(model(x)))
        assert torch.isfinite(loss)
        loss.backward()
    except RuntimeError as err:
        return err
    return None


def _fusion_grads(fused: nn.Module) -> dict[str, float]:
    return {
        f"{name}.convs.{i}": float(conv.weight.grad.abs().sum())
        for name, layer in fused.named_modules()
        if isinstance(layer, NDDRLayer)
        for i, conv in enumerate(layer.convs)
    }


def check_gradients(
    identity: nn.Module, default: nn.Module, models: list[nn.Module], x: torch.Tensor
) -> None:
    """Invariant 2. If the originals can be trained, so can the fused models; the default fusion
    gives every parameter a gradient, and every fusion weight a nonzero one where the original
    network passes a gradient through that point (measured on the identity fusion, which computes
    exactly the originals: an all-dead ReLU net legitimately gives zeros)."""
    if any(backward(copy.deepcopy(m), x) is not None for m in models):
        event("skipped gradients: the originals cannot be trained")
        return
    identity = copy.deepcopy(identity)
    err = backward(identity, x)
    if err is not None:
        raise AssertionError("the identity fusion cannot be trained, the originals can") from err
    live = {k for k, v in _fusion_grads(identity).items() if v > 0}
    err = backward(default, x)
    if err is not None:
        raise AssertionError("the default fusion cannot be trained, the originals can") from err
    missing = [name for name, p in default.named_parameters() if p.grad is None]
    assert missing == [], f"parameters without a gradient: {missing}"
    grads = _fusion_grads(default)
    assert len(grads) == sum(len(lv.points) for lv in nddrify.meta.fused_plan(default).levels)
    zero = [k for k, v in grads.items() if k in live and not v > 0]
    assert zero == [], f"fusion weights with a zero gradient: {zero}"
    if len(live) < len(grads):
        event("some fusion points pass no gradient in the original (dead ReLUs)")


def check_fused(
    models: list[nn.Module],
    names: list[str],
    as_dict: bool,
    points,
    x: torch.Tensor,
    seed: int,
    before,
) -> nddrify.Plan:
    """Fuse with ``points`` and check invariants 1, 2, 3 and 5; returns the fused plan."""
    models_arg = dict(zip(names, models)) if as_dict else list(models)
    x1 = x[:1]
    fused = nddrify.fuse(models_arg, points=points, example_input=x1, **IDENTITY)
    default = nddrify.fuse(models_arg, points=points, example_input=x1)
    fused_plan = nddrify.meta.fused_plan(fused)
    default_plan = nddrify.meta.fused_plan(default)
    assert [lv.points for lv in fused_plan.levels] == [lv.points for lv in default_plan.levels]
    assert fused_plan.tasks == tuple(names)
    for level in fused_plan.levels:
        layer = getattr(fused, f"nddr{level.index + 1}")
        assert isinstance(layer, NDDRLayer)
        assert layer.in_channels == tuple(p.channels for p in level.points)
        assert sum(c.weight.numel() for c in layer.convs) == level.weights
    assert_unchanged(models, before)

    # 2. gradients (batch of 2 so that train-mode BatchNorm works at 1×1)
    torch.manual_seed(seed + 1)
    x2 = torch.randn(2, *x.shape[1:])
    check_gradients(fused, default, models, x2)
    assert_unchanged(models, before)

    # 3. output structure
    for model in models:
        model.eval()
    fused.eval()
    with torch.no_grad():
        got = fused(x)
        want = [model(x) for model in models]
    if as_dict:
        assert isinstance(got, dict) and list(got) == names
        got = list(got.values())
    else:
        assert isinstance(got, tuple) and len(got) == len(models)
    assert [structure(g) for g in got] == [structure(w) for w in want]

    # 1. identity at init
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    assert max_identity_diff(models, fused, x2, train=True) <= ATOL
    return fused_plan


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


def _setup(specs: tuple[NetSpec, ...], as_dict: bool, batch: int, seed: int):
    models = [build(spec, seed + 7919 * i) for i, spec in enumerate(specs)]
    names = list(DICT_TASKS[: len(models)]) if as_dict else [f"task{i}" for i in range(len(models))]
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, specs[0].size, specs[0].size)
    randomise_modes(models, seed)
    return models, names, x


def check_same_spec(case: SameSpecCase, data: st.DataObject) -> None:
    models, names, x = _setup((case.spec,) * case.k, case.as_dict, case.batch, case.seed)
    models_arg = dict(zip(names, models)) if case.as_dict else models
    before = snapshot(models)
    x1 = x[:1]
    try:
        plan = nddrify.plan(models_arg, points="auto", example_input=x1)
    except nddrify.errors.PointError as err:
        assert not has_spatial_feature_map(models[0], x1), f"auto planner failed: {err}"
        return
    again = nddrify.plan(models_arg, points="auto", example_input=x1)
    assert again.levels == plan.levels and again.tasks == plan.tasks == tuple(names)
    for level in plan.levels:  # the weights (seeds) do not change where a spec is fused
        assert len({(p.name, p.node, p.shape, p.nonnegative) for p in level.points}) == 1
    assert_unchanged(models, before)
    event(f"auto levels: {len(plan.levels)}")
    candidates = check_auto_plan(plan, models, x1)
    assert_unchanged(models, before)

    mode = data.draw(st.sampled_from(["names", "auto", "int", "auto"]), label="points mode")
    event(f"points: {mode}")
    auto_nodes = point_nodes(plan, 0)
    if mode == "auto":
        points, expected = "auto", auto_nodes
    elif mode == "int":
        n = data.draw(st.integers(1, len(auto_nodes)), label="points=N")
        points, expected = n, auto_nodes[-n:]
    else:
        chosen = data.draw(
            st.lists(st.sampled_from(candidates[0]), min_size=1, unique_by=lambda c: c.node),
            label="shared points",
        )
        chosen.sort(key=candidates[0].index)
        use_names = data.draw(st.booleans(), label="use candidate names")
        points = [c.name if use_names else c.node for c in chosen]
        expected = [c.node for c in chosen]
    fused_plan = check_fused(models, names, case.as_dict, points, x, case.seed, before)
    for task in range(case.k):
        assert point_nodes(fused_plan, task) == expected
    if mode == "auto":
        assert [lv.points for lv in fused_plan.levels] == [lv.points for lv in plan.levels]


def _expect(auto: list[list], chosen: list[list]):
    """The error (or None) fuse must raise for the per-task lists of points ``chosen``."""
    if len({len(c) for c in chosen}) > 1:
        return nddrify.errors.PointError
    for level in zip(*chosen):
        if len({c.shape[2:] for c in level}) > 1:
            return nddrify.errors.ShapeMismatchError
    return None


def check_mixed(case: MixedCase, data: st.DataObject) -> None:
    models, names, x = _setup(case.specs, case.as_dict, case.batch, case.seed)
    before = snapshot(models)
    x1 = x[:1]
    candidates = [nddrify.get_fusion_candidates(m, example_input=x1) for m in models]
    assert all(candidates), "a generated net has spatial feature maps but no fusion candidate"
    auto = [[c for c in cands if c.auto] for cands in candidates]
    assert all(auto), "no automatic point although the net has candidates"
    mode = data.draw(st.sampled_from(["lists", "lists", "dict", "auto", "int"]), label="points")
    if mode == "dict" and not case.as_dict:
        mode = "lists"
    event(f"points: {mode}")
    if mode in ("lists", "dict"):
        # One point per common resolution: a random candidate of each task at that H×W.
        sizes = sorted(
            set.intersection(*({c.shape[2:] for c in cands} for cands in candidates)),
            key=lambda s: -s[0] * s[1],
        )
        assert sizes, "the tasks share a stride schedule, so they share their first resolution"
        picked = data.draw(
            st.lists(st.sampled_from(sizes), min_size=1, unique=True), label="levels"
        )
        picked.sort(key=sizes.index)
        chosen = [
            [
                data.draw(st.sampled_from([c for c in cands if c.shape[2:] == s]), label="point")
                for s in picked
            ]
            for cands in candidates
        ]
        use_names = data.draw(st.booleans(), label="use candidate names")
        lists = [[c.name if use_names else c.node for c in cs] for cs in chosen]
        points = dict(zip(names, lists)) if mode == "dict" else lists
        error = None
    else:
        # Automatic points pair by output stride (nddrify.pairing); by position when a stride
        # is unknown.
        strides = [
            [output_stride(tuple(x1.shape[-2:]), c.shape[2:]) for c in cands] for cands in auto
        ]
        if any(s is None for task in strides for s in task):
            paired = auto if len({len(a) for a in auto}) == 1 else []
        else:
            levels = pair_by_stride([list(zip(a, s)) for a, s in zip(auto, strides)]).levels
            paired = [list(column) for column in zip(*levels)]
        count = len(paired[0]) if paired else 0
        if mode == "auto":
            points, chosen = "auto", paired
        else:
            n = data.draw(st.integers(1, max(count, 1) + 1), label="points=N")
            points, chosen = n, [p[-n:] for p in paired]
            count = count if n <= count else 0
        error = nddrify.errors.PointError if not count else _expect(auto, chosen)
    event(f"expected error: {error.__name__ if error else None}")
    if error is not None:
        models_arg = dict(zip(names, models)) if case.as_dict else models
        with pytest.raises(error):
            nddrify.plan(models_arg, points=points, example_input=x1)
        assert_unchanged(models, before)
        return
    fused_plan = check_fused(models, names, case.as_dict, points, x, case.seed, before)
    for task, cs in enumerate(chosen):
        assert point_nodes(fused_plan, task) == [c.node for c in cs]


@FAST
@given(case=same_spec_cases(), data=st.data())
def test_fuse_invariants_on_random_cnns(case: SameSpecCase, data: st.DataObject) -> None:
    check_same_spec(case, data)


@FAST
@given(case=mixed_cases(), data=st.data())
def test_fuse_invariants_on_random_heterogeneous_cnns(case: MixedCase, data: st.DataObject) -> None:
    check_mixed(case, data)


@pytest.mark.slow
@SLOW
@given(case=same_spec_cases(), data=st.data())
def test_fuse_invariants_on_random_cnns_slow(case: SameSpecCase, data: st.DataObject) -> None:
    check_same_spec(case, data)


@pytest.mark.slow
@SLOW
@given(case=mixed_cases(), data=st.data())
def test_fuse_invariants_on_random_heterogeneous_cnns_slow(
    case: MixedCase, data: st.DataObject
) -> None:
    check_mixed(case, data)


def test_auto_points_fail_only_without_spatial_feature_maps() -> None:
    """The one case where ``points="auto"`` may raise PointError: no map with H×W > 1."""
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 4, 1), nn.Flatten())
    x = torch.randn(1, 3, 16, 16)
    assert not has_spatial_feature_map(pooled, x)
    with pytest.raises(nddrify.errors.PointError, match="no N×C×H×W feature maps"):
        nddrify.plan([pooled, copy.deepcopy(pooled)], example_input=x)
    spec = NetSpec(
        16,
        (ConvSpec(3, 4, 3, 2),),
        ((PoolSpec(4, "max", 2, 2, False),),),
        HeadSpec("linear", "mean", "tensor", "final", 2),
        False,
    )
    model = build(spec, 0)
    assert has_spatial_feature_map(model, x)
    assert len(nddrify.plan([model, build(spec, 1)], example_input=x).levels) >= 1


def _inplace_after_pool() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # the fusion point "2" (non-negative: the default fusion ends in a ReLU)
        nn.ReLU(inplace=True),  # legal here: MaxPool2d's backward does not need its output
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
    )


@pytest.mark.parametrize("options", [IDENTITY, {}], ids=["identity", "default"])
def test_inplace_op_on_a_fused_map_trains_like_the_original(options: dict) -> None:
    models = [_inplace_after_pool(), _inplace_after_pool()]
    x = torch.randn(2, 3, 16, 16)
    original = copy.deepcopy(models[0]).train()
    original(x).pow(2).mean().backward()  # the original trains
    fused = nddrify.fuse(models, points=["2"], example_input=x[:1], **options).train()
    sum(t.pow(2).mean() for t in fused(x)).backward()  # was a RuntimeError (regression test)
    assert all(p.grad is not None for p in fused.parameters())


def test_every_candidate_is_a_valid_point() -> None:
    """Regression: the graph's output node was offered as a candidate, then rejected."""
    models = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()) for _ in range(2)]
    x = torch.randn(1, 3, 8, 8)
    candidates = nddrify.get_fusion_candidates(models[0], example_input=x)
    assert [c.node for c in candidates] == ["0", "1"]
    for candidate in candidates:
        plan = nddrify.plan(models, points=[candidate.name], example_input=x)
        assert point_nodes(plan, 0) == [candidate.node]


def test_fusion_outputs_are_contiguous() -> None:
    """Regression: the outputs were views of one split(), so identity at init was not bit-exact
    after GELU or train-mode BatchNorm, and in-place ops on them failed."""
    layer = NDDRLayer([4, 4], init=(1.0, 0.0), norm=None, activation=None)
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    outputs = layer(a, b)
    assert torch.equal(outputs[0], a) and torch.equal(outputs[1], b)
    assert all(t.is_contiguous() for t in outputs)
