"""recipes.models: the paper's networks — exact parameter counts (from the architecture
arithmetic), output strides and odd-size behaviour, automatic fusion points, the VGG-16-Shortcut,
and loading local weight files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import nddrify
from recipes.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from recipes.models import (
    HEAD_NAMES,
    MODELS,
    ASPPv2,
    BilinearUpsample,
    DeepLabResNet,
    alexnet_fcn32s,
    build_model,
    deeplab_resnet101,
    deeplab_vgg16,
    load_pretrained,
    vgg16_classifier,
)

VGG16_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG_BN_POOLS = ["features.6", "features.13", "features.23", "features.33", "features.44"]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def vgg16_feature_params(batch_norm: bool) -> int:
    total, cin = 0, 3
    for cout in VGG16_CONFIG:
        if cout == "M":
            continue
        total += conv(cin, cout) + (2 * cout if batch_norm else 0)  # torchvision keeps conv bias
        cin = cout
    return total


def resnet101_backbone_params() -> int:
    total = conv(3, 64, 7, bias=False) + 2 * 64
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        for block in range(blocks):
            total += conv(inplanes, planes, 1, False) + 2 * planes
            total += conv(planes, planes, 3, False) + 2 * planes
            total += conv(planes, 4 * planes, 1, False) + 2 * 4 * planes
            if block == 0:  # projection shortcut
                total += conv(inplanes, 4 * planes, 1, False) + 2 * 4 * planes
            inplanes = 4 * planes
    return total


def output_shape(model: nn.Module, size: int | tuple[int, int]) -> tuple[int, ...]:
    """The output shape for a 1×3×H×W input, propagated on fake tensors (no arithmetic)."""
    height, width = (size, size) if isinstance(size, int) else size
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model.eval()(mode.from_tensor(torch.empty(1, 3, height, width)))
    return tuple(out.shape)


@pytest.fixture(scope="module")
def age_classifier() -> nn.Module:
    return vgg16_classifier(100)


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[nn.Module, nn.Module]:
    return deeplab_resnet101(40), deeplab_resnet101(3)


# ----------------------------------------------------------------------------- parameter counts


def test_deeplab_vgg16_parameter_count_with_bn() -> None:
    head = conv(512, 1024, 3, bias=False) + 2 * 1024 + conv(1024, 1024, 1, bias=False) + 2 * 1024
    expected = vgg16_feature_params(batch_norm=True) + head + conv(1024, 40, 1)
    assert expected == 20_535_400
    assert count(deeplab_vgg16(40)) == expected


def test_deeplab_vgg16_parameter_count_without_bn() -> None:
    expected = (
        vgg16_feature_params(batch_norm=False)
        + conv(512, 1024, 3)
        + conv(1024, 1024, 1)
        + conv(1024, 3, 1)
    )
    assert expected == 20_486_979
    assert count(deeplab_vgg16(3, batch_norm=False)) == expected


def test_deeplab_resnet101_parameter_counts(resnet_pair: tuple[nn.Module, nn.Module]) -> None:
    backbone = resnet101_backbone_params()
    assert backbone == 42_500_160  # torchvision resnet101 (44,549,160) without its fc
    seg, normal = resnet_pair
    assert count(seg) == backbone + 4 * conv(2048, 40, 3) == 45_449_440
    assert count(normal) == backbone + 4 * conv(2048, 3, 3)
    aspp_v3 = (
        conv(2048, 256, 1, False)
        + 2 * 256  # 1×1 branch
        + 3 * (conv(2048, 256, 3, False) + 2 * 256)  # rates 12, 24, 36
        + conv(2048, 256, 1, False)
        + 2 * 256  # image pooling
        + conv(5 * 256, 256, 1, False)
        + 2 * 256  # projection
        + conv(256, 256, 3, False)
        + 2 * 256
        + conv(256, 40, 1)
    )
    v3 = deeplab_resnet101(40, aspp="v3")
    assert count(v3) == backbone + aspp_v3 == 58_635_880
    assert v3.get_submodule(HEAD_NAMES["deeplab_resnet101"][0]).out_channels == 40


def test_alexnet_fcn32s_parameter_count() -> None:
    features = conv(3, 64, 11) + conv(64, 192, 5) + conv(192, 384) + conv(384, 256) + conv(256, 256)
    head = conv(256, 4096, 6) + conv(4096, 4096, 1) + conv(4096, 3, 1)
    model = alexnet_fcn32s(3)
    assert count(model) == features + head == 57_016_131
    # the ×32 upsampling is fixed (a buffer, never trained)
    assert [name for name, _ in model.named_buffers()] == ["upsample.kernel"]


def test_vgg16_classifier_parameter_counts(age_classifier: nn.Module) -> None:
    def expected(classes: int) -> int:
        classifier = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes
        return vgg16_feature_params(batch_norm=False) + classifier

    assert count(age_classifier) == expected(100) == 134_670_244
    gender = vgg16_classifier(2)
    assert count(gender) == expected(2) == 134_268_738
    assert [age_classifier.classifier[6].out_features, gender.classifier[6].out_features] == [
        100,
        2,
    ]
    assert output_shape(age_classifier, 224) == (1, 100)
    assert output_shape(gender, 96) == (1, 2)


# ----------------------------------------------------------------------------- geometry


def test_deeplab_vgg16_layers_follow_the_official_net() -> None:
    model = deeplab_vgg16(40)
    pools = [model.features[int(p.split(".")[1])] for p in VGG_BN_POOLS]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools[:4]] == [(3, 2, 1)] * 3 + [
        (3, 1, 1)
    ]
    assert isinstance(pools[4], nn.AvgPool2d) and not pools[4].count_include_pad
    assert isinstance(model.features[43], nn.MaxPool2d) and model.features[43].stride == 1
    conv5 = [model.features[i] for i in (34, 37, 40)]
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) for c in conv5)
    assert all(model.features[i].dilation == (1, 1) for i in (0, 3, 7, 30))
    assert (model.head.fc6.kernel_size, model.head.fc6.dilation, model.head.fc6.padding) == (
        (3, 3),
        (12, 12),
        (12, 12),
    )
    assert model.head.fc6.bias is None and model.head.fc8.bias is not None
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 15 and all(n.eps == 1e-3 and n.momentum == 0.05 for n in norms)
    assert [type(m).__name__ for m in model.head] == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Dropout",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Dropout",
        "Conv2d",
    ]


@pytest.mark.parametrize(
    "size, sizes", [(321, [161, 81, 41, 41, 41]), (320, [160, 80, 40, 40, 40])]
)
def test_deeplab_vgg16_pools_round_up_like_tf_same(size: int, sizes: list[int]) -> None:
    """TF 'SAME' pooling gives ceil(H/2): 321 → 161 → 81 → 41 (not 160)."""
    model = deeplab_vgg16(40)
    x = torch.randn(1, 2, size, size)
    seen = []
    for index in (6, 13, 23, 33, 43):
        x = model.features[index](x)
        if index == 43:
            x = model.features[44](x)
        seen.append(x.shape[-1])
    assert seen == sizes


def test_pool5_average_ignores_the_padding() -> None:
    """TF 'SAME' average pooling divides by the valid pixels only: ones stay ones at the border."""
    model = deeplab_vgg16(3)
    out = model.features[44](torch.ones(1, 1, 4, 5))
    assert torch.equal(out, torch.ones(1, 1, 4, 5))


@pytest.mark.parametrize(
    "name, outputs, size, expected",
    [
        ("deeplab_vgg16", 40, 321, (1, 40, 41, 41)),
        ("deeplab_vgg16", 3, 65, (1, 3, 9, 9)),
        ("deeplab_vgg16", 3, (320, 240), (1, 3, 40, 30)),
        ("alexnet_fcn32s", 40, 321, (1, 40, 321, 321)),
        ("alexnet_fcn32s", 3, (17, 230), (1, 3, 17, 230)),
    ],
)
def test_output_shapes(name: str, outputs: int, size: int, expected: tuple[int, ...]) -> None:
    assert output_shape(build_model(name, outputs), size) == expected


def test_deeplab_resnet101_output_stride_8(resnet_pair: tuple[nn.Module, nn.Module]) -> None:
    seg, normal = resnet_pair
    assert output_shape(seg, 321) == (1, 40, 41, 41)
    assert output_shape(normal, (320, 240)) == (1, 3, 40, 30)
    assert [seg.backbone.layer3[1].conv2.dilation, seg.backbone.layer4[1].conv2.dilation] == [
        (2, 2),
        (4, 4),
    ]
    assert [c.dilation for c in seg.head.classifier] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_deeplab_resnet101_forward_values_sum_the_aspp_branches() -> None:
    head = ASPPv2(8, 2, rates=(1, 2))
    x = torch.randn(1, 8, 5, 5)
    expected = head.classifier[0](x) + head.classifier[1](x)
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_fcn32s_crop_fits_every_input_size() -> None:
    model = alexnet_fcn32s(2)
    for size in range(1, 420, 11):
        assert output_shape(model, (size, size + 3)) == (1, 2, size, size + 3), size


def test_fcn32s_upsampling_is_aligned_with_the_score_grid() -> None:
    """Score pixel j is centred on input row 32·j + 21: a linear ramp in j must come out as
    (x − 21) / 32 at every input row x between the first and the last score centre (outside
    them, as in FCN, only one score pixel contributes: the value fades towards the border)."""
    up = BilinearUpsample(1, factor=32, offset=10)
    scores = torch.arange(4, dtype=torch.float64).reshape(1, 1, 4, 1).expand(1, 1, 4, 3)
    out = up(scores.float(), torch.empty(1, 3, 118, 118))
    rows = torch.arange(21, 32 * 3 + 21 + 1)
    expected = (rows - 21).float() / 32
    assert torch.allclose(out[0, 0, rows, 50], expected, atol=1e-6)


# ----------------------------------------------------------------------------- fusion points


def test_plan_picks_pool1_to_pool5_of_deeplab_vgg16_at_321() -> None:
    plan = nddrify.plan(
        [deeplab_vgg16(40), deeplab_vgg16(3)], "auto", example_input=torch.randn(1, 3, 321, 321)
    )
    for task in plan.tasks:
        assert plan.points(task) == VGG_BN_POOLS
    assert [lv.points[0].shape[1:] for lv in plan.levels] == [
        (64, 161, 161),
        (128, 81, 81),
        (256, 41, 41),
        (512, 41, 41),
        (512, 41, 41),
    ]
    assert plan.overhead.fusion_weights == 2_441_216  # the paper's "1.2M per task"


def test_plan_picks_the_resnet_stage_ends(resnet_pair: tuple[nn.Module, nn.Module]) -> None:
    plan = nddrify.plan(list(resnet_pair), "auto", example_input=torch.randn(1, 3, 321, 321))
    assert [lv.points[0].name for lv in plan.levels] == [
        "backbone.maxpool",
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
    ]
    assert plan.points("task1") == [
        "backbone.maxpool",
        "backbone.layer1.2.relu_2",
        "backbone.layer2.3.relu_2",
        "backbone.layer3.22.relu_2",
        "backbone.layer4.2.relu_2",
    ]
    assert [lv.points[0].shape[1:] for lv in plan.levels] == [
        (64, 81, 81),
        (256, 81, 81),
        (512, 41, 41),
        (1024, 41, 41),
        (2048, 41, 41),
    ]


def test_auto_points_of_the_other_models(age_classifier: nn.Module) -> None:
    def auto(model: nn.Module) -> list[str]:
        return [c.name for c in nddrify.get_fusion_candidates(model) if c.auto]

    vgg_pools = ["features.4", "features.9", "features.16", "features.23", "features.30"]
    assert auto(age_classifier) == vgg_pools
    assert auto(alexnet_fcn32s(2)) == ["features.2", "features.5", "features.12"]


def test_vgg16_shortcut_fuses_two_deeplab_vgg16() -> None:
    """VGG-16-Shortcut = nddrify's shortcut option on two DeepLab VGG-16s."""
    seg, normal = deeplab_vgg16(40), deeplab_vgg16(3)
    fused = nddrify.fuse(
        {"seg": seg, "normal": normal}, shortcut=True, example_input=torch.randn(1, 3, 65, 65)
    )
    plan = fused.meta["nddrify_plan"]
    # per task: 1×1 conv from 64+128+256+512+512 = 1472 channels to 512, then BN
    assert plan.shortcut_weights == 2 * 1472 * 512
    assert plan.shortcut_norm_params == 2 * 2 * 512
    fused.eval()
    with torch.no_grad():
        out = fused(torch.randn(2, 3, 65, 65))
    assert tuple(out["seg"].shape) == (2, 40, 9, 9)
    assert tuple(out["normal"].shape) == (2, 3, 9, 9)
    assert torch.isfinite(out["seg"]).all() and torch.isfinite(out["normal"]).all()
    # the paper's 321 crops give 41×41 (shapes propagated on fake tensors: a real 321 pass of
    # two VGG-16s takes too long for the default test run)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        big = fused(mode.from_tensor(torch.empty(1, 3, 321, 321)))
    assert tuple(big["seg"].shape) == (1, 40, 41, 41)
    assert tuple(big["normal"].shape) == (1, 3, 41, 41)


