"""Baselines through the same API: cross-stitch, sluice, cheaper NDDR, hard sharing."""

from __future__ import annotations

import pytest
import torch
import torchvision

import nddrify
from nddrify.baselines import CrossStitchLayer, LayerStitchLayer, SluiceLayer
from nddrify.errors import FusionConfigError, ShareError
from nddrify.layers import NDDRGroupedLayer, NDDRLayer, NDDRLowRankLayer
from nddrify.protocol import FusionKind, SpansLevels

from .models import TinyCNN, UNet
from .test_fuse import ATOL, _flatten, max_identity_diff
from .test_layers import _level

tv = torchvision.models


def test_cross_stitch_matches_hand_computation() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    layer = CrossStitchLayer(2, 3)
    assert torch.allclose(layer.weight, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.7, -0.2], [0.5, 1.5]]))
    out_a, out_b = layer(a, b)
    assert torch.allclose(out_a, 0.7 * a - 0.2 * b, atol=1e-6)
    assert torch.allclose(out_b, 0.5 * a + 1.5 * b, atol=1e-6)

    per_channel = CrossStitchLayer(2, 3, per_channel=True)
    with torch.no_grad():
        per_channel.weight.copy_(torch.arange(12.0).view(2, 2, 3))
    out_a, _ = per_channel(a, b)
    w = torch.arange(12.0).view(2, 2, 3)
    expected = w[0, 0].view(1, 3, 1, 1) * a + w[0, 1].view(1, 3, 1, 1) * b
    assert torch.allclose(out_a, expected, atol=1e-5)


def test_rows_sum_to_one_for_three_tasks() -> None:
    layer = nddrify.CrossStitch().build(_level([(1, 4, 2, 2)] * 3))
    assert torch.allclose(layer.weight.sum(dim=1), torch.ones(3))


def test_nddr_with_the_cross_stitch_pattern_is_cross_stitch() -> None:
    """Paper §3.4: NDDR with blocks fixed to a_ij·I computes the cross-stitch output exactly."""
    a_ij = torch.tensor([[0.8, 0.3], [-0.4, 1.1]])
    cross = CrossStitchLayer(2, 5)
    with torch.no_grad():
        cross.weight.copy_(a_ij)
    nddr = NDDRLayer([5, 5], norm=None, activation=None)
    with torch.no_grad():
        for i, conv in enumerate(nddr.convs):
            blocks = [a_ij[i, j] * torch.eye(5) for j in range(2)]
            conv.weight.copy_(torch.cat(blocks, dim=1)[:, :, None, None])
    x = (torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6))
    for got, want in zip(nddr(*x), cross(*x)):
        assert torch.allclose(got, want, atol=1e-6)


def test_sluice_mixes_subspaces_by_hand() -> None:
    layer = SluiceLayer(2, 4, subspaces=2)
    init = layer.weight.detach()
    assert init.diagonal().tolist() == pytest.approx([0.9] * 4)
    assert float(init[0, 2]) == pytest.approx(0.1) and float(init[0, 1]) == 0.0
    weight = torch.randn(4, 4)
    with torch.no_grad():
        layer.weight.copy_(weight)
    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    subspaces = [a[:, :2], a[:, 2:], b[:, :2], b[:, 2:]]  # (task, subspace) in row order
    mixed = [sum(weight[r, c] * subspaces[c] for c in range(4)) for r in range(4)]
    out_a, out_b = layer(a, b)
    assert torch.allclose(out_a, torch.cat(mixed[:2], 1), atol=1e-5)
    assert torch.allclose(out_b, torch.cat(mixed[2:], 1), atol=1e-5)


