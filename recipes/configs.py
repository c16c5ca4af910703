"""Training configurations: one dataclass, a registry named after the paper's rows, overrides.

Every row of the paper's Tables 1–7, A1 and A2 is a registered :class:`RecipeConfig` (or the
single-task pair of a row); ``recipes/README.md`` maps each row to its command. Defaults are the
paper's recipe (REFERENCE §5): SGD momentum 0.9, base lr 1e-3, poly 0.9 per step, 20,001 steps,
batch 10, 321×321 crops, loss weights seg 1 / normal 20, weight decay 2.5e-4 on weights only,
fusion layers at 100× (NDDR) or 1000× (cross-stitch, sluice), fc8 10× / 20×.

Any field can be overridden (``key=value`` strings, the ``--set`` flag of ``recipes.train``), and
a configuration may also be a JSON file (``{"base": "nyuv2_vgg16_nddr", "steps": 100}``).
Your own models, data and losses: the base ``byo`` (not a paper row; :mod:`recipes.custom`).

Example:
    >>> from recipes.configs import get_config, apply_overrides
    >>> cfg = get_config("nyuv2_vgg16_nddr")
    >>> cfg.method, cfg.lr, cfg.steps, cfg.batch_size, cfg.loss_weights["normal"]
    ('nddr', 0.001, 20001, 10, 20.0)
    >>> apply_overrides(cfg, ["steps=5", "init_from.seg=runs/seg.pt"]).steps
    5
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "RecipeConfig",
    "CONFIGS",
    "CHOICES",
    "METHODS",
    "LOCAL_MODELS",
    "registry",
    "get_config",
    "load_config",
    "apply_overrides",
    "parse_value",
    "validate",
    "config_to_dict",
    "config_from_dict",
    "field_types",
]

#: Training methods: the single-task baseline, the three fusion kinds, hard sharing ("Mul.").
METHODS = ("single", "nddr", "cross_stitch", "sluice", "mul")

#: Models defined by the recipes themselves (beside ``recipes.models.MODELS``).
LOCAL_MODELS = ("demo_cnn",)

#: Allowed values of the string-valued fields.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "init": ("diagonal", "xavier"),
    "nddr_activation": ("auto", "relu", "none"),
    "mean": ("imagenet", "caffe_bgr", "none"),
    "normals": ("raw", "unit"),
    "loss_at": ("output", "input"),
    "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "mul_trunk": ("first", "average"),
    "tf_same_pooling": ("auto", "on", "off"),
    "start": ("pretrained", "voc", "voc_if_present"),
    "miou_absent": ("exclude", "zero"),
    "eval_resize": ("tf_legacy", "align_corners_false", "align_corners_true"),
    "rescale_resize": ("tf_legacy", "align_corners_false", "align_corners_true"),
    "metrics_convention": ("official", "mtan"),
    "eval_split": ("train", "test"),
    "shortcut_resize": ("align_corners_false", "align_corners_true", "tf_legacy"),
    "mul_shortcut": ("shared", "per_task"),
}

_DEFAULT_LOSS_WEIGHTS = {"seg": 1.0, "normal": 20.0, "age": 1.0, "gender": 1.0}


@dataclass
class RecipeConfig:
    """One training run. Field names are the override keys (``--set key=value``).

    Attributes are grouped as: what the run reproduces (``name``, ``label``, ``paper``), data,
    model and fusion, initialisation, optimisation, and runtime. See ``recipes/README.md``.
    """

    # what this run is
    name: str = "custom"
    label: str = ""  # the row label in the paper's table ("Ours", "Sing.", "C.-S.", ...)
    paper: str = ""  # where the row is ("Table 4 · Ours")
    # data
    dataset: str = "nyuv2"  # nyuv2 | nyuv2_mtan | synthetic | imdb | wiki | module:callable
    data_root: str = "data/nyuv2"
    tasks: tuple[str, ...] = ("seg", "normal")
    crop: int = 321
    scale_min: float = 0.5
    scale_max: float = 1.5
    mirror: bool = True
    mean: str = "imagenet"  # the official TF code: caffe_bgr (recipes.models are torchvision's)
    normals: str = "raw"  # raw 0..255 vectors as the official code, or decoded unit vectors
    rescale_resize: str = "tf_legacy"  # random rescale: TF1 legacy bilinear/nearest (official)
    synthetic_images: int = 64  # dataset=synthetic: training images
    synthetic_test_images: int = 16  # dataset=synthetic: test images
    synthetic_size: tuple[int, ...] = (96, 96)  # dataset=synthetic: H, W
    # dataset=synthetic: task → fraction of the training images keeping its labels ({}: all)
    synthetic_labelled: dict[str, float] = field(default_factory=dict)
    face_resize: int = 256  # imdb/wiki: resize before the crop×crop crop
    test_subjects: int = 2000  # imdb/wiki: held-out subjects
    num_workers: int = 2
    cache_data: bool = False  # keep decoded training samples in memory (per process/worker)
    # model and fusion
    model: str = "deeplab_vgg16"  # a recipes model, or module:callable(...) for every task
    models: dict[str, str] = field(default_factory=dict)  # task → module:callable(...)
    method: str = "nddr"
    shortcut: bool = False
    shortcut_resize: str = "align_corners_false"
    points: tuple[str, ...] = ("auto",)  # "auto", or module names, e.g. features.6,features.13
    init: str = "diagonal"
    alpha: float = 0.9
    beta: float = 0.1
    nddr_activation: str = "auto"
    nddr_rank: int = 0  # > 0: low-rank NDDR
    nddr_groups: int = 1  # > 1: grouped NDDR
    subspaces: int = 2  # sluice
    cross_stitch_per_channel: bool = False
    mul_trunk: str = "first"
    mul_shortcut: str = "shared"  # method=mul, shortcut: one reducer (official) or one per task
    dropout: float | None = None  # override every Dropout's p in the task models
    # TF 'SAME' max pools (train and eval; the same as PyTorch's at odd sizes such as the 321
    # crops): auto = on for deeplab_vgg16 (official TF code), off for the Caffe networks
    tf_same_pooling: str = "auto"
    # initialisation
    pretrained: str = ""  # local ImageNet-style state dict for every task model ("" = none)
    init_from: dict[str, str] = field(default_factory=dict)  # task → single-task weights
    # tasks not in init_from: pretrained, or the DeepLab VOC weights (voc; voc_if_present falls
    # back to pretrained, loudly, when voc_weights is absent); recipes.deeplab_weights
    start: str = "pretrained"
    voc_weights: str = ""  # DeepLab-LargeFOV VOC weights (converted .pth, .npz or TF checkpoint)
    # optimisation
    steps: int = 20001
    batch_size: int = 10  # global batch (split over DDP processes)
    lr: float = 1e-3
    momentum: float = 0.9
    poly_power: float = 0.9
    weight_decay: float = 2.5e-4
    fusion_lr_mult: float | None = None  # None: 100 for NDDR, 1000 for cross-stitch and sluice
    shortcut_lr_mult: float | None = None  # None: as the fusion layers; official Sing./Mult.: 1
    head_weight_lr_mult: float = 10.0
    head_bias_lr_mult: float = 20.0
    heads: tuple[str, ...] = ()  # your models' classifier modules (head_*_lr_mult), e.g. head
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_LOSS_WEIGHTS))
    losses: dict[str, str] = field(default_factory=dict)  # task → ce | l1 | ... | module:callable
    loss_at: str = "output"
    # balancing the tasks (nddrify.weighting / nddrify.aggregation): "fixed" = loss_weights
    weighting: str = "fixed"
    weighting_options: dict[str, float] = field(default_factory=dict)
    aggregator: str = "none"  # a TorchJD aggregator on the shared parameters (pip: nddrify[mtl])
    aggregator_options: dict[str, float] = field(default_factory=dict)
    freeze_bn: bool = False  # task networks' BatchNorm in eval mode (fusion norms still train)
    sync_bn: bool = False  # synchronise BatchNorm statistics across DDP processes
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    out_dir: str = "runs"
    run_dir: str = ""  # default: {out_dir}/{name}
    log_every: int = 20
    checkpoint_every: int = 1000
    eval_every: int = 0  # 0: evaluate once, at the end
    eval_split: str = "test"
    eval_batch_size: int = 1
    eval_max_images: int = 0  # 0: every image of the split
    miou_absent: str = "exclude"
    eval_resize: str = "tf_legacy"  # predictions → label size (and loss_at=input): TF1 legacy
    metrics_convention: str = "official"  # official NDDR metrics, or mtan (lorenmt/mtan)
    progress: bool = True
    threads: int = 0  # torch.set_num_threads while training (0: torch's default)

    def resolved_run_dir(self) -> Path:
        """The run folder: ``run_dir`` or ``{out_dir}/{name}``."""
        return Path(self.run_dir) if self.run_dir else Path(self.out_dir) / self.name

    def resolved_init_from(self) -> dict[str, str]:
        """``init_from`` with ``{out_dir}`` replaced by this config's ``out_dir``."""
        return {t: p.replace("{out_dir}", self.out_dir) for t, p in self.init_from.items()}


