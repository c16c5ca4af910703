"""NDDR and NDDR-Shortcut layers, checked against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nddrify
from nddrify.errors import FusionConfigError
from nddrify.layers import (
    NDDR,
    NDDRGroupedLayer,
    NDDRLayer,
    NDDRLowRankLayer,
    NDDRShortcutLayer,
    Shortcut,
    block_diagonal,
    check_init,
    default_init,
    resize_bilinear,
)
from nddrify.plans import FusionLevel, FusionPoint
from nddrify.protocol import FusionKind, SpansLevels


def _level(shapes, nonnegative=None, layouts=None, index: int = 0) -> FusionLevel:
    """A fusion level of these (N, C, H, W) shapes, one task each."""
    nonnegative = nonnegative or [False] * len(shapes)
    layouts = layouts or ["NCHW"] * len(shapes)
    return FusionLevel(
        index,
        tuple(
            FusionPoint(f"t{k}", f"p{index}", f"n{index}", tuple(s), n, layout)
            for k, (s, n, layout) in enumerate(zip(shapes, nonnegative, layouts))
        ),
    )


def _blocks(layer: NDDRLayer, task: int) -> list[torch.Tensor]:
    weight = layer.convs[task].weight[:, :, 0, 0]
    return list(weight.split(layer.in_channels, dim=1))


def test_diagonal_init_two_tasks() -> None:
    layer = NDDRLayer([3, 3], init=(0.9, 0.1), norm=None, activation=None)
    own, other = _blocks(layer, 0)
    assert torch.equal(own, 0.9 * torch.eye(3))
    assert torch.equal(other, 0.1 * torch.eye(3))
    other, own = _blocks(layer, 1)
    assert torch.equal(own, 0.9 * torch.eye(3)) and torch.equal(other, 0.1 * torch.eye(3))


def test_default_init_rows_sum_to_one_for_more_tasks() -> None:
    assert default_init(2) == (0.9, 0.1)
    layer = NDDRLayer([2, 2, 2, 2, 2], norm=None, activation=None)
    for task in range(5):
        weight = layer.convs[task].weight.detach()[:, :, 0, 0]
        assert torch.allclose(weight.sum(dim=1), torch.ones(2))
        assert math.isclose(float(weight[0, 2 * task]), 0.9, rel_tol=1e-6)


def test_non_square_blocks_use_identity_on_the_overlap() -> None:
    layer = NDDRLayer([2, 4], init=(1.0, 0.5), norm=None, activation=None)
    own, other = _blocks(layer, 0)  # task 0: 2 outputs
    assert torch.equal(own, torch.eye(2))
    assert torch.equal(other, 0.5 * torch.eye(2, 4))
    other, own = _blocks(layer, 1)  # task 1: 4 outputs
    assert torch.equal(other, 0.5 * torch.eye(4, 2))
    assert torch.equal(own, torch.eye(4))


def test_forward_matches_per_task_convolutions_of_the_concatenation() -> None:
    layer = NDDRLayer([3, 5], init="xavier", norm="batchnorm", activation="relu").eval()
    with torch.no_grad():
        for norm in layer.norms:
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    out_a, out_b = layer(a, b)
    stacked = torch.cat([a, b], dim=1)
    for got, conv, norm in zip((out_a, out_b), layer.convs, layer.norms):
        expected = F.relu(
            F.batch_norm(
                F.conv2d(stacked, conv.weight),
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                eps=1e-3,
            )
        )
        assert torch.allclose(got, expected, atol=1e-6)


def test_channels_last_inputs_are_fused_on_the_last_axis() -> None:
    nchw = NDDRLayer([3, 5], init="xavier", norm=None, activation=None)
    nhwc = NDDRLayer([3, 5], norm=None, activation=None, layouts=[False, True])
    nhwc.load_state_dict(nchw.state_dict())
    a, b = torch.randn(2, 3, 4, 6), torch.randn(2, 5, 4, 6)
    want_a, want_b = nchw(a, b)
    got_a, got_b = nhwc(a, b.permute(0, 2, 3, 1))
    assert torch.allclose(got_a, want_a, atol=1e-6)
    assert got_b.shape == (2, 4, 6, 5)
    assert torch.allclose(got_b, want_b.permute(0, 2, 3, 1), atol=1e-6)


def test_batchnorm_follows_the_official_settings() -> None:
    layer = NDDRLayer([4, 4])
    assert all(isinstance(n, nn.BatchNorm2d) for n in layer.norms)
    assert {(n.eps, n.momentum) for n in layer.norms} == {(1e-3, 0.05)}
    assert all(c.bias is None and c.kernel_size == (1, 1) for c in layer.convs)


def test_auto_activation_only_clips_non_negative_features() -> None:
    layer = NDDRLayer([2, 2], activation="auto", nonnegative=[True, False])
    assert isinstance(layer.activations[0], nn.ReLU)
    assert isinstance(layer.activations[1], nn.Identity)
    layer = NDDRLayer([2, 2], activation=nn.GELU)
    assert all(isinstance(a, nn.GELU) for a in layer.activations)


def test_fuse_auto_activation_follows_the_graph() -> None:
    import timm
    import torchvision

    fused = nddrify.fuse([torchvision.models.resnet18(), torchvision.models.resnet18()])
    assert all(isinstance(a, nn.ReLU) for a in fused.nddr1.activations)  # after ReLU + maxpool
    fused = nddrify.fuse([timm.create_model("convnext_atto"), timm.create_model("convnext_atto")])
    assert all(isinstance(a, nn.Identity) for a in fused.nddr1.activations)  # residual sums
    fused = nddrify.fuse(
        [timm.create_model("convnext_atto"), timm.create_model("convnext_atto")],
        activation="relu",
    )
    assert all(isinstance(a, nn.ReLU) for a in fused.nddr1.activations)


def test_resize_modes() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(
        resize_bilinear(x, (8, 8), "align_corners_true"),
        F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True),
    )
    assert torch.equal(
        resize_bilinear(x, (8, 8), "align_corners_false"),
        F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False),
    )
    # TF1 legacy: source = destination · in/out, no half-pixel offset, clamp at the border.
    legacy = resize_bilinear(torch.tensor([[[[0.0, 10.0, 20.0]]]]), (1, 5), "tf_legacy")
    expected = [0.0, 6.0, 12.0, 18.0, 20.0]  # sources 0, .6, 1.2, 1.8, 2.4 (clamped to 2)
    assert torch.allclose(legacy.flatten(), torch.tensor(expected))
    with pytest.raises(FusionConfigError, match="resize mode"):
        resize_bilinear(x, (8, 8), "nearest")


def test_shortcut_layer_resizes_concatenates_and_reduces() -> None:
    layer = NDDRShortcutLayer([[2, 3], [4, 5]], norm=None, activation=None)
    assert [tuple(c.weight.shape) for c in layer.convs] == [(4, 6, 1, 1), (5, 8, 1, 1)]
    levels = [
        (torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8)),
        (torch.randn(1, 4, 4, 4), torch.randn(1, 5, 4, 4)),
    ]
    out = layer(levels)
    small = F.interpolate(levels[0][1], size=(4, 4), mode="bilinear", align_corners=False)
    expected = F.conv2d(torch.cat([small, levels[1][1]], 1), layer.convs[1].weight)
    assert torch.allclose(out[1], expected, atol=1e-6)
    levels = [
        _level([(1, 2, 8, 8), (1, 3, 8, 8)], index=0),
        _level([(1, 4, 4, 4), (1, 5, 4, 4)], index=1),
    ]
    assert nddrify.Shortcut().across_parameters(levels) == (
        4 * 6 + 5 * 8,
        2 * (4 + 5),
    )


def test_block_diagonal_is_every_diagonal_init() -> None:
    matrix = block_diagonal([2, 3], [2, 3], 0.9, 0.1)
    assert torch.equal(matrix[:2, :2], 0.9 * torch.eye(2))
    assert torch.equal(matrix[:2, 2:], 0.1 * torch.eye(2, 3))
    assert torch.equal(matrix[2:, :2], 0.1 * torch.eye(3, 2))
    assert torch.equal(matrix[2:, 2:], 0.9 * torch.eye(3))
    layer = NDDRLayer([2, 3], init=(0.9, 0.1), norm=None, activation=None)
    rows = torch.cat([conv.weight[:, :, 0, 0] for conv in layer.convs])
    assert torch.equal(rows, matrix)
    half = block_diagonal([2, 3], [2, 3], 0.5, 0.25, dtype=torch.float16)
    assert half.dtype == torch.float16 and float(half[0, 2]) == 0.25


def test_one_init_validator() -> None:
    assert check_init(None, 4) == default_init(4) and check_init(None) is None
    assert check_init([1, 0]) == (1.0, 0.0) and check_init("xavier") == "xavier"
    with pytest.raises(FusionConfigError, match=r"init=\(0.9,\) is not supported by NDDR"):
        check_init((0.9,))
    with pytest.raises(FusionConfigError, match=r"init='xavier'.*keeps the diagonal"):
        check_init("xavier", xavier=False, kind="cross-stitch")
    with pytest.raises(FusionConfigError, match="NaN or inf"):
        check_init((math.inf, 0.0))
    with pytest.raises(FusionConfigError, match=r"init=.*not supported"):
        check_init((True, False))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"init": (0.9,)}, r"init=\(0.9,\) is not supported by NDDR; use \(alpha, beta\)"),
        ({"init": "kaiming"}, "init='kaiming' is not supported"),
        ({"init": (float("nan"), 0.1)}, "NaN or inf"),
        ({"rank": 4, "groups": 2}, "choose rank= or groups=, not both"),
        ({"rank": 4, "init": "xavier"}, r"init='xavier' is not supported by NDDR\(rank=4\)"),
        ({"rank": 0}, "rank=0 is not valid"),
        ({"groups": 0}, "groups=0 is not valid"),
        ({"groups": 2, "resize": "align_corners_false"}, "only supported by the full NDDR"),
        ({"resize": "cubic"}, "resize='cubic' is unknown"),
        ({"norm": "layernorm"}, "norm='layernorm' is not supported"),
        ({"activation": "swish"}, "activation='swish' is not supported"),
    ],
)
def test_nddr_checks_its_options_when_made(options, message) -> None:
    with pytest.raises(FusionConfigError, match=message):
        NDDR(**options)


def test_shortcut_checks_its_options() -> None:
    with pytest.raises(FusionConfigError, match="norm='layernorm'"):
        Shortcut(norm="layernorm")
    levels = [_level([(1, 4, 4, 4)] * 2)]
    with pytest.raises(FusionConfigError, match="resize_mode='nearest' is unknown"):
        Shortcut(resize_mode="nearest").across_parameters(levels)
    with pytest.raises(FusionConfigError, match="resize_mode='nearest' is unknown"):
        Shortcut(resize_mode="nearest").build_across(levels)


def test_nddr_is_a_fusion_kind() -> None:
    assert isinstance(NDDR(), FusionKind) and not isinstance(NDDR(), SpansLevels)
    assert isinstance(Shortcut(), SpansLevels)
    assert [NDDR().name, NDDR(rank=64).name, NDDR(groups=8).name] == [
        "NDDR",
        "NDDR(rank=64)",
        "NDDR(groups=8)",
    ]
    level = _level([(1, 4, 4, 4), (1, 8, 4, 4)], [True, False], ["NCHW", "NHWC"])
    layer = NDDR().build(level)
    assert isinstance(layer, NDDRLayer) and layer.in_channels == (4, 8)
    assert [type(a) for a in layer.activations] == [nn.ReLU, nn.Identity]
    assert layer.channels_last == (False, True)
    assert isinstance(NDDR(rank=2).build(level), NDDRLowRankLayer)
    assert isinstance(NDDR(groups=4).build(level), NDDRGroupedLayer)
    assert NDDR(resize="tf_legacy").build(level).resize == "tf_legacy"


@pytest.mark.parametrize(
    "kind", [NDDR(), NDDR(norm=None), NDDR(rank=3), NDDR(groups=2), NDDR(norm=nn.LayerNorm)]
)
def test_nddr_counts_match_the_built_layers(kind) -> None:
    level = _level([(1, 6, 4, 4), (1, 10, 4, 4), (1, 8, 4, 4)])
    weights, norms = kind.num_parameters(level)
    assert sum(p.numel() for p in kind.build(level).parameters()) == weights + norms


def test_grouped_widths_are_checked_naming_the_level() -> None:
    level = _level([(1, 6, 4, 4), (1, 8, 4, 4)], index=2)
    for call in (NDDR(groups=4).num_parameters, NDDR(groups=4).build):
        with pytest.raises(
            FusionConfigError, match=r"fusion level 3 \(t0 'p2', t1 'p2'\).*groups=4"
        ):
            call(level)


def test_shortcut_across_levels_uses_the_last_flags_and_every_layout() -> None:
    levels = [
        _level([(1, 2, 8, 8), (1, 3, 8, 8)], [False, False], ["NHWC", "NCHW"], index=0),
        _level([(1, 4, 4, 4), (1, 5, 4, 4)], [True, False], ["NCHW", "NHWC"], index=1),
    ]
    layer = Shortcut(resize_mode="tf_legacy").build_across(levels)
    assert isinstance(layer, NDDRShortcutLayer) and layer.resize_mode == "tf_legacy"
    assert [tuple(c.weight.shape) for c in layer.convs] == [(4, 6, 1, 1), (5, 8, 1, 1)]
    assert [type(a) for a in layer.activations] == [nn.ReLU, nn.Identity]
    assert layer.channels_last == ((True, False), (False, True))
    weights, norms = Shortcut().across_parameters(levels)
    assert sum(p.numel() for p in layer.parameters()) == weights + norms
    assert Shortcut().build_across([]) is None and Shortcut().across_parameters([]) == (0, 0)
