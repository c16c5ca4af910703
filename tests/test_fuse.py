"""End-to-end behaviour of nddrify.fuse: identity at init, gradients, outputs, code, weights."""

from __future__ import annotations

import copy
import operator

import pytest
import timm
import torch
import torchvision
from torch import nn

import nddrify
from nddrify.layers import NDDRLayer, NDDRShortcutLayer
from nddrify.rewriting import FusedGraphModule

from .models import FunctionalDropout, OptionalArgs, TinyCNN, UNet

tv = torchvision.models
ATOL = 1e-5
IDENTITY = {"init": (1.0, 0.0), "norm": None, "activation": None}


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


def max_identity_diff(
    models: list[nn.Module], fused: nn.Module, x: torch.Tensor, train: bool
) -> float:
    for model in models:
        model.train(train)
    fused.train(train)
    with torch.no_grad():
        outputs = fused(x)
        expected = [model(x) for model in models]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    worst = 0.0
    for got, want in zip(outputs, expected, strict=True):
        got_t, want_t = _flatten(got), _flatten(want)
        assert len(got_t) == len(want_t) > 0
        for a, b in zip(got_t, want_t):
            assert a.shape == b.shape
            worst = max(worst, float((a - b).abs().max()))
    return worst


def _resnet50_pair():
    return [tv.resnet50(), tv.resnet50()]


def _fcn_pair():
    return [
        tv.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5),
        tv.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3),
    ]


IDENTITY_CASES = {
    # name: (factory of the models, input size, check train mode too)
    "vgg16 (dropout: eval only)": (lambda: [tv.vgg16(), tv.vgg16()], 64, False),
    "resnet50": (_resnet50_pair, 64, True),
    "fcn_resnet50 (dict outputs; dropout: eval only)": (_fcn_pair, 64, False),
    "unet (skip connections)": (lambda: [UNet(), UNet(classes=1)], 64, True),
    "resnet18 + resnet34": (lambda: [tv.resnet18(), tv.resnet34()], 64, True),
    "K=3 resnet18": (lambda: [tv.resnet18(num_classes=c) for c in (2, 3, 4)], 64, True),
    "K=5 heterogeneous resnets (torchvision + timm)": (
        lambda: [
            tv.resnet18(),
            tv.resnet34(),
            timm.create_model("resnet18"),
            tv.resnet18(num_classes=3),
            timm.create_model("resnet26"),
        ],
        64,
        True,
    ),
    "timm resnet18": (lambda: [timm.create_model("resnet18") for _ in range(2)], 64, True),
    "timm convnext_atto": (
        lambda: [timm.create_model("convnext_atto") for _ in range(2)],
        64,
        True,
    ),
    "timm tinynet_a": (lambda: [timm.create_model("tinynet_a") for _ in range(2)], 64, True),
    "timm dla34": (lambda: [timm.create_model("dla34") for _ in range(2)], 64, True),
    "timm + torchvision resnet18": (
        lambda: [timm.create_model("resnet18"), tv.resnet18()],
        64,
        True,
    ),
}


@pytest.mark.parametrize("case", list(IDENTITY_CASES))
def test_identity_at_init_and_gradients(case: str) -> None:
    factory, size, check_train = IDENTITY_CASES[case]
    models = factory()
    x = torch.randn(2, 3, size, size)
    fused = nddrify.fuse(models, points="auto", example_input=x[:1], **IDENTITY)
    plan = nddrify.training.overhead(fused)
    assert plan.fusion_weights > 0
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    if check_train:
        assert max_identity_diff(models, fused, x, train=True) <= ATOL

    # Default fusion (diagonal 0.9/0.1, BatchNorm, auto activation): every parameter learns.
    fused = nddrify.fuse(models, points="auto", example_input=x[:1]).train()
    loss = sum(t.float().mean() for t in _flatten(fused(x)))
    loss.backward()
    missing = [name for name, p in fused.named_parameters() if p.grad is None]
    assert missing == []
    fusion = [m for m in fused.modules() if isinstance(m, NDDRLayer)]
    assert len(fusion) == len(nddrify.meta.fused_plan(fused).levels)
    assert all(float(m.convs[0].weight.grad.abs().sum()) > 0 for m in fusion)