def test_layer_stitch_only_where_shapes_allow() -> None:
    sluice = nddrify.Sluice()
    vgg_levels = [
        _level([(1, c, s, s)] * 2, index=i)
        for i, (c, s) in enumerate(((64, 112), (128, 56), (256, 28), (512, 14), (512, 7)))
    ]
    assert sluice.stitched_levels(vgg_levels) == []
    assert sluice.build_across(vgg_levels) is None
    assert sluice.across_parameters(vgg_levels) == (0, 0)
    dilated = [_level([(1, 256, 28, 28)] * 2, index=i) for i in range(3)]
    assert sluice.stitched_levels(dilated) == [0, 1, 2]
    assert sluice.across_parameters(dilated) == (2 * 3, 0)
    assert nddrify.Sluice(layer_stitch=False).build_across(dilated) is None
    assert nddrify.Sluice(layer_stitch=False).across_parameters(dilated) == (0, 0)
    layer = sluice.build_across(dilated)
    assert isinstance(layer, LayerStitchLayer)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 3
    levels = [(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)) for _ in range(3)]
    assert torch.equal(layer(levels)[1], levels[2][1])  # identity at init
    with torch.no_grad():
        layer.betas.copy_(torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    out = layer(levels)
    assert torch.allclose(out[0], 0.2 * levels[0][0] + 0.3 * levels[1][0] + 0.5 * levels[2][0])


def test_cheaper_nddr_variants_keep_exact_identity_at_init() -> None:
    x = (torch.randn(2, 8, 4, 4), torch.randn(2, 12, 4, 4))
    low = NDDRLowRankLayer([8, 12], rank=3, init=(1.0, 0.0), norm=None, activation=None)
    for got, want in zip(low(*x), x):
        assert torch.equal(got, want)
    grouped = NDDRGroupedLayer([8, 12], groups=4, init=(1.0, 0.0), norm=None, activation=None)
    for got, want in zip(grouped(*x), x):
        assert torch.equal(got, want)


def test_grouped_nddr_is_a_block_sparse_full_nddr() -> None:
    grouped = NDDRGroupedLayer([4, 4], groups=2, norm=None, activation=None)
    with torch.no_grad():
        grouped.conv.weight.normal_()
    full = NDDRLayer([4, 4], norm=None, activation=None)
    dense = torch.zeros(8, 8)
    order = grouped.group_order.tolist()  # group-major position → task-major channel
    per_group = 4
    for g in range(2):
        for r in range(per_group):
            for c in range(per_group):
                dense[order[g * 4 + r], order[g * 4 + c]] = grouped.conv.weight[g * 4 + r, c, 0, 0]
    with torch.no_grad():
        for i, conv in enumerate(full.convs):
            conv.weight.copy_(dense[i * 4 : (i + 1) * 4, :, None, None])
    x = (torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))
    for got, want in zip(grouped(*x), full(*x)):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "factory",
    [
        nddrify.NDDR(rank=8),
        nddrify.NDDR(groups=4),
        nddrify.CrossStitch(),
        nddrify.CrossStitch(per_channel=True),
        nddrify.Sluice(),
    ],
    ids=["nddr-rank8", "nddr-groups4", "cross-stitch", "cross-stitch-per-channel", "sluice"],
)
def test_parameter_counts_match_the_built_layers(factory) -> None:
    level = _level([(1, 32, 8, 8), (1, 32, 8, 8)], [False, False], ["NCHW", "NCHW"])
    weights, norms = factory.num_parameters(level)
    layer = factory.build(level)
    assert sum(p.numel() for p in layer.parameters()) == weights + norms


def test_baselines_are_fusion_kinds() -> None:
    cross, sluice = nddrify.CrossStitch(), nddrify.Sluice()
    assert isinstance(cross, FusionKind) and not isinstance(cross, SpansLevels)
    assert isinstance(sluice, FusionKind) and isinstance(sluice, SpansLevels)
    assert (cross.name, nddrify.CrossStitch(per_channel=True).name, sluice.name) == (
        "CrossStitch",
        "CrossStitch",
        "Sluice",
    )
    level = _level([(1, 4, 3, 3)] * 2, [True, False], ["NCHW", "NHWC"])
    assert cross.build(level).channels_last == (False, True)
    layer = nddrify.Sluice(subspaces=4).build(level)
    assert layer.subspaces == 4 and layer.channels_last == (False, True)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: nddrify.CrossStitch(init=(0.9,)),
            r"init=\(0.9,\) is not supported by cross-stitch",
        ),
        (lambda: nddrify.CrossStitch(init="xavier"), "init='xavier' is not supported by cross"),
        (lambda: nddrify.CrossStitch(init=(0.9, float("nan"))), "NaN or inf"),
        (lambda: nddrify.Sluice(init="xavier"), "init='xavier' is not supported by sluice"),
        (lambda: nddrify.Sluice(init=[1, 2, 3]), r"init=\[1, 2, 3\] is not supported by sluice"),
        (lambda: nddrify.Sluice(subspaces=0), "subspaces=0 is not valid"),
        (lambda: nddrify.NDDR(init=(0.9,)), r"init=\(0.9,\) is not supported by NDDR"),
        (lambda: nddrify.NDDR(rank=4, groups=2), "choose rank= or groups=, not both"),
        (lambda: CrossStitchLayer(2, 4, init=(0.9,)), "not supported by cross-stitch"),
        (lambda: SluiceLayer(2, 4, init="xavier"), "not supported by sluice"),
    ],
)
def test_bad_options_fail_when_the_factory_is_made(make, message) -> None:
    with pytest.raises(FusionConfigError, match=message):
        make()


