"""``recipes.train`` with loss weighting (``weighting=``) and gradient aggregation
(``aggregator=``): records, checkpoints that resume bit for bit, DDP equal to one process, and
the refused combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.configs import load_config
from recipes.errors import ConfigError
from recipes.train import main as train_main
from recipes.train import train

from .recipes_settings import DDP_EQUALITY_ARGS, TINY_RUN, run_two_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_RUN

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "famo", "rlw", "gradnorm"])
def test_a_weighting_resumes_bit_exactly(weighting: str, tmp_path: Path) -> None:
    # 6 images, batch 2: DWA ends an epoch every 3 steps, so its weights change at step 7
    overrides = [*TINY, "steps=8", f"weighting={weighting}"]
    straight = train(
        load_config("synthetic_demo_nddr", [*overrides, f"run_dir={tmp_path / 'a'}"]),
        evaluate=False,
    )
    config = load_config("synthetic_demo_nddr", [*overrides, f"run_dir={tmp_path / 'b'}"])
    train(config, stop_at=4, evaluate=False)
    resumed = train(config, resume=True, evaluate=False)
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "a") == [
        {**r, "images_per_s": s["images_per_s"]}
        for r, s in zip(_records(tmp_path / "b"), _records(tmp_path / "a"))
    ]
    weights = [(r["weight/seg"], r["weight/normal"]) for r in _records(tmp_path / "a")]
    if weighting in ("uncertainty", "famo", "rlw", "gradnorm"):
        assert len(set(weights)) > 1  # the weights move
    else:
        assert set(weights[:6]) == {(1.0, 1.0)} and weights[6] != (1.0, 1.0)
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert checkpoint["balancing"]  # the method's state travels with the checkpoint


def test_uncertainty_weights_train_and_the_run_records_the_method(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(
        load_config(
            "synthetic_demo_nddr", [*TINY, "steps=3", "weighting=uncertainty", f"run_dir={run}"]
        ),
    )
    assert (
        "Tasks balanced by weighting=uncertainty, aggregator=none."
        in (run / "results.md").read_text()
    )
    state = torch.load(run / "checkpoint.pt", weights_only=True)["balancing"]
    assert not torch.equal(state["log_variance"], torch.zeros(2))  # learned
    assert json.loads((run / "config.json").read_text())["weighting"] == "uncertainty"
    assert result.step == 3


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "pcgrad", "imtlg", "alignedmtl"])
def test_an_aggregator_run(aggregator: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("torchjd")
    run = tmp_path / "run"
    config = load_config(
        "synthetic_demo_nddr", [*TINY, "steps=2", f"aggregator={aggregator}", f"run_dir={run}"]
    )
    result = train(config, evaluate=False, log=print)
    assert f"aggregator {aggregator} on the shared parameters" in capsys.readouterr().out
    assert result.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records)
    assert json.loads((run / "config.json").read_text())["aggregator"] == aggregator


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["weighting=dwq"], "weighting='dwq' is unknown"),
        (["aggregator=upgard"], "aggregator='upgard' is unknown"),
        (["aggregator=upgrad", "weighting=dwa"], "use it with weighting=fixed"),
        (["aggregator=upgrad", "amp=fp16"], "aggregator needs amp=none or amp=bf16"),
        (["weighting=fixed", "weighting_options.lr=1"], "takes its weights from loss_weights"),
        (["aggregator_options.c=0.5"], "aggregator_options without an aggregator"),
    ],
)
def test_refused_combinations(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("synthetic_demo_nddr", [*TINY, *overrides])


def test_single_task_runs_refuse_balancing() -> None:
    with pytest.raises(ConfigError, match="balance two or more tasks"):
        load_config("synthetic_demo_single_seg", [*TINY, "weighting=dwa"])


@pytest.mark.parametrize("weighting", ["uncertainty", "famo"])
def test_ddp_with_a_weighting_matches_one_process(weighting: str, tmp_path: Path) -> None:
    """As ``test_recipes_train.test_ddp_two_processes_match_one_process``, with a weighting
    whose state follows the losses (FAMO: the global means, recomputed after each step) or
    whose weights are learned (uncertainty: their gradients averaged over the processes)."""
    args = [*DDP_EQUALITY_ARGS, f"--set=weighting={weighting}"]
    one = tmp_path / "one"
    assert train_main([*args, f"--set=run_dir={one}"]) == 0
    two = tmp_path / "two"
    done = run_two_processes([*args, f"--set=run_dir={two}"], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(_records(one), _records(two)):
        for key in ("loss/seg", "loss/normal", "weight/seg", "weight/normal"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    wa = torch.load(one / "model.pt", weights_only=True)
    wb = torch.load(two / "model.pt", weights_only=True)
    for key in wa:
        scale = float(wa[key].float().abs().max()) + 1e-6
        assert float((wa[key].float() - wb[key].float()).abs().max()) <= 1e-4 * scale, key


def test_the_recipes_readme_commands_parse() -> None:
    import re
    import shlex

    from recipes.compare import build_parser as compare_parser
    from recipes.train import parse_config

    text = (ROOT / "recipes" / "README.md").read_text()
    section = text[text.index("## Balancing the tasks") : text.index("## Train your own models")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    trains = [shlex.split(line)[3:] for line in lines if line.startswith("python -m recipes.train")]
    configs = [parse_config(argv)[0] for argv in trains]
    assert [(c.weighting, c.aggregator) for c in configs] == [
        ("uncertainty", "none"),
        ("dwa", "none"),
        ("fixed", "upgrad"),
    ]
    assert configs[1].weighting_options == {"temperature": 2.0}
    (compare,) = [line for line in lines if line.startswith("python -m recipes.compare")]
    names = re.search(r"\{(.*?)\}", compare).group(1).split(",")
    files = [f"benchmarks/configs/balancing/{n}.json" for n in names]
    assert all((ROOT / f).is_file() for f in files)
    args = compare_parser().parse_args([*files, "--seeds", "3"])
    assert args.seeds == 3 and len(args.configs) == 5
