"""Long runs: SIGINT / SIGTERM stop training with a checkpoint and the exact resume command (real
signals, real subprocesses), ``--threads``, and damaged checkpoints on ``--resume``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from recipes.configs import config_to_dict, load_config
from recipes.demo import build_parser as demo_parser
from recipes.demo import demo_configs
from recipes.errors import TrainingInterrupted
from recipes.evaluate import main as evaluate_main
from recipes.interrupts import StopSignals, resume_command
from recipes.runstate import RUNTIME_FIELDS, changed_fields
from recipes.train import main as train_main
from recipes.train import parse_config, train

from .recipes_settings import TINY_SCENES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# Tiny in-process runs: 32×32 scenes, the demo CNN, dropout on (the RNG state must resume too).
TINY = [
    *TINY_SCENES,
    "progress=false",
    "log_every=1",
    "checkpoint_every=100000",
    "init_from={}",
    "dropout=0.3",
]

# The same on the command line, progress on: stdout is a pipe, so plain lines every step.
STEPS = 40
CLI = [
    "synthetic_demo_nddr",
    "--steps",
    str(STEPS),
    "--threads",
    "1",
    *[f"--set={item}" for item in TINY if not item.startswith("progress")],
    "--progress",
]


# tiny models: one thread is as fast, and much faster on a machine shared with others
pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert different == []


def _logged_steps(run: Path) -> int:
    """Training records in metrics.jsonl so far (complete lines only)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().split("\n")[:-1]
    return sum('"kind": "train"' in line for line in lines)


