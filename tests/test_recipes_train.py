"""The training recipes end to end: configs, networks, training on every on-disk format, resume,
DDP, outputs, the evaluation CLI and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nddrify
from recipes.builders import build_network, build_optimizer, demo_cnn
from recipes.configs import (
    CONFIGS,
    RecipeConfig,
    apply_overrides,
    get_config,
    load_config,
    registry,
)
from recipes.data import write_nyuv2_mtan, write_nyuv2_official
from recipes.data.imdb_wiki import write_synthetic_faces
from recipes.data.synthetic import SyntheticScenes
from recipes.errors import ConfigError
from recipes.train import main as train_main
from recipes.train import parse_config, train

from .recipes_settings import DDP_EQUALITY_ARGS, TINY_RUN, run_two_processes

ROOT = Path(__file__).resolve().parents[1]

# Small synthetic runs: 32×32 scenes, the demo CNN, no progress bar.
TINY = TINY_RUN

# Every row of the paper's tables → the configs that produce it.
PAPER_ROWS = {
    "Table 1": [f"nyuv2_vgg16_nddr_init_{t}" for t in ("1_0", "09_01", "05_05", "01_09", "0_1")]
    + ["nyuv2_vgg16_nddr_init_xavier"],
    "Table 2": [f"nyuv2_vgg16_nddr_lr{s}" for s in (1, 10, 100, 1000)],
    "Table 3": ["nyuv2_vgg16_nddr_from_imagenet", "nyuv2_vgg16_nddr_from_voc", "nyuv2_vgg16_nddr"],
    "Table A2": [f"nyuv2_vgg16_cross_stitch_init_{t}" for t in ("09_01", "07_03", "05_05")]
    + [f"nyuv2_vgg16_cross_stitch_lr{s}" for s in (1, 10, 100, 1000)],
}
for table, prefix in (
    ("Table 4", "nyuv2_vgg16"),
    ("Table 5", "nyuv2_resnet101"),
    ("Table 6", "nyuv2_vgg16_shortcut"),
    ("Table 7", "imdb_vgg16"),
    ("Table A1", "nyuv2_alexnet"),
):
    tasks = ("age", "gender") if prefix.startswith("imdb") else ("seg", "normal")
    PAPER_ROWS[table] = [f"{prefix}_single_{t}" for t in tasks] + [
        f"{prefix}_{m}" for m in ("mul", "cross_stitch", "sluice", "nddr")
    ]


# tiny models: one thread is as fast, and much faster on a machine shared with others
pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ----------------------------------------------------------------------------- configs


def test_every_paper_row_has_a_valid_config_with_the_paper_defaults() -> None:
    configs = registry()
    for table, names in PAPER_ROWS.items():
        for name in names:
            assert name in configs, (table, name)
            assert table in configs[name].paper, (name, configs[name].paper)
    assert len(configs) == 58
    cfg = get_config("nyuv2_vgg16_nddr")
    assert (cfg.lr, cfg.momentum, cfg.poly_power, cfg.steps, cfg.batch_size, cfg.crop) == (
        1e-3,
        0.9,
        0.9,
        20001,
        10,
        321,
    )
    assert (cfg.weight_decay, cfg.head_weight_lr_mult, cfg.head_bias_lr_mult) == (2.5e-4, 10, 20)
    assert (cfg.loss_weights["seg"], cfg.loss_weights["normal"]) == (1.0, 20.0)
    assert (cfg.alpha, cfg.beta, cfg.scale_min, cfg.scale_max) == (0.9, 0.1, 0.5, 1.5)
    assert cfg.init_from == {
        "seg": "{out_dir}/nyuv2_vgg16_single_seg/model.pt",
        "normal": "{out_dir}/nyuv2_vgg16_single_normal/model.pt",
    }
    assert cfg.resolved_init_from()["seg"] == "runs/nyuv2_vgg16_single_seg/model.pt"
    assert get_config("nyuv2_vgg16_nddr_lr1000").fusion_lr_mult == 1000.0
    assert get_config("nyuv2_vgg16_nddr_init_xavier").init == "xavier"
    assert (get_config("nyuv2_vgg16_cross_stitch_init_07_03").alpha, 0.3) == (0.7, 0.3)
    assert get_config("nyuv2_vgg16_shortcut_sluice").shortcut is True
    assert get_config("nyuv2_vgg16_nddr_from_voc").pretrained == "weights/deeplab_vgg16_voc.pth"
    assert get_config("imdb_vgg16_single_age").tasks == ("age",)


@pytest.mark.parametrize(
    ("method", "fusion_lr"),
    [("nddr", 100 * 0.01), ("cross_stitch", 1000 * 0.01), ("sluice", 1000 * 0.01)],
)
def test_param_groups_follow_the_official_multipliers(method: str, fusion_lr: float) -> None:
    cfg = load_config(f"synthetic_demo_{method}", TINY)
    optimizer, scheduler = build_optimizer(build_network(cfg), cfg)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["base"] == pytest.approx(0.01)
    assert lrs["head"] == pytest.approx(0.1)  # fc8 weights 10×
    assert lrs["head_bias"] == pytest.approx(0.2)  # fc8 bias 20×
    assert max(v for k, v in lrs.items() if k.startswith("fusion")) == pytest.approx(fusion_lr)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["base"] == 2.5e-4 and decay["base_no_decay"] == 0.0 and decay["head_bias"] == 0
    for _ in range(150):  # poly per step: multipliers survive
        optimizer.step()
        scheduler.step()
    factor = (1 - 150 / 300) ** 0.9
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.1 * factor)
    assert max(v for k, v in lrs.items() if k.startswith("fusion")) == pytest.approx(
        fusion_lr * factor
    )


def test_bad_config_values_raise_config_error_naming_the_key(tmp_path: Path) -> None:
    cfg = get_config("nyuv2_vgg16_nddr")
    cases = {
        "stepz=3": "unknown config key 'stepz'. Did you mean steps?",
        "method=fancy": "method='fancy' is not allowed; choose one of: single, nddr,",
        "steps=many": "steps='many' is not an integer",
        "amp=fp8": "amp='fp8' is not allowed; choose one of: none, bf16, fp16",
        "tasks=seg,depth": "tasks contains 'depth', which dataset='nyuv2' does not have",
        "tasks=seg": "method='nddr' needs at least two tasks",
        "model=vgg99": "model='vgg99' is not allowed; choose one of: deeplab_vgg16,",
        "shortcut=maybe": "shortcut='maybe' is not a boolean",
        "nddr_rank=-1": "nddr_rank=-1 must be ≥ 0",
        "init_from.depth=a.pt": "init_from has task 'depth', which is not in tasks",
        "steps": "override 'steps' must look like key=value",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as error:
            apply_overrides(cfg, [override])
        assert message in str(error.value), (override, str(error.value))
    with pytest.raises(ConfigError, match=r"no configuration named 'nyuv2_vgg_nddr'\. Did you"):
        get_config("nyuv2_vgg_nddr")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"base": "nyuv2_vgg16_nddr", "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        load_config(str(bad_json))
    assert train_main(["nyuv2_vgg16_nddr", "--set", "batch_size=0", "--show"]) == 2


def test_config_file_flags_and_set_compose(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"base": "nyuv2_vgg16_sluice", "steps": 50, "shortcut": True}))
    cfg, _ = parse_config(
        [
            str(path),
            "--batch-size",
            "4",
            "--data-root",
            "/data/nyu",
            "--set",
            "lr=0.002",
            "--channels-last",
            "--set",
            "init_from.seg=seg.pt",
        ]
    )
    assert (cfg.name, cfg.method, cfg.steps, cfg.shortcut) == (
        "nyuv2_vgg16_sluice",
        "sluice",
        50,
        True,
    )
    assert (cfg.batch_size, cfg.data_root, cfg.lr, cfg.channels_last) == (
        4,
        "/data/nyu",
        0.002,
        True,
    )
    assert cfg.init_from["seg"] == "seg.pt"
    assert cfg.init_from["normal"] == "{out_dir}/nyuv2_vgg16_single_normal/model.pt"
    assert train_main(["nyuv2_vgg16_mul", "--steps", "7", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["steps"], shown["method"]) == (7, "mul")
    assert train_main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "nyuv2_resnet101_nddr" in listing and "imdb_vgg16_sluice" in listing


# ----------------------------------------------------------------------------- networks

# Parameter counts from the parts: DeepLab-VGG-16 (BN) with 40 outputs has 20,535,400
# parameters, of which 14,723,136 in vgg16_bn's features; 3 outputs: 41,000 − 3,075 fewer.
_SEG, _TRUNK = 20_535_400, 14_723_136
_NORMAL = _SEG - (1024 * 40 + 40) + (1024 * 3 + 3)
_NDDR = 2_441_216 + 5_888  # REFERENCE §8: 1×1 weights + BN affine at pool1..pool5
_SHORTCUT = 1472 * 512 + 2 * 512  # per task: 1×1 conv 1472 → 512 and its BN
# DeepLab ResNet-101: torchvision resnet101 without fc (44,549,160 − 2,049,000), ASPP-L heads
# (4 dilated 3×3 convs 2048 → classes), NDDR at maxpool, layer1..4: 4·C² weights, 4·C norm.
_RESNET = 44_549_160 - 2_049_000
_ASPP = {classes: 4 * (2048 * classes * 9 + classes) for classes in (40, 3)}
_RESNET_NDDR = sum(4 * c * c + 4 * c for c in (64, 256, 512, 1024, 2048))
_FROZEN_BN_AFFINE = 2 * 52_672  # Table 5's Caffe ResNet-101: BN scale/shift frozen (buffers)


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("nyuv2_vgg16_single_seg", _SEG),
        ("nyuv2_vgg16_nddr", _SEG + _NORMAL + _NDDR),
        ("nyuv2_vgg16_cross_stitch", _SEG + _NORMAL + 5 * 4),
        ("nyuv2_vgg16_sluice", _SEG + _NORMAL + 5 * 16 + 4),  # + layer-stitch of pool4/pool5
        ("nyuv2_vgg16_mul", _SEG + _NORMAL - _TRUNK),
        ("nyuv2_vgg16_shortcut_single_seg", _SEG + _SHORTCUT),
        ("nyuv2_vgg16_shortcut_mul", _SEG + _NORMAL - _TRUNK + _SHORTCUT),  # one shared reducer
        ("nyuv2_vgg16_shortcut_nddr", _SEG + _NORMAL + _NDDR + 2 * _SHORTCUT),
        (
            "nyuv2_resnet101_nddr",
            2 * (_RESNET - _FROZEN_BN_AFFINE) + _ASPP[40] + _ASPP[3] + _RESNET_NDDR,
        ),
    ],
)
def test_paper_networks_build_with_exact_parameter_counts(name: str, parameters: int) -> None:
    cfg = apply_overrides(get_config(name), ["init_from={}", "pretrained=", "crop=33"])
    net = build_network(cfg).module
    assert sum(p.numel() for p in net.parameters()) == parameters
    out = net.eval()(torch.randn(1, 3, 33, 33))
    assert {t: tuple(v.shape) for t, v in out.items()} == {
        t: (1, {"seg": 40, "normal": 3}[t], 5, 5) for t in cfg.tasks
    }


def test_alexnet_fuses_at_pool1_pool2_conv3_conv4_pool5() -> None:
    cfg = apply_overrides(get_config("nyuv2_alexnet_nddr"), ["init_from={}", "pretrained="])
    net = build_network(cfg).module
    plan = nddrify.meta.fused_plan(net)
    assert [level.points[0].name for level in plan.levels] == [  # FCN's Caffe AlexNet
        "features.pool1",
        "features.pool2",
        "features.relu3",
        "features.relu4",
        "features.pool5",
    ]
    out = net.eval()(torch.randn(1, 3, 40, 40))
    assert tuple(out["seg"].shape) == (1, 40, 40, 40)  # FCN-32s: input resolution


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(registry()))
def test_every_registered_config_builds(name: str) -> None:
    cfg = apply_overrides(get_config(name), ["init_from={}", "pretrained="])
    size = 224 if cfg.model == "vgg16_classifier" else 65
    cfg = apply_overrides(cfg, [f"crop={size}"])
    net = build_network(cfg).module.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size))
    assert sorted(out) == sorted(cfg.tasks)


def test_tied_hard_sharing_with_shortcut_shares_one_trunk() -> None:
    cfg = load_config("synthetic_demo_mul", [*TINY, "shortcut=true"])
    net = build_network(cfg).module
    trunk = {n for n, _ in net.named_parameters() if n.startswith("seg.features.")}
    assert (
        all(net.get_parameter(n) is net.get_parameter("normal" + n[3:]) for n in trunk)
        and len(trunk) == 18
    )
    assert net.seg.head.fc8.weight is not net.normal.head.fc8.weight
    seen = {}
    for task in ("seg", "normal"):
        net.get_submodule(f"{task}.features.20").register_forward_hook(
            lambda m, i, o, task=task: seen.__setitem__(task, o)
        )
    net.train()(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["seg"], seen["normal"])  # one trunk function for both tasks


def test_single_task_shortcut_weights_carry_into_the_fused_shortcut(tmp_path: Path) -> None:
    common = [*TINY, "shortcut=true", "steps=1", f"out_dir={tmp_path}"]
    for task in ("seg", "normal"):
        train(load_config(f"synthetic_demo_single_{task}", common), evaluate=False)
    single = torch.load(tmp_path / "synthetic_demo_single_normal" / "model.pt", weights_only=True)
    assert single["shortcut.convs.0.weight"].shape == (64, 112, 1, 1)  # 16 + 32 + 64 → 64
    config = load_config("synthetic_demo_nddr", common)
    config = apply_overrides(
        config,
        [f"init_from.{t}={tmp_path}/synthetic_demo_single_{t}/model.pt" for t in ("seg", "normal")],
    )
    fused = build_network(config).module
    assert torch.equal(fused.shortcut.convs[1].weight, single["shortcut.convs.0.weight"])
    assert torch.equal(fused.shortcut.norms[1].running_var, single["shortcut.norms.0.running_var"])
    assert torch.equal(fused.normal.features[0].weight, single["features.0.weight"])


# ----------------------------------------------------------------------------- training


def test_pipeline_single_tasks_then_fused_on_the_official_png_layout(tmp_path: Path) -> None:
    data = tmp_path / "nyu"
    write_nyuv2_official(SyntheticScenes(6, size=(32, 40), seed=0), data, "train")
    write_nyuv2_official(SyntheticScenes(3, size=(32, 40), seed=1), data, "test")
    common = [
        *TINY,
        "dataset=nyuv2",
        f"data_root={data}",
        f"out_dir={tmp_path / 'runs'}",
        "steps=3",
        "model=demo_cnn",
    ]
    singles = {}
    for task in ("seg", "normal"):
        result = train(load_config(f"nyuv2_vgg16_single_{task}", common))
        singles[task] = result.run_dir
        assert result.run_dir == tmp_path / "runs" / f"nyuv2_vgg16_single_{task}"
    fused_cfg = load_config("nyuv2_vgg16_nddr", [*common, "init_from={}"])
    fused_cfg = apply_overrides(
        fused_cfg, [f"init_from.{t}={singles[t] / 'model.pt'}" for t in ("seg", "normal")]
    )
    start = build_network(fused_cfg).module
    seg_weights = torch.load(singles["seg"] / "model.pt", weights_only=True)
    assert torch.equal(start.seg.features[0].weight, seg_weights["features.0.weight"])
    assert torch.equal(start.seg.head.fc8.bias, seg_weights["head.fc8.bias"])
    fused = train(fused_cfg)
    run = fused.run_dir
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "curves.png",
        "metrics.jsonl",
        "model.pt",
        "results.json",
        "results.md",
    ]
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {
        "kind",
        "step",
        "loss",
        "loss/seg",
        "loss/normal",
        "lr",
        "images_per_s",
    }
    assert records[0]["lr"] == 1e-3 and records[1]["lr"] == pytest.approx(1e-3 * (2 / 3) ** 0.9)
    assert records[0]["loss"] == pytest.approx(
        records[0]["loss/seg"] + 20 * records[0]["loss/normal"]
    )
    (evaluation,) = _records(run, "eval")
    assert sorted(evaluation["metrics"]) == ["normal", "seg"]
    assert sorted(evaluation["metrics"]["normal"]) == [
        "mean",
        "median",
        "rmse",
        "within_11.25",
        "within_22.5",
        "within_30",
    ]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (run / "results.md").read_text().splitlines()
    assert table[-3] == "| Method | Mean | Med. | 11.25 | 22.5 | 30 | mIoU | PAcc |"
    assert table[-1].startswith("| Ours | ")
    # python -m recipes.evaluate merges the two single-task runs into one "Sing." row
    from recipes.evaluate import main as evaluate_main

    output = tmp_path / "table.md"
    assert (
        evaluate_main(
            [str(singles["seg"]), str(singles["normal"]), str(run), "--output", str(output)]
        )
        == 0
    )
    rows = output.read_text().splitlines()
    assert rows[0] == "| Method | Mean | Med. | 11.25 | 22.5 | 30 | mIoU | PAcc |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| Sing.", "| Ours"]
    assert "-" not in rows[2].split(" | ")[1:]
    assert float(rows[3].split(" | ")[6]) == pytest.approx(
        evaluation["metrics"]["seg"]["mIoU"], abs=0.051
    )


def test_training_on_the_mtan_npy_layout(tmp_path: Path) -> None:
    data = tmp_path / "mtan"
    write_nyuv2_mtan(SyntheticScenes(4, size=(32, 32), seed=0, num_classes=13), data, "train")
    write_nyuv2_mtan(SyntheticScenes(2, size=(32, 32), seed=1, num_classes=13), data, "test")
    cfg = load_config(
        "nyuv2_vgg16_cross_stitch",
        [
            *TINY,
            "dataset=nyuv2_mtan",
            f"data_root={data}",
            f"run_dir={tmp_path / 'run'}",
            "steps=2",
        ],
    )
    result = train(cfg)
    assert result.network.seg.head.fc8.out_channels == 13
    assert [r["step"] for r in result.records] == [1, 2]
    assert 0 <= result.metrics["seg"]["mIoU"] <= 100


def test_training_on_imdb_wiki_mat_and_jpegs(tmp_path: Path) -> None:
    write_synthetic_faces(tmp_path / "imdb_crop", num_subjects=6, images_per_subject=2, size=32)
    cfg = load_config(
        "imdb_vgg16_nddr",
        [
            *TINY,
            f"data_root={tmp_path / 'imdb_crop'}",
            f"run_dir={tmp_path / 'run'}",
            "steps=2",
            "crop=24",
            "face_resize=32",
            "test_subjects=2",
        ],
    )
    result = train(cfg)
    assert sorted(result.metrics) == ["age", "gender"]
    assert sorted(result.metrics["age"]) == ["mean_ae", "median_ae"]
    assert set(result.records[0]) >= {"loss/age", "loss/gender"}
    table = (result.run_dir / "results.md").read_text().splitlines()
    assert table[-3] == "| Method | Mean AE | Median AE | Acc. (%) |"


def test_resume_continues_bit_exactly(tmp_path: Path) -> None:
    # dropout on: the RNG state must be restored too
    overrides = [*TINY, "steps=4", "synthetic_images=3", "dropout=0.3"]
    straight = train(
        load_config("synthetic_demo_nddr", [*overrides, f"run_dir={tmp_path / 'a'}"]),
        evaluate=False,
    )
    interrupted = load_config("synthetic_demo_nddr", [*overrides, f"run_dir={tmp_path / 'b'}"])
    first = train(interrupted, stop_at=2, evaluate=False)
    assert first.step == 2 and not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(nddrify.NddrifyError, match="--resume"):
        train(interrupted, evaluate=False)
    resumed = train(interrupted, resume=True, evaluate=False)
    assert resumed.step == 4
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        {k: r[k] for k in r if k.startswith("loss") or k == "step"}
        for r in _records(tmp_path / "a")
    ]
    assert losses == [
        {k: r[k] for k in r if k.startswith("loss") or k == "step"}
        for r in _records(tmp_path / "b")
    ]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]


def test_batches_do_not_depend_on_the_number_of_loader_workers(tmp_path: Path) -> None:
    losses = []
    for workers in (0, 2):
        config = load_config(
            "synthetic_demo_nddr",
            [
                *TINY,
                "steps=2",
                "dropout=0",
                f"num_workers={workers}",
                f"run_dir={tmp_path / str(workers)}",
            ],
        )
        losses.append([r["loss"] for r in train(config, evaluate=False).records])
    assert losses[0] == losses[1]


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path: Path) -> None:
    base = [*TINY, "steps=1", "dropout=0"]
    fp32 = train(
        load_config("synthetic_demo_nddr", [*base, f"run_dir={tmp_path / 'a'}"]), evaluate=False
    )
    bf16 = train(
        load_config(
            "synthetic_demo_nddr",
            [*base, "amp=bf16", "channels_last=true", f"run_dir={tmp_path / 'b'}"],
        ),
        evaluate=False,
    )
    assert bf16.records[0]["loss"] == pytest.approx(fp32.records[0]["loss"], rel=3e-2)
    assert bf16.records[0]["loss"] != fp32.records[0]["loss"]  # autocast did run in bf16
    with pytest.raises(ConfigError, match="amp='fp16' needs a CUDA device"):
        train(
            load_config(
                "synthetic_demo_nddr",
                [*base, "amp=fp16", "device=cpu", f"run_dir={tmp_path / 'c'}"],
            )
        )


@pytest.mark.cuda
def test_fp16_autocast_with_grad_scaler_on_cuda(tmp_path: Path) -> None:
    config = load_config(
        "synthetic_demo_nddr",
        [*TINY, "steps=2", "amp=fp16", "channels_last=true", "device=cuda", f"run_dir={tmp_path}"],
    )
    result = train(config)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0 and len(checkpoint["rng"][0]) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.records)
    assert next(result.network.parameters()).is_cuda


def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    """2 gloo processes × 2 images == 1 process × 4 images. BatchNorm runs in training mode with
    ``sync_bn`` (CrossProcessBatchNorm2d: global batch statistics); losses are normalised by the
    global count of valid pixels. Only float summation order differs: tolerance 1e-5 relative on
    the losses, 1e-4 relative on the weights after 3 steps.

    The scenes are rescaled half-pixel here: with TF-legacy rescaling (the default) these 32×32
    runs are ill-conditioned, float noise grows ~40× per step (measured: one process on 1 vs 2
    threads already differs by 1.5e-4 in a BatchNorm bias after 3 steps), which would hide
    what this test checks; the DDP logic does not depend on the resize."""
    args = DDP_EQUALITY_ARGS  # TINY's scenes, batch 4, 3 steps, sync_bn, no dropout
    one = tmp_path / "one"
    assert train_main([*args, f"--set=run_dir={one}"]) == 0
    two = tmp_path / "two"
    done = run_two_processes([*args, f"--set=run_dir={two}"], ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = _records(one), _records(two)
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for key in ("loss", "loss/seg", "loss/normal", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
    wa = torch.load(one / "model.pt", weights_only=True)
    wb = torch.load(two / "model.pt", weights_only=True)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        scale = float(wa[key].float().abs().max()) + 1e-6
        assert float((wa[key].float() - wb[key].float()).abs().max()) <= 1e-4 * scale, key


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recipes.demo import main as demo_main

    code = demo_main(
        [
            "--out",
            str(tmp_path),
            "--size",
            "32",
            "--train-images",
            "6",
            "--test-images",
            "2",
            "--single-steps",
            "2",
            "--fused-steps",
            "2",
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "single-task" in out and "NDDR" in out
    assert (tmp_path / "synthetic_demo_single_seg" / "step2.pt").is_file()
    fused = json.loads((tmp_path / "synthetic_demo_nddr" / "config.json").read_text())
    assert fused["init_from"]["seg"].endswith("synthetic_demo_single_seg/step2.pt")
    assert _records(tmp_path / "synthetic_demo_single_seg")[-1]["step"] == 4


def test_demo_cnn_auto_points_are_its_three_pools() -> None:
    plan = nddrify.plan(
        [demo_cnn(40), demo_cnn(3)], "auto", example_input=torch.zeros(1, 3, 32, 32)
    )
    assert [level.points[0].name for level in plan.levels] == [
        "features.6",
        "features.13",
        "features.20",
    ]
    assert isinstance(RecipeConfig().steps, int) and CONFIGS  # registry filled by now