def field_types() -> dict[str, Any]:
    """Field name → resolved type annotation of :class:`RecipeConfig`."""
    return typing.get_type_hints(RecipeConfig)


# ----------------------------------------------------------------------------- parsing values

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_scalar(key: str, text: str, kind: Any) -> Any:
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false.")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not an integer.") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a number.") from None
    return text


def parse_value(key: str, value: Any) -> Any:
    """Convert ``value`` (a command-line string, or a JSON value) to the type of field ``key``.

    Example:
        >>> parse_value("steps", "100"), parse_value("tasks", "seg,normal")
        (100, ('seg', 'normal'))
        >>> parse_value("init_from", "seg=a.pt,normal=b.pt")
        {'seg': 'a.pt', 'normal': 'b.pt'}
        >>> parse_value("fusion_lr_mult", "none") is None
        True
    """
    types_ = field_types()
    if key not in types_:
        raise ConfigError(_unknown_key_message(key))
    kind = types_[key]
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # float | None
        inner = next(a for a in typing.get_args(kind) if a is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        return parse_value_as(key, value, inner)
    return parse_value_as(key, value, kind)


def parse_value_as(key: str, value: Any, kind: Any) -> Any:
    """Convert ``value`` to ``kind`` (int, float, bool, str, tuple[X, ...], dict[str, X])."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        inner = typing.get_args(kind)[0]
        if isinstance(value, str):
            items: Iterable[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            raise ConfigError(f"{key}={value!r} must be a comma-separated list or a JSON list.")
        return tuple(parse_value_as(key, v, inner) for v in items)
    if origin is dict:
        inner = typing.get_args(kind)[1]
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{key}={text!r} is not valid JSON: {error}.") from None
            else:
                pairs = [p for p in _split_top(text) if p.strip()]
                if any("=" not in p for p in pairs):
                    raise ConfigError(
                        f"{key}={text!r} must be comma-separated name=value pairs "
                        "(e.g. seg=a.pt,normal=b.pt) or a JSON object."
                    )
                value = dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be name=value pairs or a JSON object.")
        return {str(k).strip(): parse_value_as(f"{key}.{k}", v, inner) for k, v in value.items()}
    if isinstance(value, str):
        return _parse_scalar(key, value, kind)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {kind.__name__}.")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (``seg=m:f(a=1, b=2),depth=m:g``)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _unknown_key_message(key: str) -> str:
    names = [f.name for f in fields(RecipeConfig)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys: {', '.join(names)}."


def apply_overrides(config: RecipeConfig, overrides: Iterable[str]) -> RecipeConfig:
    """A copy of ``config`` with ``key=value`` overrides applied (``dict.key=value`` sets one
    entry of a dict field), validated.

    Example:
        >>> cfg = apply_overrides(get_config("nyuv2_vgg16_nddr"), ["loss_weights.normal=10"])
        >>> cfg.loss_weights["normal"], cfg.loss_weights["seg"]
        (10.0, 1.0)
    """
    values = config_to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100).")
        key, text = (s.strip() for s in item.split("=", 1))
        base, _, entry = key.partition(".")
        if base not in values:
            raise ConfigError(_unknown_key_message(base))
        if entry:
            kind = field_types()[base]
            if typing.get_origin(kind) is not dict:
                raise ConfigError(f"{base} is not a dict field; use {base}=value.")
            inner = typing.get_args(kind)[1]
            values[base] = {**values[base], entry: parse_value_as(key, text, inner)}
        else:
            values[base] = parse_value(base, text)
    return config_from_dict(values)


def config_to_dict(config: RecipeConfig) -> dict[str, Any]:
    """Plain JSON-able values of every field (tuples become lists)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
        if isinstance(value, dict):
            out[f.name] = dict(value)
    return out


def config_from_dict(values: Mapping[str, Any]) -> RecipeConfig:
    """A validated config from plain values (unknown keys raise :class:`ConfigError`)."""
    unknown = [k for k in values if k not in field_types()]
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0]))
    parsed = {k: parse_value(k, v) for k, v in values.items()}
    config = RecipeConfig(**parsed)
    validate(config)
    return config


