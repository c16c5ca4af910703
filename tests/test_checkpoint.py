"""nddrify.save / nddrify.load: plain-value checkpoints, atomic writes, weights_only loading."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import nddrify
from nddrify.specs import load_spec

from .models import DataDependent, ImageMLP, TinyCNN


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
    with pytest.raises(nddrify.errors.CheckpointError, match="is not an nddrify checkpoint"):
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


def _tiny_checkpoint(path, **save_kwargs) -> nn.Module:
    """A fused pair of TinyCNNs with random weights, saved with their specs to ``path``."""
    specs = ["tests.models:TinyCNN", "tests.models:TinyCNN"]
    fused = nddrify.fuse(specs, example_input=torch.randn(1, 3, 32, 32), norm=None).eval()
    _randomise(fused)
    nddrify.save(fused, path, **save_kwargs)
    return fused


def _message(call) -> str:
    with pytest.raises(nddrify.errors.CheckpointError) as info:
        call()
    message = str(info.value)
    assert "weights_only=False" not in message and "Traceback" not in message
    assert info.value.__cause__ is None  # torch's and pickle's own errors are not shown
    return message


def test_read_checkpoint_says_what_a_file_is(tmp_path) -> None:
    read = nddrify.checkpoint.read_checkpoint
    nddrify_ckpt, recipes = tmp_path / "fused.pt", tmp_path / "checkpoint.pt"
    _tiny_checkpoint(nddrify_ckpt)
    payload = {"format": "recipes.checkpoint/1", "step": 7, "model": {"w": torch.ones(2)}}
    nddrify.checkpoint.atomic_save(payload, recipes)
    as_recipes = {
        "expected_format": "recipes.checkpoint/1",
        "what": "a recipes training checkpoint",
    }
    loaded = read(recipes, **as_recipes, required=("model", "step"))
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(2))
    size = recipes.stat().st_size
    assert _message(lambda: nddrify.load(recipes)) == (
        f"{str(recipes)!r} ({size} bytes) is not an nddrify checkpoint (format 'nddrify.fused/3' "
        "or 'nddrify.fused/2', written by nddrify.save): it is a recipes training checkpoint "
        "(format 'recipes.checkpoint/1'): its 'model' entry holds weights; resume it with the "
        "recipes' --resume, or load its weights with net.load_state_dict(torch.load(path, "
        "weights_only=True)['model'])."
    )
    assert _message(lambda: read(nddrify_ckpt, **as_recipes)).endswith(
        "is not a recipes training checkpoint (format 'recipes.checkpoint/1', written by the "
        "recipes' training runs): it is an nddrify checkpoint (format 'nddrify.fused/3'); load it "
        "with nddrify.load(path)."
    )
    assert "has no 'optimizer' entry" in _message(
        lambda: read(recipes, **as_recipes, required=("model", "optimizer"))
    )
    torch.save({"conv.weight": torch.zeros(2, 3), "conv.bias": torch.zeros(2)}, tmp_path / "sd.pt")
    assert _message(lambda: nddrify.load(tmp_path / "sd.pt")).endswith(
        ": it is a plain state dict (2 tensors, e.g. 'conv.weight'); load it with "
        "model.load_state_dict(torch.load(path, weights_only=True))."
    )
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "other.pt")
    assert "it is a dict with keys ['epoch', 'optimizer']; pass a file written by nddrify.save" in (
        _message(lambda: nddrify.load(tmp_path / "other.pt"))
    )


def test_read_checkpoint_refuses_files_that_are_not_checkpoints(tmp_path) -> None:
    import argparse

    files = {
        "missing.pt": None,
        "empty.pt": b"",
        "notes.txt": b"weights: see the shared drive\n",
        "random.pt": bytes(range(7, 250, 3)),
        "pickle.pt": pickle.dumps({"a": 1}),
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    with open(tmp_path / "legacy.pt", "wb") as file:
        torch.save({"a": torch.zeros(1)}, file, _use_new_zipfile_serialization=False)
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "objects.pt")
    expected = {
        "missing.pt": r"does not exist \(the current folder is .*\); expected an nddrify checkpoint",
        "empty.pt": r"\(0 bytes\) is not an nddrify checkpoint .*: it is empty; its save was",
        "notes.txt": "it is a text file \\(starting 'weights: see the shared drive'\\)",
        "random.pt": "it is binary data that is not a torch.save file \\(it starts with bytes 07 0a",
        "pickle.pt": "it is a Python pickle, not a torch.save zip archive",
        "legacy.pt": "it is a legacy torch.save file",
        "objects.pt": "it holds Python objects that a safe load \\(weights_only=True\\) refuses, "
        "such as argparse.Namespace, which an nddrify checkpoint never holds, so it was not "
        "written by nddrify.save; pass the file",
    }
    for name, pattern in expected.items():
        message = _message(lambda name=name: nddrify.load(tmp_path / name))
        assert re.search(pattern, message), message
        assert repr(str(tmp_path / name)) in message
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    assert "is a folder, not a file" in _message(lambda: nddrify.load(tmp_path / "run"))


def test_damaged_checkpoints_are_caught(tmp_path) -> None:
    path = tmp_path / "fused.pt"
    _tiny_checkpoint(path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "does not end like one: it is truncated" in _message(lambda: nddrify.load(truncated))
    # torch's zip reader does not check CRC-32s: a flipped byte in a tensor loads silently
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(records, key=lambda i: i.file_size)
        record, original = info.filename, archive.read(info)
    offset = data.index(original) + 5
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :])
    try:
        silently = torch.load(flipped, weights_only=True)["state_dict"]
        good = torch.load(path, weights_only=True)["state_dict"]
        assert any(not torch.equal(silently[k], good[k]) for k in good)
    except RuntimeError:  # a later torch that checks them
        pass
    assert re.search(
        rf"the file is corrupted \('{record}' fails its CRC-32\)",
        _message(lambda: nddrify.load(flipped)),
    )
    # the same change with the CRC-32 rewritten to match: the digest written at save catches it
    rewritten = tmp_path / "rewritten.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rewritten, "w") as out:
        for item in source.infolist():
            body = source.read(item)
            out.writestr(
                item.filename,
                bytes([body[0] ^ 0x10]) + body[1:] if item.filename == record else body,
            )
    assert "but the file is corrupted (its weights or build record do not match the digest" in (
        _message(lambda: nddrify.load(rewritten))
    )


def test_format_2_checkpoints_without_a_digest_still_load(tmp_path) -> None:
    path = tmp_path / "fused.pt"
    fused = _tiny_checkpoint(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "nddrify.fused/3" and payload["digest"].startswith("sha256:")
    del payload["digest"]
    nddrify.checkpoint.atomic_save({**payload, "format": "nddrify.fused/2"}, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(nddrify.load(path)(x), fused(x)):
            assert torch.equal(got, want)
    del payload["build"]["as_dict"]
    nddrify.checkpoint.atomic_save({**payload, "format": "nddrify.fused/2"}, path)
    assert "but its 'build' entry (a dict of 'plan', 'specs', 'as_dict') is missing or wrong" in (
        _message(lambda: nddrify.load(path))
    )


def test_models_that_differ_from_the_saved_ones(tmp_path) -> None:
    path = tmp_path / "fused.pt"
    fused = nddrify.fuse([TinyCNN(), TinyCNN()], example_input=torch.randn(1, 3, 32, 32), norm=None)
    nddrify.save(fused, path)
    with pytest.raises(nddrify.errors.CheckpointError) as info:
        nddrify.load(path, models=[TinyCNN(classes=3), TinyCNN()])
    assert str(info.value) == (
        f"the models given differ from the ones saved in {str(path)!r}: 2 weight(s) do not match "
        "(e.g. 'task0.fc.weight' is (5, 16) in the checkpoint but (3, 16) here; 'task0.fc.bias' is "
        "(5,) in the checkpoint but (3,) here); pass the same architectures as at save time (same "
        "classes and constructor arguments, such as num_classes), or let the checkpoint's specs "
        "rebuild them (nddrify.load(path) after nddrify.save(fused, path, specs=[...]))."
    )
    with pytest.raises(nddrify.errors.CheckpointError, match=r"differ .*: 19 weight\(s\)"):
        nddrify.load(path, models=[TinyCNN(width=16), TinyCNN()])
    with pytest.raises(
        nddrify.errors.CheckpointError,
        match=r"differ from the ones saved in .*: task 'task0': the plan's point node\(s\)",
    ):
        nddrify.load(path, models=[ImageMLP(), ImageMLP()])
    with pytest.raises(nddrify.errors.TraceError):  # tracing failures stay their own errors
        nddrify.load(path, models=[DataDependent(), DataDependent()])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_save_gives_files_the_umask_default_mode(tmp_path, umask, mode) -> None:
    previous = os.umask(umask)
    try:
        nddrify.checkpoint.atomic_save({"a": 1}, tmp_path / "a.pt")
        nddrify.checkpoint.atomic_save({"a": 2}, tmp_path / "a.pt")  # replacing keeps it too
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    with pytest.raises(nddrify.errors.CheckpointError, match="it is a folder; pass a file path"):
        nddrify.checkpoint.atomic_save({"a": 1}, tmp_path)


# Model specs: what a checkpoint records to rebuild its models (nddrify.specs).

MYMOD = """
from torch import nn


