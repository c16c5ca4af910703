"""What the recipes show: plain progress lines off a terminal, ``--help`` with a text and default
for every config field, and the curves' panels (one per unit)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pytest

from recipes.config_help import FIELD_HELP, field_defaults, format_default
from recipes.configs import RecipeConfig, load_config
from recipes.plots import Series, draw_curves, metric_panels, plot_curves
from recipes.progress import TrainingProgress, eval_line, train_line
from recipes.train import main as train_main
from recipes.train import train

from .recipes_settings import TINY_SCENES

TINY = [
    *TINY_SCENES,
    "init_from={}",
    "threads=1",
]


# tiny models: one thread is as fast, and much faster on a machine shared with others
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- progress


def test_off_a_terminal_progress_is_one_plain_line_per_logged_step_and_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = load_config(
        "synthetic_demo_nddr", [*TINY, "steps=5", "log_every=2", f"run_dir={tmp_path}"]
    )
    assert config.progress
    result = train(config)
    lines = capsys.readouterr().out.splitlines()
    assert [r["step"] for r in result.records] == [1, 2, 4, 5]
    assert len(lines) == 5
    pattern = re.compile(
        r"step \d/5 loss \d+\.\d{4} \(seg \d+\.\d{4}, normal \d+\.\d{4}\) lr \d\.\de-0\d "
        r"\d+\.\d img/s eta (\d+s|\?)"
    )
    for line, record in zip(lines, result.records):
        assert pattern.fullmatch(line), line
        expected = train_line(record, total=5, eta_seconds=0.0)
        assert line.rsplit(" eta ", 1)[0] == expected.rsplit(" eta ", 1)[0]
    assert lines[-1] == eval_line(5, 5, "test", result.metrics)
    assert lines[-1].startswith("eval step 5/5 (test): seg mIoU ")
    assert " | normal mean " in lines[-1]


def test_progress_false_prints_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = load_config(
        "synthetic_demo_nddr", [*TINY, "steps=2", "progress=false", f"run_dir={tmp_path}"]
    )
    train(config)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_on_a_terminal_the_bar_is_drawn_on_the_console_not_stdout(
    capsys: pytest.CaptureFixture,
) -> None:
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    record = {"step": 1, "loss": 2.0, "loss/seg": 2.0, "lr": 0.01, "images_per_s": 3.0}
    bar = TrainingProgress(
        enabled=True, name="run", total=2, start=0, end=2, console=console, plain=False
    )
    with bar:
        assert bar.mode == "bar"
        bar.logged(record)
        bar.advance(1)
        bar.evaluated(1, "test", {"seg": {"mIoU": 12.5}})
    assert capsys.readouterr().out == ""
    assert "eval step 1/2 (test): seg mIoU 12.50" in screen.getvalue()
    assert "run" in screen.getvalue()


# ----------------------------------------------------------------------------- --help


def test_every_config_field_has_a_help_text() -> None:
    names = [f.name for f in dataclasses.fields(RecipeConfig)]
    missing = [name for name in names if not FIELD_HELP.get(name, "").strip()]
    assert missing == [], f"add help texts to recipes/config_help.py: {missing}"
    assert sorted(set(FIELD_HELP) - set(names)) == []  # no help for a field that is gone


def test_help_shows_each_flag_with_its_text_and_default(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = field_defaults()
    starts = {}
    for name in defaults:
        flag = "--" + name.replace("_", "-")
        found = re.search(rf"(?<![\w-]){re.escape(flag)} ", text)
        assert found, flag
        starts[name] = found.start()
    assert list(starts.values()) == sorted(starts.values())  # in field order
    ends = [*list(starts.values())[1:], text.index("Ctrl-C (SIGINT)")]
    for (name, start), end in zip(starts.items(), ends):
        entry = text[start:end].strip()
        assert entry.endswith(f"(default: {format_default(defaults[name])})"), entry
        assert " ".join(FIELD_HELP[name].split()) in entry, entry
    assert "(default: 20001)" in text and "(default: seg,normal)" in text
    assert "(default: seg=1.0,normal=20.0,age=1.0,gender=1.0)" in text
    assert "one thread can be much faster" in text


# ----------------------------------------------------------------------------- curves

RECORDS = [
    {"kind": "train", "step": 1, "loss": 30.0, "loss/seg": 3.0, "loss/normal": 1.0, "lr": 0.1},
    {"kind": "train", "step": 2, "loss": 2.0, "loss/seg": 1.0, "loss/normal": 0.05, "lr": 0.05},
    {
        "kind": "eval",
        "step": 2,
        "split": "test",
        "metrics": {
            "seg": {"mIoU": 10.0, "pixel_acc": 50.0},
            "normal": {"mean": 40.0, "median": 35.0, "rmse": 45.0, "within_11.25": 5.0},
            "depth": {"loss": 0.5, "mae": 0.4, "rmse": 0.6},
        },
    },
    {"kind": "eval", "step": 4, "metrics": {"seg": {"mIoU": 20.0, "pixel_acc": 60.0}}},
    {"kind": "eval", "step": 4, "metrics": {"age": {"mean_ae": 6.0, "median_ae": 5.0}}},
    {"kind": "eval", "step": 4, "metrics": {"gender": {"accuracy": 90.0}}},
]


def test_metric_panels_group_evaluations_by_unit() -> None:
    assert metric_panels(RECORDS) == {
        "loss": [
            Series("loss", (1, 2), (30.0, 2.0)),
            Series("loss/normal", (1, 2), (1.0, 0.05)),
            Series("loss/seg", (1, 2), (3.0, 1.0)),
        ],
        "learning rate": [Series("lr", (1, 2), (0.1, 0.05))],
        "evaluation (%)": [
            Series("seg/mIoU", (2, 4), (10.0, 20.0)),
            Series("seg/pixel_acc", (2, 4), (50.0, 60.0)),
            Series("normal/within_11.25", (2,), (5.0,)),
            Series("gender/accuracy", (4,), (90.0,)),
        ],
        "evaluation (degrees)": [
            Series("normal/mean", (2,), (40.0,)),
            Series("normal/median", (2,), (35.0,)),
            Series("normal/rmse", (2,), (45.0,)),
        ],
        "evaluation (years)": [
            Series("age/mean_ae", (4,), (6.0,)),
            Series("age/median_ae", (4,), (5.0,)),
        ],
        "evaluation loss": [Series("depth/loss", (2,), (0.5,))],
        "evaluation: depth": [
            Series("depth/mae", (2,), (0.4,)),
            Series("depth/rmse", (2,), (0.6,)),
        ],
    }
    assert list(metric_panels(RECORDS[:2])) == ["loss", "learning rate"]


def test_curves_have_one_axes_per_panel_lines_over_steps_and_annotated_single_points(
    tmp_path: Path,
) -> None:
    import matplotlib.pyplot as plt

    figure = draw_curves(RECORDS)
    try:
        titles = [axis.get_title() for axis in figure.axes]
        assert titles == list(metric_panels(RECORDS))
        assert [axis.get_ylabel() for axis in figure.axes] == [
            "training loss",
            "base learning rate",
            "%",
            "degrees",
            "years",
            "loss",
            "value",
        ]
        axes = dict(zip(titles, figure.axes))
        assert axes["loss"].get_yscale() == "log"  # 0.05 … 30: more than a decade
        percent = axes["evaluation (%)"]
        lines = {line.get_label(): line for line in percent.get_lines()}
        assert list(lines["seg/mIoU"].get_xdata()) == [2, 4]
        assert (lines["seg/mIoU"].get_marker(), lines["seg/mIoU"].get_linestyle()) == ("o", "-")
        single = lines["gender/accuracy"]
        assert (single.get_marker(), single.get_linestyle()) == ("o", "None")
        assert sorted(t.get_text() for t in percent.texts) == ["5", "90"]  # values written
    finally:
        plt.close(figure)
    flat = [{"kind": "train", "step": s, "loss": 2.0 + s / 100, "lr": 0.1} for s in (1, 2)]
    figure = draw_curves(flat)
    try:
        assert figure.axes[0].get_yscale() == "linear"  # within a decade
    finally:
        plt.close(figure)
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    png = plot_curves(jsonl, tmp_path / "out" / "curves.png")
    assert png == tmp_path / "out" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
