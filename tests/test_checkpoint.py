"""nddrify.save / nddrify.load: plain-value checkpoints, atomic writes, weights_only loading."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import nddrify

from .models import TinyCNN


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
        for b in module.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)


def test_save_and_load_from_specs_needs_no_code(tmp_path) -> None:
    specs = {"seg": "torchvision:resnet18(num_classes=5)", "depth": "timm:resnet18"}
    fused = nddrify.fuse(specs, shortcut=True, init=(0.8, 0.2))
    _randomise(fused)
    fused.eval()
    path = tmp_path / "sub" / "fused.pt"
    nddrify.save(fused, path)
    assert [p.name for p in path.parent.iterdir()] == ["fused.pt"]  # no temporary file left
    payload = torch.load(path, weights_only=True)  # plain values and tensors only
    assert payload["build"]["specs"] == list(specs.values())
    loaded = nddrify.load(path)
    assert loaded.training is False
    before, after = fused.meta["nddrify_plan"], loaded.meta["nddrify_plan"]
    assert [after.points(t) for t in specs] == [before.points(t) for t in specs]
    assert after.overhead == before.overhead
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for task in specs:
            assert torch.equal(loaded(x)[task], fused(x)[task])


@pytest.mark.parametrize(
    "fusion", ["cross_stitch", "sluice", nddrify.NDDR(rank=4), nddrify.NDDR(groups=2)], ids=str
)
def test_every_builtin_kind_round_trips(tmp_path, fusion) -> None:
    specs = ["tests.models:TinyCNN", "tests.models:TinyCNN"]
    fused = nddrify.fuse(specs, fusion=fusion, example_input=torch.randn(1, 3, 32, 32)).eval()
    _randomise(fused)
    nddrify.save(fused, tmp_path / "f.pt")
    loaded = nddrify.load(tmp_path / "f.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(loaded(x), fused(x)):
            assert torch.equal(got, want)


def test_models_without_specs_are_passed_at_load(tmp_path) -> None:
    x = torch.randn(1, 3, 32, 32)
    fused = nddrify.fuse([TinyCNN(), TinyCNN(classes=3)], example_input=x, norm=None)
    _randomise(fused)
    path = tmp_path / "fused.pt"
    nddrify.save(fused, path)
    with pytest.raises(
        nddrify.errors.CheckpointError, match=r"no model specs for task\(s\) \['task0', 'task1'\]"
    ):
        nddrify.load(path)
    loaded = nddrify.load(path, models=[TinyCNN(), TinyCNN(classes=3)]).eval()
    fused.eval()
    for got, want in zip(loaded(x), fused(x)):
        assert torch.equal(got, want)
    nddrify.save(fused, path, specs=["tests.models:TinyCNN", "tests.models:TinyCNN(classes=3)"])
    assert torch.equal(nddrify.load(path).eval()(x)[1], fused(x)[1])


def test_bad_checkpoints_and_unsavable_models(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(nddrify.errors.CheckpointError, match="not an nddrify checkpoint"):
        nddrify.load(path)
    with pytest.raises(
        nddrify.errors.CheckpointError, match=r"expected a model returned by nddrify\.fuse"
    ):
        nddrify.save(TinyCNN(), path)
    custom = nddrify.fuse([TinyCNN(), TinyCNN()], norm=lambda c: nn.GroupNorm(1, c))
    with pytest.raises(nddrify.errors.CheckpointError, match="callable option"):
        nddrify.save(custom, path)


def test_a_failed_save_keeps_the_previous_file(tmp_path) -> None:
    path = tmp_path / "fused.pt"
    fused = nddrify.fuse(["torchvision:resnet18", "torchvision:resnet18"])
    nddrify.save(fused, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    fused.meta["nddrify_build"]["example_input_shape"] = Unpicklable()
    with pytest.raises(pickle.PicklingError):
        nddrify.save(fused, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.pt"]
