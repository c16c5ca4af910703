"""The bad-input catalogue: every mistake gets a named NddrifyError that says what to do.

Each entry is (what the user did wrong, the call, the expected error, a pattern its message must
match). The README's troubleshooting section lists the same cases.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nddrify
from nddrify.layers import NDDRLayer, resize_bilinear

from .models import DataDependent, DeadBranch, ImageMLP, OptionalArgs, ShapeReturning, TinyCNN

X32 = torch.randn(1, 3, 32, 32)


def _pair(**kwargs) -> Callable[[], object]:
    return lambda: nddrify.fuse([TinyCNN(), TinyCNN()], example_input=X32, **kwargs)


def _resnets(**kwargs) -> Callable[[], object]:
    return lambda: nddrify.plan(
        [torchvision.models.resnet18(), torchvision.models.resnet18()], **kwargs
    )


class TwoInputs(nn.Module):
    def forward(self, x, depth):
        return x + depth


def _missing_timm() -> object:
    saved = sys.modules.get("timm")
    sys.modules["timm"] = None  # makes "import timm" raise ImportError
    try:
        return nddrify.fuse(["timm:resnet18", "timm:resnet18"])
    finally:
        if saved is not None:
            sys.modules["timm"] = saved
        else:
            del sys.modules["timm"]


def _fused_vgg11() -> nn.Module:
    return nddrify.fuse(
        [torchvision.models.vgg11(), torchvision.models.vgg11()], points=["features.2"]
    )


def _load_changed(change: Callable[[Path, bytes], bytes] | None, **load_kwargs) -> object:
    """nddrify.load of a real checkpoint (a fused TinyCNN pair, saved with specs unless models
    are passed) whose bytes ``change`` rewrote, in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fused.pt"
        specs = None if load_kwargs else ["tests.models:TinyCNN"] * 2
        nddrify.save(nddrify.fuse([TinyCNN(), TinyCNN()], example_input=X32), path, specs=specs)
        if change is not None:
            path.write_bytes(change(path, path.read_bytes()))
        return nddrify.load(path, **load_kwargs)


def _flip_tensor_byte(path: Path, data: bytes) -> bytes:
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
        offset = data.index(archive.read(max(records, key=lambda i: i.file_size))) + 3
    return data[:offset] + bytes([data[offset] ^ 0x20]) + data[offset + 1 :]


