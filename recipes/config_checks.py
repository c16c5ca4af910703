"""The checks behind :func:`recipes.configs.validate`: every field's allowed values and ranges,
and the combinations that exclude each other (kept apart from :mod:`recipes.configs`, which
holds the fields, parsing and the registry)."""

from __future__ import annotations

import math

from .configs import CHOICES, LOCAL_MODELS, RecipeConfig
from .errors import ConfigError

__all__ = ["check_config"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_config(config: RecipeConfig) -> None:
    """Every check of :func:`recipes.configs.validate`, in order; the first that fails raises
    :class:`ConfigError` naming the key, the value and what is allowed.

    Example:
        >>> from recipes.configs import RecipeConfig
        >>> check_config(RecipeConfig(name="ok", model="demo_cnn", dataset="synthetic"))
    """
    for key, allowed in CHOICES.items():
        value = getattr(config, key)
        _require(
            value in allowed,
            f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}.",
        )
    from .custom import complete_config, is_custom_data, is_spec, validate_custom
    from .data import DATASETS, TASKS

    config = complete_config(config)  # byo: tasks from the keys of models / losses
    custom = is_custom_data(config)
    if custom:
        _require(
            len(config.tasks) > 0,
            "tasks is empty: set models=TASK=module:callable,... (its keys are the tasks) or "
            "tasks=A,B with model=module:callable.",
        )
    else:
        _require(
            config.dataset in DATASETS,
            f"dataset={config.dataset!r} is not allowed; choose one of: {', '.join(DATASETS)}, "
            "or your own dataset as module:callable (recipes/README.md: 'Train your own models').",
        )
        known_tasks = list(TASKS[config.dataset])
        _require(len(config.tasks) > 0, f"tasks is empty; choose from: {', '.join(known_tasks)}.")
        for task in config.tasks:
            _require(
                task in known_tasks,
                f"tasks contains {task!r}, which dataset={config.dataset!r} does not have; "
                f"choose from: {', '.join(known_tasks)}.",
            )
    _require(len(set(config.tasks)) == len(config.tasks), f"tasks={config.tasks} repeats a task.")
    _require(
        not (custom and config.metrics_convention == "mtan"),
        "metrics_convention='mtan' applies to the paper's surface-normal task (e.g. "
        "dataset=nyuv2_mtan), not to your own dataset; remove the override.",
    )
    if config.method == "single":
        _require(
            len(config.tasks) == 1,
            f"method='single' trains one task, got tasks={list(config.tasks)}; "
            "set tasks=seg (or another single task).",
        )
    else:
        _require(
            len(config.tasks) >= 2,
            f"method={config.method!r} needs at least two tasks, got tasks={list(config.tasks)}.",
        )
    models = _model_names()
    if custom or config.models or is_spec(config.model):
        validate_custom(config, models)
    else:
        _require(
            config.model in models,
            f"model={config.model!r} is not allowed; choose one of: {', '.join(models)}, or "
            "module:callable.",
        )
    positive_ints = ("steps", "batch_size", "crop", "log_every", "checkpoint_every")
    others = ("eval_batch_size", "synthetic_images", "synthetic_test_images", "subspaces")
    for key in (*positive_ints, *others, "face_resize", "test_subjects"):
        _require(getattr(config, key) >= 1, f"{key}={getattr(config, key)} must be ≥ 1.")
    for key in ("num_workers", "eval_every", "eval_max_images", "nddr_rank", "threads"):
        _require(getattr(config, key) >= 0, f"{key}={getattr(config, key)} must be ≥ 0.")
    _require(config.nddr_groups >= 1, f"nddr_groups={config.nddr_groups} must be ≥ 1.")
    _require(
        len(config.synthetic_size) == 2 and min(config.synthetic_size) >= 8,
        f"synthetic_size={config.synthetic_size} must be two sizes H,W of at least 8.",
    )
    for task, fraction in config.synthetic_labelled.items():
        _require(
            task in ("seg", "normal"),
            f"synthetic_labelled has task {task!r}; the synthetic scenes label seg and normal.",
        )
        _require(
            0.0 <= fraction <= 1.0,
            f"synthetic_labelled.{task}={fraction} must be a fraction in [0, 1].",
        )
    _require(
        not config.synthetic_labelled or config.dataset == "synthetic",
        f"synthetic_labelled applies to dataset=synthetic only (dataset={config.dataset!r}).",
    )
    for key in ("lr", "momentum", "poly_power", "weight_decay", "alpha", "beta"):
        value = getattr(config, key)
        _require(math.isfinite(value) and value >= 0, f"{key}={value} must be a finite number ≥ 0.")
    _require(config.lr > 0, f"lr={config.lr} must be > 0.")
    _require(
        0 < config.scale_min <= config.scale_max,
        f"scale_min={config.scale_min}, scale_max={config.scale_max}: need 0 < min ≤ max.",
    )
    if config.fusion_lr_mult is not None:
        _require(config.fusion_lr_mult > 0, f"fusion_lr_mult={config.fusion_lr_mult} must be > 0.")
    if config.shortcut_lr_mult is not None:
        mult = config.shortcut_lr_mult
        _require(
            math.isfinite(mult) and mult > 0,
            f"shortcut_lr_mult={mult} must be a finite number > 0 (or none: as the fusion layers).",
        )
        _require(
            config.shortcut,
            f"shortcut_lr_mult={mult} applies with shortcut=true only; set shortcut=true, or "
            "shortcut_lr_mult=none.",
        )
    _require(
        config.mul_shortcut == "shared" or (config.method == "mul" and config.shortcut),
        f"mul_shortcut={config.mul_shortcut!r} applies to method='mul' with shortcut=true only "
        f"(method={config.method!r}, shortcut={config.shortcut}); set mul_shortcut=shared.",
    )
    if config.dropout is not None:
        _require(0 <= config.dropout < 1, f"dropout={config.dropout} must be in [0, 1).")
    paper_tasks = () if custom else ("seg", "normal", "age", "gender")
    for task in config.loss_weights:
        _require(
            task in paper_tasks or task in config.tasks,
            f"loss_weights has unknown task {task!r}; tasks are "
            f"{', '.join(dict.fromkeys([*paper_tasks, *config.tasks]))}.",
        )
    for task in config.init_from:
        _require(
            task in config.tasks,
            f"init_from has task {task!r}, which is not in tasks={list(config.tasks)}.",
        )
    if config.start == "voc":  # voc_if_present falls back (with a note) for other models
        _require(
            config.model == "deeplab_vgg16" and not config.models,
            f"start={config.start!r} loads DeepLab-LargeFOV VOC weights: it needs "
            f"model='deeplab_vgg16' (got model={config.model!r}); use start=pretrained.",
        )
    if config.start != "pretrained":
        _require(
            bool(config.voc_weights),
            f"start={config.start!r} needs voc_weights=PATH (e.g. weights/deeplab_vgg16_voc.pth).",
        )
    nddr_only = {"nddr_rank": 0, "nddr_groups": 1, "init": "diagonal"}
    if config.method != "nddr":
        for key, default in nddr_only.items():
            _require(
                getattr(config, key) == default,
                f"{key}={getattr(config, key)!r} applies to method='nddr' only "
                f"(method={config.method!r}); remove the override.",
            )
    _require(
        not (config.nddr_rank and config.nddr_groups > 1),
        "choose nddr_rank or nddr_groups, not both.",
    )
    _require(
        not (config.freeze_bn and config.sync_bn),
        "freeze_bn and sync_bn exclude each other: frozen BatchNorm has no batch statistics.",
    )
    builtin = [m for m in models if m not in LOCAL_MODELS]
    _require(
        config.tf_same_pooling != "on" or (config.model in builtin and not config.models),
        f"tf_same_pooling='on' applies to the recipes models ({', '.join(builtin)}), not to "
        f"model={config.model!r}; remove the override.",
    )
    _check_balancing(config)
    _require(bool(config.points), "points is empty; use auto or module names.")
    if "auto" in config.points:
        _require(len(config.points) == 1, f"points={config.points}: 'auto' stands alone.")


