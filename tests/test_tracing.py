"""Tracing: names, shapes, input sizes, modes, and the errors users see."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import nddrify

from .models import DataDependent, TinyCNN


def test_node_names_follow_torchvision_and_modules_resolve_to_their_last_node() -> None:
    traced = nddrify.tracing.trace_model(torchvision.models.resnet18())
    names = traced.node_names
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer1.0.relu_1" in names and "layer4.1.add" in names
    assert traced.node("layer2").meta["qualname"] == "layer2.1.relu_1"
    assert tuple(traced.node("layer2").meta["tensor_meta"].shape) == (1, 128, 28, 28)
    with pytest.raises(KeyError):
        traced.node("layer5")


def test_default_input_uses_the_models_declared_size() -> None:
    model = timm.create_model("swinv2_tiny_window8_256")
    assert tuple(nddrify.tracing.default_example_input(model).shape) == (1, 3, 256, 256)
    assert tuple(nddrify.tracing.default_example_input(TinyCNN()).shape) == (1, 3, 224, 224)


def test_timm_models_trace_with_the_notrace_registry() -> None:
    traced = nddrify.tracing.trace_model(timm.create_model("convnext_atto"))
    assert traced.node("stages.3").meta["tensor_meta"].shape[1] == 320


def test_tracing_leaves_the_model_untouched_mixed_modes_included() -> None:
    model = TinyCNN().train()
    model.stem[1].eval()  # a frozen BatchNorm inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nddrify.tracing.trace_model(model)
    assert model.training is True and model.stem[1].training is False and model.fc.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fused = nddrify.fuse([model, TinyCNN()], example_input=torch.randn(1, 3, 32, 32))
    assert fused.training is True and fused.nddr1.training is True
    assert fused.task0.stem[1].training is False  # the frozen BatchNorm stays frozen
    assert fused.task1.stem[1].training is True


def test_untraceable_model_names_task_module_and_fixes() -> None:
    with pytest.raises(nddrify.errors.TraceError) as err:
        nddrify.fuse({"seg": DataDependent(), "depth": DataDependent()})
    message = str(err.value)
    assert "task 'seg'" in message
    assert "in module 'gate' (Gate)" in message
    assert "leaf_modules=[ItsClass]" in message and "autowrap_functions" in message
    assert "concrete_args" in message
    assert isinstance(err.value.__cause__, Exception)  # the fx error is attached
    # The suggested fix works.
    options = nddrify.TraceOptions(leaf_modules=[DataDependent.Gate])
    fused = nddrify.fuse([DataDependent(), DataDependent()], trace_options=options)
    assert "self.task0.gate" in fused.code


class _FlatHead(torch.nn.Module):
    """A head sized for one input resolution (196 = 14×14 positions of a 16×16 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3)
        self.fc = torch.nn.Linear(196, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def test_a_shape_failure_is_one_line_naming_the_module(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(nddrify.errors.TraceError) as info:
        nddrify.fuse([_FlatHead(), _FlatHead()], example_input=torch.randn(1, 3, 32, 32))
    first = str(info.value).splitlines()[0]
    assert first == (
        "task 'task0': the traced model failed on an example input of shape (1, 3, 32, 32) in "
        "module 'fc' (Linear): RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        "(1x900 and 196x2)"
    )
    assert "ShapeProp" not in str(info.value)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out


def test_a_detector_error_names_the_backbone_route() -> None:
    def detector() -> torch.nn.Module:
        make = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn
        return make(weights=None, weights_backbone=None).eval()

    a, b = detector(), detector()
    with pytest.raises(nddrify.errors.TraceError) as info:
        nddrify.fuse([a, b])
    message = str(info.value)
    assert "FasterRCNN cannot be traced whole" in message and "'backbone'" in message
    assert len(message.splitlines()) == 1
    assert "nddrify.fuse(models, within='backbone')" in message
    # the route works: the fused backbones give both detectors' FPN maps exactly at identity init
    fused = nddrify.fuse(
        [a.backbone, b.backbone], init=(1.0, 0.0), norm=None, activation=None
    ).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out_a, out_b = fused(x)
        expected_a, expected_b = a.backbone(x), b.backbone(x)
    assert list(out_a) == list(expected_a) == ["0", "1", "pool"]
    assert all(torch.equal(out_a[k], expected_a[k]) for k in expected_a)
    assert all(torch.equal(out_b[k], expected_b[k]) for k in expected_b)
