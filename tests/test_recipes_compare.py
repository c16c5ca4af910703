"""Seeds and spread: the statistics of :mod:`recipes.compare` on hand-computed numbers, the
``python -m recipes.compare`` command and ``recipes.demo --seeds`` on tiny synthetic runs, and the
few-labels option of the synthetic scenes (``synthetic_labelled``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipes.compare import (
    format_cell,
    format_markdown,
    main,
    mean,
    paired_differences,
    sample_std,
    summarise,
    t_interval,
    t_quantile,
)
from recipes.configs import apply_overrides, get_config, load_config
from recipes.data.synthetic import SyntheticScenes, drop_labels, labelled_count
from recipes.errors import ConfigError

from .recipes_settings import TINY_SCENES

pytestmark = pytest.mark.usefixtures("one_thread")

# 32×32 scenes, the demo CNN, 2 steps, no progress, in-process data loading.
TINY = [
    *TINY_SCENES,
    "steps=2",
    "progress=false",
    "log_every=1",
    "threads=1",
]


# ----------------------------------------------------------------------------- statistics


def test_mean_and_sample_std_by_hand() -> None:
    assert mean([2.0, 4.0, 9.0]) == 5.0
    # deviations −3, −1, 4: (9 + 1 + 16) / (3 − 1) = 13
    assert sample_std([2.0, 4.0, 9.0]) == pytest.approx(math.sqrt(13.0), rel=1e-15)
    assert math.isnan(sample_std([1.0]))
    with pytest.raises(ValueError):
        mean([])


def test_paired_differences_are_b_minus_a() -> None:
    assert paired_differences([1.0, 2.0, 3.0], [1.5, 1.0, 5.0]) == [0.5, -1.0, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        paired_differences([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, math.tan(math.pi * 0.475)),  # Cauchy: tan(π(p − ½)) = 12.7062047…
        (0.975, 2, 0.95 / math.sqrt(2 * 0.975 * 0.025)),  # (2p − 1)/√(2p(1 − p)) = 4.3026527…
        (0.995, 2, 0.99 / math.sqrt(2 * 0.995 * 0.005)),  # 9.9248432…
        (0.975, 4, 2.7764451051977987),  # tables: 2.776445105
        (0.975, 30, 2.0422724563012373),  # tables: 2.042272456
        (0.025, 2, -0.95 / math.sqrt(2 * 0.975 * 0.025)),  # symmetry
    ],
)
def test_t_quantile_matches_closed_forms_and_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-11)


def test_t_quantile_headline_value_and_bad_arguments() -> None:
    assert round(t_quantile(0.975, 2), 9) == 4.302652730  # t_{0.975, 2} = 4.302652729…
    assert t_quantile(0.5, 7) == 0.0
    for p, df in ((0.0, 2), (1.0, 2), (0.9, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_t_quantile_agrees_with_scipy_when_available() -> None:
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.975, 0.995, 0.999999):
        for df in (0.5, 1, 2, 3, 5, 9, 29, 200):
            assert t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-10)


def test_t_interval_by_hand() -> None:
    # values 1, 2, 3: mean 2, s = 1, half width t_{0.975,2} · 1/√3 = 4.3026527297 / 1.7320508076
    interval = t_interval([1.0, 2.0, 3.0])
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) / math.sqrt(3.0)
    assert (interval.mean, interval.std, interval.n) == (2.0, 1.0, 3)
    assert interval.low == pytest.approx(2.0 - half, rel=1e-12)
    assert interval.high == pytest.approx(2.0 + half, rel=1e-12)
    assert round(half, 6) == 2.484138 and not interval.excludes_zero()
    # 90 %, n = 2: t_{0.95,1} = tan(0.45π) = 6.3137515; s = √2/2 · |10 − 11| ... values 10, 11
    narrow = t_interval([10.0, 11.0], confidence=0.9)
    assert narrow.high - narrow.mean == pytest.approx(
        math.tan(math.pi * 0.45) * (math.sqrt(0.5) / math.sqrt(2.0)), rel=1e-11
    )
    assert narrow.excludes_zero()
    single = t_interval([4.0])
    assert single.mean == 4.0 and math.isnan(single.low) and math.isnan(single.high)


def test_summarise_pairs_by_seed_and_judges_direction() -> None:
    runs = {
        "A": {0: {"seg/mIoU": 10.0, "normal/mean": 30.0}, 1: {"seg/mIoU": 12.0, "normal/mean": 31.0},
              2: {"seg/mIoU": 11.0, "normal/mean": 29.0}},
        "B": {0: {"seg/mIoU": 12.0, "normal/mean": 29.0}, 1: {"seg/mIoU": 14.1, "normal/mean": 30.1},
              2: {"seg/mIoU": 12.9, "normal/mean": 28.0}},
    }  # fmt: skip
    summary = summarise(runs)
    assert summary["reference"] == "A"
    assert summary["configs"]["A"]["seg/mIoU"]["mean"] == 11.0
    assert summary["configs"]["A"]["seg/mIoU"]["std"] == 1.0
    diff = summary["differences"]["B"]["seg/mIoU"]
    assert diff["differences"] == pytest.approx([2.0, 2.1, 1.9])
    assert diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(0.1)
    half = 0.1 * (0.95 / math.sqrt(2 * 0.975 * 0.025)) / math.sqrt(3.0)
    assert diff["low"] == pytest.approx(2.0 - half) and diff["high"] == pytest.approx(2.0 + half)
    assert diff["verdict"] == "better"
    normal = summary["differences"]["B"]["normal/mean"]  # −1, −0.9, −1: lower error is better
    assert normal["mean"] == pytest.approx(-29 / 30) and normal["verdict"] == "better"
    assert summary["lower_is_better"] == ["normal/mean"]
    # a seed only one config has is left out of the pairs
    runs["B"][3] = {"seg/mIoU": 99.0, "normal/mean": 1.0}
    assert summarise(runs)["differences"]["B"]["seg/mIoU"]["n"] == 3


def test_markdown_cells() -> None:
    assert format_cell({"mean": 66.84, "std": 0.456, "n": 3}, 1) == "66.8 ± 0.5"
    assert format_cell({"mean": 66.84, "n": 1}, 1) == "66.8"
    assert format_cell({"mean": -0.5, "low": -0.9, "high": -0.1}, 1, difference=True) == (
        "-0.5 [-0.9, -0.1]*"
    )
    summary = summarise({"A": {0: {"seg/mIoU": 1.0}}, "B": {0: {"seg/mIoU": 2.0}}})
    assert "| B − A | 1 | +1.00 [nan, nan] |" in format_markdown(summary)


# ----------------------------------------------------------------------------- few labels


def test_synthetic_labelled_keeps_the_first_images_labels_only() -> None:
    assert labelled_count(0.125, 256) == 32 and labelled_count(0.001, 10) == 1
    assert labelled_count(0.0, 10) == 0 and labelled_count(1.0, 7) == 7
    full = SyntheticScenes(4, size=(16, 16), seed=3, normals="unit")
    few = SyntheticScenes(4, size=(16, 16), seed=3, normals="unit", labelled={"normal": 0.25})
    assert torch.equal(few[0]["normal"], full[0]["normal"])
    for index in (1, 2, 3):
        assert torch.equal(few[index]["image"], full[index]["image"])
        assert torch.equal(few[index]["seg"], full[index]["seg"])
        assert not few[index]["normal_mask"].any() and not few[index]["normal"].any()
    raw = drop_labels(SyntheticScenes(1, size=(8, 8))[0], "seg")
    assert raw["seg"].unique().tolist() == [255]
    with pytest.raises(ConfigError):
        SyntheticScenes(2, labelled={"depth": 0.5})


def test_synthetic_labelled_config_field_applies_to_training_split_only() -> None:
    from recipes.loading import dataset_for

    cfg = load_config("synthetic_demo_single_seg", [*TINY, "synthetic_labelled=seg=0.5"])
    assert cfg.synthetic_labelled == {"seg": 0.5}
    assert dataset_for(cfg, "train", train=True).base.labelled == {"seg": 2}
    assert dataset_for(cfg, "test", train=False).base.labelled == {}
    for bad, message in (
        ("synthetic_labelled=depth=0.5", "synthetic_labelled has task 'depth'"),
        ("synthetic_labelled=seg=1.5", "synthetic_labelled.seg=1.5 must be a fraction"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(get_config("synthetic_demo_nddr"), [bad])


# ----------------------------------------------------------------------------- commands


def test_compare_command_runs_seeds_and_writes_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    override = tmp_path / "wide.json"
    override.write_text(json.dumps({"base": "synthetic_demo_single_seg", "lr": 0.05}))
    sets = [arg for item in TINY if not item.startswith("threads=") for arg in ("--set", item)]
    out = str(tmp_path / "c")
    argv = ["synthetic_demo_single_seg", str(override), "--seeds", "2", "--out", out, *sets]
    assert main([*argv, "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "| config | n | seg/mIoU ↑ | seg/pixel_acc ↑ |" in out
    assert "| wide − synthetic_demo_single_seg | 2 | " in out
    report = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert report["settings"]["seeds"] == [0, 1]
    assert sorted(report["runs"]["wide"]) == ["0", "1"]  # JSON keys
    for label in ("synthetic_demo_single_seg", "wide"):
        for seed in (0, 1):
            run = tmp_path / "c" / label / f"seed{seed}"
            saved = json.loads((run / "config.json").read_text())
            assert (saved["seed"], saved["threads"]) == (seed, 2)
    values = report["runs"]["wide"]
    diff = report["differences"]["wide"]["seg/mIoU"]
    by_hand = [
        values[s]["seg/mIoU"] - report["runs"]["synthetic_demo_single_seg"][s]["seg/mIoU"]
        for s in ("0", "1")
    ]
    assert diff["differences"] == pytest.approx(by_hand)
    assert (tmp_path / "c" / "compare.md").read_text().startswith("| config | n |")


def test_compare_command_rejects_bad_input(tmp_path: Path) -> None:
    assert main(["synthetic_demo_single_seg", "--seeds", "0"]) == 2
    assert main(["no_such_config", "--seeds", "1", "--out", str(tmp_path)]) == 2


def test_demo_seeds_prints_spread_and_paired_intervals(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recipes.demo import main as demo_main

    args = ["--out", str(tmp_path), "--size", "32", "--train-images", "4", "--test-images", "2",
            "--single-steps", "2", "--fused-steps", "1", "--batch-size", "2", "--quiet",
            "--threads", "1", "--seeds", "2", "--labelled", "seg=0.5",
            "--report", str(tmp_path / "report.md")]  # fmt: skip
    assert demo_main(args) == 0
    out = capsys.readouterr().out
    assert "mean ± std over 2 seeds [0, 1]" in out and "NDDR − single-task" in out
    assert " ± " in out and "95 % t interval" in out
    for seed in (0, 1):
        fused = json.loads(
            (tmp_path / f"seed{seed}" / "synthetic_demo_nddr" / "config.json").read_text()
        )
        assert fused["seed"] == seed and fused["synthetic_labelled"] == {"seg": 0.5}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"].startswith("python -m recipes.demo --out ")
    assert report["reference"] == "single-task" and set(report["runs"]) == {"single-task", "NDDR"}
    assert "| NDDR − single-task | 2 |" in (tmp_path / "report.md").read_text()
