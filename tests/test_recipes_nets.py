"""The paper's layouts of its networks (issue 13, items 6–8): DeepLab v2's Caffe ResNet-101 with
frozen BN (Table 5), FCN's Caffe AlexNet (Table A1), TF 'SAME' max pooling (480×640 evaluation),
and the configs that select them. Exact values and counts computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torchvision.ops import FrozenBatchNorm2d

import nddrify
from recipes.builders import build_task_model
from recipes.configs import CHOICES, apply_overrides, get_config, registry
from recipes.errors import ConfigError
from recipes.models import (
    HEAD_NAMES,
    MODELS,
    FCN32s,
    TFSameMaxPool2d,
    alexnet_fcn32s,
    build_model,
    caffe_layer_names,
    deeplab_resnet101,
    deeplab_vgg16,
    load_pretrained,
    model_options,
)
from recipes.tf_pooling import same_padding, tf_same_max_pool2d

RESNET_POINTS = [
    "backbone.maxpool",
    "backbone.layer1",
    "backbone.layer2",
    "backbone.layer3",
    "backbone.layer4",
]
ALEXNET_CAFFE_POINTS = [
    "features.pool1",
    "features.pool2",
    "features.relu3",
    "features.relu4",
    "features.pool5",
]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = True, groups: int = 1) -> int:
    return k * k * (cin // groups) * cout + (cout if bias else 0)


def output_shape(model: nn.Module, height: int, width: int) -> tuple[int, ...]:
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return tuple(model.eval()(mode.from_tensor(torch.empty(1, 3, height, width))).shape)


@pytest.fixture(scope="module")
def caffe_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("deeplab_resnet101_caffe", 40).eval()


# ----------------------------------------------------------------------------- TF 'SAME' pooling


def test_tf_same_pool_on_4x4_is_hand_computed() -> None:
    """4 rows, 3×3 stride 2: TF pads 0 before and 1 after (windows rows 0–2 and 2–3)."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert TFSameMaxPool2d(3, 2)(x).tolist() == [[[[10.0, 11.0], [14.0, 15.0]]]]
    # PyTorch's symmetric padding 1 starts the windows at −1
    assert nn.MaxPool2d(3, 2, padding=1)(x).tolist() == [[[[5.0, 7.0], [13.0, 15.0]]]]


def test_tf_same_pool_on_5x6_is_hand_computed() -> None:
    """5 rows pad (1, 1): row windows {0,1}, {1,2,3}, {3,4}; 6 columns pad (0, 1): column windows
    {0,1,2}, {2,3,4}, {4,5}. x[r, c] = 6r + c, so each max is 6·(last row) + (last column)."""
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    assert same_padding(5, 3, 2) == (1, 1) and same_padding(6, 3, 2) == (0, 1)
    expected = [[8.0, 10.0, 11.0], [20.0, 22.0, 23.0], [26.0, 28.0, 29.0]]
    assert tf_same_max_pool2d(x, (3, 3), (2, 2))[0, 0].tolist() == expected
    # on −x each window's max is its first element: −(6·first row + first column)
    assert TFSameMaxPool2d(3, 2)(-x)[0, 0].tolist() == [
        [-0.0, -2.0, -4.0],
        [-6.0, -8.0, -10.0],
        [-18.0, -20.0, -22.0],
    ]
    assert nn.MaxPool2d(3, 2, padding=1)(x)[0, 0].tolist() == [
        [7.0, 9.0, 11.0],
        [19.0, 21.0, 23.0],
        [25.0, 27.0, 29.0],
    ]


@pytest.mark.parametrize("size", [321, 161, 81, 41, 480, 640, 240, 120])
def test_tf_same_equals_pytorch_padding_exactly_at_odd_sizes_only(size: int) -> None:
    """The DeepLab VGG pools (3×3, stride 2 or 1, padding 1): at the 321 crop's sizes
    (321 → 161 → 81 → 41) SAME and PyTorch agree exactly; at 480×640's even sizes stride 2 differs."""
    torch.manual_seed(size)
    x = torch.randn(1, 2, size, 7)
    for stride in (2, 1):
        ours = nn.MaxPool2d(3, stride, padding=1)(x)
        same = TFSameMaxPool2d(3, stride)(x)
        assert same.shape == ours.shape
        agree = torch.equal(same[..., :3], ours[..., :3])  # 7 columns: odd, the same windows
        assert agree == (size % 2 == 1 or stride == 1)


