"""The paper's configurations: one :class:`~recipes.configs.RecipeConfig` per row of Tables
1–7, A1 and A2 (and the single-task runs each row starts from), built by :func:`paper_configs`;
:func:`recipes.configs.registry` holds them by name. ``recipes/README.md`` maps every row to its
command.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .configs import RecipeConfig, validate

__all__ = ["paper_configs", "PRETRAINED_WEIGHTS", "SINGLE_TASK_RECIPE", "VOC_WEIGHTS"]

#: The local ImageNet weights each model's single-task runs start from (``pretrained``).
PRETRAINED_WEIGHTS = {
    "deeplab_vgg16": "weights/vgg16_bn_imagenet.pth",
    "deeplab_resnet101": "weights/resnet101_imagenet.pth",
    "alexnet_fcn32s": "weights/alexnet_imagenet.pth",
    # the Caffe layouts (Tables 5, A1): MSRA's Caffe ResNet-101 (DeepLab v2's start) and
    # CaffeNet, converted to state dicts (Caffe layer names load: recipes/README.md, Table 5/A1)
    "deeplab_resnet101_caffe": "weights/resnet101_caffe_imagenet.pth",
    "alexnet_fcn32s_caffe": "weights/caffenet_imagenet.pth",
    "vgg16_classifier": "weights/vgg16_imagenet.pth",
}

#: The DeepLab-LargeFOV VOC weights (``python -m recipes.deeplab_weights convert``) that the
#: official code starts its VGG-16 single-task and Mul. runs from (and Table 3 "Pret.").
VOC_WEIGHTS = "weights/deeplab_vgg16_voc.pth"


#: How the official single-task script differs from the fused runs' (REFERENCE §5,
#: ``st_normal.sh``): weight decay 5e-4 effective (its ``l2_loss`` term has no 0.5 factor; the
#: fused runs' 5e-4·0.5 is ``weight_decay=2.5e-4``) and surface-normal loss weight 10 (fused: 20).
#: Every paper family's single-task rows use it; the fused rows keep 2.5e-4 / 20. Paper-text
#: single-task runs: ``--set weight_decay=2.5e-4 --set loss_weights.normal=20``.
SINGLE_TASK_RECIPE: dict[str, float] = {"weight_decay": 5e-4, "normal_loss_weight": 10.0}


def _single_task_recipe(base: RecipeConfig) -> dict[str, Any]:
    """The :data:`SINGLE_TASK_RECIPE` fields of a single-task row built from ``base``."""
    weights = {**base.loss_weights, "normal": SINGLE_TASK_RECIPE["normal_loss_weight"]}
    return {"weight_decay": SINGLE_TASK_RECIPE["weight_decay"], "loss_weights": weights}


def _family(
    prefix: str,
    *,
    dataset: str,
    data_root: str,
    model: str,
    tasks: tuple[str, ...],
    table: str,
    official_single: bool = True,
    init_prefix: str = "",
    **common: Any,
) -> dict[str, RecipeConfig]:
    """Single-task runs, Mul., C.-S., Sluice and Ours for one table, all on the same footing:
    fused models start from the single-task runs' weights (``init_from``): those of
    ``{init_prefix}_single_<task>`` (default: this family's own). ``official_single``: the
    single-task rows use :data:`SINGLE_TASK_RECIPE`."""
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
            **(_single_task_recipe(base) if official_single else {}),
        )
    init_prefix = init_prefix or prefix
    init_from = {t: f"{{out_dir}}/{init_prefix}_single_{t}/model.pt" for t in tasks}
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
    # Table 5: DeepLab v2's ResNet-101 (Caffe layout: stride in the first 1×1 conv, frozen BN)
    configs |= _family(
        "nyuv2_resnet101",
        model="deeplab_resnet101_caffe",
        table="Table 5",
        freeze_bn=True,
        **nyu,
    )
    # Table 6 as the official code (REFERENCE §3, §5): TF1 legacy resize; the fused rows put a
    # fresh reducer on top of the non-shortcut single-task runs (Table 4's); the single-task and
    # Mult. reducers train at 1× (NDDR-Shortcut: 100×, as the fusion layers); Mult. has one
    # reducer (mul_shortcut="shared", the default)
    configs |= _family(
        "nyuv2_vgg16_shortcut",
        model="deeplab_vgg16",
        table="Table 6",
        shortcut=True,
        shortcut_resize="tf_legacy",
        init_prefix="nyuv2_vgg16",
        **nyu,
    )
    for method in ("single_seg", "single_normal", "mul"):
        configs[f"nyuv2_vgg16_shortcut_{method}"].shortcut_lr_mult = 1.0
    # The official start of the VGG-16 single-task and Mul. runs (st_seg.sh, mt_baseline.sh): the
    # DeepLab VOC weights, fc6/fc7 included, Mul. not from our single-task runs. Where the file is
    # absent: the ImageNet start, with a WARNING (start=voc_if_present). Mul. from the single-task
    # runs: --set init_from=seg={out_dir}/nyuv2_vgg16_single_seg/model.pt,normal=...
    for prefix in ("nyuv2_vgg16", "nyuv2_vgg16_shortcut"):
        for method in ("single_seg", "single_normal", "mul"):
            row = configs[f"{prefix}_{method}"]
            row.start, row.voc_weights = "voc_if_present", VOC_WEIGHTS
            row.pretrained, row.init_from = PRETRAINED_WEIGHTS["deeplab_vgg16"], {}
    configs |= _family(
        "nyuv2_alexnet",
        model="alexnet_fcn32s_caffe",
        table="Table A1",
        # the cross-stitch paper's fusion points: pool1, pool2, conv3, conv4, pool5 (FCN's Caffe
        # AlexNet; torchvision's alexnet_fcn32s: features.2, .5, .7, .9, .12)
        points=(
            "features.pool1",
            "features.pool2",
            "features.relu3",
            "features.relu4",
            "features.pool5",
        ),
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
    # the official ablation script trains the Xavier-initialised NDDR layers at 1000× (REFERENCE
    # §5); the paper's text implies the default 100× (--set fusion_lr_mult=100)
    configs["nyuv2_vgg16_nddr_init_xavier"] = _variant(
        nddr,
        "nyuv2_vgg16_nddr_init_xavier",
        "Random",
        "Table 1 · Random",
        init="xavier",
        fusion_lr_mult=1000.0,
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
        start="voc",  # the DeepLab VOC weights or an error (recipes.deeplab_weights)
        voc_weights=VOC_WEIGHTS,
        pretrained=VOC_WEIGHTS,  # not read with start=voc
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
    configs |= _family(
        "synthetic_demo",
        table="demo",
        official_single=False,
        **demo,  # type: ignore[arg-type]
    )
    for cfg in configs.values():
        validate(cfg)
    return configs
