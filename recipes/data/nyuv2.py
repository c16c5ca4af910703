"""NYUv2 readers and writers: the official NDDR-CNN layout (PNG) and the MTAN build (``.npy``).

Official NDDR layout (``datasets/nyu_v2`` of the NDDR-CNN README; ``--data-dir`` in its scripts)::

    ROOT/list/training_seg.txt          lines "<image> <label>", e.g.
    ROOT/list/training_normal_mask.txt    "/nyu_train_val/img/0001.png /nyu_train_val/seg/0001.png"
    ROOT/list/testing_seg.txt           (the official reader concatenates ROOT + path, so paths
    ROOT/list/testing_normal_mask.txt    start with "/"; both lists name the same images in order)
    ROOT/nyu_train_val/{img,seg,normal_mask}/*.png

795 training / 654 testing images of 480×640. ``img``: RGB PNG. ``seg``: 1-channel PNG, classes
0..39, 255 = ignore. ``normal_mask``: RGB uint8 PNG, the normal encoded as ``round((n + 1) / 2 · 255)``;
a pixel is invalid when all three channels are 255 (the official loss keeps pixels where *any*
channel differs from 255).

MTAN build (``im2im_pred/create_dataset.py`` and ``utils.py`` of lorenmt/mtan)::

    ROOT/{train,val}/image/{i}.npy    H×W×3 float RGB in [0, 1] (288×384)
    ROOT/{train,val}/label/{i}.npy    H×W float, 13 classes 0..12, -1 = ignore
    ROOT/{train,val}/depth/{i}.npy    H×W×1 float (0 = invalid)
    ROOT/{train,val}/normal/{i}.npy   H×W×3 float unit vectors, all 0 = invalid

with ``i`` = 0..N−1 (MTAN counts ``image/*.npy``). The reader maps label −1 to 255.

Readers return raw samples (channels last, see :mod:`recipes.data.transforms`) or, with a
``transform``, whatever it returns.

Example:
    >>> import tempfile
    >>> from recipes.data.synthetic import SyntheticScenes
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = tmp.name
    >>> _ = write_nyuv2_official(SyntheticScenes(2, size=(12, 16)), root, "train")
    >>> data = NYUv2(root, "train")
    >>> len(data), tuple(data[0]["image"].shape)
    (2, (12, 16, 3))
    >>> tmp.cleanup()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from .transforms import decode_normals, encode_normals, normal_validity

__all__ = [
    "NYUV2_NUM_CLASSES",
    "NYUV2_MTAN_NUM_CLASSES",
    "IGNORE_INDEX",
    "NYUv2",
    "NYUv2MTAN",
    "official_split_name",
    "write_nyuv2_official",
    "write_nyuv2_mtan",
]

NYUV2_NUM_CLASSES = 40
NYUV2_MTAN_NUM_CLASSES = 13
IGNORE_INDEX = 255

_OFFICIAL_SPLITS = {
    "train": "training",
    "training": "training",
    "test": "testing",
    "testing": "testing",
    "val": "testing",
}
_MTAN_SPLITS = {
    "train": "train",
    "training": "train",
    "test": "val",
    "testing": "val",
    "val": "val",
}
_OFFICIAL_HINT = (
    "download the official NDDR NYUv2 preprocessing (the 'datasets/nyu_v2' folder linked from the "
    "NDDR-CNN README, holding list/ and nyu_train_val/) and pass that folder as root, write one "
    f"with {__package__}.write_nyuv2_official(...), or run with dataset=synthetic"
)
_MTAN_HINT = (
    "download the MTAN NYUv2 build (nyuv2.zip linked from the lorenmt/mtan README, holding "
    "train/ and val/) and pass the unzipped folder as root, write one with "
    f"{__package__}.write_nyuv2_mtan(...), or run with dataset=synthetic"
)


def official_split_name(split: str) -> str:
    """``"train"`` → ``"training"``, ``"test"`` (or ``"val"``) → ``"testing"``.

    Example:
        >>> official_split_name("test")
        'testing'
    """
    try:
        return _OFFICIAL_SPLITS[split]
    except KeyError:
        raise ConfigError(f"split={split!r}: use 'train' or 'test'") from None


def _check_root(root: str | os.PathLike[str], what: str, hint: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what} root {path} is not a directory: {hint}")
    return path


def _resolve(root: Path, listed: str) -> Path:
    # The official reader concatenates data_dir + path, so listed paths start with "/" and are
    # relative to root; a genuinely absolute path that exists is taken as is.
    relative = root / listed.lstrip("/")
    if relative.exists() or not Path(listed).is_absolute() or not Path(listed).exists():
        return relative
    return Path(listed)


def _read_list(root: Path, list_file: Path) -> list[tuple[Path, Path]]:
    if not list_file.is_file():
        raise DatasetNotFoundError(
            f"expected {list_file.relative_to(root)} under {root}: {_OFFICIAL_HINT}"
        )
    pairs: list[tuple[Path, Path]] = []
    with open(list_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetFormatError(
                    f"{list_file}:{number}: expected '<image> <label>' (two paths separated by a "
                    f"space), got {line.rstrip()!r}"
                )
            pairs.append((_resolve(root, fields[0]), _resolve(root, fields[1])))
    if not pairs:
        raise DatasetFormatError(f"{list_file} lists no images: expected '<image> <label>' lines")
    return pairs


def _read_png(path: Path, channels: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is listed but missing: {_OFFICIAL_HINT}")
    try:
        with Image.open(path) as image:
            image.load()
            if channels == 3 and image.mode != "RGB":
                image = image.convert("RGB")
            array = np.asarray(image)
    except OSError as error:
        raise DatasetFormatError(f"{path} is not a readable image: {error}") from error
    if channels == 1 and array.ndim != 2:
        raise DatasetFormatError(
            f"{path} has {array.shape[-1]} channels: segmentation labels must be a 1-channel "
            "(L or P mode) PNG of class ids 0..39 with 255 = ignore"
        )
    if array.dtype != np.uint8:
        raise DatasetFormatError(f"{path} holds {array.dtype} pixels: expected 8-bit values")
    return array


class NYUv2(Dataset):
    """NYUv2 in the official NDDR-CNN layout (module docstring).

    Args:
        root: the folder holding ``list/`` and ``nyu_train_val/``.
        split: ``"train"`` (795 images) or ``"test"`` (654).
        transform: optional callable applied to the raw sample.
        normals: ``"raw"`` (uint8 as stored, 255 = invalid; the official code uses these values
            as the direction) or ``"unit"`` (decoded to float32 unit vectors, invalid = 0).
        num_classes: class ids must be below it (or 255).

    Raw sample: ``image`` uint8 H×W×3 RGB, ``seg`` uint8 H×W, ``normal`` uint8 H×W×3 (``"raw"``)
    or float32 H×W×3 (``"unit"``), ``normal_mask`` bool H×W.

    Example:
        >>> NYUv2("/no/such/folder")
        Traceback (most recent call last):
        ...
        recipes.errors.DatasetNotFoundError: NYUv2 root /no/such/folder is not a directory: ...
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        normals: str = "raw",
        num_classes: int = NYUV2_NUM_CLASSES,
    ) -> None:
        if normals not in ("raw", "unit"):
            raise ConfigError(f"normals={normals!r}: use 'raw' or 'unit'")
        self.root = _check_root(root, "NYUv2", _OFFICIAL_HINT)
        self.split = split
        prefix = official_split_name(split)
        seg_pairs = _read_list(self.root, self.root / "list" / f"{prefix}_seg.txt")
        normal_list = self.root / "list" / f"{prefix}_normal_mask.txt"
        normal_pairs = _read_list(self.root, normal_list)
        seg_images = [image for image, _ in seg_pairs]
        normal_images = [image for image, _ in normal_pairs]
        if seg_images != normal_images:
            raise DatasetFormatError(
                f"list/{prefix}_seg.txt and list/{prefix}_normal_mask.txt under {self.root} do "
                f"not name the same images in the same order ({len(seg_images)} vs "
                f"{len(normal_images)} lines): regenerate the lists"
            )
        missing = [
            path
            for (image, seg), (_, normal) in zip(seg_pairs, normal_pairs)
            for path in (image, seg, normal)
            if not path.is_file()
        ]
        if missing:
            raise DatasetNotFoundError(
                f"{len(missing)} file(s) listed in list/{prefix}_*.txt are missing under "
                f"{self.root}, first {missing[0]}: {_OFFICIAL_HINT}"
            )
        self.files = [
            (image, seg, normal) for (image, seg), (_, normal) in zip(seg_pairs, normal_pairs)
        ]
        self.transform = transform
        self.normals = normals
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.files)

    def read_raw(self, index: int) -> dict[str, torch.Tensor]:
        """The raw sample ``index`` (no transform)."""
        image_path, seg_path, normal_path = self.files[index]
        image = _read_png(image_path, 3)
        seg = _read_png(seg_path, 1)
        normal = _read_png(normal_path, 3)
        if not image.shape[:2] == seg.shape == normal.shape[:2]:
            raise DatasetFormatError(
                f"sizes differ: {image_path} {image.shape[:2]}, {seg_path} {seg.shape}, "
                f"{normal_path} {normal.shape[:2]}"
            )
        bad = (seg >= self.num_classes) & (seg != IGNORE_INDEX)
        if bad.any():
            raise DatasetFormatError(
                f"{seg_path} holds label {int(seg[bad][0])}: expected 0..{self.num_classes - 1} "
                f"or {IGNORE_INDEX} (ignore)"
            )
        normal_t = torch.from_numpy(normal.copy())
        sample = {
            "image": torch.from_numpy(image.copy()),
            "seg": torch.from_numpy(seg.copy()),
            "normal": normal_t,
            "normal_mask": normal_validity(normal_t),
        }
        if self.normals == "unit":
            sample["normal"], sample["normal_mask"] = decode_normals(normal_t)
        return sample

    def __getitem__(self, index: int) -> Any:
        sample = self.read_raw(index)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"NYUv2(root={str(self.root)!r}, split={self.split!r}, len={len(self)})"


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _raw_normals(sample: Mapping[str, Any]) -> np.ndarray:
    normal = sample["normal"]
    tensor = normal if isinstance(normal, torch.Tensor) else torch.from_numpy(np.asarray(normal))
    if tensor.dtype == torch.uint8:
        return tensor.numpy()
    return encode_normals(tensor, sample.get("normal_mask")).numpy()


