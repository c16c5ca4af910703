"""Bring your own models and data: specs for the ``byo`` configuration of :mod:`recipes.train`.

The ``byo`` base config trains a fused network of *your* single-task models on *your* dataset with
the recipes' trainer (progress, AMP, checkpoints, bit-exact resume, DDP):

* ``models`` — task → model spec ``module:callable(key=literal, ...)`` (built by
  :func:`nddrify.specs.load_spec`, which never downloads), or ``model`` — one spec for every task;
  each model takes an N×C×H×W batch and returns **one tensor**;
* ``dataset`` — a spec ``module:callable(...)`` returning a torch ``Dataset`` whose samples are
  ``(image, {task: target})`` (or a dict with ``"image"`` and the task keys). If the callable has
  a ``split`` parameter it is called with ``split="train"`` and ``split="test"``; without one there
  is no test split and the evaluation is skipped (``eval_split=train`` scores the training data);
* ``losses`` — task → a built-in loss (``ce``, ``l1``, ``l2``/``mse``, ``cosine``, ``bce``, with
  literal keyword arguments such as ``ce(ignore_index=-1)``; :mod:`recipes.custom_losses`) or a spec
  ``module:callable`` of your own loss.

Tasks are ``tasks`` when set, else the keys of ``models`` (else of ``losses``). The recipes apply
no augmentation to your data; the trainer's sampler fixes which samples each step takes, so resume
is bit-exact when your ``__getitem__`` is deterministic.

Example:
    >>> from recipes.configs import load_config
    >>> spec = "recipes.byo_example"
    >>> cfg = load_config("byo", [f"models=seg={spec}:make_seg,depth={spec}:make_depth",
    ...                           f"dataset={spec}:ToyScenes", "losses=seg=ce,depth=l1"])
    >>> cfg.tasks, cfg.method, has_split(cfg)
    (('seg', 'depth'), 'nddr', True)
    >>> tuple(example_input(cfg).shape)
    (2, 3, 32, 32)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nddrify.errors import SpecError
from nddrify.specs import load_spec, parse_arguments

from .configs import RecipeConfig
from .errors import ConfigError

__all__ = [
    "TEMPLATES",
    "is_spec",
    "is_custom_data",
    "model_spec",
    "custom_tasks",
    "complete_config",
    "validate_custom",
    "parse_call",
    "load_callable",
    "ToSample",
    "custom_dataset",
    "has_split",
    "example_input",
    "build_user_model",
    "check_outputs",
]

_README = "recipes/README.md, 'Train your own models on your own data'"

#: Base configurations that are not paper rows (``get_config("byo")``; not in the registry).
TEMPLATES: dict[str, RecipeConfig] = {
    "byo": RecipeConfig(
        name="byo",
        dataset="",
        data_root="",
        tasks=(),
        model="",
        method="nddr",
        points=("auto",),
        pretrained="",
        init_from={},
        loss_weights={},
        steps=1000,
        batch_size=8,
        lr=0.01,
        fusion_lr_mult=10.0,  # the paper's 100× (NDDR) / 1000× go with its lr of 1e-3
        log_every=10,
        checkpoint_every=200,
        eval_batch_size=8,
    )
}


def is_spec(value: object) -> bool:
    """Whether ``value`` names a callable: ``"module:callable"`` (arguments optional).

    Example:
        >>> is_spec("mymod:make(width=8)"), is_spec("nyuv2"), is_spec("")
        (True, False, False)
    """
    return isinstance(value, str) and ":" in value.partition("(")[0]


def is_custom_data(config: RecipeConfig) -> bool:
    """Whether ``config.dataset`` is a spec of your own dataset."""
    return is_spec(config.dataset)


def model_spec(config: RecipeConfig, task: str) -> str | None:
    """The model spec of ``task`` (``models[task]``, else a spec ``model``), or None when the task
    uses a built-in model."""
    if task in config.models:
        return config.models[task]
    return config.model if is_spec(config.model) else None


def custom_tasks(config: RecipeConfig) -> tuple[str, ...]:
    """``tasks`` when set, else the keys of ``models``, else those of ``losses``."""
    return tuple(config.tasks) or tuple(config.models) or tuple(config.losses)


def complete_config(config: RecipeConfig) -> RecipeConfig:
    """``config`` with ``tasks`` filled in from ``models`` / ``losses`` when it is empty."""
    if config.tasks or not (is_custom_data(config) or config.models):
        return config
    return dataclasses.replace(config, tasks=custom_tasks(config))


# ----------------------------------------------------------------------------- specs


def parse_call(text: str, what: str) -> tuple[str, dict[str, Any]]:
    """Split ``"target(key=literal, ...)"`` into the target and its keyword arguments.

    Example:
        >>> parse_call("mymod:Data(size=64, names=['a'])", "dataset")
        ('mymod:Data', {'size': 64, 'names': ['a']})
        >>> parse_call("ce", "losses.seg")
        ('ce', {})
    """
    try:
        return parse_arguments(text, what)
    except SpecError as error:
        raise ConfigError(str(error)) from None


def load_callable(target: str, what: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{what}={target!r} must look like 'package.module:callable'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{what}={target!r}: cannot import {module_name!r} ({error}); run from the folder "
            "holding it or add that folder to PYTHONPATH."
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{what}={target!r}: {module_name!r} has no {attribute!r}.") from None


# ----------------------------------------------------------------------------- validation


def validate_custom(config: RecipeConfig, builtin_models: list[str]) -> None:
    """The checks of :func:`recipes.configs.validate` for your own models, data and losses
    (``config.tasks`` already completed). Nothing is imported: specs are checked for form."""
    tasks = list(config.tasks)
    if "image" in tasks:
        raise ConfigError("a task may not be named 'image' (the batch key of the images).")
    custom_data = is_custom_data(config)
    for task in tasks:
        spec = model_spec(config, task)
        if spec is not None:
            parse_call(spec, f"models.{task}")
        elif custom_data or config.model not in builtin_models:
            known = f"; models has {sorted(config.models)}" if config.models else ""
            raise ConfigError(
                f"task {task!r} has no model{known}: set models.{task}=module:callable (or "
                "model=module:callable for every task), e.g. "
                "recipes.builders:demo_cnn(num_outputs=5); see " + _README + "."
            )
    if custom_data:
        parse_call(config.dataset, "dataset")
        from .custom_losses import BUILTIN_LOSSES, check_loss_spec

        for task in tasks:
            if task not in config.losses:
                known = f"; losses has {sorted(config.losses)}" if config.losses else ""
                raise ConfigError(
                    f"task {task!r} has no loss{known}: set losses.{task}=NAME with a built-in "
                    f"({', '.join(BUILTIN_LOSSES)}) or your own module:callable."
                )
            check_loss_spec(config.losses[task], f"losses.{task}")
    elif config.losses:
        raise ConfigError(
            f"losses={config.losses} applies to your own dataset (dataset=module:callable); "
            f"dataset={config.dataset!r} uses the paper's losses: remove the override."
        )


# ----------------------------------------------------------------------------- data


class ToSample:
    """Turns one of your samples into the trainer's sample dict ``{"image": ..., task: ...}``
    (tensors; targets of other tasks are dropped). Accepts ``(image, {task: target})`` or a
    dict with ``"image"``; raises :class:`ConfigError` naming missing tasks.

    Example:
        >>> to_sample = ToSample(("seg",))
        >>> sorted(to_sample((torch.zeros(3, 4, 4), {"seg": 1, "depth": 2.0})))
        ['image', 'seg']
        >>> to_sample((torch.zeros(3, 4, 4), {"depth": 2.0}))
        Traceback (most recent call last):
        ...
        recipes.errors.ConfigError: the dataset's samples have no target for task(s) ['seg'] (they have ['depth'], not in tasks: ['depth']); return (image, {task: target}) with every task of tasks=['seg'], or train the tasks your data has (tasks=... or models=...).
    """

    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.tasks = tuple(tasks)

    def __call__(self, sample: Any, generator: torch.Generator | None = None) -> dict[str, Any]:
        if isinstance(sample, Mapping) and "image" in sample:
            image, targets = sample["image"], sample
        elif isinstance(sample, (tuple, list)) and len(sample) == 2:
            image, targets = sample
        else:
            raise ConfigError(
                f"a dataset sample is a {type(sample).__name__}; return (image, {{task: target}}) "
                "or a dict with 'image' and one key per task."
            )
        if not isinstance(targets, Mapping):
            raise ConfigError(
                f"a dataset sample's targets are a {type(targets).__name__}; return "
                "(image, {task: target}) with one entry per task."
            )
        image = torch.as_tensor(image)
        if not image.is_floating_point():
            raise ConfigError(
                f"dataset images are {image.dtype}; return float images (e.g. "
                "image.float() / 255), shaped C×H×W."
            )
        missing = [t for t in self.tasks if t not in targets]
        if missing:
            have = sorted(str(k) for k in targets if k != "image")
            extra = [k for k in have if k not in self.tasks]
            others = f", not in tasks: {extra}" if extra else ""
            raise ConfigError(
                f"the dataset's samples have no target for task(s) {missing} (they have "
                f"{have}{others}); return (image, {{task: target}}) with every task of "
                f"tasks={list(self.tasks)}, or train the tasks your data has (tasks=... or "
                "models=...)."
            )
        return {"image": image, **{t: torch.as_tensor(targets[t]) for t in self.tasks}}


def _dataset_factory(config: RecipeConfig) -> tuple[Callable[..., Any], dict[str, Any], bool]:
    target, kwargs = parse_call(config.dataset, "dataset")
    factory = load_callable(target, "dataset")
    if not callable(factory):
        raise ConfigError(f"dataset={config.dataset!r} is not callable.")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    return factory, kwargs, "split" in parameters


def has_split(config: RecipeConfig) -> bool:
    """Whether the dataset callable takes ``split`` (so it has a test split)."""
    return _dataset_factory(config)[2]


def custom_dataset(config: RecipeConfig, split: str) -> Any:
    """Your dataset of ``split`` as a :class:`recipes.data.TransformedDataset` of sample dicts
    (``.base`` your dataset, ``.transform`` a :class:`ToSample`); a callable without ``split``
    gives the same dataset for every split."""
    from .data.transforms import TransformedDataset

    factory, kwargs, takes_split = _dataset_factory(config)
    if takes_split:
        kwargs = {**kwargs, "split": split}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise ConfigError(f"dataset={config.dataset!r} cannot be called so: {error}.") from None
    except ValueError:  # no signature to check: call it
        pass
    data = factory(**kwargs)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise ConfigError(
            f"dataset={config.dataset!r} returned a {type(data).__name__}; return a torch "
            "Dataset (with __len__ and __getitem__)."
        )
    return TransformedDataset(data, ToSample(tuple(config.tasks)), seed=None)


def example_input(config: RecipeConfig) -> torch.Tensor:
    """A batch of two copies of the first training image (what the models are traced with);
    the first sample is checked for every task's target."""
    data = custom_dataset(config, "train")
    if len(data) == 0:
        raise ConfigError(f"dataset={config.dataset!r} (split 'train') is empty.")
    image = data[0]["image"]
    return torch.stack([image, image])


# ----------------------------------------------------------------------------- models


def build_user_model(spec: str, task: str) -> nn.Module:
    """Task ``task``'s model from its spec (:func:`nddrify.specs.load_spec`; errors name the
    task)."""
    try:
        return load_spec(spec)
    except SpecError as error:
        raise SpecError(f"models.{task}={spec!r}: {error}") from None


def check_outputs(models: Mapping[str, nn.Module], example: torch.Tensor) -> None:
    """Run each model (eval mode, no gradients) on ``example`` and raise :class:`ConfigError`
    unless it returns one tensor."""
    for task, model in models.items():
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(example)
        finally:
            model.train(training)
        if not isinstance(output, torch.Tensor):
            raise ConfigError(
                f"the {task} model ({type(model).__name__}) returns a "
                f"{type(output).__name__}; a task model must return one tensor. Wrap it in a "
                "module whose forward returns the prediction, e.g. model(x)['out']."
            )
