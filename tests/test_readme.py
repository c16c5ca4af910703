"""README.md as a test: every Python block runs, top to bottom in one process, and every shell
line is exercised (here, by another named test, or by ``.ci/run``).

The runs are ``slow`` (two VGG-16s and a detector: about 6 GB and a few minutes); ``.ci/run``
runs them. The check that every shell line has its exercise is quick and in the default run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TESTS = Path(__file__).resolve().parent


def blocks(language: str, path: Path = README) -> list[str]:
    """The fenced code blocks of ``path`` in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def shell_lines() -> list[str]:
    return [
        line.split("  #")[0].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]


# How each shell line of the README is exercised: ("ci", None) — .ci/run runs it verbatim;
# ("test", "file.py::name") — that test runs it or its cheap form; ("run", extra args) — the
# slow test below runs it with those arguments appended (a cheap but real form of the line).
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"'
EXERCISES: dict[str, tuple[str, object]] = {
    f"{INSTALL} && nddrify demo": ("test", "test_recipes_train.py::test_demo_runs_end_to_end"),
    f"{INSTALL} && pytest": ("ci", None),
    "python -m recipes.demo": ("test", "test_recipes_train.py::test_demo_runs_end_to_end"),
    "python -m recipes.train nyuv2_vgg16_single_seg": ("run", ["--show"]),
    "python -m recipes.train nyuv2_vgg16_nddr --data-root /data/nyuv2": ("run", ["--show"]),
    "torchrun --nproc_per_node=2 -m recipes.train nyuv2_vgg16_nddr --set sync_bn=true": (
        "run",
        ["--show"],
    ),
    "python -m recipes.train byo --models seg=mymod:make_seg,depth=mymod:make_depth --dataset "
    "mymod:ToyScenes --losses seg=ce,depth=l1 --steps 100 --batch-size 8": (
        "test",
        "test_byo.py::test_the_readme_command_trains_a_fused_pair_of_user_models",
    ),
    "nddrify --version": ("run", []),
    "nddrify inspect torchvision:vgg16 torchvision:vgg16 --input 1,3,224,224": ("run", []),
    "nddrify inspect timm:resnet50 timm:resnet50 --points layer1,layer2 --all": ("run", []),
    'nddrify inspect "torchvision:resnet50(replace_stride_with_dilation=[False, True, True])" '
    "torchvision:resnet50 --json": ("run", []),
    "nddrify fuse torchvision:resnet18 torchvision:resnet18 --tasks seg,depth --shortcut -o "
    "fused.pt": ("run", []),
    "nddrify export fused.pt --onnx fused.onnx --pt2 fused.pt2": ("run", []),
    "nddrify demo --model resnet18 --no-train --threads 1": ("run", []),
}


def test_every_shell_line_has_its_exercise() -> None:
    lines = shell_lines()
    assert sorted(set(lines)) == sorted(EXERCISES), "README shell lines and EXERCISES differ"
    ci = (ROOT / ".ci" / "run").read_text()
    for line, (how, what) in EXERCISES.items():
        if how == "ci":
            assert line in ci, line
        elif how == "test":
            file, name = str(what).split("::")
            assert f"def {name}(" in (TESTS / file).read_text(), what
    # the bring-your-own line is the command tests/test_byo.py runs from recipes/README.md
    recipes_readme = blocks("bash", ROOT / "recipes" / "README.md")
    byo = [line for block in recipes_readme for line in block.splitlines() if " byo " in line]
    assert [line for line in lines if " byo " in line] == byo


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.mark.slow
def test_every_python_block_runs_in_one_process(tmp_path) -> None:
    script = "\n\n".join(blocks("python"))
    (tmp_path / "readme_blocks.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "readme_blocks.py"],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2,441,216 fusion 1×1 weights" in result.stdout
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "fused.pt").is_file()


@pytest.mark.slow
def test_every_shell_line_runs(tmp_path) -> None:
    bin_dir = Path(sys.executable).parent
    env = _environment()
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    ran = 0
    for line in shell_lines():  # in README order: fuse writes what export reads
        how, extra = EXERCISES[line]
        if how != "run":
            continue
        argv = [*shlex.split(line), *extra]
        if argv[0] == "python":
            argv[0] = sys.executable
        result = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (line, result.stderr[-3000:])
        ran += 1
    assert ran == sum(how == "run" for how, _ in EXERCISES.values())
    assert (tmp_path / "fused.onnx").is_file() and (tmp_path / "fused.pt2").is_file()
