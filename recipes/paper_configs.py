"""The paper's configurations: one :class:`~recipes.configs.RecipeConfig` per row of Tables
1–7, A1 and A2 (and the single-task runs each row starts from), built by :func:`paper_configs`;
:func:`recipes.configs.registry` holds them by name. ``recipes/README.md`` maps every row to its
command.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .configs import RecipeConfig, validate

__all__ = ["paper_configs", "PRETRAINED_WEIGHTS"]

#: The local ImageNet weights each model's single-task runs start from (``pretrained``).
PRETRAINED_WEIGHTS = {
    "deeplab_vgg16": "weights/vgg16_bn_imagenet.pth",
    "deeplab_resnet101": "weights/resnet101_imagenet.pth",
    "alexnet_fcn32s": "weights/alexnet_imagenet.pth",
    "vgg16_classifier": "weights/vgg16_imagenet.pth",
}


def _family(
    prefix: str,
    *,
    dataset: str,
    data_root: str,
    model: str,
    tasks: tuple[str, ...],
    table: str,
    **common: Any,
) -> dict[str, RecipeConfig]:
    """Single-task runs, Mul., C.-S., Sluice and Ours for one table, all on the same footing:
    fused models start from the single-task runs' weights (``init_from``)."""
    base = RecipeConfig(dataset=dataset, data_root=data_root, model=model, tasks=tasks, **common)
    singles = {}
    for task in tasks:
        name = f"{prefix}_single_{task}"
        singles[name] = dataclasses.replace(
            base,
            name=name,
            label="Sing.",
            paper=f"{table} · Sing. ({task})",
            method="single",
            tasks=(task,),
            pretrained=PRETRAINED_WEIGHTS.get(model, ""),
        )
    init_from = {t: f"{{out_dir}}/{prefix}_single_{t}/model.pt" for t in tasks}
    fused = {}
    for method, label in (
        ("mul", "Mul."),
        ("cross_stitch", "C.-S."),
        ("sluice", "Sluice"),
        ("nddr", "Ours"),
    ):
        name = f"{prefix}_{method}"
        fused[name] = dataclasses.replace(
            base,
            name=name,
            label=label,
            paper=f"{table} · {label}",
            method=method,
            init_from=dict(init_from),
        )
    return {**singles, **fused}


def _variant(
    config: RecipeConfig, name: str, label: str, paper: str, **changes: Any
) -> RecipeConfig:
    return dataclasses.replace(config, name=name, label=label, paper=paper, **changes)