def _signal_when(condition: Callable[[], bool], number: int) -> threading.Thread:
    """A thread sending ``number`` to this process once ``condition()`` holds."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), number)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """model.pt of the run without interruption: the same command line, another folder (in this
    process: the same computation, without the seconds of another interpreter start)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    config, _ = parse_config([*CLI, f"--set=run_dir={run}"])
    assert train(config).step == STEPS
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_the_step_and_the_printed_command_resumes_bit_exactly(
    number: signal.Signals, uninterrupted: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = [*CLI, f"--set=run_dir={run}", "--overwrite"]
    process = subprocess.Popen(
        [sys.executable, "-m", "recipes.train", *argv],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shown: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            shown.append(line.rstrip("\n"))
            progress = re.match(rf"step (\d+)/{STEPS} loss ", line)
            if progress and int(progress.group(1)) >= 3:
                process.send_signal(number)
                break
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    shown += out.splitlines()
    assert process.returncode == 128 + number, err[-3000:]
    assert "Traceback" not in err
    (message,) = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    parsed = re.fullmatch(
        rf"interrupted at step (\d+)/{STEPS}; checkpoint written to (.+)\. Resume with: (.+)",
        message,
    )
    assert parsed, message
    step = int(parsed.group(1))
    assert 3 <= step < STEPS
    assert parsed.group(2) == str(run / "checkpoint.pt")
    command = shlex.split(parsed.group(3))
    assert command[0] in ("python", sys.executable)
    assert command[1:] == ["-m", "recipes.train", *CLI, f"--set=run_dir={run}", "--resume"]
    # the state at that step: checkpoint, logs and progress lines end there; no final weights
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == step
    assert [r["step"] for r in _records(run)] == list(range(1, step + 1))
    assert _records(run, "eval") == [] and not (run / "model.pt").exists()
    steps_shown = [int(m.group(1)) for m in map(re.compile(r"step (\d+)/").match, shown) if m]
    assert steps_shown == list(range(1, step + 1))
    # the printed command, run as printed, finishes the run: the weights of the uninterrupted run
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / 'checkpoint.pt'} at step {step}" in " ".join(done.stderr.split())
    _assert_same_weights(torch.load(run / "model.pt", weights_only=True), uninterrupted)
    assert [r["step"] for r in _records(run)] == list(range(1, STEPS + 1))
    assert [r["step"] for r in _records(run, "eval")] == [STEPS]


def test_resume_command_drops_overwrite_and_adds_resume_once() -> None:
    program = ["python", "-m", "recipes.train"]
    assert (
        resume_command(["cfg", "--overwrite", "--set", "init_from={}"], program=program)
        == "python -m recipes.train cfg --set 'init_from={}' --resume"
    )
    assert (
        resume_command(["cfg", "--resume"], program=program)
        == "python -m recipes.train cfg --resume"
    )


# ----------------------------------------------------------------------------- library


def test_train_raises_training_interrupted_and_restores_the_signal_handlers(
    tmp_path: Path,
) -> None:
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    straight = train(
        load_config("synthetic_demo_nddr", [*TINY, "steps=20", f"run_dir={tmp_path / 'a'}"]),
        evaluate=False,
    )
    run = tmp_path / "b"
    config = load_config("synthetic_demo_nddr", [*TINY, "steps=20", f"run_dir={run}"])
    watcher = _signal_when(lambda: _logged_steps(run) >= 2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as caught:
        train(config, evaluate=False)
    watcher.join()
    stopped = caught.value
    assert 2 <= stopped.step < 20
    assert (stopped.total, stopped.checkpoint, stopped.signal_number) == (
        20,
        run / "checkpoint.pt",
        signal.SIGINT,
    )
    assert stopped.exit_code == 130
    assert str(stopped) == (
        f"interrupted at step {stopped.step}/20; checkpoint written to {run / 'checkpoint.pt'}"
    )
    assert {number: signal.getsignal(number) for number in before} == before
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == stopped.step
    assert [r["step"] for r in _records(run)] == list(range(1, stopped.step + 1))
    resumed = train(config, resume=True, evaluate=False)
    assert resumed.step == 20
    _assert_same_weights(resumed.network.state_dict(), straight.network.state_dict())


def test_a_signal_during_evaluation_stops_it_with_the_checkpoint_of_that_step(
    tmp_path: Path,
) -> None:
    """In one process the evaluation stops at once; evaluating leaves the RNG streams as they
    were, so resuming from the step before the evaluation is bit-exact."""
    overrides = [*TINY, "steps=4", "eval_every=2", "synthetic_test_images=60", "eval_batch_size=1"]
    straight = train(
        load_config("synthetic_demo_nddr", [*overrides, f"run_dir={tmp_path / 'a'}"]),
        evaluate=True,
    )
    assert [r["step"] for r in _records(tmp_path / "a", "eval")] == [2, 4]
    run = tmp_path / "b"
    config = load_config("synthetic_demo_nddr", [*overrides, f"run_dir={run}"])
    watcher = _signal_when(lambda: _logged_steps(run) >= 2, signal.SIGTERM)
    started = time.perf_counter()
    with pytest.raises(TrainingInterrupted) as caught:
        train(config, evaluate=True)
    watcher.join()
    assert time.perf_counter() - started < 20
    assert (caught.value.step, caught.value.signal_number) == (2, signal.SIGTERM)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in _records(run)] == [1, 2]
    assert _records(run, "eval") == []  # the stopped evaluation logged nothing
    resumed = train(config, resume=True, evaluate=False)
    _assert_same_weights(resumed.network.state_dict(), straight.network.state_dict())


def test_a_repeated_signal_counts_once_a_later_one_aborts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(repeat_window=60.0) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C from a launcher: ignored
        assert stop.signal_number == signal.SIGINT
    aborted = pytest.raises(KeyboardInterrupt, match="second stop signal \\(SIGTERM\\)")
    with aborted, StopSignals(repeat_window=0.0):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- --threads


def test_threads_apply_while_training_and_are_restored(tmp_path: Path) -> None:
    config, _ = parse_config(
        [
            "synthetic_demo_nddr",
            "--threads",
            "2",
            "--steps",
            "1",
            *[f"--set={item}" for item in TINY],
            f"--set=run_dir={tmp_path / 'run'}",
        ]
    )
    assert config.threads == 2
    seen: list[int] = []
    train(config, evaluate=False, log=lambda text: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == 1  # restored
    assert "threads" in RUNTIME_FIELDS
    other = load_config("synthetic_demo_nddr", [*TINY, "threads=1"])
    assert changed_fields(config_to_dict(other), config)["steps"] == (300, 1)
    assert "threads" not in changed_fields(config_to_dict(other), config)
    assert evaluate_main([str(tmp_path / "run"), "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_demo_passes_threads_to_every_run(tmp_path: Path) -> None:
    args = demo_parser().parse_args(
        ["--out", str(tmp_path), "--threads", "3", "--methods", "nddr,mul"]
    )
    configs = demo_configs(args)
    assert sorted(configs) == ["mul", "nddr", "single_normal", "single_seg"]
    assert {name: c.threads for name, c in configs.items()} == dict.fromkeys(configs, 3)


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_resume_from_a_damaged_checkpoint_is_an_error_not_a_traceback(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    argv = ["synthetic_demo_nddr", *[f"--set={o}" for o in TINY], "--steps", "2"]
    argv += [f"--set=run_dir={run}", "--no-eval"]
    assert train_main([*argv, "--stop-at", "1"]) == 0
    checkpoint = run / "checkpoint.pt"
    data = checkpoint.read_bytes()
    if damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    else:
        checkpoint.write_text("step 1 of a run\n")
    logs = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train_main([*argv, "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: {checkpoint}") or f"error: '{checkpoint}'" in err, err
    assert "a recipes training checkpoint" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_bytes() == logs  # nothing was written
    assert not (run / "model.pt").exists()