def make(width: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    )
"""


def test_specs_import_modules_from_the_working_directory(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymod.py").write_text(MYMOD)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        assert isinstance(load_spec("mymod:make(width=4)")[0], nn.Conv2d)
        assert sys.path == path_before  # the working directory was on it for the import only
        x = torch.randn(1, 3, 32, 32)
        fused = nddrify.fuse(["mymod:make", "mymod:make"], example_input=x, points=["2", "5"])
        _randomise(fused)
        nddrify.save(fused, "fused.pt")
        with torch.no_grad():
            assert torch.equal(nddrify.load("fused.pt").eval()(x)[0], fused.eval()(x)[0])
    finally:
        sys.modules.pop("mymod", None)


def test_the_console_script_imports_specs_from_the_working_directory(tmp_path) -> None:
    script = Path(sys.executable).parent / "nddrify"
    if not script.exists():
        script = Path(shutil.which("nddrify") or script)
    if not script.exists():
        pytest.skip("the nddrify console script is not installed (pip install -e .)")
    (tmp_path / "mymod.py").write_text(MYMOD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [str(script), "inspect", "mymod:make", "mymod:make", "--input", "1,3,32,32"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "task0" in done.stdout


def test_spec_keywords_are_checked_against_the_builder(tmp_path, monkeypatch) -> None:
    def error(spec: str) -> str:
        with pytest.raises(nddrify.errors.SpecError) as info:
            load_spec(spec)
        return str(info.value)

    resnet = (
        "; it accepts: groups, norm_layer, num_classes, progress, replace_stride_with_dilation, "
        "weights, width_per_group, zero_init_residual."
    )
    assert error("torchvision:resnet18(foo=1)") == (
        "model spec 'torchvision:resnet18(foo=1)': torchvision:resnet18 takes no keyword "
        "argument 'foo'" + resnet
    )
    assert "'num_clases' (did you mean 'num_classes'?)" + resnet in error(
        "torchvision:resnet18(num_clases=3)"
    )
    assert "'foo' cannot be given to this model (TypeError: " in error(
        "torchvision:quantized_resnet18(foo=1)"  # its class takes **kwargs: torchvision says
    )
    assert "cannot be built with its arguments (replace_stride_with_dilation should be" in (
        error("torchvision:resnet50(replace_stride_with_dilation=[True])")
    )
    assert load_spec("torchvision:resnet18(pretrained=False, num_classes=3)").fc.out_features == 3
    assert error("timm:resnet18(foo=1)").startswith(
        "model spec 'timm:resnet18(foo=1)': 'foo' cannot be given to this model"
    )
    assert error("timm:resnet5O") == (
        "timm cannot build 'resnet5O': timm has no model 'resnet5O'; did you mean ['resnet50', "
        "'resnet51q', 'resnet50t', 'resnet50s', 'resnet50d']?"
    )
    (tmp_path / "mymod.py").write_text(MYMOD + "\n\ndef need(depth):\n    return make()\n")
    monkeypatch.chdir(tmp_path)
    try:
        assert error("mymod:make(widht=4)") == (
            "model spec 'mymod:make(widht=4)': mymod:make takes no keyword argument 'widht' (did "
            "you mean 'width'?); it accepts: width."
        )
        assert "mymod:need': missing a required argument: 'depth'; give it in the spec" in (
            error("mymod:need")
        )
    finally:
        sys.modules.pop("mymod", None)


@pytest.mark.parametrize(
    "spec",
    [
        "torchvision:resnet18(pretrained=True)",
        "torchvision:resnet18(weights='IMAGENET1K_V1')",
        "torchvision:resnet18(weights='DEFAULT')",
        "torchvision:deeplabv3_resnet50(weights_backbone='DEFAULT')",
        "torchvision:fasterrcnn_resnet50_fpn(pretrained_backbone=True)",
        "timm:resnet18(pretrained=True)",
        "timm:resnet18(pretrained=True, pretrained_cfg_overlay={'url': 'https://x/y.pth'})",
        "timm:hf-hub:timm/resnet18.a1_in1k",
    ],
)
def test_specs_never_download_weights(spec) -> None:
    with pytest.raises(nddrify.errors.SpecError) as info:
        load_spec(spec)
    message = str(info.value)
    assert "would download; nddrify never downloads weights" in message
    assert "model.load_state_dict(torch.load(PATH, weights_only=True))" in message
    assert "then use the spec 'mymod:make'" in message


def test_timm_loads_pretrained_weights_from_a_local_file_only(tmp_path) -> None:
    import timm

    source = timm.create_model("resnet18")  # timm drops a classifier of another size
    _randomise(source)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    overlay = f"pretrained_cfg_overlay={{'file': {str(tmp_path / 'weights.pth')!r}}}"
    model = load_spec(f"timm:resnet18(pretrained=True, {overlay})")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(nddrify.errors.SpecError, match=r"from '.*nothing.pth', which is not a fi"):
        load_spec("timm:resnet18(pretrained=True, pretrained_cfg_overlay={'file': 'nothing.pth'})")


def test_load_spec_does_not_import_timm_for_other_specs() -> None:
    code = (
        "import sys; from nddrify.specs import load_spec; load_spec('torchvision:resnet18'); "
        "load_spec('tests.models:TinyCNN'); print('timm' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert done.stdout.strip() == "False", done.stderr