def test_channels_last_stages_fuse_exactly() -> None:
    """Swin's NHWC stages: identity at init holds, and the default layer mixes channels."""
    models = [tv.swin_t(), tv.swin_t(num_classes=10)]
    points = ["features.1", "features.3"]
    x = torch.randn(2, 3, 64, 64)
    fused = nddrify.fuse(models, points=points, example_input=x[:1], **IDENTITY)
    assert fused.nddr1.channels_last == (True, True)
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    fused = nddrify.fuse(models, points=points, example_input=x[:1], init=(0.5, 0.5), norm=None)
    fused.eval()
    with torch.no_grad():
        a, b = fused(x)
        assert a.shape == (2, 1000) and b.shape == (2, 10)
        assert float((a - models[0].eval()(x)).abs().max()) > 1e-3  # the tasks now share features


def test_outputs_tuple_for_list_and_dict_for_dict() -> None:
    a, b = TinyCNN(classes=3), TinyCNN(classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = nddrify.fuse([a, b], example_input=x)(x)
    assert isinstance(out, tuple) and [o.shape[1] for o in out] == [3, 7]
    out = nddrify.fuse({"seg": a, "depth": b}, example_input=x)(x)
    assert isinstance(out, dict) and list(out) == ["seg", "depth"]
    assert out["depth"].shape == (2, 7)


def test_fused_code_reads_like_hand_written_pytorch() -> None:
    models = {"seg": tv.vgg11(), "normal": tv.vgg11()}
    fused = nddrify.fuse(models, points=["features.2", "features.5"])
    code = fused.code
    assert "def forward(self, x):" in code
    assert 'seg_features_0 = getattr(self.seg.features, "0")(x)' in code
    assert "nddr1 = self.nddr1(seg_features_2, normal_features_2)" in code
    assert "seg_features_2_nddr = nddr1[0]" in code
    assert "normal_features_2_nddr = nddr1[1]" in code
    assert 'seg_features_3 = getattr(self.seg.features, "3")(seg_features_2_nddr)' in code
    assert "nddr2 = self.nddr2(seg_features_5, normal_features_5)" in code
    # the classifier runs whole: a run of nodes that is exactly one submodule's forward is one call
    assert "seg_classifier = self.seg.classifier(seg_flatten)" in code
    assert "return {'seg': seg_classifier, 'normal': normal_classifier}" in code
    assert code.count("self.nddr") == 2  # one call per fusion level


def test_fusion_replaces_the_value_for_all_users_including_skips() -> None:
    """U-Net: enc1's output feeds both the next encoder stage and the last decoder (skip)."""
    a, b = UNet(), UNet()
    fused = nddrify.fuse([a, b], points=["enc1"], example_input=torch.randn(1, 3, 32, 32))
    graph = fused.graph
    fused_value = next(n for n in graph.nodes if n.name == "task0_enc1_nddr")
    users = {u.name for u in fused_value.users}
    assert users == {"task0_pool", "task0_cat_2"}
    original = next(n for n in graph.nodes if n.name == "task0_enc1")  # DoubleConv, one call
    assert {u.name for u in original.users} == {"nddr1"}


def test_originals_are_never_mutated() -> None:
    a, b = tv.resnet18(), tv.resnet18()
    a.eval()
    before = copy.deepcopy(a.state_dict())
    fused = nddrify.fuse([a, b]).train()
    fused(torch.randn(2, 3, 64, 64)).__len__()  # train-mode forward updates BN stats of the copies
    assert a.training is False and b.training is True
    for key, value in a.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The fused model owns copies: changing them does not touch the originals.
    with torch.no_grad():
        fused.task0.conv1.weight.add_(1.0)
    assert torch.equal(a.conv1.weight, before["conv1.weight"])


def test_checkpoints_carry_over_and_task_state_dict_round_trips() -> None:
    seg = tv.resnet18(num_classes=4)
    checkpoint = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in seg.state_dict().items()
    }
    seg.load_state_dict(checkpoint)
    fused = nddrify.fuse({"seg": seg, "depth": tv.resnet18(num_classes=1)})
    assert torch.equal(
        fused.get_submodule("seg.layer3.1.conv2").weight, checkpoint["layer3.1.conv2.weight"]
    )
    weights = nddrify.training.task_state_dict(fused, "seg")
    assert sorted(weights) == sorted(checkpoint)
    fresh = tv.resnet18(num_classes=4)
    fresh.load_state_dict(weights)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, checkpoint[key])
    assert sorted(nddrify.training.task_state_dict(fused, 1)) == sorted(tv.resnet18().state_dict())
    with pytest.raises(nddrify.errors.FusedModelError, match=r"no task 'sky'.*'seg', 'depth'"):
        nddrify.training.task_state_dict(fused, "sky")


