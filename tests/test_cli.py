"""The nddrify command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nddrify.cli import load_spec, main


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
