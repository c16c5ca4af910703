"""Model sweep (timm style): fuse two copies of every zoo model with ``points="auto"``.

One parametrized test over every timm model in ``/work/shared/dev-zoo.txt`` and every torchvision
classification and segmentation model. The checks live in ``benchmarks/model_sweep.py``
(:func:`sweep_one`, shared with the script that writes ``benchmarks/results/model_sweep.*``):
identity at init (α=1, β=0, no norm) within 1e-5 in eval mode, and in train mode where the model is
not random there; a gradient for every parameter of the default fused model; the auto points.

A fast, diverse subset runs by default; the rest is marked ``slow`` (``pytest -m slow``). Named
exclusions: ``TOO_SLOW`` models are skipped, ``KNOWN_FAILURES`` are ``xfail(strict=True)`` so that
a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_sweep.py"


def _load_sweep():
    if "model_sweep" in sys.modules:
        return sys.modules["model_sweep"]
    spec = importlib.util.spec_from_file_location("model_sweep", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_sweep"] = module
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()

#: Cheap and diverse: ResNet, depthwise/SE nets with dropout (eval-only identity), a segmentation
#: model with dict outputs, channel shuffle, fire modules, and timm ConvNeXt, GhostNet, DLA.
FAST = (
    "torchvision/resnet18",
    "torchvision/mobilenet_v3_small",
    "torchvision/lraspp_mobilenet_v3_large",
    "torchvision/shufflenet_v2_x0_5",
    "torchvision/squeezenet1_1",
    "timm/convnext_atto",
    "timm/ghostnet_050",
    "timm/dla34",
)


def _params() -> list:
    models = sweep.all_models()
    known = {sweep.model_id(s, n) for s, n in models}
    # The fast subset runs even where the zoo file is missing (a fresh clone without /work/shared).
    models += [tuple(key.split("/", 1)) for key in FAST if key not in known]
    params = []
    for source, name in models:
        key = sweep.model_id(source, name)
        marks = [] if key in FAST else [pytest.mark.slow]
        if key in sweep.TOO_SLOW:
            marks.append(pytest.mark.skip(reason=sweep.TOO_SLOW[key]))
        elif key in sweep.KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=sweep.KNOWN_FAILURES[key]))
        params.append(pytest.param(source, name, id=key, marks=marks))
    return params


def test_fast_subset_is_part_of_the_sweep() -> None:
    assert len(FAST) == len(set(FAST)) >= 8
    assert not set(FAST) & (set(sweep.TOO_SLOW) | set(sweep.KNOWN_FAILURES))
    tv_models = {sweep.model_id(s, n) for s, n in sweep.all_models("torchvision")}
    assert {k for k in FAST if k.startswith("torchvision/")} <= tv_models


@pytest.mark.parametrize(("source", "name"), _params())
def test_fuse_two_copies(source: str, name: str) -> None:
    row = sweep.sweep_one(source, name, informational=False)
    assert row["error"] is None, f"{row['error_stage']}: {row['error']}\n{row.get('traceback')}"
    assert row["traced"]

    # Auto points: at least one, the same for both copies and for both fusion settings, maps
    # (N, C, H, W) or token sequences (N, C, L) of the 1-image example batch.
    points = row["points"]
    assert len(points) >= 1
    assert [(p["name"], p["shape"]) for p in points] == [
        (p["name"], p["shape"]) for p in row["points_task1"]
    ]
    assert row["points_default_fuse"] == points
    assert all(len(p["shape"]) in (3, 4) and p["shape"][0] == 1 for p in points)

    # Identity at init: eval always, train where the model is deterministic in train mode.
    assert row["identity_eval"] <= sweep.ATOL
    if not row["stochastic_modules"] and not row["random_in_train"]:
        assert row["identity_train"] is not None
        assert row["identity_train"] <= sweep.ATOL
    else:
        assert row["identity_train"] is None

    # Gradients of the default fused model (default init, BatchNorm).
    assert row["params_without_grad"] == []
    assert row["fusion_layers_zero_grad"] == []
    assert sweep.failures(row) == []
