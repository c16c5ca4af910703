"""The planner: automatic stage ends, point resolution, shape checks, the Plan object."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from rich.console import Console
from torch import nn

import nddrify
from nddrify.graph_analysis import stage_ends, stage_module

from .models import DeepLabLargeFOV, TinyCNN, UNet

tv = torchvision.models
RESNET_POINTS = ["maxpool", "layer1", "layer2", "layer3", "layer4"]

AUTO_POINTS = {
    # name: (model factory, expected names, expected C×H×W at 224² unless given)
    "vgg16": (tv.vgg16, ["features.4", "features.9", "features.16", "features.23", "features.30"]),
    "vgg16_bn": (
        tv.vgg16_bn,
        ["features.6", "features.13", "features.23", "features.33", "features.43"],
    ),
    "resnet50": (tv.resnet50, RESNET_POINTS),
    "resnet101": (tv.resnet101, RESNET_POINTS),
    "resnet50 dilated (layer3, layer4 keep 28×28)": (
        lambda: tv.resnet50(replace_stride_with_dilation=[False, True, True]),
        RESNET_POINTS,
    ),
    "deeplab-largefov vgg16 (pool4, pool5 stride 1)": (
        DeepLabLargeFOV,
        ["features.4", "features.9", "features.16", "features.23", "features.31"],
    ),
    "fcn_resnet50 (never the head)": (
        lambda: tv.segmentation.fcn_resnet50(weights=None, weights_backbone=None),
        [f"backbone.{p}" for p in RESNET_POINTS],
    ),
    "deeplabv3_resnet50 (never the ASPP head)": (
        lambda: tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None),
        [f"backbone.{p}" for p in RESNET_POINTS],
    ),
    "alexnet": (tv.alexnet, ["features.2", "features.5", "features.12"]),
    "unet (encoder stages; decoder excluded)": (UNet, ["enc1", "enc2", "enc3", "bottleneck"]),
}


@pytest.mark.parametrize("case", list(AUTO_POINTS))
def test_auto_points(case: str) -> None:
    factory, expected = AUTO_POINTS[case]
    candidates = nddrify.get_fusion_candidates(factory())
    assert [c.name for c in candidates if c.auto] == expected


def test_auto_points_shapes_for_vgg16_and_dilated_resnet() -> None:
    plan = nddrify.plan([tv.vgg16(), tv.vgg16()])
    assert [lv.points[0].shape[1:] for lv in plan.levels] == [
        (64, 112, 112),
        (128, 56, 56),
        (256, 28, 28),
        (512, 14, 14),
        (512, 7, 7),
    ]
    dilated = tv.resnet50(replace_stride_with_dilation=[False, True, True])
    plan = nddrify.plan([dilated, dilated])
    assert [lv.points[0].shape[1:] for lv in plan.levels] == [
        (64, 56, 56),
        (256, 56, 56),
        (512, 28, 28),
        (1024, 28, 28),
        (2048, 28, 28),
    ]
    assert [lv.points[0].node for lv in plan.levels] == [
        "maxpool",
        "layer1.2.relu_2",
        "layer2.3.relu_2",
        "layer3.5.relu_2",
        "layer4.2.relu_2",
    ]


def test_deeplab_output_stride_and_pool5_node() -> None:
    plan = nddrify.plan(
        [DeepLabLargeFOV(), DeepLabLargeFOV()], example_input=torch.randn(1, 3, 321, 321)
    )
    # 'SAME'-style 3×3 pools with padding 1: 321 → 161 → 81 → 41, then stride 1.
    assert [lv.points[0].spatial for lv in plan.levels] == [(161, 161), (81, 81), (41, 41)] + [
        (41, 41)
    ] * 2


def test_channels_last_maps_are_recognised_with_their_channel_axis() -> None:
    """Swin keeps its stages N×H×W×C: they are fused on the channel axis, never misread."""
    plan = nddrify.plan(
        [tv.swin_t(), tv.swin_t()], points=["features.1", "features.3", "features.5"]
    )
    assert [lv.points[0].layout for lv in plan.levels] == ["NHWC"] * 3
    assert [lv.points[0].shape for lv in plan.levels] == [
        (1, 96, 56, 56),
        (1, 192, 28, 28),
        (1, 384, 14, 14),
    ]
    for candidate in nddrify.get_fusion_candidates(timm.create_model("convnext_atto")):
        assert candidate.shape[1] in (40, 80, 160, 320), candidate  # channels, never W


def test_points_by_name_module_or_node() -> None:
    a, b = tv.resnet18(), tv.resnet18()
    plan = nddrify.plan([a, b], points=["layer1", "layer2.1.relu_1"])
    assert plan.points("task0") == ["layer1.1.relu_1", "layer2.1.relu_1"]
    assert [lv.points[0].name for lv in plan.levels] == ["layer1", "layer2.1.relu_1"]
    assert nddrify.plan([a, b], points="layer1, layer2").points("task1") == [
        "layer1.1.relu_1",
        "layer2.1.relu_1",
    ]


def test_points_per_task_for_different_architectures() -> None:
    models = {"a": tv.resnet18(), "b": timm.create_model("convnext_atto")}
    plan = nddrify.plan(models, points=[["layer2", "layer3"], ["stages.1", "stages.2"]])
    assert plan.points("b") == [
        stage_ends_node(models["b"], "stages.1"),
        stage_ends_node(models["b"], "stages.2"),
    ]
    assert [lv.points[1].channels for lv in plan.levels] == [80, 160]
    same = nddrify.plan(models, points={"a": ["layer2", "layer3"], "b": ["stages.1", "stages.2"]})
    assert same.levels == plan.levels


def stage_ends_node(model: torch.nn.Module, module: str) -> str:
    return nddrify.tracing.trace_model(model).node(module).meta["qualname"]


def test_int_points_take_the_last_n_auto_points() -> None:
    plan = nddrify.plan([tv.resnet18(), tv.resnet34()], points=2)
    assert [lv.points[1].name for lv in plan.levels] == ["layer3", "layer4"]
    with pytest.raises(nddrify.errors.PointError, match="between 1 and 5"):
        nddrify.plan([tv.resnet18(), tv.resnet18()], points=6)


def test_unknown_point_lists_close_names() -> None:
    with pytest.raises(nddrify.errors.PointError) as err:
        nddrify.plan([tv.resnet18(), tv.resnet18()], points=["layer1", "layr2"])
    message = str(err.value)
    assert "task 'task0'" in message and "'layr2'" in message
    assert "'layer2'" in message  # the closest valid name is suggested


def test_mismatched_resolution_names_level_tasks_and_shapes() -> None:
    models = {"seg": tv.resnet18(), "depth": tv.resnet18()}
    message = re.escape(
        "fusion level 1: the tasks' feature maps differ in H×W (seg 'layer1' 64×56×56, "
        "depth 'layer2' 128×28×28)"
    )
    with pytest.raises(nddrify.errors.ShapeMismatchError, match=message):
        nddrify.plan(models, points=[["layer1"], ["layer2"]])
    fused = nddrify.fuse(models, points=[["layer1"], ["layer2"]], resize=True)
    out = fused(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == out["depth"].shape == (2, 1000)


def test_vgg16_overhead_matches_the_paper() -> None:
    plan = nddrify.plan([tv.vgg16(), tv.vgg16()])
    overhead = plan.overhead
    assert overhead.fusion_weights == 2_441_216
    assert overhead.weights_per_task == 1_220_608
    assert overhead.model_params == (138_357_544, 138_357_544)
    assert overhead.fusion_norm_params == 5_888
    assert round(100 * overhead.relative_per_task, 2) == 0.88
    assert str(overhead).startswith(
        "2,441,216 fusion 1×1 weights (1,220,608 per task = 0.88% of one model's 138,357,544)"
    )
    assert [lv.weights for lv in plan.levels] == [
        2 * 128 * 64,
        2 * 256 * 128,
        2 * 512 * 256,
        2 * 1024 * 512,
        2 * 1024 * 512,
    ]


def test_resnet50_overhead_is_large_as_reference_says() -> None:
    plan = nddrify.plan([tv.resnet50(), tv.resnet50()])
    assert plan.overhead.fusion_weights == 2 * sum((2 * c) * c for c in (64, 256, 512, 1024, 2048))
    assert round(plan.overhead.fusion_weights / 1e6, 1) == 22.3


def test_plan_repr_and_rich_rendering() -> None:
    plan = nddrify.plan(
        {"seg": TinyCNN(), "depth": TinyCNN()}, example_input=torch.randn(1, 3, 32, 32)
    )
    text = repr(plan)
    assert text.splitlines()[0] == "Plan(2 tasks: seg, depth; 2 levels)"
    assert "level 1  seg        stage1                   stage1.2" in text
    assert "level 2  depth      stage2                   stage2.2" in text
    assert "overhead:" in text
    console = Console(record=True, width=140)
    console.print(plan)
    rendered = console.export_text()
    assert "NDDR fusion plan: seg, depth" in rendered
    assert "stage2.2" in rendered and "16×8×8" in rendered and "8×16×16" in rendered


def test_plan_is_deterministic() -> None:
    models = [tv.resnet18(), tv.resnet34()]
    assert nddrify.plan(models).levels == nddrify.plan(models).levels


def test_candidates_mark_auto_points_and_cover_the_spine() -> None:
    candidates = nddrify.get_fusion_candidates(tv.resnet18())
    names = [c.node for c in candidates]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer1.0.conv1" not in names  # inside a residual block: not on the spine
    assert "layer1.0.add" in names
    assert sum(c.auto for c in candidates) == 5


def test_stage_module_names_read_like_modules() -> None:
    traced = nddrify.tracing.trace_model(tv.resnet18())
    points = stage_ends(traced.graph)
    assert [stage_module(n, points, traced.graph) for n in points] == RESNET_POINTS


def test_declared_points_follow_timm_feature_info() -> None:
    models = [timm.create_model("resnet18"), timm.create_model("resnet18")]
    plan = nddrify.plan(models, points="declared")
    assert [lv.points[0].name for lv in plan.levels] == [
        "act1",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert nddrify.plan(models).levels[0].points[0].name == "maxpool"  # the graph's choice
    with pytest.raises(nddrify.errors.PointError, match="declares no feature_info"):
        nddrify.plan([tv.resnet18(), tv.resnet18()], points="declared")


def test_few_automatic_levels_and_points_inside_blocks_warn() -> None:
    import warnings

    x = torch.randn(1, 3, 32, 32)

    class Flat(nn.Module):  # stem, pool, block, pool, 1×1 head: two stage ends
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.pool1 = nn.MaxPool2d(2)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.pool2 = nn.MaxPool2d(2)
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool2(self.block(self.pool1(self.stem(x)))))

    with pytest.warns(UserWarning, match=r"found only 2 fusion level\(s\)") as record:
        plan = nddrify.plan([Flat(), Flat()], example_input=x)
    assert plan.points("task0") == ["pool1", "pool2"]  # never the head's logits
    assert len(record) == 1
    models = [torchvision.models.resnet18(), torchvision.models.resnet18()]
    with pytest.warns(UserWarning, match=r"'layer1.0.conv2'.*inside the block 'layer1.0'"):
        nddrify.plan(models, points=["layer1.0.conv2", "layer2"], example_input=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # block outputs, 5 automatic levels: no warning
        nddrify.plan(models, points=["layer1", "layer2"], example_input=x)
        nddrify.plan(models, example_input=x)