def test_deeplab_vgg16_tf_same_pooling_changes_even_sizes_only() -> None:
    torch.manual_seed(0)
    plain = deeplab_vgg16(3).eval()
    same = deeplab_vgg16(3, tf_same_pooling=True).eval()
    same.load_state_dict(plain.state_dict())
    pools = [n for n, m in same.features.named_children() if isinstance(m, TFSameMaxPool2d)]
    assert pools == ["6", "13", "23", "33", "43"]  # indices (and the state dict) unchanged
    with torch.no_grad():
        odd, even = torch.randn(1, 3, 33, 41), torch.randn(1, 3, 32, 40)
        assert torch.equal(same(odd), plain(odd))
        assert same(even).shape == plain(even).shape == (1, 3, 4, 5)
        assert not torch.equal(same(even), plain(even))


def test_fused_tf_same_deeplab_vgg16_keeps_pool_points_and_identity() -> None:
    seg = deeplab_vgg16(40, tf_same_pooling=True).eval()
    normal = deeplab_vgg16(3, tf_same_pooling=True).eval()
    fused = nddrify.fuse(
        [seg, normal],
        init=(1.0, 0.0),
        norm=None,
        activation=None,
        example_input=torch.randn(1, 3, 32, 32),
    ).eval()
    plan = fused.meta["nddrify_plan"]
    assert [lv.points[0].name.split(".max_pool2d")[0] for lv in plan.levels] == [
        "features.6",
        "features.13",
        "features.23",
        "features.33",
        "features.44",
    ]
    x = torch.randn(1, 3, 32, 32)  # even: the SAME padding is computed at run time
    with torch.no_grad():
        out = fused(x)
        assert (out[0] - seg(x)).abs().max() <= 1e-5
        assert (out[1] - normal(x)).abs().max() <= 1e-5


def test_tf_same_pooling_config_field() -> None:
    assert CHOICES["tf_same_pooling"] == ("auto", "on", "off")
    assert model_options("deeplab_vgg16") == {"tf_same_pooling": True}  # official TF code
    assert model_options("alexnet_fcn32s_caffe") == {"tf_same_pooling": False}  # Caffe (FCN)
    assert model_options("deeplab_resnet101_caffe") == {"tf_same_pooling": False}
    assert model_options("deeplab_vgg16", "off") == {"tf_same_pooling": False}
    vgg = build_task_model(get_config("nyuv2_vgg16_nddr"), "seg")
    assert isinstance(vgg.features[6], TFSameMaxPool2d)
    off = apply_overrides(get_config("nyuv2_vgg16_nddr"), ["tf_same_pooling=off"])
    assert type(build_task_model(off, "seg").features[6]) is nn.MaxPool2d
    alex = build_task_model(get_config("nyuv2_alexnet_nddr"), "normal")
    assert type(alex.features.pool1) is nn.MaxPool2d and alex.features.pool1.ceil_mode
    on = apply_overrides(get_config("nyuv2_alexnet_nddr"), ["tf_same_pooling=on"])
    assert isinstance(build_task_model(on, "normal").features.pool1, TFSameMaxPool2d)
    with pytest.raises(ConfigError, match="tf_same_pooling='on'"):
        apply_overrides(get_config("synthetic_demo_nddr"), ["tf_same_pooling=on"])


# ----------------------------------------------------------------------------- ResNet-101 (Table 5)


def test_caffe_resnet_strides_in_the_first_1x1_and_dilates_every_block(
    caffe_resnet: nn.Module,
) -> None:
    backbone = caffe_resnet.backbone
    first = backbone.layer2[0]
    assert (first.conv1.stride, first.conv2.stride, first.downsample[0].stride) == (
        (2, 2),
        (1, 1),
        (2, 2),
    )
    assert [b.conv2.dilation for b in backbone.layer3] == [(2, 2)] * 23
    assert [b.conv2.dilation for b in backbone.layer4] == [(4, 4)] * 3
    assert [b.conv2.padding for b in backbone.layer4] == [(4, 4)] * 3
    assert backbone.maxpool.ceil_mode
    # torchvision's layout: stride in the 3×3, a dilated stage's first block keeps the old rate
    tv = deeplab_resnet101(3)
    assert (tv.backbone.layer2[0].conv1.stride, tv.backbone.layer2[0].conv2.stride) == (
        (1, 1),
        (2, 2),
    )
    assert [tv.backbone.layer3[0].conv2.dilation, tv.backbone.layer4[0].conv2.dilation] == [
        (1, 1),
        (2, 2),
    ]
    assert output_shape(caffe_resnet, 321, 321) == (1, 40, 41, 41)  # output stride 8
    assert output_shape(caffe_resnet, 65, 97) == (1, 40, 9, 13)


