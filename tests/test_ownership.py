"""Fusion without copies (``fuse(copy=False)``) and planning / fusing models built on the meta
device."""

from __future__ import annotations

import pytest
import torch
import torchvision

import nddrify
from nddrify.errors import FusionConfigError, ModelsError

X = torch.randn(2, 3, 64, 64)


def resnets(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"a": torchvision.models.resnet18().eval(), "b": torchvision.models.resnet18().eval()}


def test_copy_false_takes_the_tensors_and_equals_copy_true() -> None:
    copied = nddrify.fuse(resnets(), init=(0.8, 0.2))
    models = resnets()
    tensors = {name: t for name, t in models["a"].state_dict(keep_vars=True).items()}
    taken = nddrify.fuse(models, init=(0.8, 0.2), copy=False)
    for name, tensor in taken.a.state_dict(keep_vars=True).items():
        assert tensor is tensors[name], name  # the very same tensors: nothing was copied
    with torch.no_grad():
        want, got = copied.eval()(X), taken.eval()(X)
    assert all(torch.equal(got[t], want[t]) for t in ("a", "b"))
    assert sum(p.numel() for p in taken.parameters()) == sum(p.numel() for p in copied.parameters())


def test_consumed_models_are_empty_and_refuse_to_run() -> None:
    models = resnets()
    count = sum(p.numel() for p in models["b"].parameters())
    nddrify.fuse(models, copy=False)
    for model in models.values():
        assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert sum(p.numel() for p in models["b"].parameters()) == count  # shapes are kept
    with pytest.raises(ModelsError, match=r"task 'b' was consumed .* run fused\.b"):
        models["b"](X)
    with pytest.raises(ModelsError, match="consumed"):
        models["a"].layer1(torch.randn(1, 64, 8, 8))  # submodules too


def test_copy_false_trains_the_fused_model_only() -> None:
    models = resnets()
    fused = nddrify.fuse(models, copy=False).train()
    before = fused.a.conv1.weight.detach().clone()
    out = fused(X)
    (out["a"].sum() + out["b"].sum()).backward()
    torch.optim.SGD(fused.parameters(), lr=0.1).step()
    assert not torch.equal(fused.a.conv1.weight, before)
    assert models["a"].conv1.weight.device.type == "meta"


def test_copy_false_refuses_a_model_passed_twice() -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(ModelsError, match=r"tasks 'task0' and 'task1' hold the same tensor"):
        nddrify.fuse([model, model], copy=False)
    assert model.conv1.weight.device.type == "cpu"  # refused before anything was consumed


def test_copy_false_is_refused_with_within() -> None:
    with pytest.raises(FusionConfigError, match="copy=False is not available with within="):
        nddrify.fuse(resnets(), within="layer1", copy=False)


def test_specs_plan_on_the_meta_device_like_real_models() -> None:
    specs = ["torchvision:resnet50", "torchvision:resnet50"]
    from_specs = nddrify.plan(specs, points="auto")  # built on the meta device
    real = nddrify.plan(nddrify.trace(specs), points="auto")  # built with weights
    assert from_specs.to_dict() == real.to_dict()
    assert from_specs.model_params == (25_557_032, 25_557_032)


def test_a_users_meta_model_plans_and_lists_candidates() -> None:
    with torch.device("meta"):
        models = [torchvision.models.resnet18(), torchvision.models.resnet34()]
    plan = nddrify.plan(models, points=2)
    assert [lv.points[1].name for lv in plan.levels] == ["layer3", "layer4"]
    auto = [c.name for c in nddrify.get_fusion_candidates(models[0]) if c.auto]
    assert auto == ["maxpool", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("route", ["assign", "to_empty"])
def test_fusing_meta_models_then_loading_weights(route: str) -> None:
    reference = nddrify.fuse(resnets(), fusion=nddrify.NDDR(rank=16)).eval()
    with torch.device("meta"):
        meta = [torchvision.models.resnet18(), torchvision.models.resnet18()]
    fused = nddrify.fuse(dict(zip("ab", meta)), fusion=nddrify.NDDR(rank=16)).eval()
    assert {p.device.type for p in fused.parameters()} == {"meta"}
    if route == "assign":
        fused.load_state_dict(reference.state_dict(), assign=True)
    else:
        fused.to_empty(device="cpu")
        fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        got, want = fused(X), reference(X)
    assert all(torch.equal(got[t], want[t]) for t in ("a", "b"))
