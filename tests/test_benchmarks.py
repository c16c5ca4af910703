"""Smoke tests of the benchmark scripts: each runs its ``--preset ci`` on CPU into ``tmp_path``.

Checked: the JSON rows and keys, the exact parameter figures for 2 × VGG-16 (2,441,216 NDDR
weights = 1,220,608 per task = 0.88% of 138,357,544), analytic = measured for every overhead row,
the compute-bound ceiling of the throughput benchmark against the closed-form FLOPs, bit-exact
agreement of the hand-written NDDR-VGG with the generated one, and that the Markdown and PNG
reports are written. Timings themselves are not asserted (the CI machine is shared).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision

import nddrify

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    key = f"benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


overhead = _load("fusion_overhead")
throughput = _load("throughput")
surgery = _load("surgery_cost")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def overhead_ci(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("overhead")
    assert overhead.main(["--preset", "ci", "--out", str(out)]) == 0
    return json.loads((out / "fusion_overhead.json").read_text()), out


def test_overhead_rows_and_vgg16_figures(overhead_ci: tuple[dict, Path]) -> None:
    payload, out = overhead_ci
    rows = payload["rows"]
    # VGG-16, K=2, 6 kinds × shortcut off/on
    assert len(rows) == 12
    assert all("error" not in r for r in rows)
    for row in rows:
        assert set(row["check"]) == {"weights", "norm_params", "params_added", "flops_added"}
        assert all(row["check"].values()), row
        assert row["plan_agrees"], row
        assert row["analytic"]["params_added"] == row["measured"]["params_added"]
    vgg = next(
        r for r in rows if (r["backbone"], r["kind"], r["shortcut"]) == ("vgg16", "nddr", False)
    )
    assert vgg["points"] == [f"features.{i}" for i in (4, 9, 16, 23, 30)]
    assert vgg["model_params"] == 138_357_544
    assert vgg["measured"]["weights"] == 2_441_216
    assert vgg["weights_per_task"] == 1_220_608
    assert vgg["measured"]["norm_params"] == 5_888
    assert f"{100 * vgg['relative_weights_per_task']:.2f}" == "0.88"
    # NDDR FLOPs: Σ_levels 2·H·W·(2C)² at 224² on 64/128/256/512/512 channels
    expected = sum(
        2 * hw * hw * (2 * c) ** 2
        for c, hw in ((64, 112), (128, 56), (256, 28), (512, 14), (512, 7))
    )
    assert vgg["measured"]["flops_added"] == expected == 1_746_927_616
    md = (out / "fusion_overhead.md").read_text()
    assert "| vgg16 | 224² | nddr | 2,441,216 | 1,220,608 | 0.88% | 5,888 |" in md
    assert (
        "analytic = measured for weights, norm parameters, parameters added and FLOPs added: ✓"
        in md
    )


def test_overhead_meta_equals_real_and_more_tasks() -> None:
    # meta-device counts are the real ones; and K = 3 follows the closed forms too
    real = overhead.measure("resnet18", 2, "nddr rank 64", True, device="cpu")
    meta = overhead.measure("resnet18", 2, "nddr rank 64", True)
    assert real["measured"] == meta["measured"]
    assert real["analytic"] == meta["analytic"]
    three = overhead.measure("vgg16", 3, "nddr", False)
    assert all(three["check"].values())
    # K=3, equal widths: K·S·C... = (3C)² per level
    assert three["measured"]["weights"] == sum((3 * c) ** 2 for c in (64, 128, 256, 512, 512))


def test_throughput_ci(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    assert throughput.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the preset's 1 thread is undone
    payload = json.loads((tmp_path / "throughput_cpu.json").read_text())
    assert set(payload) == {"env", "settings", "rows", "handwritten"}
    for key in ("cpu", "cpu_cores", "torch", "cuda", "torch_threads", "command"):
        assert key in payload["env"]
    assert payload["env"]["torch_threads"] == 1
    rows = payload["rows"]
    variants = ["sequential", "fused nddr", "batched nddr", "shared"]
    combos = {(r["batch"], r["mode"], r["variant"]) for r in rows}
    assert combos == {(b, m, v) for b in (1, 2) for m in ("forward", "train") for v in variants}
    batched_available = throughput._batch_tasks() is not None
    for row in rows:
        assert (row["model"], row["size"], row["dtype"]) == ("resnet18", 64, "fp32")
        if row["variant"] == "batched nddr" and not batched_available:
            assert row["error"] == "nddrify.batching is not available"
            continue
        assert "error" not in row, row
        latency = row["latency"]
        assert latency["samples"] == 3
        assert latency["min_ms"] <= latency["q1_ms"] <= latency["median_ms"] <= latency["q3_ms"]
        assert latency["q3_ms"] <= latency["max_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / latency["median_ms"] * 1000)
        if row["variant"] == "sequential":
            assert row["ratio"] == 1.0 and row["ceiling"] == 1.0
    # the forward ceiling of the fused model is 1/(1+ε) with ε from the closed-form FLOPs
    plan = nddrify.plan(
        throughput.build_models("resnet18", 2), example_input=torch.randn(1, 3, 64, 64)
    )
    shapes = [[tuple(p.shape) for p in level.points] for level in plan.levels]
    fusion_flops = overhead.analytic("nddr", False, shapes).flops
    sequential = next(
        r for r in rows if (r["variant"], r["mode"], r["batch"]) == ("sequential", "forward", 1)
    )
    fused = next(
        r for r in rows if (r["variant"], r["mode"], r["batch"]) == ("fused nddr", "forward", 1)
    )
    assert fused["flops_batch1"] - sequential["flops_batch1"] == fusion_flops
    epsilon = fusion_flops / sequential["flops_batch1"]
    assert fused["ceiling"] == pytest.approx(1 / (1 + epsilon), rel=1e-12)
    (hand,) = payload["handwritten"]
    assert hand["outputs_equal"] and hand["max_abs_diff"] == 0.0
    md = (tmp_path / "throughput_cpu.md").read_text()
    assert "## resnet18, K = 2, forward" in md and "## resnet18, K = 2, train" in md
    assert "Generated vs hand-written NDDR-VGG" in md
    assert (tmp_path / "throughput_cpu.png").read_bytes()[:8] == _PNG_MAGIC


def test_throughput_cpu_preset_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert throughput.main(["--preset", "cpu", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "91 timed variant-settings, 546 steps"
    assert "vgg16 ×2 forward b1 224² fp32 compile: batched nddr, fused nddr, sequential" in lines


def test_handwritten_vgg_shares_modules() -> None:
    fused = nddrify.fuse(throughput.build_models("vgg16_small_head", 2)).eval()
    hand = throughput.HandwrittenNDDRVGG(fused)
    fused_params = {id(p) for p in fused.parameters()}
    assert {id(p) for p in hand.parameters()} == fused_params  # the same tensors, no copies
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fused(x), hand.eval()(x)))


def test_surgery_cost_ci(tmp_path: Path) -> None:
    assert surgery.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "surgery_cost.json").read_text())
    rows = payload["rows"]
    assert [(r["model"], r["operation"]) for r in rows] == [
        ("resnet18", "fuse"),
        ("resnet18", "inspect"),
    ]
    fuse_row, inspect_row = rows
    assert fuse_row["model_params"] == 11_689_512
    assert 0 < fuse_row["cold_s"] == fuse_row["warm_median_s"]  # repeats 0: the cold call only
    assert fuse_row["peak_rss_increase_mib"] >= 0
    assert inspect_row["peak_rss_mib"] > 0
    assert 0 < inspect_row["plan_in_command_s"] < inspect_row["cold_s"]
    assert inspect_row["repeats"] == 0
    assert payload["env"]["fuse_target_s"] == 2.0
    md = (tmp_path / "surgery_cost.md").read_text()
    assert "| fuse ≤ 2 s |" in md and "`nddrify inspect`" in md


def test_cli_startup_one_round(tmp_path: Path) -> None:
    startup = _load("cli_startup")
    assert startup.main(["--rounds", "1", "--out", str(tmp_path)]) in (0, 1)  # timing: reported
    payload = json.loads((tmp_path / "cli_startup.json").read_text())
    assert sorted(payload["median_s"]) == sorted(startup.COMMANDS)
    assert set(payload["checks"]) == {
        "nddrify --help",
        "nddrify --version",
        "import nddrify",
        "import nddrify; nddrify.fuse",
    }
    assert "| `nddrify --help` |" in (tmp_path / "cli_startup.md").read_text()


def test_paper_step_time_estimates_and_flop_counts() -> None:
    cost = _load("paper_step_time")
    records = [
        {"family": "f", "method": "single", "steps": 100, "flops_per_step": 3.6e15,
         "cpu_flops_per_s": 1e10},
        {"family": "f", "method": "nddr", "steps": 100, "flops_per_step": 7.2e15},
    ]  # fmt: skip
    single, fused = cost.estimate(records, gpu_tflops=100.0)
    assert single["gpu_hours"] == pytest.approx(1.0)  # 100 × 3.6e15 FLOP / 1e14 FLOP/s = 1 h
    assert fused["gpu_hours"] == pytest.approx(2.0)
    assert fused["gpu_hours_with_single"] == pytest.approx(3.0)
    assert single["cpu_factor"] == pytest.approx(1e4)
    # the fused network runs both task networks plus the fusion layers
    flops = {
        n: cost.count_flops(cost._config(f"synthetic_demo_{n}"))
        for n in ("single_seg", "single_normal", "nddr")
    }
    assert flops["nddr"] > flops["single_seg"] + flops["single_normal"] > 0


def test_cheap_fusion_ci(tmp_path: Path) -> None:
    cheap = _load("cheap_fusion")
    assert cheap.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "cheap_fusion.json").read_text())
    groups = {g["name"]: {r["variant"]: r for r in g["rows"]} for g in payload["groups"]}
    assert list(groups) == [
        "eager, NCHW: the issue's setting",
        "eager, NCHW: before (plain ops) and after, same weights",
        "eager, NCHW: inference form",
        "eager, channels-last",
    ]
    issue, before_after, inference, _ = groups.values()
    assert set(issue) == {"sequential", "nddr", "nddr rank 64", "nddr groups 8"}
    # the same weights through both arithmetics: the same FLOPs, hence the same ceiling
    assert before_after["nddr"]["flops_batch1"] == before_after["nddr (plain ops)"]["flops_batch1"]
    plain = before_after["nddr rank 64 (plain ops)"]
    assert before_after["nddr rank 64"]["ceiling"] == plain["ceiling"] < 1
    assert set(inference) == {
        "sequential, conv-BN folded",
        "nddr inference",
        "nddr rank 64 inference",
    }
    assert inference["nddr inference"]["baseline"] == "sequential, conv-BN folded"
    layers = payload["groups"][1]["fusion_layer_ms"]
    assert set(layers["nddr rank 64"]) == {f"nddr{i}" for i in range(1, 6)}
    assert "| nddr rank 64 | sequential |" in (tmp_path / "cheap_fusion.md").read_text()
    assert "Fusion layers alone" in (tmp_path / "cheap_fusion.md").read_text()


def test_fuse_memory_ci(tmp_path: Path) -> None:
    memory = _load("fuse_memory")
    assert memory.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "fuse_memory.json").read_text())
    copied, taken = payload["fuse"]
    assert (copied["copy"], taken["copy"]) == (True, False)
    resnet18 = torchvision.models.resnet18()
    weights = sum(
        t.numel() * t.element_size() for t in (*resnet18.parameters(), *resnet18.buffers())
    )
    assert copied["weights_bytes"] == taken["weights_bytes"] == 2 * weights
    assert [r["variant"] for r in payload["inspect"]] == [
        "nddrify inspect (meta device)",
        "plan of models built with weights",
    ]
    assert "## `nddrify.fuse(models, copy=...)`" in (tmp_path / "fuse_memory.md").read_text()


def test_gpu_suite_runs_its_cpu_preset(tmp_path: Path) -> None:
    suite = _load("gpu_suite")
    assert suite.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    variants = {(r["mode"], r["batch"], r["variant"]) for r in payload["rows"] if "latency" in r}
    for mode in ("forward", "train"):
        for batch in (2, 4):
            assert {
                (mode, batch, v)
                for v in ("sequential", "fused nddr", "fused nddr rank 64", "batched nddr")
            } <= variants
    assert payload["skipped"] == []
    assert "# GPU suite: fused vs sequential on" in (tmp_path / "gpu_suite_cpu.md").read_text()


def test_mtl_step_cost_ci(tmp_path: Path) -> None:
    pytest.importorskip("torchjd")
    cost = _load("mtl_step_cost")
    assert cost.main(["--preset", "ci", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "mtl_step_cost.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"fixed", "upgrad"} and rows["fixed"]["time_ratio"] == 1.0
    assert rows["upgrad"]["kind"] == "aggregator" and rows["upgrad"]["step_ms"] > 0
    assert "| upgrad | aggregator |" in (tmp_path / "mtl_step_cost.md").read_text()
    assert rows["fixed"]["memory_above_fixed_bytes"] == 0
