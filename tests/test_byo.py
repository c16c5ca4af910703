"""Bring your own models and data: ``python -m recipes.train byo`` trains a fused pair of
user-defined models on a user-defined dataset (recipes/README.md, "Train your own models on your
own data"; the module there is ``recipes/byo_example.py``)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nddrify.errors import SpecError
from recipes.builders import build_network
from recipes.configs import get_config, load_config
from recipes.custom_losses import BUILTIN_LOSSES, loss_counts, resolve_loss
from recipes.errors import ConfigError
from recipes.results import format_results
from recipes.scoring import TaskLossMeter
from recipes.train import train, valid_counts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "recipes" / "byo_example.py"
README = ROOT / "recipes" / "README.md"
SPEC = "recipes.byo_example"
BYO = [
    f"models=seg={SPEC}:make_seg,depth={SPEC}:make_depth",
    f"dataset={SPEC}:ToyScenes",
    "losses=seg=ce,depth=l1",
    "num_workers=0",
    "progress=false",
]
SEG_METRICS = ["loss", "mIoU", "pixel_acc"]
DEPTH_METRICS = ["loss", "mae", "rmse"]


# tiny models: one thread is as fast, and much faster on a machine shared with others
pytestmark = pytest.mark.usefixtures("one_thread")


def _section() -> str:
    text = README.read_text()
    return text[text.index("## Train your own models on your own data") :]


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_readme_shows_the_example_module_in_full() -> None:
    (block,) = re.findall(r"```python\n(.*?)```", _section(), flags=re.S)[:1]
    assert block == EXAMPLE.read_text()


def test_the_readme_command_trains_a_fused_pair_of_user_models(tmp_path: Path) -> None:
    (command,) = re.findall(r"```bash\n(python -m recipes\.train byo .*?)\n```", _section())
    (tmp_path / "mymod.py").write_text(EXAMPLE.read_text())
    argv = shlex.split(command)
    argv = [sys.executable, *argv[1:], "--steps", "30", "--threads", "1", "--set=num_workers=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "byo"
    for name in ("model.pt", "checkpoint.pt", "metrics.jsonl", "results.md", "config.json"):
        assert (run / name).is_file(), name
    train_records = _records(run, "train")
    assert [r["step"] for r in train_records] == [1, 10, 20, 30]
    assert set(train_records[0]) >= {"loss", "loss/seg", "loss/depth"}
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    (evaluation,) = _records(run, "eval")
    metrics = evaluation["metrics"]
    assert (sorted(metrics["seg"]), sorted(metrics["depth"])) == (SEG_METRICS, DEPTH_METRICS)
    table = (run / "results.md").read_text().splitlines()
    assert table[-3] == (
        "| Method | seg/loss | seg/pixel_acc | seg/mIoU | depth/loss | depth/mae | depth/rmse |"
    )
    config = json.loads((run / "config.json").read_text())
    assert (config["tasks"], config["method"]) == (["seg", "depth"], "nddr")
    weights = torch.load(run / "model.pt", weights_only=True)
    assert any("fusion" in key or "nddr" in key for key in weights), sorted(weights)[:5]


def test_a_json_file_with_base_byo_is_the_same_config(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    models = {"seg": f"{SPEC}:make_seg", "depth": f"{SPEC}:make_depth"}
    values = {"base": "byo", "models": models, "dataset": f"{SPEC}:ToyScenes"}
    path.write_text(json.dumps({**values, "losses": {"seg": "ce", "depth": "l1"}}))
    from_file = load_config(str(path), ["num_workers=0", "progress=false"])
    assert from_file == load_config("byo", BYO)
    assert from_file.tasks == ("seg", "depth") and from_file.loss_weights == {}
    assert get_config("byo").dataset == ""  # the base alone names no dataset: refused
    with pytest.raises(ConfigError, match="or your own dataset as module:callable"):
        load_config("byo")
    spaced = load_config("byo", [*BYO, f"models.seg={SPEC}:make_seg(num_classes=4)"])
    assert spaced.models["seg"].endswith("(num_classes=4)")


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    common = [*BYO, "steps=4", "batch_size=4", "log_every=1"]
    straight = train(load_config("byo", [*common, f"run_dir={tmp_path / 'a'}"]), evaluate=False)
    interrupted = load_config("byo", [*common, f"run_dir={tmp_path / 'b'}"])
    assert train(interrupted, stop_at=2, evaluate=False).step == 2
    resumed = train(interrupted, resume=True, evaluate=False)
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in _records(tmp_path / d, "train")] for d in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: str) -> None:
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_errors_name_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edge = [f"models=seg={SPEC}:make_seg,edge={SPEC}:make_depth", "losses=seg=ce,edge=l1"]
    with pytest.raises(ConfigError, match=r"task\(s\) \['edge'\] .*not in tasks: \['depth'\]"):
        build_network(load_config("byo", [*BYO, *edge]))
    with pytest.raises(ConfigError, match="not a built-in loss \\(ce, l1, l2, mse, cosine, bce\\)"):
        load_config("byo", [*BYO, "losses.seg=cross_entropy"])
    with pytest.raises(ConfigError, match=r"loss 'ce' takes the arguments \['ignore_index'\]"):
        load_config("byo", [*BYO, "losses.seg=ce(ignore=3)"])
    with pytest.raises(ConfigError, match="task 'depth' has no loss"):
        load_config("byo", [*BYO, "losses=seg=ce"])
    with pytest.raises(SpecError, match=r"models\.seg='no_such_module:make'.*no_such_module"):
        build_network(load_config("byo", [*BYO, "models.seg=no_such_module:make"]))
    _write_module(
        tmp_path,
        monkeypatch,
        "byo_user_bits",
        "import torch\n"
        f"from {SPEC} import ToyScenes, make_seg\n"
        "class DictNet(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = make_seg()\n"
        "    def forward(self, x):\n"
        "        return {'out': self.net(x)}\n"
        "def scenes():\n"
        "    return ToyScenes('train')\n",
    )
    with pytest.raises(ConfigError, match="returns a dict; a task model must return one tensor"):
        build_network(load_config("byo", [*BYO, "models.seg=byo_user_bits:DictNet"]))
    # a dataset callable without `split`: no test split, the evaluation is skipped
    result = train(
        load_config(
            "byo", [*BYO, "dataset=byo_user_bits:scenes", "steps=1", f"run_dir={tmp_path / 'r'}"]
        )
    )
    assert result.metrics == {} and (tmp_path / "r" / "results.md").is_file()


def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    """2 gloo processes × 2 images == 1 process × 4 images with ``sync_bn``; the depth loss
    ignores the background (4.0), so the processes' valid counts differ."""
    from recipes.train import main as train_main

    args = [
        "byo",
        "--no-eval",
        *[f"--set={o}" for o in BYO],
        "--set=losses.depth=l1(ignore=4.0)",
        "--set=batch_size=4",
        "--set=steps=3",
        "--set=log_every=1",
        "--set=sync_bn=true",
    ]
    assert train_main([*args, f"--set=run_dir={tmp_path / 'one'}"]) == 0
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={port}", "-m", "recipes.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, f"--set=run_dir={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "loss/seg", "loss/depth"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    wa = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for key in wa:
        scale = float(wa[key].float().abs().max()) + 1e-6
        assert float((wa[key].float() - wb[key].float()).abs().max()) <= 1e-4 * scale, key