def test_fused_deeplab_vgg16_at_identity_init_reproduces_both_models() -> None:
    seg, normal = deeplab_vgg16(40).eval(), deeplab_vgg16(3).eval()
    fused = nddrify.fuse(
        [seg, normal],
        init=(1.0, 0.0),
        norm=None,
        activation=None,
        example_input=torch.randn(1, 3, 33, 33),
    ).eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        out = fused(x)
        assert (out[0] - seg(x)).abs().max() < 1e-4
        assert (out[1] - normal(x)).abs().max() < 1e-4


def test_head_names_are_the_final_classifiers() -> None:
    models = {
        "deeplab_vgg16": deeplab_vgg16(40),
        "alexnet_fcn32s": alexnet_fcn32s(3),
        "deeplab_resnet101": DeepLabResNet(torchvision.models.resnet18(), ASPPv2(512, 3)),
    }
    assert set(HEAD_NAMES) == set(MODELS)
    heads = {name: [models[name].get_submodule(h) for h in HEAD_NAMES[name]] for name in models}
    assert heads["deeplab_vgg16"][0].out_channels == 40
    assert heads["alexnet_fcn32s"][0].out_channels == 3
    assert [c.out_channels for c in heads["deeplab_resnet101"][0]] == [3, 3, 3, 3]
    assert HEAD_NAMES["vgg16_classifier"] == ["classifier.6"]