def test_widths_are_checked_naming_the_level() -> None:
    level = _level([(1, 256, 8, 8), (1, 64, 8, 8)], index=1)
    for call in (nddrify.CrossStitch().build, nddrify.CrossStitch().num_parameters):
        with pytest.raises(FusionConfigError, match=r"fusion level 2 .*same width.*\[256, 64\]"):
            call(level)
    odd = _level([(1, 6, 8, 8)] * 2, index=0)
    for call in (nddrify.Sluice(subspaces=4).build, nddrify.Sluice(subspaces=4).num_parameters):
        with pytest.raises(FusionConfigError, match=r"fusion level 1 .*subspaces=4"):
            call(odd)


KINDS = {
    "nddr": {},
    "cross_stitch": {"fusion": "cross_stitch"},
    "sluice": {"fusion": "sluice", "subspaces": 2},
    "nddr-low-rank": {"fusion": nddrify.NDDR(rank=16, init=(1.0, 0.0), norm=None, activation=None)},
    "nddr-grouped": {"fusion": nddrify.NDDR(groups=4, init=(1.0, 0.0), norm=None, activation=None)},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_identity_at_init_and_learns(kind: str) -> None:
    models = [tv.resnet50(replace_stride_with_dilation=[False, True, True]) for _ in range(2)]
    x = torch.randn(2, 3, 64, 64)
    options = dict(KINDS[kind])
    identity = dict(options)
    if kind in ("nddr", "cross_stitch", "sluice"):
        identity["init"] = (1.0, 0.0)
    if kind == "nddr":
        identity.update(norm=None, activation=None)
    fused = nddrify.fuse(models, example_input=x[:1], **identity)
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    assert max_identity_diff(models, fused, x, train=True) <= ATOL
    if kind == "sluice":  # dilated layer3/layer4 keep 28×28 but change width: no layer-stitch
        assert not hasattr(fused, "shortcut")
    fused = nddrify.fuse(models, example_input=x[:1], **options).train()
    sum(t.mean() for t in _flatten(fused(x))).backward()
    assert [n for n, p in fused.named_parameters() if p.grad is None] == []


def test_sluice_layer_stitch_in_a_fused_model() -> None:
    models = [UNet(), UNet()]
    x = torch.randn(2, 3, 32, 32)
    fused = nddrify.fuse(
        models,
        points=["bottleneck.2", "bottleneck.5"],
        fusion="sluice",
        init=(1.0, 0.0),
        example_input=x[:1],
    )
    assert isinstance(fused.shortcut, LayerStitchLayer) and fused.shortcut.levels == (0, 1)
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    assert nddrify.meta.fused_plan(fused).shortcut_weights == 4


def test_cross_stitch_needs_equal_widths() -> None:
    with pytest.raises(FusionConfigError, match=r"fusion level 2 .*same width.*\[256, 64\]"):
        nddrify.fuse([tv.resnet50(), tv.resnet18()], fusion="cross_stitch")


def test_param_groups_use_each_kinds_multiplier() -> None:
    fused = nddrify.fuse(
        [TinyCNN(), TinyCNN()], fusion="cross_stitch", example_input=torch.randn(1, 3, 32, 32)
    )
    groups = {g["name"]: g for g in nddrify.param_groups(fused, lr=1e-3)}
    assert (
        groups["fusion_no_decay"]["lr_mult"] == 1000
        and groups["fusion_no_decay"]["weight_decay"] == 0
    )
    groups = {g["name"]: g for g in nddrify.param_groups(fused, lr=1e-3, fusion_lr_mult=10)}
    assert groups["fusion_no_decay"]["lr"] == pytest.approx(1e-2)


def test_share_runs_one_trunk_then_task_layers() -> None:
    seg, depth = tv.resnet18(num_classes=4), tv.resnet18(num_classes=1)
    shared = nddrify.share({"seg": seg, "depth": depth})
    plan = nddrify.meta.fused_plan(shared)
    assert plan.points("seg") == ["layer4.1.relu_1"]  # the last automatic point
    assert (
        "shared_layer4 = self.shared.layer4(shared_layer3)" in shared.code
        and "depth_avgpool = self.depth.avgpool(shared_layer4)" in shared.code
    )
    x = torch.randn(2, 3, 64, 64)
    seg.eval(), depth.eval(), shared.eval()
    with torch.no_grad():
        out = shared(x)
        assert torch.allclose(out["seg"], seg(x), atol=ATOL)  # trunk = task 0's weights
        assert out["depth"].shape == (2, 1)
    # Only the trunk and each task's own layers are parameters.
    trunk = sum(p.numel() for n, p in seg.named_parameters() if not n.startswith("fc"))
    assert sum(p.numel() for p in shared.parameters()) == trunk + 512 * 4 + 4 + 512 * 1 + 1
    weights = nddrify.training.task_state_dict(shared, "depth")
    assert torch.equal(weights["layer1.0.conv1.weight"], seg.state_dict()["layer1.0.conv1.weight"])
    assert torch.equal(weights["fc.weight"], depth.fc.weight)
    shared.train()
    sum(t.mean() for t in shared(x).values()).backward()
    assert [n for n, p in shared.named_parameters() if p.grad is None] == []


def test_share_split_by_name_and_averaged_trunk() -> None:
    models = [UNet(), UNet(classes=1)]
    shared = nddrify.share(
        models, split="enc2", trunk="average", example_input=torch.randn(1, 3, 32, 32)
    )
    mean = (models[0].enc1[0].weight + models[1].enc1[0].weight) / 2
    assert torch.allclose(shared.get_submodule("shared.enc1.0").weight, mean)
    assert hasattr(shared.task1, "enc3") and not hasattr(shared.task1, "enc1")
    out = shared(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 3, 32, 32), (2, 1, 32, 32)]


