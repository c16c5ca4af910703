"""Boundaries between the library (``nddrify``) and the application (the repository's
``recipes/`` folder, installed as ``nddrify_recipes``): the library never imports the recipes,
the wheel installs no top-level ``recipes`` package, the CLI's demo reaches the recipes through
the ``nddrify.commands`` entry point, and recipes/train.py and recipes/evaluate.py do not import
each other."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from nddrify.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
INSTALLED_NAME = "nddrify_recipes"  # what pyproject.toml installs recipes/ as
APP_NAMES = {"recipes", INSTALLED_NAME}
SMALL_DEMO = ["--model", "tests.models:TinyCNN", "--size", "32"]  # a fast fusion part


def _run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# ----------------------------------------------------------------------------- import nddrify


def test_importing_nddrify_imports_no_recipes() -> None:
    # Run from the repository root, where `recipes` is importable: a stray (even lazy) import
    # of the application by the library would show up in sys.modules.
    code = (
        "import sys, nddrify, nddrify.cli\n"
        "nddrify.cli.build_parser()\n"
        f"names = {sorted(APP_NAMES)!r}\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in names))\n"
    )
    done = _run(code, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the wheel


def _source_modules(folder: Path, installed_as: str) -> set[str]:
    return {
        f"{installed_as}/{path.relative_to(folder).as_posix()}"
        for path in folder.rglob("*.py")
        if "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline from a copy of the sources (an in-tree build would
    write build/ and *.egg-info into the checkout, and a stale build/ could leak into it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("nddrify", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(tmp / "dist"),
    ]
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = (tmp / "dist").glob("nddrify-*.whl")
    return path


def test_wheel_installs_the_recipes_as_nddrify_recipes(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nddrify/__init__.py" in names
    assert f"{INSTALLED_NAME}/__init__.py" in names
    assert f"{INSTALLED_NAME}/data/__init__.py" in names
    assert not [n for n in names if n.startswith("recipes/")]
    tops = {n.partition("/")[0] for n in names if not n.partition("/")[0].endswith(".dist-info")}
    assert tops == {"nddrify", INSTALLED_NAME}


def test_wheel_has_every_module_of_the_source_tree(wheel: Path) -> None:
    # pyproject.toml lists the packages one by one (a mapped package rules out packages.find),
    # so a new subpackage must be added to [tool.setuptools] packages there.
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _source_modules(ROOT / "nddrify", "nddrify") | _source_modules(
        RECIPES, INSTALLED_NAME
    )
    missing = sorted(expected - names)
    packages = sorted({name.rpartition("/")[0].replace("/", ".") for name in missing})
    assert not missing, f"add {packages} to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_wheel_declares_the_demo_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(meta).decode()
    assert "[nddrify.commands]" in text
    assert f"demo = {INSTALLED_NAME}.demo:main" in text


def test_wheel_recipes_import_under_their_installed_name(wheel: Path, tmp_path: Path) -> None:
    # Outside the checkout, from the unpacked wheel only: the recipes' imports are relative, so
    # they work as nddrify_recipes without any top-level `recipes` package.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import sys\n"
        f"import {INSTALLED_NAME}.train, {INSTALLED_NAME}.evaluate, {INSTALLED_NAME}.demo\n"
        f"import {INSTALLED_NAME}.data\n"
        f"print({INSTALLED_NAME}.__file__)\n"
        "print('recipes' in sys.modules)\n"
        f"print({INSTALLED_NAME}.train.build_parser().prog)\n"
    )
    done = _run(code, tmp_path, PYTHONPATH=str(unpacked))
    assert done.returncode == 0, done.stderr[-3000:]
    location, has_recipes, prog = done.stdout.splitlines()
    assert Path(location).is_relative_to(unpacked)
    assert has_recipes == "False"
    assert prog == f"python -m {INSTALLED_NAME}.train"


# ----------------------------------------------------------------------------- the CLI's demo


def test_the_commands_entry_point_resolves_to_the_demo() -> None:
    (point,) = [p for p in entry_points(group="nddrify.commands") if p.name == "demo"]
    assert point.value == f"{INSTALLED_NAME}.demo:main"
    function = point.load()
    assert callable(function)
    assert (function.__module__, function.__qualname__) == (f"{INSTALLED_NAME}.demo", "main")
    assert Path(sys.modules[function.__module__].__file__).name == "demo.py"


def _demo_called(argv: list[str]) -> int:
    _demo_called.argv = argv  # type: ignore[attr-defined]
    return 0


def test_demo_runs_the_entry_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = EntryPoint(name="demo", value=f"{__name__}:_demo_called", group="nddrify.commands")
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [fake])
    out = str(tmp_path / "runs")
    assert main(["demo", *SMALL_DEMO, "--out", out]) == 0
    assert _demo_called.argv == ["--out", out]  # type: ignore[attr-defined]


def test_demo_without_the_recipes_says_how_to_install_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    assert main(["demo", *SMALL_DEMO, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nddrify: error:" in err and 'pip install -e ".[dev]"' in err and "--no-train" in err


# ----------------------------------------------------------------------------- recipes' imports


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, at any level (function-level
    imports included), as absolute names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _recipes_modules() -> dict[Path, str]:
    """Each module of recipes/ with the package it belongs to (named ``recipes``)."""
    modules = {}
    for path in RECIPES.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        folder = path.parent.relative_to(RECIPES).parts
        modules[path] = ".".join(("recipes", *folder))
    return modules


@pytest.mark.parametrize(("importer", "imported"), [("evaluate", "train"), ("train", "evaluate")])
def test_train_and_evaluate_do_not_import_each_other(importer: str, imported: str) -> None:
    imports = _imported_modules(RECIPES / f"{importer}.py", "recipes")
    assert f"recipes.{imported}" not in imports
    assert f"{INSTALLED_NAME}.{imported}" not in imports


def _module_name(path: Path) -> str:
    parts = path.relative_to(RECIPES).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("recipes", *parts))


def test_no_import_path_between_train_and_evaluate() -> None:
    # Through the modules both use (results, scoring, ...): importing a module runs its
    # packages' __init__ too, so those count as imported.
    graph: dict[str, set[str]] = {}
    for path, package in _recipes_modules().items():
        own = set()
        for name in _imported_modules(path, package):
            if name.partition(".")[0] == INSTALLED_NAME:
                name = "recipes" + name[len(INSTALLED_NAME) :]
            while name.startswith("recipes"):
                own.add(name)
                name = name.rpartition(".")[0]
        graph[_module_name(path)] = own
    for start, other in (
        ("recipes.evaluate", "recipes.train"),
        ("recipes.train", "recipes.evaluate"),
    ):
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        assert other not in seen, f"{start} imports {other} through other recipes modules"


def test_recipes_import_one_another_relatively() -> None:
    # Absolute `recipes.` / `nddrify_recipes.` imports would tie the code to one of its two names.
    absolute = {}
    for path in _recipes_modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        ]
        names += [
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        ]
        bad = [n for n in names if n.partition(".")[0] in APP_NAMES]
        if bad:
            absolute[path.relative_to(ROOT).as_posix()] = bad
    assert absolute == {}
