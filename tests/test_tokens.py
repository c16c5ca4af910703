"""Token fusion: transformer blocks' N × L × C outputs as fusion points.

Identity tolerance: with (α, β) = (1, 0), no norm and no activation every fusion layer is the
identity, so each task of the fused model must reproduce its original model's output to within
1e-5 (relative to the output's magnitude), in eval mode.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

import nddrify
from nddrify.graph_analysis import TokenGrid, annotate, token_stage_ends
from nddrify.graph_analysis.tokens import evenly_spaced
from nddrify.layers import FeatureLayout, NDDRLayer, from_nchw, on_grid, to_nchw
from nddrify.plans import Plan
from nddrify.tracing import trace_model

timm = pytest.importorskip("timm")

IDENTITY = nddrify.NDDR(init=(1.0, 0.0), norm=None, activation=None)
IDENTITY_RESIZE = nddrify.NDDR(
    init=(1.0, 0.0), norm=None, activation=None, resize="align_corners_false"
)


def _randomise_head(model: nn.Module) -> nn.Module:
    """Some timm models zero-init their classifier (Hiera): identity checks need a real head."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.abs().sum():
            nn.init.normal_(module.weight, std=0.02)
    return model.eval()


def _assert_identity(fused: nn.Module, models, x: torch.Tensor) -> None:
    fused.eval()
    with torch.no_grad():
        outputs = fused(x)
        outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
        for out, model in zip(outputs, models):
            expected = model.eval()(x)
            scale = expected.abs().max().item()
            assert scale > 0
            assert (out - expected).abs().max().item() <= 1e-5 * max(1.0, scale)


def _vit(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    torch.manual_seed(len(name) + sum(kwargs.values()) if kwargs else 0)
    return timm.create_model(name, **kwargs).eval()


def _points(fused: nn.Module, task: str) -> list[str]:
    return nddrify.meta.fused_plan(fused).points(task)


# -- layers --------------------------------------------------------------------------------------


def test_token_layer_is_a_per_token_linear_map():
    torch.manual_seed(0)
    layer = NDDRLayer([4, 6], init="xavier", norm=None, activation=None, layouts=["NLC"] * 2)
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 6)
    out_a, out_b = layer(a, b)
    both = torch.cat([a, b], dim=-1)  # N × L × ΣC
    for out, conv in zip((out_a, out_b), layer.convs):
        expected = torch.einsum("nlc,oc->nlo", both, conv.weight[:, :, 0, 0])
        torch.testing.assert_close(out, expected)
    assert out_a.shape == (2, 5, 4) and out_b.shape == (2, 5, 6)


def test_tokens_on_grid_pass_extra_tokens_through():
    vit = FeatureLayout("NLC", prefix=2, grid=(3, 4))
    cnn = FeatureLayout("NCHW")
    assert on_grid([vit, cnn]) and not on_grid([vit, vit])
    tokens, image = torch.randn(1, 2 + 12, 8), torch.randn(1, 8, 3, 4)
    maps = to_nchw([tokens, image], [vit, cnn])
    assert maps[0].shape == (1, 8, 3, 4)
    # raster order: token 2 + (row 1, col 2) is position (1, 2) of the grid
    assert torch.equal(maps[0][0, :, 1, 2], tokens[0, 2 + 1 * 4 + 2])
    back = from_nchw([m * 2 for m in maps], [vit, cnn], [tokens, image])
    assert torch.equal(back[0][:, :2], tokens[:, :2])  # extra tokens unchanged
    assert torch.equal(back[0][:, 2:], tokens[:, 2:] * 2)


def test_tokens_without_a_grid_cannot_meet_a_map():
    layer = NDDRLayer(
        [8, 8], init=(1.0, 0.0), norm=None, activation=None, layouts=[FeatureLayout("NLC"), "NCHW"]
    )
    with pytest.raises(nddrify.errors.FusionConfigError, match="no known patch grid"):
        layer(torch.randn(1, 12, 8), torch.randn(1, 8, 3, 4))