def test_state_dict_reloads_into_a_freshly_fused_model(tmp_path) -> None:
    models = [TinyCNN(), TinyCNN()]
    fused = nddrify.fuse(models, example_input=torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)
    again = nddrify.fuse(models, example_input=torch.randn(1, 3, 32, 32))
    again.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    fused.eval(), again.eval()
    for got, want in zip(again(x), fused(x)):
        assert torch.equal(got, want)


def test_train_and_eval_graphs_differ_for_googlenet_aux_heads() -> None:
    models = [
        tv.googlenet(init_weights=False, aux_logits=True),
        tv.googlenet(init_weights=False, aux_logits=True),
    ]
    x = torch.randn(2, 3, 96, 96)
    fused = nddrify.fuse(models, example_input=x[:1], **IDENTITY)
    assert fused.eval_graph is not None
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    assert isinstance(fused(x)[0], torch.Tensor)  # eval: logits only
    assert fused.graph is fused.eval_graph
    fused.train()
    assert fused.graph is fused.train_graph
    train_out = fused(x)
    assert type(train_out[0]).__name__ == "GoogLeNetOutputs"  # train: logits + two aux heads
    assert [t.shape for t in train_out[1]] == [(2, 1000)] * 3


def test_deepcopy_keeps_weights_plan_and_both_modes() -> None:
    models = [FunctionalDropout(), FunctionalDropout()]
    x = torch.randn(4, 3, 32, 32)
    for fused in (
        nddrify.fuse([TinyCNN(), TinyCNN()], example_input=x[:1]),
        nddrify.fuse(models, example_input=x[:1]),
    ):
        twin = copy.deepcopy(fused).eval()
        fused.eval()
        assert isinstance(twin, FusedGraphModule)
        assert (twin.eval_graph is None) == (fused.eval_graph is None)
        assert twin.meta["nddrify_plan"] == fused.meta["nddrify_plan"]
        for got, want in zip(twin(x), fused(x)):
            assert torch.equal(got, want)
        with torch.no_grad():
            next(twin.parameters()).add_(1)
        assert not torch.equal(next(twin.parameters()), next(fused.parameters()))
    assert twin.eval_graph is not None
    twin.train()
    assert (twin(x)[0] == 0).float().mean() > 0.2  # the copy still switches graphs


@pytest.mark.parametrize("dual", [False, True], ids=["one graph", "train and eval graphs"])
def test_fused_models_pickle_with_plan_and_modes(tmp_path, dual: bool) -> None:
    make = FunctionalDropout if dual else TinyCNN
    x = torch.randn(4, 3, 32, 32)
    fused = nddrify.fuse({"a": make(), "b": make()}, example_input=x[:1]).eval()
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, FusedGraphModule) and loaded.training is False
    assert loaded.meta["nddrify_plan"] == fused.meta["nddrify_plan"]
    assert loaded.code == fused.code
    for task in ("a", "b"):
        assert torch.equal(loaded(x)[task], fused(x)[task])
    assert type(loaded.a) is make  # the whole task model survives
    if dual:
        loaded.train()
        assert (loaded(x)["a"] == 0).float().mean() > 0.2