def test_share_needs_the_same_trunk() -> None:
    with pytest.raises(ShareError, match="same architecture up to the split point"):
        nddrify.share([tv.resnet18(), tv.resnet34()])
    with pytest.raises(ShareError, match="trunk='median'"):
        nddrify.share([tv.resnet18(), tv.resnet18()], trunk="median")


def test_inspect_shows_every_kind(capsys) -> None:
    from nddrify.cli import main

    assert main(["inspect", "timm:resnet18", "timm:resnet18", "--fusion", "cross_stitch"]) == 0
    assert "20 CrossStitch weights" in capsys.readouterr().out
    assert (
        main(["inspect", "torchvision:resnet50", "torchvision:resnet50", "--rank", "64", "--json"])
        == 0
    )
    assert '"fusion_weights": ' in capsys.readouterr().out


def test_readme_custom_fusion_example() -> None:
    """The README's custom-fusion example, verbatim in spirit: a factory plus a FusionLayer."""
    from nddrify.layers import FusionLayer

    class MeanLayer(FusionLayer):
        def forward(self, *maps):
            mean = torch.stack(maps).mean(dim=0)
            return tuple(mean for _ in maps)

    class Averaging:
        name = "Averaging"

        def build(self, level):
            return MeanLayer()

        def num_parameters(self, level):
            return (0, 0)

    a, b = TinyCNN(), TinyCNN()
    x = torch.randn(2, 3, 32, 32)
    fused = nddrify.fuse([a, b], fusion=Averaging(), points=["stage2"], example_input=x[:1]).eval()
    a.eval(), b.eval()
    with torch.no_grad():
        mean = (a.stage2(a.stage1(a.stem(x))) + b.stage2(b.stage1(b.stem(x)))) / 2
        expected = a.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(mean, 1), 1))
        assert torch.allclose(fused(x)[0], expected, atol=1e-6)
    assert nddrify.training.overhead(fused).fusion_weights == 0