def _halves(prediction: torch.Tensor, target: torch.Tensor, spec: str) -> None:
    """Means weighted by counts over two halves equal the whole batch's mean (DDP's rule)."""
    loss = resolve_loss(spec)
    whole = loss(prediction, target)
    parts = [(prediction[i : i + 2], target[i : i + 2]) for i in (0, 2)]
    total = sum(loss.count(p, t) for p, t in parts)
    merged = sum(loss(p, t) * loss.count(p, t) for p, t in parts) / total
    assert float(merged) == pytest.approx(float(whole), rel=1e-5), spec


def test_builtin_losses_and_their_counts() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 3, (4, 8, 8), generator=generator)
    labels[:2, :4] = 255  # uneven ignore labels across the halves
    _halves(logits, labels, "ce")
    _halves(torch.randn(4, 5, generator=generator), torch.tensor([0, 4, -100, 2]), "ce")
    depth = torch.rand(4, 1, 8, 8, generator=generator)
    depth[0] = 0
    for spec in ("l1", "l2", "mse", "l1(ignore=0.0)", "bce"):
        _halves(torch.randn(4, 1, 4, 4, generator=generator), depth, spec)
    normals = torch.randn(4, 3, 8, 8, generator=generator)
    normals[1, :, :3] = 0
    _halves(torch.randn(4, 3, 4, 4, generator=generator), normals, "cosine")
    assert list(BUILTIN_LOSSES) == ["ce", "l1", "l2", "mse", "cosine", "bce"]
    # dense ce ignores 255 by default, image-level ce does not (255 may be a class)
    assert resolve_loss("ce").count(logits, labels) == float((labels != 255).sum()) / 4
    image_logits = torch.zeros(2, 300)
    assert resolve_loss("ce").count(image_logits, torch.tensor([255, 1])) == 2.0
    # your own loss: a function or a class, weighed by images
    for spec in (
        "torch.nn.functional:l1_loss",
        "torch.nn:L1Loss",
        "torch.nn:SmoothL1Loss(beta=1.0)",
    ):
        own = resolve_loss(spec)
        assert own.count(torch.zeros(3, 1), torch.ones(3, 1)) == 3.0
        assert float(own(torch.zeros(3, 1), torch.ones(3, 1))) == pytest.approx(
            0.5 if "Smooth" in spec else 1.0
        )
    outputs = {"seg": logits, "depth": torch.zeros(4, 1, 4, 4)}
    batch = {"seg": labels, "depth": depth}
    losses = {"seg": "ce", "depth": "l1(ignore=0.0)"}
    counts = valid_counts(outputs, batch, "output", losses)
    assert counts == loss_counts(outputs, batch, "output", losses)
    assert counts["depth"] == float((depth[:, :, ::2, ::2] != 0).sum())


