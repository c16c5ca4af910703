"""Datasets of the paper's experiments, their augmentation, and a synthetic stand-in.

* :mod:`recipes.data.nyuv2`: NYUv2 in the official NDDR layout (PNG + list files) and the MTAN
  ``.npy`` build, with writers for both;
* :mod:`recipes.data.imdb_wiki`: IMDB-WIKI from ``imdb.mat`` / ``wiki.mat``, the paper's filter and
  subject-disjoint split;
* :mod:`recipes.data.synthetic`: ray-cast indoor scenes with exact classes and normals (the
  default for demos and tests: no download needed);
* :mod:`recipes.data.transforms`: the official augmentation and normalisation.

:func:`build_dataset` returns a torch ``Dataset`` of normalised sample dicts:

* NYU-like (``"nyuv2"``, ``"nyuv2_mtan"``, ``"synthetic"``): ``image`` float32 3×H×W, ``seg``
  int64 H×W (255 = ignore), ``normal`` float32 3×H×W, ``normal_mask`` bool H×W;
* faces (``"imdb"``, ``"wiki"``): ``image`` float32 3×H×W, ``age`` int64 (0..99), ``gender``
  int64 (0 female, 1 male).

Example:
    >>> data = build_dataset("synthetic", None, "train", train=True, crop=32, num_images=4,
    ...                      size=(24, 32), aug_seed=0)
    >>> sample = data[0]
    >>> tuple(sample["image"].shape), sample["seg"].dtype, tuple(sample["normal"].shape)
    ((3, 32, 32), torch.int64, (3, 32, 32))
    >>> TASKS["synthetic"], NUM_OUTPUTS["imdb"]
    (['seg', 'normal'], {'age': 100, 'gender': 2})
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetNotFoundError
from .imdb_wiki import NUM_AGES, IMDBWiki
from .nyuv2 import (
    NYUV2_MTAN_NUM_CLASSES,
    NYUV2_NUM_CLASSES,
    NYUv2,
    NYUv2MTAN,
    official_split_name,
    write_nyuv2_mtan,
    write_nyuv2_official,
)
from .synthetic import SyntheticScenes
from .transforms import EvalTransform, FaceTransform, TrainTransform, TransformedDataset

__all__ = [
    "DATASETS",
    "TASKS",
    "NUM_OUTPUTS",
    "DEFAULT_CROP",
    "build_dataset",
    "build_raw_dataset",
    "NYUv2",
    "NYUv2MTAN",
    "SyntheticScenes",
    "IMDBWiki",
    "TrainTransform",
    "EvalTransform",
    "FaceTransform",
    "TransformedDataset",
    "write_nyuv2_official",
    "write_nyuv2_mtan",
]

#: Dataset name → task names, in the order the paper's networks are listed.
TASKS: dict[str, list[str]] = {
    "nyuv2": ["seg", "normal"],
    "nyuv2_mtan": ["seg", "normal"],
    "synthetic": ["seg", "normal"],
    "imdb": ["age", "gender"],
    "wiki": ["age", "gender"],
}
#: Dataset name → task → output channels of that task's network.
NUM_OUTPUTS: dict[str, dict[str, int]] = {
    "nyuv2": {"seg": NYUV2_NUM_CLASSES, "normal": 3},
    "nyuv2_mtan": {"seg": NYUV2_MTAN_NUM_CLASSES, "normal": 3},
    "synthetic": {"seg": NYUV2_NUM_CLASSES, "normal": 3},
    "imdb": {"age": NUM_AGES, "gender": 2},
    "wiki": {"age": NUM_AGES, "gender": 2},
}
#: Dataset name → training crop when ``crop=None`` (faces: the square network input).
DEFAULT_CROP: dict[str, int | tuple[int, int] | None] = {
    "nyuv2": 321,
    "nyuv2_mtan": (288, 384),
    "synthetic": None,  # the scene size
    "imdb": 224,
    "wiki": 224,
}
_SYNTHETIC_DEFAULT_IMAGES = {"train": 64, "test": 16}


def _synthetic(
    root: str | os.PathLike[str] | None,
    split: str,
    *,
    num_images: int | None = None,
    size: tuple[int, int] = (96, 128),
    data_seed: int = 0,
    num_classes: int = NYUV2_NUM_CLASSES,
    normals: str = "raw",
    labelled: Mapping[str, float] | None = None,
) -> Dataset:
    prefix = official_split_name(split)
    default_count = _SYNTHETIC_DEFAULT_IMAGES["train" if prefix == "training" else "test"]
    count = default_count if num_images is None else num_images
    if labelled and root is not None:
        raise ConfigError(
            "synthetic scenes with a fraction of the labels (labelled=...) render in memory "
            "only; leave the data root empty"
        )
    # One scene stream per split: seed 2·data_seed for training, 2·data_seed + 1 for testing.
    scenes = SyntheticScenes(
        count,
        size=size,
        seed=2 * data_seed + (prefix == "testing"),
        num_classes=num_classes,
        normals=normals,
        labelled=labelled,
    )
    if root is None:
        return scenes
    # With a root the scenes go through the real on-disk format once, then are read back.
    root = Path(root).expanduser()
    if not (root / "list" / f"{prefix}_seg.txt").is_file():
        write_nyuv2_official(
            SyntheticScenes(count, size=size, seed=scenes.seed, num_classes=num_classes),
            root,
            split,
        )
    return NYUv2(root, split, normals=normals, num_classes=num_classes)


def _nyuv2(root: str | os.PathLike[str] | None, split: str, *, normals: str = "raw") -> Dataset:
    if root is None:
        raise DatasetNotFoundError(
            "dataset 'nyuv2' needs root=<folder with list/ and nyu_train_val/>: download the "
            "official NDDR NYUv2 preprocessing or run with dataset=synthetic"
        )
    return NYUv2(root, split, normals=normals)


def _nyuv2_mtan(root: str | os.PathLike[str] | None, split: str) -> Dataset:
    if root is None:
        raise DatasetNotFoundError(
            "dataset 'nyuv2_mtan' needs root=<folder with train/ and val/ of .npy files>: "
            "download the MTAN NYUv2 build or run with dataset=synthetic"
        )
    return NYUv2MTAN(root, split)


def _faces(source: str) -> Callable[..., Dataset]:
    def build(
        root: str | os.PathLike[str] | None,
        split: str,
        *,
        test_subjects: int = 2000,
        split_seed: int = 0,
    ) -> Dataset:
        if root is None:
            raise DatasetNotFoundError(
                f"dataset '{source}' needs root=<folder holding {source}.mat and the face crops> "
                f"(e.g. .../{source}_crop)"
            )
        return IMDBWiki(root, source, split, test_subjects=test_subjects, seed=split_seed)

    build.__name__ = f"build_{source}"
    return build


#: Dataset name → ``builder(root, split, **options)`` of the raw (untransformed) dataset.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "nyuv2": _nyuv2,
    "nyuv2_mtan": _nyuv2_mtan,
    "synthetic": _synthetic,
    "imdb": _faces("imdb"),
    "wiki": _faces("wiki"),
}


def build_raw_dataset(
    name: str, root: str | os.PathLike[str] | None, split: str, **options: Any
) -> Dataset:
    """The raw dataset ``name`` (samples laid out like the files, channels last).

    Example:
        >>> tuple(build_raw_dataset("synthetic", None, "test", num_images=1, size=(8, 8))[0]["seg"].shape)
        (8, 8)
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r} is unknown: use one of {sorted(DATASETS)}")
    if split not in ("train", "test", "val"):
        raise ConfigError(f"split={split!r}: use 'train' or 'test'")
    builder = DATASETS[name]
    try:
        inspect.signature(builder).bind(root, split, **options)
    except TypeError as error:
        raise ConfigError(f"dataset {name!r} does not take these options: {error}") from error
    return builder(root, split, **options)