def test_param_groups_give_fc8_its_10x_and_20x() -> None:
    fused = nddrify.fuse(
        [deeplab_vgg16(40), deeplab_vgg16(3)], example_input=torch.randn(1, 3, 33, 33)
    )
    groups = {
        g["name"]: g for g in nddrify.param_groups(fused, lr=1e-3, head=HEAD_NAMES["deeplab_vgg16"])
    }
    assert sum(p.numel() for p in groups["head"]["params"]) == 1024 * 40 + 1024 * 3
    assert sum(p.numel() for p in groups["head_bias"]["params"]) == 40 + 3
    assert math.isclose(groups["head"]["lr"], 1e-2) and math.isclose(
        groups["head_bias"]["lr"], 2e-2
    )


# ----------------------------------------------------------------------------- errors, weights


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"deeplab_vgg17.*deeplab_vgg16"):
        build_model("deeplab_vgg17", 40)
    with pytest.raises(ConfigError, match="num_outputs must be a positive int"):
        deeplab_vgg16(0)
    with pytest.raises(ConfigError, match="aspp='v4'"):
        deeplab_resnet101(3, aspp="v4")


def test_load_pretrained_takes_torchvision_vgg16_bn_features(tmp_path: Path) -> None:
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.weight"] = torch.randn(1000, 4096)  # not in the model: ignored
    path = tmp_path / "vgg16_bn_features.pth"
    torch.save(state, path)
    model = deeplab_vgg16(40)
    skipped = load_pretrained(model, path)
    assert skipped == [k for k in model.state_dict() if k.startswith("head.")]
    assert torch.equal(model.features[40].weight, state["features.40.weight"])
    assert torch.equal(model.features[41].running_var, state["features.41.running_var"])


