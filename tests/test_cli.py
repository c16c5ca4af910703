"""The nddrify command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nddrify.cli import main
from nddrify.specs import load_spec


def test_inspect_vgg16_prints_the_plan_and_overhead(capsys) -> None:
    assert (
        main(["inspect", "torchvision:vgg16", "torchvision:vgg16", "--input", "1,3,224,224"]) == 0
    )
    out = capsys.readouterr().out
    for name in ("features.4", "features.9", "features.16", "features.23", "features.30"):
        assert name in out
    assert "2,441,216 fusion 1×1 weights" in out and "0.88%" in out


def test_inspect_json_with_points_and_all(capsys) -> None:
    code = main(
        [
            "inspect",
            "timm:resnet18",
            "timm:resnet18",
            "--points",
            "layer1,layer2",
            "--all",
            "--json",
        ]
    )
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert [lv["points"][0]["name"] for lv in payload["levels"]] == ["layer1", "layer2"]
    assert payload["levels"][0]["points"][0]["shape"] == [1, 64, 56, 56]
    assert payload["levels"][0]["weights"] == 2 * 128 * 64
    candidates = payload["candidates"]["task0"]
    assert sum(c["auto"] for c in candidates) == 5 and len(candidates) > 5


def test_inspect_callable_spec_with_arguments(capsys) -> None:
    spec = "torchvision:resnet50(replace_stride_with_dilation=[False, True, True])"
    assert main(["inspect", spec, spec, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [lv["points"][0]["shape"][2] for lv in payload["levels"]] == [56, 56, 28, 28, 28]
    assert isinstance(load_spec("tests.models:TinyCNN(width=4)"), object)
    assert load_spec("tests.models:TinyCNN(width=4)").stem[0].out_channels == 4


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["vgg16", "vgg16"], "must look like 'torchvision:NAME'"),
        (["torchvision:vgg1", "torchvision:vgg16"], "no model 'vgg1'; did you mean"),
        (["torchvision:vgg16(7)", "torchvision:vgg16"], "literal keyword arguments"),
        (["nosuchpkg.mod:fn", "torchvision:vgg16"], "cannot import 'nosuchpkg.mod'"),
        (["timm:resnet18(pretrained=True)", "timm:resnet18"], "never downloads"),
        (["timm:not_a_model", "timm:resnet18"], "timm cannot build 'not_a_model'"),
    ],
)
def test_bad_specs_give_one_line_errors(specs, message, capsys) -> None:
    assert main(["inspect", *specs]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nddrify: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_bad_input_and_points_flags(capsys) -> None:
    assert (
        main(["inspect", "torchvision:resnet18", "torchvision:resnet18", "--input", "1,3,224"]) == 2
    )
    assert "four positive sizes" in capsys.readouterr().err
    assert (
        main(["inspect", "torchvision:resnet18", "torchvision:resnet18", "--points", "layer9"]) == 2
    )
    assert "no node or module called 'layer9'" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nddrify",
            "inspect",
            "torchvision:resnet18",
            "torchvision:resnet18",
            "--points",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "layer3" in result.stdout and "layer4" in result.stdout


def test_demo_reproduces_the_originals(capsys) -> None:
    assert main(["demo", "--size", "64", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "max |Δ| = {'seg': 0.0, 'normal': 0.0}" in out
    assert "parameters without gradient: 0" in out


# ----------------------------------------------------------------------------- speed and verbs

TINY = ["tests.models:TinyCNN", "tests.models:TinyCNN", "--tasks", "seg,depth"]
TINY_INPUT = ["--input", "1,3,32,32"]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_help_and_version_import_nothing_heavy() -> None:
    # what keeps `nddrify --help` fast: neither the CLI's parser nor `import nddrify` loads
    # torch, torchvision, networkx or rich (timings: README, "Command line")
    heavy = "['torch', 'torchvision', 'networkx', 'rich', 'timm']"
    code = (
        "import contextlib, io, sys\n"
        "import nddrify, nddrify.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    nddrify.cli.main(['--version'])\n"
        "    try:\n"
        "        nddrify.cli.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print([m for m in {heavy} if m in sys.modules])"
    )
    assert _run(code) == "[]"
    version = _run("import nddrify.cli; nddrify.cli.main(['--version'])")
    assert version.startswith("nddrify 0.1.0 (torch ")


def test_the_public_names_load_on_first_use() -> None:
    assert _run("import nddrify, sys; f = nddrify.fuse; print('torch' in sys.modules)") == "True"
    assert _run("import nddrify; print(nddrify.errors.PointError.__name__)") == "PointError"


def test_fuse_writes_a_checkpoint_that_load_rebuilds(tmp_path, capsys) -> None:
    import torch

    import nddrify

    path = tmp_path / "fused.pt"
    assert main(["fuse", *TINY, *TINY_INPUT, "--shortcut", "-o", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    fused = nddrify.load(path)
    plan = nddrify.meta.fused_plan(fused)
    assert plan.tasks == ("seg", "depth") and plan.shortcut_weights > 0
    out = fused.eval()(torch.zeros(1, 3, 32, 32))
    assert sorted(out) == ["depth", "seg"]
    # an existing file is never replaced without --force
    assert main(["fuse", *TINY, *TINY_INPUT, "-o", str(path)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (
        main(["fuse", *TINY, *TINY_INPUT, "--fusion", "cross_stitch", "-o", str(path), "--force"])
        == 0
    )
    assert type(nddrify.load(path).nddr1).__name__ == "CrossStitchLayer"


def test_fuse_json_reports_the_plan_and_file(tmp_path, capsys) -> None:
    path = tmp_path / "fused.pt"
    assert main(["fuse", *TINY, *TINY_INPUT, "--rank", "4", "-o", str(path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["output"] == str(path) and payload["bytes"] == path.stat().st_size
    assert payload["tasks"] == ["seg", "depth"]
    assert [lv["points"][0]["name"] for lv in payload["levels"]] == ["stage1", "stage2"]
    assert "found only 2 fusion level(s)" in payload["warnings"][0]


def test_export_onnx_outputs_are_the_task_names(tmp_path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    checkpoint, onnx_path, pt2 = tmp_path / "f.pt", tmp_path / "f.onnx", tmp_path / "f.pt2"
    assert main(["fuse", *TINY, *TINY_INPUT, "-o", str(checkpoint)]) == 0
    capsys.readouterr()
    args = ["export", str(checkpoint), "--onnx", str(onnx_path), "--pt2", str(pt2), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)["exports"]
    assert [r["format"] for r in report] == ["onnx", "pt2"]
    assert all(r["outputs"] == ["seg", "depth"] and r["verified"] is True for r in report)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["seg", "depth"]
    assert [i.name for i in session.get_inputs()] == ["image"]
    # the outputs exist already: refused without --force
    assert main(["export", str(checkpoint), "--onnx", str(onnx_path)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(checkpoint)]) == 2
    assert "needs --onnx OUT.onnx and/or --pt2" in capsys.readouterr().err


def test_errors_under_json_are_json(capsys) -> None:
    assert main(["inspect", "torchvision:vgg1", "torchvision:vgg16", "--json"]) == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["error"]["type"] == "SpecError"
    assert "did you mean" in payload["error"]["message"]
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "torchvision:vgg16", "--fusion", "fancy", "--json"])
    assert exit_info.value.code == 2
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "UsageError"


def test_errors_and_warnings_name_the_cli_flags(capsys) -> None:
    sizes = ["--input", "1,3,64,64", "--input", "1,3,48,48", "--points", "stage1,stage2"]
    assert main(["inspect", *TINY, *sizes]) == 2
    err = capsys.readouterr().err
    assert "pass --resize to resize" in err and "resize=True" not in err
    assert main(["inspect", *TINY, *sizes, "--resize", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [p["shape"][2] for p in payload["levels"][0]["points"]] == [32, 24]
    assert main(["inspect", *TINY, *TINY_INPUT]) == 0
    err = capsys.readouterr().err
    assert "nddrify: warning: --points auto found only 2" in err
    assert "nddrify inspect SPEC SPEC --all" in err


def test_every_flag_an_error_names_exists() -> None:
    from nddrify.cli import build_parser

    parser = build_parser()
    flags = {
        option
        for action in parser._subparsers._group_actions[0].choices["inspect"]._actions
        for option in action.option_strings
    }
    assert {"--points", "--resize", "--shortcut", "--input", "--fusion", "--subspaces"} <= flags
    assert main(["inspect", *TINY, *TINY_INPUT, "--points", "declared"]) == 2  # not a timm model


def test_heterogeneous_overhead_names_each_task(capsys) -> None:
    assert main(["inspect", "torchvision:resnet18", "torchvision:resnet34", "--json"]) == 0
    overhead = json.loads(capsys.readouterr().out)["overhead"]
    assert overhead["model_params"] == [11689512, 21797672]
    assert sum(overhead["weights_by_task"]) == overhead["fusion_weights"]
    ratios = [w / m for w, m in zip(overhead["weights_by_task"], overhead["model_params"])]
    assert overhead["relative_by_task"] == pytest.approx(ratios)


@pytest.mark.usefixtures("one_thread")  # restores torch's thread count after --threads 1
def test_demo_takes_a_bare_torchvision_name(capsys) -> None:
    assert (
        main(["demo", "--model", "resnet18", "--size", "64", "--no-train", "--threads", "1"]) == 0
    )
    assert "two torchvision:resnet18 models" in capsys.readouterr().out