# -- analysis ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "grid"),
    [
        ("vit_tiny_patch16_224", {}, TokenGrid(1, 14, 14)),
        ("deit_tiny_distilled_patch16_224", {}, TokenGrid(2, 14, 14)),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 112, "depth": 12}, TokenGrid(5, 8, 8)),
        ("eva02_tiny_patch14_224", {}, TokenGrid(1, 16, 16)),
    ],
)
def test_plain_vits_fuse_after_evenly_spaced_blocks(name, kwargs, grid):
    model = _vit(name, **kwargs)
    size = 112 if kwargs.get("img_size") == 112 else 224
    traced = trace_model(model, example_input=torch.randn(1, 3, size, size))
    ends = token_stage_ends(annotate(traced.graph))
    assert [n.meta["qualname"] for n in ends] == [f"blocks.{i}.add_1" for i in (2, 5, 8, 11)]
    assert {n.meta["nddrify_tokens"] for n in ends} == {grid}
    candidates = nddrify.get_fusion_candidates(model, torch.randn(1, 3, size, size))
    assert [c.name for c in candidates if c.auto] == [
        "blocks.2",
        "blocks.5",
        "blocks.8",
        "blocks.11",
    ]


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: torchvision.models.VisionTransformer(
                image_size=224, patch_size=16, num_layers=12, num_heads=2, hidden_dim=32, mlp_dim=64
            ),
            id="small",
        ),
        pytest.param(torchvision.models.vit_b_16, id="vit_b_16", marks=pytest.mark.slow),
    ],
)
def test_torchvision_vit_fuses_at_four_blocks_exactly(build):
    torch.manual_seed(0)
    a, b = _randomise_head(build()), _randomise_head(build())  # their heads start at zero
    x = torch.randn(1, 3, 224, 224)
    fused = nddrify.fuse([a, b], fusion=IDENTITY, example_input=x)
    assert _points(fused, "task0") == [
        f"encoder.layers.encoder_layer_{i}.add_1" for i in (2, 5, 8, 11)
    ]
    _assert_identity(fused, [a, b], x)


def test_evenly_spaced():
    assert evenly_spaced(12, 4) == [2, 5, 8, 11]
    assert evenly_spaced(12, 3) == [3, 7, 11]
    assert evenly_spaced(2, 4) == [0, 1]


def test_hiera_gets_one_point_per_token_stage():
    model = timm.create_model("hiera_tiny_224")
    candidates = nddrify.get_fusion_candidates(model)
    auto = [(c.name, c.shape[1:]) for c in candidates if c.auto]
    # stages of depth 1, 2, 7, 2: their last blocks; tokens are unrolled (no raster grid)
    assert auto == [
        ("blocks.0", (96, 3136)),
        ("blocks.2", (192, 784)),
        ("blocks.9", (384, 196)),
        ("blocks.11", (768, 49)),
    ]


# -- fusion --------------------------------------------------------------------------------------


def test_vit_pair_identity_and_plan_round_trip():
    a, b = _vit(depth=12), _vit(depth=12, num_classes=7)
    x = torch.randn(2, 3, 224, 224)
    fused = nddrify.fuse({"cls": a, "other": b}, fusion=IDENTITY, example_input=x)
    _assert_identity(fused, [a, b], x)
    plan = nddrify.meta.fused_plan(fused)
    point = plan.levels[0].points[0]
    assert (point.layout, point.shape, point.tokens) == ("NLC", (1 * 2, 192, 197), (1, 14, 14))
    assert point.describe_shape() == "192×197 NLC (1+14×14)"
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # NDDR on tokens: ΣC → C_i per token, i.e. 2 × (384 × 192) weights per level
    assert plan.levels[0].weights == 2 * 384 * 192