def paper_configs() -> dict[str, RecipeConfig]:
    """Every row of the paper's tables as a validated :class:`RecipeConfig`, by name (what
    :func:`recipes.configs.registry` holds).

    Example:
        >>> paper_configs()["nyuv2_resnet101_sluice"].paper
        'Table 5 · Sluice'
    """
    nyu = {"dataset": "nyuv2", "data_root": "data/nyuv2", "tasks": ("seg", "normal")}
    configs: dict[str, RecipeConfig] = {}
    configs |= _family("nyuv2_vgg16", model="deeplab_vgg16", table="Table 4", **nyu)
    configs |= _family("nyuv2_resnet101", model="deeplab_resnet101", table="Table 5", **nyu)
    configs |= _family(
        "nyuv2_vgg16_shortcut", model="deeplab_vgg16", table="Table 6", shortcut=True, **nyu
    )
    configs |= _family(
        "nyuv2_alexnet",
        model="alexnet_fcn32s",
        table="Table A1",
        # the cross-stitch paper's fusion points: pool1, pool2, conv3, conv4, pool5
        points=("features.2", "features.5", "features.7", "features.9", "features.12"),
        **nyu,
    )
    configs |= _family(
        "imdb_vgg16",
        model="vgg16_classifier",
        table="Table 7",
        dataset="imdb",
        data_root="data/imdb_crop",
        tasks=("age", "gender"),
        crop=224,
        scale_min=1.0,
        scale_max=1.0,
    )
    nddr = configs["nyuv2_vgg16_nddr"]
    nddr.paper = "Table 4 · Ours; Table 3 · Sing. (the default: both branches from single tasks)"
    # Table 1: NDDR initialisation
    for (alpha, beta), tag in (
        ((1.0, 0.0), "1_0"),
        ((0.9, 0.1), "09_01"),
        ((0.5, 0.5), "05_05"),
        ((0.1, 0.9), "01_09"),
        ((0.0, 1.0), "0_1"),
    ):
        configs[f"nyuv2_vgg16_nddr_init_{tag}"] = _variant(
            nddr,
            f"nyuv2_vgg16_nddr_init_{tag}",
            f"({alpha:g}, {beta:g})",
            f"Table 1 · ({alpha:g}, {beta:g})",
            alpha=alpha,
            beta=beta,
        )
    configs["nyuv2_vgg16_nddr_init_xavier"] = _variant(
        nddr, "nyuv2_vgg16_nddr_init_xavier", "Random", "Table 1 · Random", init="xavier"
    )
    # Table 2: NDDR learning-rate scale
    for scale in (1, 10, 100, 1000):
        name = f"nyuv2_vgg16_nddr_lr{scale}"
        configs[name] = _variant(
            nddr, name, f"{scale:g}", f"Table 2 · {scale:g}", fusion_lr_mult=float(scale)
        )
    # Table 3: initial weights of both branches
    configs["nyuv2_vgg16_nddr_from_imagenet"] = _variant(
        nddr,
        "nyuv2_vgg16_nddr_from_imagenet",
        "Init.",
        "Table 3 · Init.",
        init_from={},
        pretrained="weights/vgg16_bn_imagenet.pth",
    )
    configs["nyuv2_vgg16_nddr_from_voc"] = _variant(
        nddr,
        "nyuv2_vgg16_nddr_from_voc",
        "Pret.",
        "Table 3 · Pret.",
        init_from={},
        pretrained="weights/deeplab_vgg16_voc.pth",
    )
    # Table A2: cross-stitch hyper-parameters on VGG-16
    stitch = configs["nyuv2_vgg16_cross_stitch"]
    for (alpha, beta), tag in (((0.9, 0.1), "09_01"), ((0.7, 0.3), "07_03"), ((0.5, 0.5), "05_05")):
        name = f"nyuv2_vgg16_cross_stitch_init_{tag}"
        configs[name] = _variant(
            stitch,
            name,
            f"({alpha:g}, {beta:g})",
            f"Table A2 · ({alpha:g}, {beta:g})",
            alpha=alpha,
            beta=beta,
        )
    for scale in (1, 10, 100, 1000):
        name = f"nyuv2_vgg16_cross_stitch_lr{scale}"
        configs[name] = _variant(
            stitch, name, f"{scale:g}", f"Table A2 · {scale:g}", fusion_lr_mult=float(scale)
        )
    # Cheaper NDDR variants (not in the paper)
    configs["nyuv2_vgg16_nddr_rank64"] = _variant(
        nddr, "nyuv2_vgg16_nddr_rank64", "NDDR r=64", "", nddr_rank=64
    )
    configs["nyuv2_vgg16_nddr_groups8"] = _variant(
        nddr, "nyuv2_vgg16_nddr_groups8", "NDDR g=8", "", nddr_groups=8
    )
    configs["nyuv2_resnet101_nddr_rank64"] = _variant(
        configs["nyuv2_resnet101_nddr"],
        "nyuv2_resnet101_nddr_rank64",
        "NDDR r=64",
        "",
        nddr_rank=64,
    )
    # The built-in synthetic scenes with a small CNN (python -m recipes.demo)
    demo = {
        "dataset": "synthetic",
        "data_root": "",
        "tasks": ("seg", "normal"),
        "model": "demo_cnn",
        "crop": 96,
        "scale_min": 0.75,
        "scale_max": 1.25,
        "batch_size": 8,
        "steps": 300,
        "lr": 0.01,
        "log_every": 10,
        "checkpoint_every": 100,
        "eval_batch_size": 8,
        "num_workers": 0,
        "normals": "unit",
    }
    configs |= _family("synthetic_demo", table="demo", **demo)  # type: ignore[arg-type]
    for cfg in configs.values():
        validate(cfg)
    return configs