def test_load_pretrained_maps_a_torchvision_resnet_onto_the_backbone(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": resnet.state_dict()}, path)  # nested, as many checkpoints
    model = DeepLabResNet(torchvision.models.resnet18(), ASPPv2(512, 3))
    skipped = load_pretrained(model, path)
    assert skipped == [k for k in model.state_dict() if k.startswith("head.")]
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)


def test_fcn32s_takes_alexnet_fc6_fc7_as_convolutions() -> None:
    model = alexnet_fcn32s(3)
    fc6, fc7 = torch.randn(4096, 9216), torch.randn(4096, 4096)
    state = {
        "classifier.1.weight": fc6,
        "classifier.1.bias": torch.arange(4096.0),
        "classifier.4.weight": fc7,
    }
    adapted = model.adapt_state_dict(state)
    assert sorted(adapted) == ["head.fc6.bias", "head.fc6.weight", "head.fc7.weight"]
    assert torch.equal(adapted["head.fc6.weight"].reshape(4096, -1), fc6)
    model.load_state_dict(adapted, strict=False)
    # a fc6 unit computes the same on a 6×6 pool5 map as the Linear on its flattened copy
    pool5 = torch.randn(1, 256, 6, 6)
    assert torch.allclose(
        model.head.fc6(pool5).flatten(), fc6 @ pool5.flatten() + torch.arange(4096.0), atol=1e-2
    )


def test_load_pretrained_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(DatasetNotFoundError, match=r"nope\.pth"):
        load_pretrained(nn.Conv2d(1, 1, 1), missing)
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(DatasetFormatError, match=r"list\.pth.*no state dict"):
        load_pretrained(nn.Conv2d(1, 1, 1), not_weights)
    text = tmp_path / "text.pth"
    text.write_text("not a torch file")
    with pytest.raises(DatasetFormatError, match=r"text\.pth"):
        load_pretrained(nn.Conv2d(1, 1, 1), text)