def _load_saved(obj: object | None) -> object:
    """nddrify.load of a file torch.save wrote (through atomic_save) holding ``obj`` (``None``:
    no file at all)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        if obj is not None:
            nddrify.checkpoint.atomic_save(obj, path)
        return nddrify.load(path)


@dataclass(frozen=True)
class BadInput:
    what: str
    call: Callable[[], object]
    error: type[Exception]
    pattern: str


CATALOGUE = [
    BadInput(
        "one model",
        lambda: nddrify.fuse([TinyCNN()]),
        nddrify.errors.ModelsError,
        "at least two tasks",
    ),
    BadInput(
        "a bare module",
        lambda: nddrify.fuse(TinyCNN()),
        nddrify.errors.ModelsError,
        "got a single TinyCNN",
    ),
    BadInput(
        "not a model",
        lambda: nddrify.fuse([TinyCNN(), 3]),
        nddrify.errors.ModelsError,
        "task 'task1' is a int",
    ),
    BadInput(
        "models of another type",
        lambda: nddrify.fuse(42),
        nddrify.errors.ModelsError,
        "list or dict",
    ),
    BadInput(
        "task name that is not an identifier",
        lambda: nddrify.fuse({"my task": TinyCNN(), "b": TinyCNN()}),
        nddrify.errors.ModelsError,
        "task name 'my task' cannot be used",
    ),
    BadInput(
        "reserved task name",
        lambda: nddrify.fuse({"nddr1": TinyCNN(), "b": TinyCNN()}),
        nddrify.errors.ModelsError,
        "does not start with 'nddr'",
    ),
    BadInput(
        "models in different dtypes",
        lambda: nddrify.fuse([TinyCNN(), TinyCNN().double()]),
        nddrify.errors.ModelsError,
        "different devices or dtypes.*task1: cpu/float64.*model.to",
    ),
    BadInput(
        "models on different devices",
        lambda: nddrify.fuse([TinyCNN(), TinyCNN().to("meta")]),
        nddrify.errors.ModelsError,
        "different devices or dtypes.*task1: meta/float32",
    ),
    BadInput(
        "untraceable model",
        lambda: nddrify.fuse([DataDependent(), DataDependent()]),
        nddrify.errors.TraceError,
        "(?s)task 'task0'.*module 'gate'.*leaf_modules",
    ),
    BadInput(
        "forward needs a second input",
        lambda: nddrify.fuse([TwoInputs(), TwoInputs()]),
        nddrify.errors.InputError,
        r"needs the argument\(s\) \['depth'\].*TraceOptions\(concrete_args=",
    ),
    BadInput(
        "concrete_args for an argument forward does not take",
        lambda: nddrify.fuse(
            [OptionalArgs(), OptionalArgs()],
            trace_options=nddrify.TraceOptions(concrete_args={"maks": None}),
        ),
        nddrify.errors.InputError,
        r"concrete_args names \['maks'\]",
    ),
    BadInput(
        "example input of the wrong rank",
        lambda: nddrify.fuse([TinyCNN(), TinyCNN()], example_input=torch.randn(3, 32, 32)),
        nddrify.errors.InputError,
        "4-D N×C×H×W batch",
    ),
    BadInput(
        "example input the model cannot run",
        lambda: nddrify.fuse([TinyCNN(), TinyCNN()], example_input=torch.randn(1, 4, 32, 32)),
        nddrify.errors.TraceError,
        "failed on an example input of shape",
    ),
    BadInput(
        "example input that is not a tensor",
        lambda: nddrify.fuse([TinyCNN(), TinyCNN()], example_input=[1, 3, 32, 32]),
        nddrify.errors.InputError,
        "example_input must be a tensor",
    ),
    BadInput(
        "unknown point name",
        _resnets(points=["layr2"]),
        nddrify.errors.PointError,
        "did you mean.*'layer2'",
    ),
    BadInput(
        "points in different order across tasks",
        _resnets(points=[["layer1", "layer2"], ["layer2", "layer1"]]),
        nddrify.errors.PointError,
        "task 'task1': point 'layer1' runs before 'layer2'",
    ),
    BadInput(
        "duplicate points",
        _resnets(points=["layer1", "layer1.1.relu_1"]),
        nddrify.errors.PointError,
        "same node",
    ),
    BadInput("empty points", _resnets(points=[]), nddrify.errors.PointError, "points is empty"),
    BadInput(
        "different numbers of points per task",
        _resnets(points=[["layer1"], ["layer1", "layer2"]]),
        nddrify.errors.PointError,
        "same number of fusion points",
    ),
    BadInput(
        "per-task lists for the wrong number of tasks",
        _resnets(points=[["layer1"]]),
        nddrify.errors.PointError,
        "1 per-task lists but there are 2 tasks",
    ),
    BadInput(
        "points dict missing a task",
        _resnets(points={"task0": ["layer1"]}),
        nddrify.errors.PointError,
        "no entry for task",
    ),
    BadInput(
        "points of a wrong type", _resnets(points=True), nddrify.errors.PointError, "not valid"
    ),
    BadInput(
        "too many last-N points", _resnets(points=6), nddrify.errors.PointError, "between 1 and 5"
    ),
    BadInput(
        "a point that is not a feature map",
        _resnets(points=["fc"]),
        nddrify.errors.PointError,
        "shape \\(1, 1000\\); fusion points must be image feature maps",
    ),
    BadInput(
        "a point whose value is not a tensor",
        lambda: nddrify.plan(
            [ShapeReturning(), ShapeReturning()], points=["size"], example_input=X32
        ),
        nddrify.errors.PointError,
        "which is not a tensor",
    ),
    BadInput(
        "a point after the output (a dead branch)",
        lambda: nddrify.plan([DeadBranch(), DeadBranch()], points=["unused"], example_input=X32),
        nddrify.errors.PointError,
        "does not feed the model's output",
    ),
    BadInput(
        "no feature map to fuse automatically",
        lambda: nddrify.plan([ImageMLP(), ImageMLP()], example_input=X32),
        nddrify.errors.PointError,
        "found no N×C×H×W feature maps",
    ),
    BadInput(
        "mismatched H×W at a level",
        _resnets(points=[["layer1"], ["layer2"]]),
        nddrify.errors.ShapeMismatchError,
        "fusion level 1.*task0 'layer1' 64×56×56, task1 'layer2' 128×28×28.*resize=True",
    ),
    BadInput(
        "NaN init", _pair(init=(float("nan"), 0.1)), nddrify.errors.FusionConfigError, "NaN or inf"
    ),
    BadInput(
        "init of a wrong form",
        _pair(init=(0.9,)),
        nddrify.errors.FusionConfigError,
        "init=.*not supported",
    ),
    BadInput(
        "unknown norm",
        _pair(norm="layernorm"),
        nddrify.errors.FusionConfigError,
        "norm='layernorm' is not supported",
    ),
    BadInput(
        "unknown activation",
        _pair(activation="swish"),
        nddrify.errors.FusionConfigError,
        "activation='swish'",
    ),
    BadInput(
        "bad shortcut value",
        _pair(shortcut="yes"),
        nddrify.errors.FusionConfigError,
        "shortcut='yes' is not valid",
    ),
    BadInput(
        "fusion factory together with NDDR options",
        _pair(fusion=nddrify.NDDR(), norm=None),
        nddrify.errors.FusionConfigError,
        "either fusion",
    ),
    BadInput(
        "unknown shortcut resize mode",
        _pair(shortcut=nddrify.Shortcut(resize_mode="nearest")),
        nddrify.errors.FusionConfigError,
        "resize_mode='nearest' is unknown",
    ),
    BadInput(
        "unknown resize mode",
        lambda: resize_bilinear(X32, (8, 8), "cubic"),
        nddrify.errors.FusionConfigError,
        "resize mode",
    ),
    BadInput(
        "an NDDR layer for one task",
        lambda: NDDRLayer([4]),
        nddrify.errors.FusionConfigError,
        "at least two tasks",
    ),
    BadInput(
        "bad model spec",
        lambda: nddrify.fuse(["vgg16:", "vgg16:"]),
        nddrify.errors.SpecError,
        "must look like",
    ),
    BadInput(
        "unknown torchvision model",
        lambda: nddrify.specs.load_spec("torchvision:resnet19"),
        nddrify.errors.SpecError,
        "no model 'resnet19'; did you mean",
    ),
    BadInput(
        "missing timm", _missing_timm, nddrify.errors.SpecError, "needs timm.*pip install timm"
    ),
    BadInput(
        "pretrained weights in a spec",
        lambda: nddrify.specs.load_spec("timm:resnet18(pretrained=True)"),
        nddrify.errors.SpecError,
        "never downloads",
    ),
    BadInput(
        "task_state_dict of an unknown task",
        lambda: nddrify.training.task_state_dict(_fused_vgg11(), "seg"),
        nddrify.errors.FusedModelError,
        "no task 'seg'.*'task0', 'task1'",
    ),
    BadInput(
        "overhead of a model that was not fused",
        lambda: nddrify.training.overhead(TinyCNN()),
        nddrify.errors.FusedModelError,
        "expected a model returned by nddrify.fuse",
    ),
    BadInput(
        "checkpoint file of random bytes",
        lambda: _load_changed(lambda path, data: bytes(range(1, 256)) * 4),
        nddrify.errors.CheckpointError,
        r"\(1020 bytes\) is not an nddrify checkpoint .*: it is binary data that is not a "
        "torch.save file.*; pass a file written by nddrify.save",
    ),
    BadInput(
        "checkpoint path naming a text file",
        lambda: _load_changed(lambda path, data: b"see the shared drive\n"),
        nddrify.errors.CheckpointError,
        "it is a text file \\(starting 'see the shared drive'\\); pass a file written by",
    ),
    BadInput(
        "truncated checkpoint",
        lambda: _load_changed(lambda path, data: data[: len(data) // 3]),
        nddrify.errors.CheckpointError,
        "cannot be read as an nddrify checkpoint .*: it starts like a zip archive but does not end "
        "like one: it is truncated; the file was damaged .*: restore a backup or write it again",
    ),
    BadInput(
        "empty checkpoint file",
        lambda: _load_changed(lambda path, data: b""),
        nddrify.errors.CheckpointError,
        r"\(0 bytes\) is not an nddrify checkpoint .*: it is empty; its save was interrupted",
    ),
    BadInput(
        "missing checkpoint file",
        lambda: _load_saved(None),
        nddrify.errors.CheckpointError,
        r"model.pt' does not exist \(the current folder is .*\); expected an nddrify "
        "checkpoint.*: check the path",
    ),
    BadInput(
        "checkpoint with a corrupted tensor byte",
        lambda: _load_changed(_flip_tensor_byte),
        nddrify.errors.CheckpointError,
        r"the file is corrupted \('archive/data/\d+' fails its CRC-32\); the file was damaged",
    ),
    BadInput(
        "plain state dict passed to nddrify.load",
        lambda: _load_saved(TinyCNN().state_dict()),
        nddrify.errors.CheckpointError,
        r"it is a plain state dict \(\d+ tensors, e.g. 'stem.0.weight'\); load it with "
        r"model.load_state_dict\(torch.load\(path, weights_only=True\)\)",
    ),
    BadInput(
        "recipes training checkpoint passed to nddrify.load",
        lambda: _load_saved({"format": "recipes.checkpoint/1", "model": TinyCNN().state_dict()}),
        nddrify.errors.CheckpointError,
        "is not an nddrify checkpoint .*: it is a recipes training checkpoint .*: its 'model' "
        "entry holds weights; resume it with the recipes' --resume",
    ),
    BadInput(
        "nddrify.load with models of another architecture",
        lambda: _load_changed(None, models=[TinyCNN(classes=3), TinyCNN()]),
        nddrify.errors.CheckpointError,
        r"the models given differ from the ones saved in .*: 2 weight\(s\) do not match \(e.g. "
        r"'task0.fc.weight' is \(5, 16\) in the checkpoint but \(3, 16\) here.*pass the same "
        "architectures as at save time",
    ),
    BadInput(
        "torchvision spec with pretrained=True",
        lambda: nddrify.specs.load_spec("torchvision:resnet18(pretrained=True)"),
        nddrify.errors.SpecError,
        r"\(pretrained=True\), which torchvision would download; nddrify never downloads weights.*"
        r"model.load_state_dict\(torch.load\(PATH, weights_only=True\)\)",
    ),
    BadInput(
        "torchvision spec with weights='IMAGENET1K_V1'",
        lambda: nddrify.specs.load_spec("torchvision:resnet18(weights='IMAGENET1K_V1')"),
        nddrify.errors.SpecError,
        r"\(weights='IMAGENET1K_V1'\), which torchvision would download; nddrify never downloads",
    ),
    BadInput(
        "unknown keyword in a torchvision spec",
        lambda: nddrify.fuse(["torchvision:resnet18(foo=1)", "torchvision:resnet18"]),
        nddrify.errors.SpecError,
        "torchvision:resnet18 takes no keyword argument 'foo'; it accepts: groups, norm_layer, "
        "num_classes, progress",
    ),
    BadInput(
        "misspelt timm model name",
        lambda: nddrify.specs.load_spec("timm:resnet5O"),
        nddrify.errors.SpecError,
        r"timm has no model 'resnet5O'; did you mean \['resnet50'",
    ),
    BadInput(
        "unknown keyword of a callable spec",
        lambda: nddrify.specs.load_spec("tests.models:TinyCNN(clases=3)"),
        nddrify.errors.SpecError,
        r"tests.models:TinyCNN takes no keyword argument 'clases' \(did you mean 'classes'\?\); "
        "it accepts: classes, width",
    ),
    BadInput(
        "points dict with a misspelt task",
        _resnets(points={"task0": ["layer1"], "tsk1": ["layer1"]}),
        nddrify.errors.PointError,
        r"no entry for task\(s\) \['task1'\]; it names unknown task\(s\) \['tsk1'\]",
    ),
    BadInput(
        "param_groups head that matches no module",
        lambda: nddrify.param_groups(_fused_vgg11(), 1e-3, head=["classifer.6"]),
        nddrify.errors.FusionConfigError,
        r"'classifer.6' \(close names: \['classifier.6'",
    ),
    BadInput(
        "export of a module nddrify did not build",
        lambda: nddrify.exporting.export_program(TinyCNN(), "/nonexistent/never-written.pt2"),
        nddrify.errors.FusedModelError,
        "expected a model returned by nddrify.fuse",
    ),
]


def test_the_catalogue_is_large_and_distinct() -> None:
    assert len(CATALOGUE) >= 20
    assert len({entry.what for entry in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.what for e in CATALOGUE])
def test_bad_input_gets_a_named_error(entry: BadInput) -> None:
    with pytest.raises(entry.error, match=entry.pattern) as info:
        entry.call()
    assert isinstance(info.value, nddrify.NddrifyError)
    assert "Traceback" not in str(info.value)


def test_all_errors_share_one_base_class() -> None:
    errors = [n for n in nddrify.errors.__all__ if n != "NddrifyError"]
    assert len(errors) == 13  # every class lives in nddrify.errors, one per kind of mistake
    for name in errors:
        assert issubclass(getattr(nddrify.errors, name), nddrify.NddrifyError)