def _check_balancing(config: RecipeConfig) -> None:
    from nddrify.aggregation import AGGREGATORS
    from nddrify.weighting import WEIGHTINGS

    _require(
        config.weighting in WEIGHTINGS,
        f"weighting={config.weighting!r} is unknown; choose one of {', '.join(sorted(WEIGHTINGS))}.",
    )
    _require(
        config.aggregator == "none" or config.aggregator in AGGREGATORS,
        f"aggregator={config.aggregator!r} is unknown; choose none or one of "
        f"{', '.join(sorted(AGGREGATORS))}.",
    )
    _require(
        not (config.weighting == "equal" and config.weighting_options),
        "weighting=equal takes no options; remove weighting_options.",
    )
    _require(
        config.aggregator == "none" or config.weighting == "fixed",
        f"aggregator={config.aggregator!r} combines the per-task gradients itself: use it with "
        f"weighting=fixed (loss_weights scale each task's loss), not weighting={config.weighting!r}.",
    )
    _require(
        config.aggregator == "none" or config.amp != "fp16",
        "aggregator needs amp=none or amp=bf16 (fp16's loss scaling does not reach TorchJD's "
        "Jacobian); set amp=bf16.",
    )
    _require(
        (config.weighting == "fixed" and config.aggregator == "none") or len(config.tasks) >= 2,
        f"weighting={config.weighting!r} / aggregator={config.aggregator!r} balance two or more "
        f"tasks; this run trains {list(config.tasks)}.",
    )
    _require(
        config.aggregator != "none" or not config.aggregator_options,
        "aggregator_options without an aggregator; set aggregator=NAME or remove them.",
    )
    _require(
        config.weighting != "fixed" or not config.weighting_options,
        "weighting=fixed takes its weights from loss_weights; remove weighting_options.",
    )


def _model_names() -> list[str]:
    try:
        from .models import MODELS
    except ImportError:  # the models module is optional for building configs only
        return list(LOCAL_MODELS)
    return [*MODELS, *LOCAL_MODELS]