def write_nyuv2_official(
    samples: Iterable[Mapping[str, Any]],
    root: str | os.PathLike[str],
    split: str = "train",
) -> Path:
    """Write raw samples (``image`` uint8 H×W×3, ``seg`` H×W ids 0..255, ``normal`` uint8 raw or
    float unit H×W×3) in the official layout: PNGs ``nyu_train_val/{img,seg,normal_mask}/
    {split}_{i:04d}.png`` and the two list files of the split (overwritten). Returns ``root``.

    Example:
        >>> import tempfile
        >>> from recipes.data.synthetic import SyntheticScenes
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = write_nyuv2_official(SyntheticScenes(1, size=(8, 8)), tmp.name, "test")
        >>> sorted(p.name for p in (root / "list").iterdir())
        ['testing_normal_mask.txt', 'testing_seg.txt']
        >>> tmp.cleanup()
    """
    prefix = official_split_name(split)
    root = Path(root).expanduser()
    for folder in ("img", "seg", "normal_mask"):
        (root / "nyu_train_val" / folder).mkdir(parents=True, exist_ok=True)
    (root / "list").mkdir(parents=True, exist_ok=True)
    seg_lines: list[str] = []
    normal_lines: list[str] = []
    for index, sample in enumerate(samples):
        image = _numpy(sample["image"])
        seg = _numpy(sample["seg"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise DatasetFormatError(
                f"sample {index}: image must be uint8 H×W×3, got {image.dtype} {image.shape}"
            )
        if seg.ndim != 2 or seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
            raise DatasetFormatError(f"sample {index}: seg must be H×W with values 0..255")
        name = f"{split}_{index:04d}.png"
        relative = {
            folder: f"/nyu_train_val/{folder}/{name}" for folder in ("img", "seg", "normal_mask")
        }
        Image.fromarray(np.ascontiguousarray(image)).save(root / relative["img"].lstrip("/"))
        Image.fromarray(np.ascontiguousarray(seg.astype(np.uint8))).save(
            root / relative["seg"].lstrip("/")
        )
        Image.fromarray(np.ascontiguousarray(_raw_normals(sample))).save(
            root / relative["normal_mask"].lstrip("/")
        )
        seg_lines.append(f"{relative['img']} {relative['seg']}\n")
        normal_lines.append(f"{relative['img']} {relative['normal_mask']}\n")
    (root / "list" / f"{prefix}_seg.txt").write_text("".join(seg_lines), encoding="utf-8")
    (root / "list" / f"{prefix}_normal_mask.txt").write_text(
        "".join(normal_lines), encoding="utf-8"
    )
    return root


def _mtan_split(split: str) -> str:
    try:
        return _MTAN_SPLITS[split]
    except KeyError:
        raise ConfigError(f"split={split!r}: use 'train' or 'test' (MTAN's 'val')") from None


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFoundError(f"expected {path}: {_MTAN_HINT}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetFormatError(f"{path} is not a readable .npy array: {error}") from error


class NYUv2MTAN(Dataset):
    """NYUv2 in the MTAN ``.npy`` build (module docstring).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"test"`` (read from ``val/``).
        transform: optional callable applied to the raw sample.
        num_classes: label ids must be below it (13 for this build).
        with_depth: also return ``"depth"`` (H×W float32).

    Raw sample: ``image`` float32 H×W×3 in [0, 1], ``seg`` int64 H×W (−1 mapped to 255),
    ``normal`` float32 H×W×3 unit vectors, ``normal_mask`` bool H×W (not all-zero).

    Example:
        >>> NYUv2MTAN("/no/such/folder")
        Traceback (most recent call last):
        ...
        recipes.errors.DatasetNotFoundError: NYUv2-MTAN root /no/such/folder is not a directory: ...
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        num_classes: int = NYUV2_MTAN_NUM_CLASSES,
        with_depth: bool = False,
    ) -> None:
        self.root = _check_root(root, "NYUv2-MTAN", _MTAN_HINT)
        self.split = split
        self.folder = self.root / _mtan_split(split)
        needed = ["image", "label", "normal"] + (["depth"] if with_depth else [])
        for name in needed:
            if not (self.folder / name).is_dir():
                raise DatasetNotFoundError(
                    f"expected {self.folder.relative_to(self.root)}/{name}/ under {self.root}: "
                    f"{_MTAN_HINT}"
                )
        count = sum(1 for p in (self.folder / "image").iterdir() if p.suffix == ".npy")
        if count == 0:
            raise DatasetNotFoundError(f"{self.folder / 'image'} holds no .npy files: {_MTAN_HINT}")
        for name in needed:
            for index in range(count):
                if not (self.folder / name / f"{index}.npy").is_file():
                    raise DatasetNotFoundError(
                        f"expected {self.folder / name / f'{index}.npy'} (image/ holds {count} "
                        f"files, numbered 0..{count - 1}): {_MTAN_HINT}"
                    )
        self.num_images = count
        self.transform = transform
        self.num_classes = num_classes
        self.with_depth = with_depth

    def __len__(self) -> int:
        return self.num_images

    def read_raw(self, index: int) -> dict[str, torch.Tensor]:
        """The raw sample ``index`` (no transform)."""
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for {self.num_images} images")
        paths = {
            name: self.folder / name / f"{index}.npy"
            for name in ("image", "label", "normal", "depth")
        }
        image = _load_npy(paths["image"])
        label = _load_npy(paths["label"])
        normal = _load_npy(paths["normal"])
        if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.floating):
            raise DatasetFormatError(
                f"{paths['image']} holds {image.dtype} {image.shape}: expected float H×W×3 in [0, 1]"
            )
        if label.shape != image.shape[:2] or normal.shape != image.shape:
            raise DatasetFormatError(
                f"{self.folder}/*/{index}.npy shapes differ: image {image.shape}, label "
                f"{label.shape} (expected H×W), normal {normal.shape} (expected H×W×3)"
            )
        if (
            not np.array_equal(label, np.round(label))
            or (((label < 0) & (label != -1)) | (label >= self.num_classes)).any()
        ):
            raise DatasetFormatError(
                f"{paths['label']} holds values other than integers 0..{self.num_classes - 1} "
                "and -1 (ignore)"
            )
        seg = torch.from_numpy(np.where(label == -1, IGNORE_INDEX, label).astype(np.int64))
        normal_t = torch.from_numpy(normal.astype(np.float32))
        sample = {
            "image": torch.from_numpy(image.astype(np.float32)),
            "seg": seg,
            "normal": normal_t,
            "normal_mask": normal_validity(normal_t),
        }
        if self.with_depth:
            depth = _load_npy(paths["depth"])
            sample["depth"] = torch.from_numpy(depth.reshape(image.shape[:2]).astype(np.float32))
        return sample

    def __getitem__(self, index: int) -> Any:
        sample = self.read_raw(index)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"NYUv2MTAN(root={str(self.root)!r}, split={self.split!r}, len={len(self)})"


def write_nyuv2_mtan(
    samples: Iterable[Mapping[str, Any]],
    root: str | os.PathLike[str],
    split: str = "train",
) -> Path:
    """Write raw samples in the MTAN ``.npy`` build under ``root/{train,val}/``: image float32
    H×W×3 (uint8 / 255, floats kept), label float32 H×W (255 → −1), depth float32 H×W×1 (the
    sample's ``"depth"`` or zeros), normal float32 H×W×3 unit (uint8 raw decoded; invalid = 0).
    Returns ``root``.

    Example:
        >>> import tempfile
        >>> from recipes.data.synthetic import SyntheticScenes
        >>> tmp = tempfile.TemporaryDirectory()
        >>> root = write_nyuv2_mtan(SyntheticScenes(1, size=(8, 8)), tmp.name, "test")
        >>> sorted(p.name for p in (root / "val").iterdir())
        ['depth', 'image', 'label', 'normal']
        >>> tmp.cleanup()
    """
    folder = Path(root).expanduser() / _mtan_split(split)
    for name in ("image", "label", "depth", "normal"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, sample in enumerate(samples):
        image = _numpy(sample["image"])
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DatasetFormatError(f"sample {index}: image must be H×W×3, got {image.shape}")
        image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
        seg = _numpy(sample["seg"]).astype(np.float32)
        label = np.where(seg == IGNORE_INDEX, -1.0, seg).astype(np.float32)
        normal = sample["normal"]
        normal_t = (
            normal if isinstance(normal, torch.Tensor) else torch.from_numpy(np.asarray(normal))
        )
        if normal_t.dtype == torch.uint8:
            unit = decode_normals(normal_t)[0]
        else:
            unit = normal_t.to(torch.float32)
            if "normal_mask" in sample:
                mask = torch.as_tensor(sample["normal_mask"]).bool()
                unit = torch.where(mask[..., None], unit, torch.zeros_like(unit))
        depth = sample.get("depth")
        depth_array = (
            np.zeros(image.shape[:2], np.float32)
            if depth is None
            else _numpy(depth).astype(np.float32)
        ).reshape(*image.shape[:2], 1)
        np.save(folder / "image" / f"{index}.npy", image.astype(np.float32))
        np.save(folder / "label" / f"{index}.npy", label)
        np.save(folder / "depth" / f"{index}.npy", depth_array)
        np.save(folder / "normal" / f"{index}.npy", unit.numpy())
    return Path(root).expanduser()