def test_caffe_resnet_parameter_count_with_frozen_bn(caffe_resnet: nn.Module) -> None:
    convs, bn_channels, inplanes = conv(3, 64, 7, False), 64, 64
    for planes, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        for block in range(blocks):
            convs += conv(inplanes, planes, 1, False) + conv(planes, planes, 3, False)
            convs += conv(planes, 4 * planes, 1, False)
            bn_channels += planes + planes + 4 * planes
            if block == 0:
                convs += conv(inplanes, 4 * planes, 1, False)
                bn_channels += 4 * planes
            inplanes = 4 * planes
    aspp = 4 * conv(2048, 40, 3)
    assert (convs, bn_channels) == (42_394_816, 52_672)
    # frozen BN: scale and shift are buffers, not parameters (DeepLab v2 trains neither)
    assert count(caffe_resnet) == convs + aspp == 45_344_096
    frozen = [m for m in caffe_resnet.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 104 and sum(m.weight.numel() for m in frozen) == bn_channels
    assert not any(isinstance(m, nn.BatchNorm2d) for m in caffe_resnet.modules())
    # with the frozen affine counted, the same 45,449,440 as the torchvision layout
    assert count(caffe_resnet) + 2 * bn_channels == 45_449_440
    assert HEAD_NAMES["deeplab_resnet101_caffe"] == ["head.classifier"]


def test_resnet101_rows_use_the_caffe_layout_with_frozen_bn() -> None:
    rows = {n: c for n, c in registry().items() if n.startswith("nyuv2_resnet101")}
    assert len(rows) == 7  # 2 single-task, Mul., C.-S., Sluice, Ours, rank-64 NDDR
    assert {(c.model, c.freeze_bn) for c in rows.values()} == {("deeplab_resnet101_caffe", True)}


def test_caffe_names_load_into_the_caffe_resnet(caffe_resnet: nn.Module, tmp_path) -> None:
    names = caffe_layer_names()
    assert len(names) == 3 + 33 * 9 + 4 * 3 + 4  # conv1/bn/scale, blocks, projections, ASPP
    assert [names[n] for n in ("conv1", "res2c_branch2c")] == [
        "backbone.conv1",
        "backbone.layer1.2.conv3",
    ]
    # the stage ends (fusion points) by Caffe name: res2c, res3b3, res4b22, res5c
    assert [names[f"res{n}_branch2c"] for n in ("2c", "3b3", "4b22", "5c")] == [
        "backbone.layer1.2.conv3",
        "backbone.layer2.3.conv3",
        "backbone.layer3.22.conv3",
        "backbone.layer4.2.conv3",
    ]
    state = {}
    for caffe, module in names.items():  # Caffe: BatchNorm holds the statistics, Scale the affine
        for param, value in caffe_resnet.get_submodule(module).state_dict().items():
            affine = param in ("weight", "bias")
            if (caffe.startswith("bn") and affine) or (caffe.startswith("scale") and not affine):
                continue
            state[f"{caffe}.{param}"] = torch.full_like(value, 0.5)
    path = tmp_path / "caffe.pt"
    torch.save(state, path)
    model = build_model("deeplab_resnet101_caffe", 40)
    assert load_pretrained(model, path) == []
    assert all(bool((v == 0.5).all()) for v in model.state_dict().values())


def test_fused_caffe_resnets_resolve_the_stage_ends_and_reproduce_both() -> None:
    torch.manual_seed(0)
    seg, normal = (
        build_model("deeplab_resnet101_caffe", 40),
        build_model("deeplab_resnet101_caffe", 3),
    )
    fused = nddrify.fuse(
        {"seg": seg.eval(), "normal": normal.eval()},
        init=(1.0, 0.0),
        norm=None,
        activation=None,
        example_input=torch.randn(1, 3, 65, 65),
    ).eval()
    plan = fused.meta["nddrify_plan"]
    assert [lv.points[0].name for lv in plan.levels] == RESNET_POINTS
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        out = fused(x)
        assert (out["seg"] - seg(x)).abs().max() <= 1e-5
        assert (out["normal"] - normal(x)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- AlexNet (Table A1)


def test_caffe_alexnet_fcn32s_layers_and_parameter_count() -> None:
    model = build_model("alexnet_fcn32s_caffe", 3)
    assert isinstance(model, FCN32s)
    f = model.features
    assert [n for n, _ in f.named_children()] == [
        "conv1", "relu1", "pool1", "norm1",
        "conv2", "relu2", "pool2", "norm2",
        "conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5",
    ]  # fmt: skip
    assert [(c.out_channels, c.groups) for c in f if isinstance(c, nn.Conv2d)] == [
        (96, 1),
        (256, 2),
        (384, 1),
        (384, 2),
        (256, 2),
    ]
    assert (f.norm1.size, f.norm1.alpha, f.norm1.beta, f.norm1.k) == (5, 1e-4, 0.75, 1.0)
    assert f.conv1.padding == (100, 100) and f.pool5.ceil_mode
    features = (
        (11 * 11 * 3 * 96 + 96)
        + (5 * 5 * 48 * 256 + 256)
        + (3 * 3 * 256 * 384 + 384)
        + (3 * 3 * 192 * 384 + 384)
        + (3 * 3 * 192 * 256 + 256)
    )
    head = (6 * 6 * 256 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 3 + 3)
    assert features == 2_334_080 and head == 54_546_435
    assert count(model) == features + head == 56_880_515
    assert output_shape(model, 65, 70) == (1, 3, 65, 70)
    assert count(alexnet_fcn32s(3)) == 57_016_131  # torchvision's layout, still an option
    assert set(MODELS) >= {"alexnet_fcn32s", "alexnet_fcn32s_caffe"}


def test_alexnet_rows_use_the_caffe_layout_and_its_points() -> None:
    rows = {n: c for n, c in registry().items() if n.startswith("nyuv2_alexnet")}
    assert {c.model for c in rows.values()} == {"alexnet_fcn32s_caffe"}
    assert {c.points for c in rows.values()} == {tuple(ALEXNET_CAFFE_POINTS)}


def test_fused_caffe_alexnets_trace_lrn_and_groups_and_reproduce_both() -> None:
    torch.manual_seed(0)
    seg, normal = alexnet_fcn32s(40, layout="caffe"), alexnet_fcn32s(3, layout="caffe")
    for model in (seg, normal):  # FCN's score starts at zero: give it values to compare
        nn.init.normal_(model.head.score.weight, std=0.01)
    points = [*ALEXNET_CAFFE_POINTS, "head.relu6", "head.relu7"]  # with the fc-level points
    fused = nddrify.fuse(
        [seg.eval(), normal.eval()],
        points,
        init=(1.0, 0.0),
        norm=None,
        activation=None,
        example_input=torch.randn(1, 3, 40, 40),
    ).eval()
    assert fused.meta["nddrify_plan"].points("task0") == points
    x = torch.randn(1, 3, 40, 44)
    with torch.no_grad():
        out = fused(x)
        assert out[0].shape == (1, 40, 40, 44)
        assert (out[0] - seg(x)).abs().max() <= 1e-5
        assert (out[1] - normal(x)).abs().max() <= 1e-5


def test_caffe_alexnet_takes_caffe_named_weights(tmp_path) -> None:
    model = alexnet_fcn32s(3, layout="caffe")
    state = {
        k.removeprefix("features."): torch.full_like(v, 0.25)
        for k, v in model.state_dict().items()
        if k.startswith("features.")
    }
    state["fc6.weight"] = torch.full((4096, 9216), 0.5)  # an inner product (CaffeNet)
    state["fc7.weight"] = torch.full((4096, 4096, 1, 1), 0.75)  # a conv already (FCN)
    path = tmp_path / "caffenet.pt"
    torch.save(state, path)
    missing = load_pretrained(model, path)
    assert missing == [
        "head.fc6.bias",
        "head.fc7.bias",
        "head.score.weight",
        "head.score.bias",
        "upsample.kernel",
    ]
    assert bool((model.features.conv2.weight == 0.25).all())
    assert bool((model.head.fc6.weight == 0.5).all()) and bool(
        (model.head.fc7.weight == 0.75).all()
    )
