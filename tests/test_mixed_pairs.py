"""Mixed pairs: models whose stage ends sit at different strides, and per-task example inputs.

``points="auto"`` and ``points=N`` pair levels by output stride (input size / map size, on each
task's own input) when the models differ; the points without a partner are listed in
``plan.unpaired`` and named in a warning. Per-task example inputs give a fused model with one
input per task. Small custom CNNs with known strides keep every test fast.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nddrify
from nddrify.errors import InputError, PointError, ShapeMismatchError, TraceError
from nddrify.pairing import UnpairedPoint, output_stride, pair_by_stride
from nddrify.plans import Plan


def _cbr(channels_in: int, channels: int, stride: int | tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


def _down(channels_in: int, channels: int, pooled: bool) -> nn.Sequential:
    if pooled:
        return nn.Sequential(nn.MaxPool2d(2), _cbr(channels_in, channels, 1))
    return _cbr(channels_in, channels, 2)


class Det(nn.Module):
    """A detector-style backbone: stage ends at strides 4 (pool), 4, 8, 16, 32."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = _cbr(3, width, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _cbr(width, width, 1)
        self.layer2 = _cbr(width, 2 * width, 2)
        self.layer3 = _cbr(2 * width, 4 * width, 2)
        self.layer4 = _cbr(4 * width, 8 * width, 2)
        self.fc = nn.Linear(8 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.pool(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Seg(nn.Module):
    """A segmenter-style encoder: a stride-2 stem, no stem pool; stage ends at 2, 4, 8, 16.

    ``pooled=True`` downsamples with ``MaxPool2d(2)`` (floor) instead of stride-2 convs (ceil),
    so on an input size that 8 does not divide its maps round differently from :class:`Det`'s.
    """

    def __init__(self, width: int = 6, pooled: bool = False) -> None:
        super().__init__()
        self.stem = _cbr(3, width, 2)
        self.down1 = _down(width, 2 * width, pooled)
        self.down2 = _down(2 * width, 3 * width, pooled)
        self.down3 = _down(3 * width, 4 * width, pooled)
        self.fc = nn.Linear(4 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down3(self.down2(self.down1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Aniso(nn.Module):
    """Its stem halves H only (stride (2, 1)), so no single stride explains its maps."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = _cbr(3, width, (2, 1))
        self.down1 = _cbr(width, 2 * width, 2)
        self.down2 = _cbr(2 * width, 3 * width, 2)
        self.down3 = _cbr(3 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down3(self.down2(self.down1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FixedClassifier(nn.Module):
    """A classifier with a fixed ``nn.Linear`` after flatten: it runs on 14×14 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.fc = nn.Linear(4 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


X64 = torch.randn(1, 3, 64, 64)
IDENTITY = nddrify.NDDR(init=(1.0, 0.0), norm=None, activation=None)
IDENTITY_RESIZED = nddrify.NDDR(
    init=(1.0, 0.0), norm=None, activation=None, resize="align_corners_false"
)
LEFT_OUT = (
    UnpairedPoint("det", "pool", "pool", 4),
    UnpairedPoint("det", "layer4", "layer4.2", 32),
    UnpairedPoint("seg", "stem", "stem.2", 2),
)


def _levels(plan: Plan, inputs: dict[str, int]) -> list[tuple[int, ...]]:
    """Per level: the stride of each task's map on its own input size."""
    return [tuple(inputs[p.task] // p.spatial[0] for p in lv.points) for lv in plan.levels]


def _names(plan: Plan) -> list[tuple[str, ...]]:
    return [tuple(p.name for p in lv.points) for lv in plan.levels]


def _plan(points: str | int = "auto", **kwargs: object) -> Plan:
    with pytest.warns(UserWarning, match="paired by output stride") as record:
        plan = nddrify.plan(
            {"det": Det(), "seg": Seg()}, points=points, example_input=X64, **kwargs
        )
    (warning,) = [w for w in record if "paired by output stride" in str(w.message)]
    message = str(warning.message)
    assert "det 'pool' (stride 4), det 'layer4' (stride 32), seg 'stem' (stride 2)" in message
    return plan


def test_pair_by_stride_with_three_tasks() -> None:
    pairing = pair_by_stride(
        [
            [("a4", 4), ("a8", 8), ("a16", 16)],
            [("b2", 2), ("b4", 4), ("b8", 8), ("b16", 16)],
            [("c4", 4), ("c8", 8), ("c32", 32)],
        ]
    )
    assert pairing.levels == (("a4", "b4", "c4"), ("a8", "b8", "c8"))
    assert pairing.strides == (4, 8)
    assert pairing.unpaired == ((0, "a16", 16), (1, "b2", 2), (1, "b16", 16), (2, "c32", 32))


def test_output_stride_tolerates_rounding() -> None:
    assert output_stride((64, 64), (16, 16)) == 4
    assert output_stride((60, 60), (7, 7)) == output_stride((60, 60), (8, 8)) == 8
    assert output_stride((65, 65), (3, 3)) == 32
    assert output_stride((64, 64), (8, 16)) is None


def test_auto_pairs_stage_ends_by_stride_and_says_what_it_left_out() -> None:
    plan = _plan()
    assert _names(plan) == [("layer1", "down1"), ("layer2", "down2"), ("layer3", "down3")]
    assert [lv.points[1].node for lv in plan.levels] == ["down1.2", "down2.2", "down3.2"]
    assert _levels(plan, {"det": 64, "seg": 64}) == [(4, 4), (8, 8), (16, 16)]
    assert plan.unpaired == LEFT_OUT
    text = repr(plan)
    assert "left out (no map at the same output stride in every task):" in text
    assert re.search(r"det\s+layer4\s+layer4\.2\s+stride 32", text)
    assert re.search(r"seg\s+stem\s+stem\.2\s+stride 2", text)
    # resize=True no longer hides a position mismatch: the same levels, by stride
    assert _names(_plan(resize=True)) == _names(plan)


def test_int_points_take_the_last_paired_levels() -> None:
    plan = _plan(points=2)
    assert _names(plan) == [("layer2", "down2"), ("layer3", "down3")]
    assert plan.unpaired == LEFT_OUT
    with pytest.raises(PointError, match=r"points=4 must be between 1 and 3.*\[4, 8, 16\]"):
        nddrify.plan({"det": Det(), "seg": Seg()}, points=4, example_input=X64)


def test_plan_with_unpaired_points_round_trips_and_old_dicts_load() -> None:
    plan = _plan()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["unpaired"][2] == {"task": "seg", "name": "stem", "node": "stem.2", "stride": 2}
    again = Plan.from_dict(data)
    assert again == plan and again.unpaired == LEFT_OUT
    del data["unpaired"]  # a plan saved before the field existed
    old = Plan.from_dict(data)
    assert old.unpaired == () and old.levels == plan.levels


def test_same_strides_pair_by_position_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = nddrify.plan({"a": Det(8), "b": Det(4)}, example_input=X64)
        last_two = nddrify.plan({"a": Det(8), "b": Det(4)}, points=2, example_input=X64)
    assert _names(plan) == [(n, n) for n in ("pool", "layer1", "layer2", "layer3", "layer4")]
    assert _names(last_two) == _names(plan)[-2:]
    assert plan.unpaired == last_two.unpaired == ()
    assert "left out" not in repr(plan)


def test_stride_paired_fusion_is_identity_at_init() -> None:
    det, seg = Det().eval(), Seg().eval()
    with pytest.warns(UserWarning, match="paired by output stride"):
        fused = nddrify.fuse({"det": det, "seg": seg}, fusion=IDENTITY, example_input=X64)
    x = torch.randn(2, 3, 64, 64)
    out = fused.eval()(x)
    assert (out["det"] - det(x)).abs().max() <= 1e-5
    assert (out["seg"] - seg(x)).abs().max() <= 1e-5


def test_maps_at_one_stride_that_round_differently_need_resize() -> None:
    models = {"det": Det(), "seg": Seg(pooled=True)}
    x60 = torch.randn(1, 3, 60, 60)  # det rounds 7.5 up to 8, seg's MaxPool2d(2) down to 7
    message = (
        "fusion level 2: the tasks' feature maps have the same output stride 8 but differ in "
        "H×W (det 'layer2' 16×8×8, seg 'down2' 18×7×7) because of rounding (the input size is "
        "not a multiple of 8"
    )
    with pytest.warns(UserWarning), pytest.raises(ShapeMismatchError, match=re.escape(message)):
        nddrify.plan(models, example_input=x60)
    with pytest.warns(UserWarning):
        plan = nddrify.plan(models, example_input=x60, resize=True)
    assert _names(plan) == [("layer1", "down1"), ("layer2", "down2"), ("layer3", "down3")]


def test_unknown_strides_fall_back_to_position_pairing_with_a_warning() -> None:
    models = {"aniso": Aniso(), "seg": Seg()}
    with pytest.warns(UserWarning, match=r"stride of point\(s\) aniso 'stem'.*paired by position"):
        plan = nddrify.plan(models, example_input=X64, resize=True)
    assert _names(plan) == [(n, n) for n in ("stem", "down1", "down2", "down3")]
    assert plan.unpaired == ()
    with pytest.warns(UserWarning), pytest.raises(PointError, match="strides are unknown"):
        nddrify.plan({"aniso": Aniso(), "det": Det()}, example_input=X64, resize=True)


def test_per_task_inputs_give_one_input_per_task() -> None:
    det, seg = Det().eval(), Seg().eval()
    inputs = {"det": torch.randn(1, 3, 64, 64), "seg": torch.randn(1, 3, 48, 48)}
    traced = nddrify.trace({"det": det, "seg": seg}, example_input=inputs)
    assert repr(traced) == "TracedSet(det: Det, seg: Seg; inputs det 1×3×64×64, seg 1×3×48×48)"
    assert traced.separate_inputs
    message = (
        "fusion level 1: the tasks' feature maps have the same output stride 4 but differ in "
        "H×W (det 'layer1' 8×16×16, seg 'down1' 12×12×12) because the tasks' example inputs "
        "differ in size (det 64×64, seg 48×48); pass resize=True"
    )
    with pytest.warns(UserWarning), pytest.raises(ShapeMismatchError, match=re.escape(message)):
        nddrify.plan(traced)
    with pytest.warns(UserWarning, match="paired by output stride"):
        plan = nddrify.plan(traced, fusion=IDENTITY_RESIZED)
    assert _names(plan) == [("layer1", "down1"), ("layer2", "down2"), ("layer3", "down3")]
    assert _levels(plan, {"det": 64, "seg": 48}) == [(4, 4), (8, 8), (16, 16)]
    fused = nddrify.rewrite(traced, plan).eval()
    for graph in (*fused.graphs(), *fused.flat_graphs):
        assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["det", "seg"]
    assert "def forward(self, det, seg):" in fused.code
    x_det, x_seg = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 48, 48)
    out = fused(x_det, x_seg)
    assert (out["det"] - det(x_det)).abs().max() <= 1e-5
    assert (out["seg"] - seg(x_seg)).abs().max() <= 1e-5
    # a list in task order is the same as the dict; equal shapes keep the one shared input
    listed = nddrify.trace([det, seg], example_input=list(inputs.values()))
    assert [tuple(x.shape) for x in listed.example_inputs] == [(1, 3, 64, 64), (1, 3, 48, 48)]
    same = nddrify.fuse([Det(), Det(4)], example_input=[X64, torch.zeros(1, 3, 64, 64)])
    assert [n.name for n in same.graph.nodes if n.op == "placeholder"] == ["x"]


def test_a_per_task_input_model_saves_and_loads(tmp_path) -> None:
    det, seg = Det().eval(), Seg().eval()
    inputs = {"det": torch.randn(1, 3, 64, 64), "seg": torch.randn(1, 3, 48, 48)}
    with pytest.warns(UserWarning):
        fused = nddrify.fuse(
            {"det": det, "seg": seg},
            fusion=nddrify.NDDR(resize="align_corners_false"),
            example_input=inputs,
        ).eval()
    nddrify.save(fused, tmp_path / "fused.pt")
    again = nddrify.load(tmp_path / "fused.pt", models={"det": Det(), "seg": Seg()}).eval()
    assert [n.name for n in again.graph.nodes if n.op == "placeholder"] == ["det", "seg"]
    x_det, x_seg = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 48, 48)
    expected, actual = fused(x_det, x_seg), again(x_det, x_seg)
    assert all(torch.equal(expected[t], actual[t]) for t in ("det", "seg"))


def test_a_model_that_needs_another_input_size_is_one_trace_error_line() -> None:
    with pytest.raises(TraceError) as err:
        nddrify.trace({"cls": FixedClassifier(), "det": Det()}, example_input=X64)
    message = str(err.value)
    first = message.splitlines()[0]
    assert first == (
        "task 'cls': the traced model failed on an example input of shape (1, 3, 64, 64) in "
        "module 'fc' (Linear): RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        "(1x4096 and 196x2)"
    )
    assert "Traceback" not in message and "opcode" not in message
    assert "example_input={'cls': torch.randn(1, 3, H, W), 'det': torch.randn(1, 3, H, W)}" in (
        message
    )
    traced = nddrify.trace(
        {"cls": FixedClassifier(), "det": Det()},
        example_input={"cls": torch.zeros(1, 3, 14, 14), "det": X64},
    )
    assert traced.separate_inputs


@pytest.mark.parametrize(
    ("example_input", "message"),
    [
        ([X64], "got 1 example inputs for 2 tasks ['det', 'seg']"),
        (
            {"det": X64, "cls": X64},
            "no entry for task(s) ['seg']; it names unknown task(s) ['cls']",
        ),
        ({"det": X64, "seg": "image.png"}, "task 'seg': example_input must be a tensor, got str"),
        ([X64, None], "task 'seg': example_input must be a tensor, got NoneType"),
        ("image.png", "example_input must be a tensor, a list of tensors (one per task)"),
    ],
)
def test_bad_example_inputs_name_the_task(example_input: object, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        nddrify.trace({"det": Det(), "seg": Seg()}, example_input=example_input)