# ----------------------------------------------------------------------------- validation


def validate(config: RecipeConfig) -> None:
    """Raise :class:`ConfigError` naming the key and the allowed values when ``config`` is
    inconsistent (unknown choice, out-of-range number, tasks the dataset does not have, ...);
    the checks live in :mod:`recipes.config_checks`.

    Example:
        >>> import dataclasses
        >>> bad = dataclasses.replace(get_config("nyuv2_vgg16_nddr"), method="fancy")
        >>> try:
        ...     validate(bad)
        ... except ConfigError as error:
        ...     print(error)
        method='fancy' is not allowed; choose one of: single, nddr, cross_stitch, sluice, mul.
    """
    from .config_checks import check_config

    check_config(config)


# ----------------------------------------------------------------------------- the registry

#: Every registered configuration by name (filled on first use: :func:`registry`).
CONFIGS: dict[str, RecipeConfig] = {}


def registry() -> dict[str, RecipeConfig]:
    """The registered configurations by name (:data:`CONFIGS`, built and validated once).

    Example:
        >>> len(registry()), "nyuv2_resnet101_nddr" in registry()
        (58, True)
    """
    if not CONFIGS:
        from .paper_configs import paper_configs

        CONFIGS.update(paper_configs())
    return CONFIGS


def get_config(name: str) -> RecipeConfig:
    """A copy of the registered configuration ``name``, or of a base that is not a paper row
    (``byo``: your own models and data, :mod:`recipes.custom`).

    Example:
        >>> get_config("nyuv2_vgg16_single_seg").tasks
        ('seg',)
        >>> get_config("byo").method, "byo" in registry()
        ('nddr', False)
    """
    from .custom import TEMPLATES

    configs = registry()
    config = configs.get(name, TEMPLATES.get(name))
    if config is None:
        close = difflib.get_close_matches(name, [*configs, *TEMPLATES], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"no configuration named {name!r}.{hint} List them with python -m {__package__}.train "
            "--list, or pass a JSON file path."
        )
    copies = {
        k: dict(getattr(config, k)) for k in ("init_from", "models", "losses", "loss_weights")
    }
    return dataclasses.replace(config, **copies)


def load_config(
    name_or_path: str | os.PathLike[str], overrides: Iterable[str] = ()
) -> RecipeConfig:
    """A registered config by name, or a JSON file (``{"base": NAME, key: value, ...}``; without
    ``base`` the defaults of :class:`RecipeConfig`), with ``key=value`` overrides applied; an
    empty ``tasks`` of your own models is filled in with the keys of ``models`` (or ``losses``).

    Example:
        >>> load_config("nyuv2_vgg16_sluice", ["steps=10"]).steps
        10
    """
    text = os.fspath(name_or_path)
    if text.endswith(".json") or os.path.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"config file {text!r} is not valid JSON: {error}.") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {text!r} must hold a JSON object.")
        base_name = values.pop("base", None)
        base = get_config(base_name) if base_name else RecipeConfig(name=path.stem)
        merged = {**config_to_dict(base), **values}
        config = config_from_dict(merged)
    else:
        config = get_config(text)
    from .custom import complete_config

    return complete_config(apply_overrides(config, overrides))  # byo: tasks from models