def build_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    train: bool | None = None,
    crop: int | tuple[int, int] | None = None,
    mean: str = "caffe_bgr",
    scale: tuple[float, float] | None = (0.5, 1.5),
    mirror: bool = True,
    negate_normal_x: bool = False,
    rescale_resize: str = "tf_legacy",
    normals: str = "raw",
    ignore_index: int = 255,
    aug_seed: int | None = None,
    eval_crop: int | tuple[int, int] | None = None,
    pad_to_multiple: int | None = None,
    resize: int = 256,
    num_images: int | None = None,
    size: tuple[int, int] = (96, 128),
    data_seed: int = 0,
    num_classes: int | None = None,
    labelled: Mapping[str, float] | None = None,
    test_subjects: int = 2000,
    split_seed: int = 0,
) -> TransformedDataset:
    """A dataset of normalised sample dicts (module docstring) for training or evaluation.

    Args:
        name: ``"nyuv2"``, ``"nyuv2_mtan"``, ``"synthetic"``, ``"imdb"`` or ``"wiki"``.
        root: dataset folder; for ``"synthetic"`` None renders in memory, a folder gets the
            scenes written once in the official NYUv2 layout and read back from it.
        split: ``"train"`` or ``"test"``.
        train: training augmentation (default: ``split == "train"``); else evaluation transform.
        crop: training crop (default :data:`DEFAULT_CROP`; synthetic: the scene size).
        mean: ``"caffe_bgr"`` (official), ``"imagenet"`` or ``"none"``.
        scale, mirror, negate_normal_x, ignore_index: see :class:`TrainTransform`.
        rescale_resize: the random rescale's convention (:class:`TrainTransform` ``resize``;
            default ``"tf_legacy"``, the official code's).
        normals: ``"raw"`` (official: uint8 values as the direction) or ``"unit"``; NYUv2 and
            synthetic only (MTAN normals are unit vectors).
        aug_seed: None: augmentation draws from torch's global RNG; an int: from
            ``(aug_seed, epoch, index)`` (see :class:`TransformedDataset`).
        eval_crop, pad_to_multiple: see :class:`EvalTransform`.
        resize: faces are resized to ``resize``² before the ``crop``² crop.
        num_images, size, data_seed, num_classes: synthetic scenes (default 64 train / 16 test
            images of 96×128, 40 classes).
        labelled: synthetic scenes: task → fraction of the images keeping that task's labels
            (:class:`recipes.data.synthetic.SyntheticScenes`; default all).
        test_subjects, split_seed: IMDB-WIKI subject split (2000 held-out subjects).

    Example:
        >>> data = build_dataset("synthetic", split="test", num_images=2, size=(16, 24))
        >>> len(data), tuple(data[1]["image"].shape), data.transform
        (2, (3, 16, 24), EvalTransform(mean='caffe_bgr', center_crop=None, pad_to_multiple=None, ignore_index=255))
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r} is unknown: use one of {sorted(DATASETS)}")
    train = (split == "train") if train is None else bool(train)
    options: dict[str, Any] = {}
    if name == "synthetic":
        options = {
            "num_images": num_images,
            "size": tuple(size),
            "data_seed": data_seed,
            "normals": normals,
        }
        if num_classes is not None:
            options["num_classes"] = num_classes
        if labelled:
            options["labelled"] = dict(labelled)
    elif name == "nyuv2":
        options = {"normals": normals}
    elif name in ("imdb", "wiki"):
        options = {"test_subjects": test_subjects, "split_seed": split_seed}
    base = build_raw_dataset(name, root, split, **options)

    if crop is None:
        crop = DEFAULT_CROP[name] if name != "synthetic" else tuple(size)  # type: ignore[assignment]
    transform: Callable[..., Any]
    if name in ("imdb", "wiki"):
        if not isinstance(crop, int):
            raise ConfigError(f"crop={crop!r}: face images use a square int crop (224 for VGG-16)")
        transform = FaceTransform(size=crop, resize=resize, train=train, mirror=mirror, mean=mean)
    elif train:
        transform = TrainTransform(
            crop=crop,  # type: ignore[arg-type]
            scale=scale,
            mirror=mirror,
            mean=mean,
            ignore_index=ignore_index,
            negate_normal_x=negate_normal_x,
            resize=rescale_resize,
        )
    else:
        transform = EvalTransform(
            mean=mean,
            center_crop=eval_crop,
            pad_to_multiple=pad_to_multiple,
            ignore_index=ignore_index,
        )
    return TransformedDataset(base, transform, seed=aug_seed)
