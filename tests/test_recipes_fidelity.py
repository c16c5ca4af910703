"""The paper configs against the official code (shared REFERENCE §3, §5): the single-task recipe,
Table 1's Xavier row at 1000×, and Table 6's shortcut (reducer lr, one Mult. reducer, fresh
reducers on the non-shortcut single-task runs, TF1 legacy resize). Exact values, built networks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes.builders import Network, build_network, build_optimizer, build_task_model
from recipes.configs import apply_overrides, get_config, load_config, registry
from recipes.errors import ConfigError
from recipes.shortcuts import shortcut_layers

pytestmark = pytest.mark.usefixtures("one_thread")

NYU_FAMILIES = ("nyuv2_vgg16", "nyuv2_resnet101", "nyuv2_vgg16_shortcut", "nyuv2_alexnet")
FUSED = ("mul", "cross_stitch", "sluice", "nddr")
SHORTCUT_ROWS = [f"nyuv2_vgg16_shortcut_single_{t}" for t in ("seg", "normal")] + [
    f"nyuv2_vgg16_shortcut_{m}" for m in FUSED
]
# DeepLab-VGG-16 (BN) parts: one reducer 1472 → 512 (1×1 weights) and its BN affine
_REDUCER_WEIGHTS, _REDUCER_NORM = 1472 * 512, 2 * 512
_SEG, _TRUNK = 20_535_400, 14_723_136
_NORMAL = _SEG - (1024 * 40 + 40) + (1024 * 3 + 3)

# Tiny synthetic runs on the demo CNN (reducer 16 + 32 + 64 → 64 channels)
TINY = ["crop=32", "synthetic_size=32,32", "num_workers=0", "progress=false", "init_from={}"]
_DEMO_REDUCER_WEIGHTS, _DEMO_REDUCER_NORM = 112 * 64, 2 * 64


def _build(name: str, *overrides: str) -> tuple[Network, list[dict]]:
    cfg = apply_overrides(get_config(name), ["init_from={}", "pretrained=", "crop=33", *overrides])
    network = build_network(cfg)
    optimizer, _ = build_optimizer(network, cfg)
    return network, optimizer.param_groups


def _reducer_ids(network: Network) -> set[int]:
    (layer,) = shortcut_layers(network.module)
    return {id(p) for p in layer.parameters()}


def _summary(groups: list[dict]) -> dict[str, tuple[float, float, int]]:
    """Group name → (lr multiplier, weight decay, number of parameters)."""
    return {
        g["name"]: (g["lr_mult"], g["weight_decay"], sum(p.numel() for p in g["params"]))
        for g in groups
    }


# ----------------------------------------------------------------------------- item 2


def test_every_single_task_row_uses_the_official_single_task_recipe() -> None:
    configs = registry()
    expected = {f"{f}_single_{t}" for f in NYU_FAMILIES for t in ("seg", "normal")}
    expected |= {"imdb_vgg16_single_age", "imdb_vgg16_single_gender"}
    singles = {n for n, c in configs.items() if c.method == "single"}
    assert singles - expected == {"synthetic_demo_single_seg", "synthetic_demo_single_normal"}
    assert expected <= singles
    for name in sorted(expected):
        cfg = get_config(name)
        assert (cfg.weight_decay, cfg.loss_weights["normal"]) == (5e-4, 10.0), name
    assert get_config("nyuv2_vgg16_single_seg").weight_decay == 5e-4
    assert get_config("nyuv2_vgg16_single_normal").loss_weights == {
        "seg": 1.0,
        "normal": 10.0,
        "age": 1.0,
        "gender": 1.0,
    }


def test_fused_rows_keep_the_fused_recipe_and_the_demo_is_unchanged() -> None:
    configs = registry()
    fused = [n for n, c in configs.items() if c.method != "single"]
    assert len(fused) == 58 - 12
    for name in fused:
        cfg = configs[name]
        assert (cfg.weight_decay, cfg.loss_weights["normal"]) == (2.5e-4, 20.0), name
    demo = get_config("synthetic_demo_single_normal")  # not a paper row
    assert (demo.weight_decay, demo.loss_weights["normal"]) == (2.5e-4, 20.0)


def test_single_task_optimizer_decays_at_5e_4() -> None:
    _, groups = _build("nyuv2_vgg16_single_normal")
    assert {name: decay for name, (_, decay, _) in _summary(groups).items()} == {
        "head": 5e-4,
        "head_bias": 0.0,
        "base": 5e-4,
        "base_no_decay": 0.0,
    }


# ----------------------------------------------------------------------------- item 4


def test_table1_xavier_row_trains_nddr_at_1000x() -> None:
    cfg = get_config("nyuv2_vgg16_nddr_init_xavier")
    assert (cfg.init, cfg.fusion_lr_mult) == ("xavier", 1000.0)
    for tag in ("1_0", "09_01", "05_05", "01_09", "0_1"):  # the diagonal rows: 100×
        assert get_config(f"nyuv2_vgg16_nddr_init_{tag}").fusion_lr_mult is None
    _, groups = _build("nyuv2_vgg16_nddr_init_xavier")
    summary = _summary(groups)
    assert summary["fusion"] == (1000.0, 2.5e-4, 2_441_216)  # REFERENCE §8: NDDR 1×1 weights
    assert summary["fusion_no_decay"] == (1000.0, 0.0, 5_888)
    assert [g["lr"] for g in groups if g["name"].startswith("fusion")] == [1.0, 1.0]


# ----------------------------------------------------------------------------- item 5


def test_shortcut_rows_resize_like_tf1_and_fuse_fresh_reducers_on_plain_single_runs() -> None:
    for name in SHORTCUT_ROWS:
        assert get_config(name).shortcut_resize == "tf_legacy", name
    for method in ("cross_stitch", "sluice", "nddr"):
        assert get_config(f"nyuv2_vgg16_shortcut_{method}").init_from == {
            "seg": "{out_dir}/nyuv2_vgg16_single_seg/model.pt",
            "normal": "{out_dir}/nyuv2_vgg16_single_normal/model.pt",
        }
    # Mult. starts from the DeepLab VOC weights (the official mt_baseline.sh): a fresh reducer too
    mul = get_config("nyuv2_vgg16_shortcut_mul").init_from
    assert not any("shortcut" in path for path in mul.values())
    expected = {"single_seg": 1.0, "single_normal": 1.0, "mul": 1.0}
    expected |= {"cross_stitch": None, "sluice": None, "nddr": None}
    assert {
        m: get_config(f"nyuv2_vgg16_shortcut_{m}").shortcut_lr_mult for m in expected
    } == expected
    assert get_config("nyuv2_vgg16_shortcut_mul").mul_shortcut == "shared"


def test_single_task_shortcut_reducer_trains_at_1x() -> None:
    network, groups = _build("nyuv2_vgg16_shortcut_single_seg")
    (layer,) = shortcut_layers(network.module)
    assert layer.resize_mode == "tf_legacy"
    summary = _summary(groups)
    assert summary["shortcut"] == (1.0, 5e-4, _REDUCER_WEIGHTS)
    assert summary["shortcut_no_decay"] == (1.0, 0.0, _REDUCER_NORM)
    assert not any(name.startswith("fusion") for name in summary)
    reducer = {id(p) for g in groups if g["name"].startswith("shortcut") for p in g["params"]}
    assert reducer == _reducer_ids(network)


def test_mul_shortcut_has_one_shared_reducer_at_1x() -> None:
    network, groups = _build("nyuv2_vgg16_shortcut_mul")
    net = network.module
    (layer,) = shortcut_layers(net)
    assert layer.convs[0].weight is layer.convs[1].weight
    assert layer.norms[0].weight is layer.norms[1].weight
    assert layer.norms[0].bias is layer.norms[1].bias
    assert sum(p.numel() for p in layer.parameters()) == _REDUCER_WEIGHTS + _REDUCER_NORM
    assert sum(p.numel() for p in net.parameters()) == (
        _SEG + _NORMAL - _TRUNK + _REDUCER_WEIGHTS + _REDUCER_NORM
    )
    summary = _summary(groups)
    assert summary["shortcut"] == (1.0, 2.5e-4, _REDUCER_WEIGHTS)
    assert summary["shortcut_no_decay"] == (1.0, 0.0, _REDUCER_NORM)
    assert not any(name.startswith("fusion") for name in summary)


def test_nddr_shortcut_reducer_trains_with_the_nddr_layers_at_100x() -> None:
    network, groups = _build("nyuv2_vgg16_shortcut_nddr")
    reducer = _reducer_ids(network)
    mults = {g["lr_mult"] for g in groups if reducer & {id(p) for p in g["params"]}}
    assert mults == {100.0}
    summary = _summary(groups)
    assert summary["fusion"] == (100.0, 2.5e-4, 2_441_216 + 2 * _REDUCER_WEIGHTS)
    assert summary["fusion_no_decay"] == (100.0, 0.0, 5_888 + 2 * _REDUCER_NORM)


def test_shared_mul_reducer_gives_both_tasks_one_map_and_per_task_is_an_option() -> None:
    outputs = {}
    for mode in ("shared", "per_task"):
        cfg = load_config("synthetic_demo_mul", [*TINY, "shortcut=true", f"mul_shortcut={mode}"])
        net = build_network(cfg).module
        (layer,) = shortcut_layers(net)
        reducer = sum(p.numel() for p in layer.parameters())
        copies = 1 if mode == "shared" else 2
        assert reducer == copies * (_DEMO_REDUCER_WEIGHTS + _DEMO_REDUCER_NORM)
        layer.register_forward_hook(lambda m, i, o, mode=mode: outputs.__setitem__(mode, o))
        net.train()(torch.randn(2, 3, 32, 32))
    assert torch.equal(outputs["shared"][0], outputs["shared"][1])
    assert not torch.equal(outputs["per_task"][0], outputs["per_task"][1])


def test_shortcut_lr_mult_overrides_fusion_lr_mult_for_the_reducers_only() -> None:
    cfg = load_config(
        "synthetic_demo_nddr",
        [*TINY, "shortcut=true", "fusion_lr_mult=10", "shortcut_lr_mult=1"],
    )
    network = build_network(cfg)
    optimizer, _ = build_optimizer(network, cfg)
    summary = _summary(optimizer.param_groups)
    assert summary["shortcut"] == (1.0, 2.5e-4, 2 * _DEMO_REDUCER_WEIGHTS)
    assert summary["shortcut_no_decay"] == (1.0, 0.0, 2 * _DEMO_REDUCER_NORM)
    # NDDR per level C: 2 tasks × (2C → C) weights, 2 tasks × BN(C) affine
    assert summary["fusion"] == (10.0, 2.5e-4, sum(4 * c * c for c in (16, 32, 64)))
    assert summary["fusion_no_decay"] == (10.0, 0.0, sum(4 * c for c in (16, 32, 64)))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert (lrs["shortcut"], lrs["fusion"]) == (cfg.lr, 10 * cfg.lr)


def test_fused_shortcut_starts_a_fresh_reducer_on_plain_single_task_weights(
    tmp_path: Path,
) -> None:
    single = {}
    for task in ("seg", "normal"):
        cfg = load_config(f"synthetic_demo_single_{task}", TINY)
        model = build_task_model(cfg, task)
        torch.save(model.state_dict(), tmp_path / f"{task}.pt")
        single[task] = model
    weights = [f"init_from.{t}={tmp_path / t}.pt" for t in ("seg", "normal")]
    network = build_network(load_config("synthetic_demo_nddr", [*TINY, "shortcut=true", *weights]))
    assert not any("shortcut tensors" in note for note in network.notes)
    net = network.module
    assert torch.equal(net.normal.features[0].weight, single["normal"].features[0].weight)
    (layer,) = shortcut_layers(net)
    bound = (6 / (112 + 64)) ** 0.5  # Xavier-uniform: a fresh reducer
    assert all(float(conv.weight.detach().abs().max()) <= bound for conv in layer.convs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["shortcut_lr_mult=0"], "shortcut_lr_mult=0.0 must be a finite number > 0"),
        (["shortcut_lr_mult=inf"], "shortcut_lr_mult=inf must be a finite number > 0"),
        (
            ["shortcut=false"],
            "shortcut_lr_mult=1.0 applies with shortcut=true only; set shortcut=true, or "
            "shortcut_lr_mult=none.",
        ),
        (
            ["mul_shortcut=both"],
            "mul_shortcut='both' is not allowed; choose one of: shared, per_task.",
        ),
        (
            ["method=nddr", "shortcut_lr_mult=none", "mul_shortcut=per_task"],
            "mul_shortcut='per_task' applies to method='mul' with shortcut=true only "
            "(method='nddr', shortcut=True); set mul_shortcut=shared.",
        ),
    ],
)
def test_bad_shortcut_options_raise_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        apply_overrides(get_config("nyuv2_vgg16_shortcut_mul"), overrides)
    assert message in str(error.value)