def test_vit_small_and_vit_tiny_differ_in_width():
    a, b = _vit(depth=4), _vit("vit_small_patch16_224", depth=4)
    x = torch.randn(1, 3, 224, 224)
    fused = nddrify.fuse([a, b], fusion=IDENTITY, example_input=x)
    assert [lv.channels for lv in nddrify.meta.fused_plan(fused).levels] == [(192, 384)] * 4
    _assert_identity(fused, [a, b], x)


def test_vit_and_deit_fuse_patch_tokens_on_the_grid():
    a, b = _vit(depth=4), _vit("deit_tiny_distilled_patch16_224", depth=4)
    x = torch.randn(1, 3, 224, 224)
    fused = nddrify.fuse([a, b], fusion=IDENTITY, example_input=x)
    _assert_identity(fused, [a, b], x)
    layer = fused.get_submodule("fusion.level1") if hasattr(fused, "fusion") else None
    layers = [m for m in fused.modules() if isinstance(m, NDDRLayer)]
    assert layers and all(on_grid(layer.layouts) for layer in layers)
    assert layer is None or isinstance(layer, NDDRLayer)


def test_vit_and_cnn_with_resize():
    a = _vit(depth=4)
    torch.manual_seed(1)
    b = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    fused = nddrify.fuse(
        [a, b],
        [["blocks.1", "blocks.3"], ["layer2", "layer3"]],
        fusion=IDENTITY_RESIZE,
        example_input=x,
    )
    plan = nddrify.meta.fused_plan(fused)
    assert [p.describe_shape() for p in plan.levels[0].points] == [
        "192×197 NLC (1+14×14)",
        "128×28×28",
    ]
    _assert_identity(fused, [a, b], x)
    # away from identity the tasks really exchange features
    mixing = nddrify.fuse(
        [a, b],
        [["blocks.1", "blocks.3"], ["layer2", "layer3"]],
        fusion=nddrify.NDDR(
            init=(0.9, 0.1), norm=None, activation=None, resize="align_corners_false"
        ),
        example_input=x,
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(mixing(x)[0], a(x), atol=1e-4)


@pytest.mark.parametrize(
    "fusion",
    [
        nddrify.CrossStitch(init=(1.0, 0.0)),
        nddrify.Sluice(init=(1.0, 0.0), subspaces=2),
        nddrify.NDDR(rank=16, init=(1.0, 0.0), norm=None, activation=None),
        nddrify.NDDR(groups=4, init=(1.0, 0.0), norm=None, activation=None),
    ],
    ids=["cross-stitch", "sluice", "low-rank", "grouped"],
)
def test_every_fusion_kind_on_tokens(fusion):
    a, b = _vit(depth=4), _vit(depth=4, num_classes=5)
    x = torch.randn(1, 3, 224, 224)
    fused = nddrify.fuse([a, b], fusion=fusion, example_input=x)
    _assert_identity(fused, [a, b], x)


def test_token_fusion_trains_with_batchnorm_and_shortcut():
    a, b = _vit(depth=4), _vit(depth=4, num_classes=5)
    x = torch.randn(2, 3, 224, 224)
    fused = nddrify.fuse([a, b], shortcut=True, example_input=x).train()
    out_a, out_b = fused(x)
    # squares, not sums: task0's features end in a LayerNorm whose outputs sum to zero, so a
    # plain sum has no gradient there (it passed on float noise with more than one thread)
    (out_a.pow(2).sum() + out_b.pow(2).sum()).backward()
    grads = [p.grad for n, p in fused.named_parameters() if "fusion" in n or "shortcut" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_hierarchical_token_transformer_identity():
    a = _randomise_head(timm.create_model("hiera_tiny_224"))
    b = _randomise_head(timm.create_model("hiera_tiny_224", num_classes=3))
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # four levels: no "fewer than 3 levels" warning
        fused = nddrify.fuse([a, b], fusion=IDENTITY, example_input=x)
    assert _points(fused, "task0") == [f"blocks.{i}.add_1" for i in (0, 2, 9, 11)]
    _assert_identity(fused, [a, b], x)