@pytest.mark.parametrize(
    ("spec", "prediction", "target", "names"),
    [
        ("ce", torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4, 8, 8)), SEG_METRICS),
        ("ce", torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), ["accuracy", "loss"]),
        ("l2", torch.randn(4, 1, 4, 4), torch.rand(4, 8, 8), DEPTH_METRICS),
        ("bce", torch.randn(4, 2), torch.randint(0, 2, (4, 2)).float(), ["accuracy", "loss"]),
        (
            "cosine",
            torch.randn(4, 3, 4, 4),
            torch.randn(4, 3, 8, 8),
            ["loss", "mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"],
        ),
        ("torch.nn:MSELoss", torch.randn(4, 2), torch.randn(4, 2), ["loss"]),
    ],
)
def test_evaluation_meters_merge_like_one(
    spec: str, prediction: torch.Tensor, target: torch.Tensor, names: list[str]
) -> None:
    whole = TaskLossMeter("t", spec)
    whole.update_batch(prediction, {"t": target})
    merged = TaskLossMeter("t", spec)
    for part in (slice(0, 2), slice(2, 4)):
        shard = TaskLossMeter("t", spec)
        shard.update_batch(prediction[part], {"t": target[part]})
        merged.merge(shard.state_dict())
    assert sorted(whole.compute()) == names
    for key, value in whole.compute().items():
        assert merged.compute()[key] == pytest.approx(value, rel=1e-6), key
    assert "t/loss" in format_results({"run": {"t": whole.compute()}})
