"""Automatic stage ends on the trunk: the last block before each downsampling, never a side
branch's pooled map, a padding op, a point inside a block, or the head's logits."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nddrify.graph_analysis import annotate, enclosing_block, spine, stage_ends, stage_module
from nddrify.tracing import TracedModel, trace_model

SMALL = torch.randn(1, 3, 96, 96)


def _traced(model: nn.Module, example: torch.Tensor | None = SMALL) -> TracedModel:
    return trace_model(model.eval(), example_input=example)


def _auto(traced: TracedModel) -> list[str]:
    graph = annotate(traced.graph)
    points = stage_ends(graph)
    return [stage_module(n, points, graph) for n in points]


class Flat(nn.Module):
    """Stem conv, max-pool, a conv block, max-pool, a 1×1 classifier conv producing logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.classifier = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.act(self.stem(x)))
        x = self.pool2(self.relu(self.bn(self.conv(x))))
        return self.classifier(x)


class SpatialGate(nn.Module):
    """Spatial attention: mean and max over channels, pooled below the block's resolution, a
    conv, sigmoid, upsampled back and multiplied in (like CSATv2's and GhostNetV2's gates)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        attn = torch.sigmoid(self.conv(self.pool(attn)))
        return x * F.interpolate(attn, size=x.shape[-2:])


class SE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.expand = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.se = SE(cout)
        self.gate = SpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.se(torch.relu(self.bn(self.conv(x)))))


class GatedNet(nn.Module):
    """Two stages of gated blocks (the last map 4×4, the gate's pooled map 2×2) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(Block(3, 8, 2), Block(8, 8, 1)),
            nn.Sequential(Block(8, 16, 2), Block(16, 16, 1)),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x).mean((2, 3)))


class LastFeature(nn.Module):
    """An smp encoder returning its deepest feature map."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]


TIMM_POINTS = {
    # the last block before each downsampling, not the strided first block of the run
    "dpn68": [
        "features.conv1_pool",
        "features.conv2_3",
        "features.conv3_4",
        "features.conv4_12",
        "features.conv5_bn_ac",
    ],
    # the end of the middle flow (blocks.10), not the entry flow's strided blocks.2
    "xception41": ["stem", "blocks.0", "blocks.1", "blocks.10", "blocks.12"],
    "ghostnet_050": ["blocks.0", "blocks.2", "blocks.4", "blocks.6", "blocks.9.0.bn1"],
    "tf_mobilenetv3_large_minimal_100": [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.4",
        "blocks.6.0.bn1",
    ],
    # "same" padding before every strided conv does not split a stage
    "tf_efficientnet_b0": ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
}


@pytest.mark.parametrize("name", list(TIMM_POINTS))
def test_timm_stage_ends_are_the_last_blocks(name: str) -> None:
    traced = _traced(timm.create_model(name, pretrained=False))
    assert _auto(traced) == TIMM_POINTS[name]
    graph = traced.graph
    assert all(enclosing_block(n, graph) is None for n in stage_ends(graph))


def test_torchvision_resnet18_and_vgg16_unchanged() -> None:
    assert _auto(_traced(torchvision.models.resnet18())) == [
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert _auto(_traced(torchvision.models.vgg16(), None)) == [
        "features.4",
        "features.9",
        "features.16",
        "features.23",
        "features.30",
    ]


def test_flat_net_never_fuses_the_head_logits() -> None:
    traced = _traced(Flat(), torch.randn(1, 3, 32, 32))
    assert _auto(traced) == ["pool1", "pool2"]
    assert "classifier" not in [n.meta["qualname"] for n in spine(traced.graph)]


def test_gate_maps_are_not_the_trunk() -> None:
    traced = _traced(GatedNet(), torch.randn(1, 3, 16, 16))
    graph = traced.graph
    assert _auto(traced) == ["stages.0", "stages.1"]
    assert spine(graph)[-1].meta["qualname"] == "stages.1.1.gate.mul"
    for n in stage_ends(graph):
        assert enclosing_block(n, graph) is None


def test_enclosing_block_names_the_outermost_block() -> None:
    traced = _traced(GatedNet(), torch.randn(1, 3, 16, 16))
    graph = traced.graph
    assert enclosing_block(traced.node("stages.0.1.se.reduce"), graph) == "stages.0.1.se"
    assert enclosing_block(traced.node("stages.0.1.gate.conv"), graph) == "stages.0.1.gate"
    assert enclosing_block(traced.node("stages.0.1.bn"), graph) is None
    resnet = _traced(torchvision.models.resnet18())
    assert enclosing_block(resnet.node("layer1.0.conv2"), resnet.graph) == "layer1.0"
    assert enclosing_block(resnet.node("layer2.0.downsample.0"), resnet.graph) == "layer2.0"
    assert enclosing_block(resnet.node("layer1.0.add"), resnet.graph) is None
    assert enclosing_block(resnet.node("layer1"), resnet.graph) is None


def test_smp_efficientnet_encoder_gets_every_stage() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    encoder = smp.encoders.get_encoder("efficientnet-b0", weights=None)
    traced = _traced(LastFeature(encoder), torch.randn(1, 3, 64, 64))
    names = [n.meta["qualname"] for n in stage_ends(traced.graph)]
    assert names == [
        "encoder._blocks.0._bn2",
        "encoder._blocks.2.add",
        "encoder._blocks.4.add",
        "encoder._blocks.10.add",
        "encoder._blocks.15._bn2",
    ]
