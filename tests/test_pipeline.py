"""The three stages as values: trace → plan (JSON round trip) → rewrite; the generated code; the
in-place rule; the package's shape (module sizes, public surface)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.models as tv
from torch import nn

import nddrify
from nddrify.errors import FusionConfigError, PlanError, PointError
from nddrify.plans import Plan

from .models import TinyCNN

IDENTITY = {"init": (1.0, 0.0), "norm": None, "activation": None}
PACKAGE = Path(nddrify.__file__).parent


def test_rewrite_of_a_plan_loaded_from_json_builds_the_fused_model() -> None:
    torch.manual_seed(0)
    models = {"seg": tv.resnet18(), "depth": tv.resnet18()}
    fused = nddrify.fuse(models, points="auto", shortcut=True)
    traced = nddrify.trace(models)
    plan = nddrify.plan(traced, points="auto", shortcut=True)
    text = json.dumps(plan.to_dict())
    loaded = Plan.from_dict(json.loads(text))
    assert loaded == plan
    assert loaded.fusion == {
        "kind": "nddr",
        "init": None,
        "norm": "batchnorm",
        "activation": "auto",
        "resize": None,
        "rank": None,
        "groups": 1,
    }
    rebuilt = nddrify.rewrite(traced, loaded)
    assert rebuilt.code == fused.code
    assert list(rebuilt.state_dict()) == list(fused.state_dict())
    rebuilt.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    fused.eval(), rebuilt.eval()
    with torch.no_grad():
        expected, got = fused(x), rebuilt(x)
    assert all(torch.equal(expected[t], got[t]) for t in models)


def test_plan_holds_no_traces_and_fuse_is_rewrite_of_trace_and_plan() -> None:
    models = [tv.vgg11(), tv.vgg11()]
    traced = nddrify.trace(models)
    plan = nddrify.plan(traced, points=2)
    assert set(vars(plan)) == {
        "tasks",
        "levels",
        "model_params",
        "shortcut_weights",
        "shortcut_norm_params",
        "fusion_kind",
        "fusion",
        "shortcut",
        "unpaired",
    }
    assert plan.points("task1") == ["features.15", "features.20"]
    assert nddrify.rewrite(traced, plan).code == nddrify.fuse(models, points=2).code


def test_an_edited_plan_is_checked_against_the_traced_models() -> None:
    traced = nddrify.trace([tv.vgg11(), tv.vgg11()])
    data = nddrify.plan(traced, points=["features.2"]).to_dict()
    data["levels"][0]["points"][1]["node"] = "features.99"
    with pytest.raises(PlanError, match=r"task 'task1'.*\['features.99'\].*eval-mode graph"):
        nddrify.rewrite(traced, Plan.from_dict(data))
    data = nddrify.plan(traced, points=["features.2"]).to_dict()
    data["levels"][0]["points"][0]["node"] = "features.5"  # another resolution than planned
    with pytest.raises(PlanError, match=r"says point 'features.5' is 64×112×112.*gives 128×56×56"):
        nddrify.rewrite(traced, Plan.from_dict(data))
    with pytest.raises(PlanError, match="format"):
        Plan.from_dict({"tasks": ["a", "b"]})
    with pytest.raises(PlanError, match="malformed"):
        Plan.from_dict({"format": 1, "tasks": ["a", "b"]})
    other = nddrify.trace({"seg": tv.vgg11(), "depth": tv.vgg11()})
    with pytest.raises(PlanError, match=r"plan is for tasks \['task0', 'task1'\]"):
        nddrify.rewrite(other, Plan.from_dict(data))


def test_a_plan_of_your_own_kind_needs_the_kind_again() -> None:
    from nddrify.layers import FusionLayer

    class Swap(FusionLayer):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return b, a

    class SwapKind:
        name = "Swap"

        def build(self, level: object) -> nn.Module:
            return Swap()

        def num_parameters(self, level: object) -> tuple[int, int]:
            return (0, 0)

    traced = nddrify.trace([TinyCNN(), TinyCNN()])
    plan = nddrify.plan(traced, points=1, fusion=SwapKind())
    assert plan.fusion is None and plan.fusion_kind == "Swap"
    with pytest.raises(PlanError, match=r"fusion kind 'Swap' is your own.*fusion=\.\.\."):
        nddrify.rewrite(traced, plan)
    assert isinstance(nddrify.rewrite(traced, plan, fusion=SwapKind()).nddr1, Swap)


def test_objects_that_are_not_fusion_kinds_are_refused() -> None:
    class OldStyle:  # the previous implicit protocol: __call__ + num_parameters(shapes)
        def __call__(self, shapes: object) -> nn.Module:
            return nn.Identity()

        def num_parameters(self, shapes: object) -> tuple[int, int]:
            return (0, 0)

    with pytest.raises(FusionConfigError, match=r"lacks \['name', 'build'\]"):
        nddrify.fuse([TinyCNN(), TinyCNN()], fusion=OldStyle())


class _ReluInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(torch.relu_(y))  # in place on the fused map


@pytest.mark.parametrize("fusion", ["nddr", "cross_stitch"])
def test_in_place_functions_on_a_fused_map_train(fusion: str) -> None:
    torch.manual_seed(0)
    models = [_ReluInPlace(), _ReluInPlace()]
    fused = nddrify.fuse(models, points=["stem"], fusion=fusion).train()
    assert "clone" in fused.code
    out = fused(torch.randn(2, 3, 8, 8))
    (out[0].sum() + out[1].sum()).backward()  # raised "modified by an inplace operation" before
    assert fused.nddr1.weight.grad is not None if fusion == "cross_stitch" else True
    grads = [p.grad for p in fused.task0.stem.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


class _TrainOnlyBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        if not self.training:
            x = self.extra(x)
        return self.head(x)


def test_points_are_checked_on_the_train_graph_too() -> None:
    models = [_TrainOnlyBranch(), _TrainOnlyBranch()]
    with pytest.raises(PointError, match=r"task 'task0'.*'extra'.*not in the train-mode one"):
        nddrify.plan(models, points=["extra"])


def test_two_resnet18s_read_like_hand_written_code() -> None:
    a, b = tv.resnet18().eval(), tv.resnet18().eval()
    fused = nddrify.fuse({"seg": a, "normal": b}, **IDENTITY)
    lines = [line for line in fused.code.splitlines() if line.strip()]
    assert len(lines) <= 40, fused.code
    code = fused.code
    assert "seg_layer2 = self.seg.layer2(seg_layer1_nddr)" in code
    assert "nddr3 = self.nddr3(seg_layer2, normal_layer2)" in code
    assert "getattr(" not in code
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fused(x)
        assert torch.equal(out["seg"], a(x)) and torch.equal(out["normal"], b(x))
    # both graphs collapse when train and eval differ (googlenet's auxiliary heads)
    g1, g2 = (
        tv.googlenet(init_weights=False, aux_logits=True),
        tv.googlenet(init_weights=False, aux_logits=True),
    )
    fused = nddrify.fuse([g1, g2], points=2)
    for graph in fused.graphs():
        called = [str(n.target) for n in graph.nodes if n.op == "call_module"]
        assert "task0.inception4e" in called and "task1.inception5b" in called
    assert len(fused.graphs()) == 2
    # the node-by-node form stays available to batching
    flat = [str(n.target) for n in fused.flat_graph(train=False).nodes if n.op == "call_module"]
    assert "task0.inception4e.branch1.conv" in flat


def test_shared_trunk_is_written_by_the_same_rewriter() -> None:
    models = {"seg": tv.vgg11(), "depth": tv.vgg11()}
    shared = nddrify.share(models)
    assert "shared_features = self.shared.features(x)" in shared.code
    assert "seg_classifier = self.seg.classifier(seg_flatten)" in shared.code
    assert not hasattr(shared.seg, "features")  # each task's own trunk is not kept


def test_the_package_keeps_its_shape() -> None:
    assert len(nddrify.__all__) <= 16
    assert all(hasattr(nddrify, name) for name in nddrify.__all__)
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}