def test_functional_dropout_follows_the_mode() -> None:
    models = [FunctionalDropout(), FunctionalDropout()]
    x = torch.randn(4, 3, 32, 32)
    fused = nddrify.fuse(models, example_input=x[:1], **IDENTITY)
    assert max_identity_diff(models, fused, x, train=False) <= ATOL
    fused.train()
    out = fused(x)[0]
    assert (out == 0).float().mean() > 0.2  # dropout is active in train mode
    fused.eval()
    assert (fused(x)[0] == 0).float().mean() == 0


def test_optional_forward_arguments_are_fixed_to_their_defaults() -> None:
    models = [OptionalArgs(), OptionalArgs()]
    x = torch.randn(2, 3, 32, 32)
    fused = nddrify.fuse(models, example_input=x[:1], **IDENTITY)
    assert "assert" not in fused.code  # fx's specialisation guards are dropped
    assert max_identity_diff(models, fused, x, train=True) <= ATOL
    options = nddrify.TraceOptions(concrete_args={"scale": 2.0})
    fused = nddrify.fuse(models, example_input=x[:1], trace_options=options, **IDENTITY)
    fused.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x)[0], 2.0 * models[0].eval()(x), atol=ATOL)


def test_shortcut_replaces_the_last_fused_map() -> None:
    models = {"seg": tv.vgg11(), "normal": tv.vgg11()}
    fused = nddrify.fuse(models, shortcut=True)
    shortcut = fused.shortcut
    assert isinstance(shortcut, NDDRShortcutLayer)
    # VGG-11 pools: 64 + 128 + 256 + 512 + 512 = 1472 channels reduced to 512, per task.
    assert [tuple(c.weight.shape) for c in shortcut.convs] == [(512, 1472, 1, 1)] * 2
    assert "shortcut = self.shortcut(((seg_features_2_nddr, normal_features_2_nddr)" in fused.code
    node = next(n for n in fused.graph.nodes if n.name == "seg_shortcut")
    assert node.target is operator.getitem
    assert [u.name for u in node.users] == ["seg_avgpool"]
    out = fused(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 1000)
    plan = nddrify.meta.fused_plan(fused)
    assert plan.shortcut_weights == 2 * 1472 * 512
    assert plan.shortcut_norm_params == 2 * 2 * 512
    params = sum(p.numel() for p in shortcut.parameters())
    assert params == plan.shortcut_weights + plan.shortcut_norm_params


def test_plan_parameter_counts_match_the_built_layers() -> None:
    models = [tv.resnet18(), tv.resnet34()]
    fused = nddrify.fuse(models)
    plan = nddrify.meta.fused_plan(fused)
    for level in plan.levels:
        layer = getattr(fused, f"nddr{level.index + 1}")
        weights = sum(c.weight.numel() for c in layer.convs)
        norms = sum(p.numel() for n in layer.norms for p in n.parameters())
        assert (weights, norms) == (level.weights, level.norm_params)


def test_fuse_on_bf16_models_keeps_dtype() -> None:
    models = [TinyCNN().to(torch.bfloat16), TinyCNN().to(torch.bfloat16)]
    fused = nddrify.fuse(models, example_input=torch.randn(1, 3, 32, 32))
    assert {p.dtype for p in fused.parameters()} == {torch.bfloat16}
    out = fused(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out[0].dtype == torch.bfloat16


@pytest.mark.cuda
def test_fuse_on_cuda_matches_cpu() -> None:
    models = [tv.resnet18().eval(), tv.resnet18().eval()]
    x = torch.randn(2, 3, 64, 64)
    fused = nddrify.fuse(models, **IDENTITY).eval()
    cuda_models = [copy.deepcopy(m).cuda() for m in models]
    fused_cuda = nddrify.fuse(cuda_models, **IDENTITY).eval()
    assert all(p.is_cuda for p in fused_cuda.parameters())
    with torch.no_grad():
        for got, want in zip(fused_cuda(x.cuda()), fused(x)):
            assert torch.allclose(got.cpu(), want, atol=1e-3)
