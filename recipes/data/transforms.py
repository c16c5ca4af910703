"""Augmentation and normalisation of the recipes' samples, following the official NDDR-CNN input
pipeline (``util/img_encoder_mt.py`` of the TensorFlow code, itself from DeepLab-TF).

Readers (:class:`~recipes.data.nyuv2.NYUv2`, :class:`~recipes.data.synthetic.SyntheticScenes`, ...)
return *raw* samples laid out like the files, channels last:

* ``"image"``: ``uint8`` H×W×3 RGB (0..255), or floating H×W×3 RGB in [0, 1] (MTAN build);
* ``"seg"``: integer H×W, ``255`` = ignore;
* ``"normal"``: ``uint8`` H×W×3 in the NYU raw encoding (``round((n + 1) / 2 · 255)``, all three
  channels 255 = invalid), or floating H×W×3 unit vectors (all three 0 = invalid);
* ``"normal_mask"``: bool H×W, True where the normal is valid (computed from ``"normal"`` if absent);
* ``"depth"`` (optional): floating H×W;
* anything else (``"age"``, ``"gender"``) is passed through as a tensor.

The transforms turn them into *normalised* samples, channels first: ``"image"`` float32 3×H×W,
``"seg"`` int64 H×W, ``"normal"`` float32 3×H×W (raw values 0..255 stay raw: the official code uses
them as the direction vector; unit vectors stay unit), ``"normal_mask"`` bool H×W, ``"depth"``
float32 H×W.

:class:`TrainTransform` is the official training augmentation, in the official order:

1. normalise the image (Caffe: RGB → BGR minus the mean; padding with 0 then means "mean colour");
2. random scale ``s ~ U(scale)``; new size ``int(H · s) × int(W · s)`` (truncation, as
   ``tf.to_int32``); image bilinear, labels / normals / mask nearest, both with the convention
   ``resize`` (:mod:`recipes.resizing`; config ``rescale_resize``). Default ``"tf_legacy"``, the
   official code's ``tf.image.resize_images`` (bilinear: source ``i · in / out``, no half-pixel
   offset) and ``resize_nearest_neighbor`` (``floor(i · in / out)``), both TF1 defaults;
   ``"align_corners_false"`` (half-pixel bilinear and ``"nearest-exact"``) and
   ``"align_corners_true"`` are options;
3. mirror with probability 0.5; the normal's x component is *not* negated by default (as in the
   official code); ``negate_normal_x=True`` negates it (raw encoding: ``x → 255 − x``);
4. pad bottom/right up to the crop size: image 0, ``seg`` ``ignore_index``, ``normal`` its invalid
   code (255 raw, 0 unit), ``normal_mask`` False, ``depth`` 0;
5. random crop of exactly ``crop`` (uniform offsets).

Randomness. Every random number is drawn with torch (``torch.rand`` / ``torch.randint``) from the
``generator`` passed to the call (or given to the transform), else from torch's global RNG; Python's
``random`` and NumPy's RNG are never used. So saving ``torch.get_rng_state()`` is enough to resume
bit-exactly when the transform uses the global RNG in the main process, and
:class:`TransformedDataset` with ``seed=`` makes every sample's augmentation a pure function of
``(seed, epoch, index)`` (independent of DataLoader workers and of resumes). Draw order per sample:
scale, mirror, crop row, crop column.

Example:
    >>> import torch
    >>> raw = {"image": torch.zeros(5, 7, 3, dtype=torch.uint8),
    ...        "seg": torch.ones(5, 7, dtype=torch.uint8),
    ...        "normal": torch.full((5, 7, 3), 128, dtype=torch.uint8)}
    >>> out = TrainTransform(crop=9, scale=(1.0, 1.0), mirror=False)(raw)
    >>> out["image"].shape, out["seg"].shape, int(out["seg"][8, 8]), bool(out["normal_mask"][8, 8])
    (torch.Size([3, 9, 9]), torch.Size([9, 9]), 255, False)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetFormatError
from ..resizing import check_resize_mode, resize_bilinear, resize_nearest

__all__ = [
    "CAFFE_BGR_MEAN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEANS",
    "normalize_image",
    "encode_normals",
    "decode_normals",
    "normal_validity",
    "sample_generator",
    "TrainTransform",
    "EvalTransform",
    "FaceTransform",
    "TransformedDataset",
]

#: Caffe / DeepLab mean in BGR order, the official code's ``IMG_MEAN`` (0..255 scale).
CAFFE_BGR_MEAN: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)
#: torchvision's ImageNet statistics, RGB order, [0, 1] scale.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Accepted values of the ``mean`` option.
MEANS: tuple[str, ...] = ("caffe_bgr", "imagenet", "none")

_RAW_NORMAL_INVALID = 255
_DENSE_KEYS = ("image", "seg", "normal", "normal_mask", "depth")


def _check_mean(mean: str) -> str:
    if mean not in MEANS:
        raise ConfigError(
            f"mean={mean!r} is not a known normalisation: use one of {list(MEANS)} "
            "('caffe_bgr' for the official Caffe/DeepLab weights, 'imagenet' for torchvision ones)"
        )
    return mean


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise DatasetFormatError(
            f"sample[{key!r}] is a {type(value).__name__}, not an array: samples must hold tensors "
            "or NumPy arrays"
        ) from error


def normalize_image(image: Any, mean: str = "caffe_bgr") -> torch.Tensor:
    """Turn an RGB H×W×3 image (``uint8`` 0..255, or floating in [0, 1]) into float32 3×H×W.

    ``mean="caffe_bgr"``: BGR order minus :data:`CAFFE_BGR_MEAN` (0..255 scale, official);
    ``"imagenet"``: RGB in [0, 1] minus :data:`IMAGENET_MEAN`, divided by :data:`IMAGENET_STD`;
    ``"none"``: RGB in [0, 1]. In every case the mean colour maps to 0 (padding value).

    Example:
        >>> import torch
        >>> pixel = torch.tensor([[[10, 20, 30]]], dtype=torch.uint8)
        >>> [round(v, 3) for v in normalize_image(pixel)[:, 0, 0].tolist()]
        [-74.007, -96.669, -112.679]
    """
    _check_mean(mean)
    tensor = _as_tensor(image, "image")
    if tensor.dim() != 3 or tensor.shape[-1] != 3:
        raise DatasetFormatError(
            f"sample['image'] has shape {tuple(tensor.shape)}: expected H×W×3 RGB (channels last)"
        )
    if tensor.dtype == torch.uint8:
        rgb255 = tensor.permute(2, 0, 1).to(torch.float32)
    elif tensor.is_floating_point():
        rgb255 = tensor.permute(2, 0, 1).to(torch.float32) * 255.0
    else:
        raise DatasetFormatError(
            f"sample['image'] has dtype {tensor.dtype}: expected uint8 (0..255) or float ([0, 1])"
        )
    if mean == "caffe_bgr":
        bgr = rgb255.flip(0)
        return bgr - torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32).view(3, 1, 1)
    rgb = rgb255 / 255.0
    if mean == "imagenet":
        mean_t = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        return (rgb - mean_t) / std_t
    return rgb


def normal_validity(normal: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Bool mask of valid normals: ``uint8`` raw encoding → not all channels 255; floating unit
    vectors → not all channels 0 (the MTAN convention).

    Example:
        >>> import torch
        >>> normal_validity(torch.tensor([[255, 255, 255], [255, 255, 0]], dtype=torch.uint8))
        tensor([False,  True])
    """
    if normal.dtype == torch.uint8:
        return (normal != _RAW_NORMAL_INVALID).any(dim=dim)
    return (normal != 0).any(dim=dim)


def decode_normals(raw: Any, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode NYU raw ``uint8`` normals to float32 unit vectors: ``v / 255 · 2 − 1`` then
    L2-normalised; invalid pixels (all channels 255) become 0. Returns ``(unit, valid_mask)``.

    Example:
        >>> import torch
        >>> unit, valid = decode_normals(torch.tensor([[128, 128, 255], [255, 255, 255]],
        ...                                           dtype=torch.uint8))
        >>> [round(v, 3) for v in unit[0].tolist()], unit[1].tolist(), valid.tolist()
        ([0.004, 0.004, 1.0], [0.0, 0.0, 0.0], [True, False])
    """
    tensor = _as_tensor(raw, "normal")
    if tensor.dtype != torch.uint8:
        raise DatasetFormatError(
            f"raw normals must be uint8 (NYU encoding), got {tensor.dtype}: unit-vector normals "
            "need no decoding"
        )
    valid = normal_validity(tensor, dim=dim)
    vectors = tensor.to(torch.float32) / 255.0 * 2.0 - 1.0
    norm = vectors.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    unit = torch.where(valid.unsqueeze(dim), vectors / norm, torch.zeros_like(vectors))
    return unit, valid


def encode_normals(unit: Any, valid: Any | None = None) -> torch.Tensor:
    """Encode unit normals (…×3, channels last) in the NYU raw ``uint8`` format:
    ``round((n + 1) / 2 · 255)`` (round half to even), invalid pixels → (255, 255, 255).
    ``valid`` defaults to "not all channels 0".

    Example:
        >>> import torch
        >>> encode_normals(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])).tolist()
        [[128, 128, 255], [255, 255, 255]]
    """
    tensor = _as_tensor(unit, "normal").to(torch.float32)
    if tensor.shape[-1] != 3:
        raise DatasetFormatError(
            f"normals have shape {tuple(tensor.shape)}: expected 3 channels last"
        )
    mask = normal_validity(tensor) if valid is None else _as_tensor(valid, "normal_mask").bool()
    codes = torch.round((tensor + 1.0) / 2.0 * 255.0).clamp(0, 255).to(torch.uint8)
    return torch.where(mask.unsqueeze(-1), codes, torch.full_like(codes, _RAW_NORMAL_INVALID))


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)`` through NumPy's ``SeedSequence``
    (well mixed: nearby seeds and indices give unrelated streams).

    Example:
        >>> import torch
        >>> a = torch.rand(2, generator=sample_generator(0, 1, 5))
        >>> torch.equal(a, torch.rand(2, generator=sample_generator(0, 1, 5)))
        True
    """
    if seed < 0 or any(key < 0 for key in keys):
        raise ConfigError(f"seeds and indices must be non-negative, got {(seed, *keys)}")
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigError(f"{name}={value!r}: expected a positive int or a (height, width) pair")
    return pair  # type: ignore[return-value]


def _to_chw(sample: Mapping[str, Any], mean: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Raw (channels-last) sample → float/int channels-first tensors. Returns the dict and whether
    the normals are in the raw uint8 encoding."""
    out: dict[str, torch.Tensor] = {}
    raw_normals = False
    sizes: dict[str, tuple[int, int]] = {}
    for key, value in sample.items():
        tensor = _as_tensor(value, key)
        if key == "image":
            out[key] = normalize_image(tensor, mean)
        elif key == "seg":
            if tensor.dim() != 2 or tensor.is_floating_point() or tensor.dtype == torch.bool:
                raise DatasetFormatError(
                    f"sample['seg'] has shape {tuple(tensor.shape)} and dtype {tensor.dtype}: "
                    "expected an integer H×W label map"
                )
            out[key] = tensor.to(torch.int64)
        elif key == "normal":
            if tensor.dim() != 3 or tensor.shape[-1] != 3:
                raise DatasetFormatError(
                    f"sample['normal'] has shape {tuple(tensor.shape)}: expected H×W×3"
                )
            raw_normals = tensor.dtype == torch.uint8
            if "normal_mask" not in sample:
                out["normal_mask"] = normal_validity(tensor)
            out[key] = tensor.permute(2, 0, 1).to(torch.float32)
        elif key == "normal_mask":
            out[key] = tensor.to(torch.bool)
        elif key == "depth":
            out[key] = (tensor[..., 0] if tensor.dim() == 3 else tensor).to(torch.float32)
        else:
            out[key] = tensor
    for key in _DENSE_KEYS:
        if key in out:
            sizes[key] = tuple(out[key].shape[-2:])  # type: ignore[assignment]
    if len(set(sizes.values())) > 1:
        raise DatasetFormatError(f"sample entries differ in height×width: {sizes}")
    return out, raw_normals


def _spatial_size(data: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    for key in _DENSE_KEYS:
        if key in data:
            return int(data[key].shape[-2]), int(data[key].shape[-1])
    raise DatasetFormatError(
        f"sample has none of the dense entries {list(_DENSE_KEYS)}: nothing to transform "
        f"(keys: {sorted(data)})"
    )


def _resize(data: dict[str, torch.Tensor], size: tuple[int, int], mode: str) -> None:
    """Image bilinear, every other dense entry nearest, both with convention ``mode``."""
    for key in _DENSE_KEYS:
        if key not in data:
            continue
        if key == "image":
            data[key] = resize_bilinear(data[key], size, mode)
        else:
            data[key] = resize_nearest(data[key], size, mode)


def _fills(raw_normals: bool, ignore_index: int) -> dict[str, float | int | bool]:
    return {
        "image": 0.0,
        "seg": ignore_index,
        "normal": float(_RAW_NORMAL_INVALID) if raw_normals else 0.0,
        "normal_mask": False,
        "depth": 0.0,
    }


def _pad_bottom_right(data: dict[str, torch.Tensor], size: tuple[int, int], fills: dict) -> None:
    height, width = _spatial_size(data)
    target_h, target_w = max(size[0], height), max(size[1], width)
    if (target_h, target_w) == (height, width):
        return
    for key in _DENSE_KEYS:
        if key not in data:
            continue
        tensor = data[key]
        padded = torch.full(
            (*tensor.shape[:-2], target_h, target_w), fills[key], dtype=tensor.dtype
        )
        padded[..., :height, :width] = tensor
        data[key] = padded


def _crop(data: dict[str, torch.Tensor], top: int, left: int, size: tuple[int, int]) -> None:
    for key in _DENSE_KEYS:
        if key in data:
            data[key] = data[key][..., top : top + size[0], left : left + size[1]].contiguous()


def _mirror(data: dict[str, torch.Tensor], raw_normals: bool, negate_normal_x: bool) -> None:
    for key in _DENSE_KEYS:
        if key in data:
            data[key] = data[key].flip(-1)
    if negate_normal_x and "normal" in data:
        normal = data["normal"].clone()
        if raw_normals:
            valid = data["normal_mask"]
            normal[0] = torch.where(valid, _RAW_NORMAL_INVALID - normal[0], normal[0])
        else:
            normal[0] = -normal[0]
        data["normal"] = normal


class TrainTransform:
    """The official random scale / mirror / pad / crop augmentation (see the module docstring).

    Args:
        crop: output size, an int or ``(height, width)``; outputs are exactly this size.
        scale: ``(low, high)`` of the uniform random scale, or None for no rescaling.
        mirror: random horizontal flip with probability 0.5.
        mean: image normalisation, one of :data:`MEANS`.
        ignore_index: label written into padded ``seg`` pixels.
        negate_normal_x: negate the normal's x component on mirrored samples (the official code
            does not; MTAN does).
        resize: the rescale's convention, one of :data:`recipes.resizing.RESIZE_MODES` (default
            ``"tf_legacy"``, the official code's).
        generator: default ``torch.Generator`` (a call's ``generator=`` wins; None = global RNG).

    Example:
        >>> import torch
        >>> raw = {"image": torch.zeros(30, 40, 3, dtype=torch.uint8),
        ...        "seg": torch.zeros(30, 40, dtype=torch.uint8)}
        >>> out = TrainTransform(crop=(21, 33))(raw, generator=torch.Generator().manual_seed(0))
        >>> tuple(out["image"].shape), tuple(out["seg"].shape)
        ((3, 21, 33), (21, 33))
    """

    def __init__(
        self,
        crop: int | tuple[int, int] = 321,
        scale: tuple[float, float] | None = (0.5, 1.5),
        mirror: bool = True,
        mean: str = "caffe_bgr",
        ignore_index: int = 255,
        negate_normal_x: bool = False,
        generator: torch.Generator | None = None,
        resize: str = "tf_legacy",
    ) -> None:
        self.crop = _pair(crop, "crop")
        self.resize = check_resize_mode(resize, "TrainTransform: resize")
        if scale is not None:
            low, high = (float(v) for v in scale)
            if not 0 < low <= high:
                raise ConfigError(f"scale={scale!r}: expected 0 < low <= high")
            scale = (low, high)
        self.scale = scale
        self.mirror = bool(mirror)
        self.mean = _check_mean(mean)
        self.ignore_index = int(ignore_index)
        self.negate_normal_x = bool(negate_normal_x)
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop={self.crop}, scale={self.scale}, mirror={self.mirror}, "
            f"mean={self.mean!r}, ignore_index={self.ignore_index}, "
            f"negate_normal_x={self.negate_normal_x}, resize={self.resize!r})"
        )

    def __call__(
        self, sample: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        rng = generator if generator is not None else self.generator
        data, raw_normals = _to_chw(sample, self.mean)
        height, width = _spatial_size(data)
        if self.scale is not None:
            low, high = self.scale
            factor = low + (high - low) * torch.rand((), generator=rng, dtype=torch.float32)
            new_size = (
                max(1, int(torch.tensor(float(height)) * factor)),
                max(1, int(torch.tensor(float(width)) * factor)),
            )
            if new_size != (height, width):
                _resize(data, new_size, self.resize)
        if self.mirror and bool(torch.rand((), generator=rng) < 0.5):
            _mirror(data, raw_normals, self.negate_normal_x)
        _pad_bottom_right(data, self.crop, _fills(raw_normals, self.ignore_index))
        padded_h, padded_w = _spatial_size(data)
        top = int(torch.randint(0, padded_h - self.crop[0] + 1, (), generator=rng))
        left = int(torch.randint(0, padded_w - self.crop[1] + 1, (), generator=rng))
        _crop(data, top, left, self.crop)
        return data


class EvalTransform:
    """Evaluation: normalise only (the official evaluation runs on the full 480×640 image).

    Args:
        mean: image normalisation, one of :data:`MEANS`.
        center_crop: optional int or ``(height, width)``: pad bottom/right up to it if smaller,
            then take the centred window of exactly that size.
        pad_to_multiple: optional int k: pad bottom/right so height and width are multiples of k.
        ignore_index: label written into padded ``seg`` pixels.

    Example:
        >>> import torch
        >>> raw = {"image": torch.zeros(5, 7, 3, dtype=torch.uint8),
        ...        "seg": torch.zeros(5, 7, dtype=torch.uint8)}
        >>> out = EvalTransform(pad_to_multiple=4)(raw)
        >>> tuple(out["seg"].shape), int(out["seg"][7, 7]), int(out["seg"][4, 6])
        ((8, 8), 255, 0)
    """

    def __init__(
        self,
        mean: str = "caffe_bgr",
        center_crop: int | tuple[int, int] | None = None,
        pad_to_multiple: int | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.mean = _check_mean(mean)
        self.center_crop = None if center_crop is None else _pair(center_crop, "center_crop")
        if pad_to_multiple is not None and (
            not isinstance(pad_to_multiple, int) or pad_to_multiple < 1
        ):
            raise ConfigError(f"pad_to_multiple={pad_to_multiple!r}: expected a positive int")
        self.pad_to_multiple = pad_to_multiple
        self.ignore_index = int(ignore_index)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(mean={self.mean!r}, center_crop={self.center_crop}, "
            f"pad_to_multiple={self.pad_to_multiple}, ignore_index={self.ignore_index})"
        )

    def __call__(
        self, sample: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        data, raw_normals = _to_chw(sample, self.mean)
        fills = _fills(raw_normals, self.ignore_index)
        if self.center_crop is not None:
            _pad_bottom_right(data, self.center_crop, fills)
            height, width = _spatial_size(data)
            top = (height - self.center_crop[0]) // 2
            left = (width - self.center_crop[1]) // 2
            _crop(data, top, left, self.center_crop)
        if self.pad_to_multiple is not None:
            height, width = _spatial_size(data)
            k = self.pad_to_multiple
            _pad_bottom_right(data, (-(-height // k) * k, -(-width // k) * k), fills)
        return data


class FaceTransform:
    """Face images (IMDB-WIKI): resize to ``resize``×``resize`` (bilinear, antialiased), then a
    ``size``×``size`` crop: random offsets and a random mirror when ``train``, centred otherwise
    (the usual VGG-16 protocol; the paper gives no details). Labels pass through.

    Example:
        >>> import torch
        >>> raw = {"image": torch.zeros(50, 40, 3, dtype=torch.uint8), "age": 30, "gender": 1}
        >>> out = FaceTransform(size=24, resize=32, train=True)(raw)
        >>> tuple(out["image"].shape), int(out["age"]), int(out["gender"])
        ((3, 24, 24), 30, 1)
    """

    def __init__(
        self,
        size: int = 224,
        resize: int = 256,
        train: bool = False,
        mirror: bool = True,
        mean: str = "caffe_bgr",
        generator: torch.Generator | None = None,
    ) -> None:
        if not (isinstance(size, int) and isinstance(resize, int) and 0 < size <= resize):
            raise ConfigError(f"size={size!r}, resize={resize!r}: expected 0 < size <= resize")
        self.size = size
        self.resize = resize
        self.train = bool(train)
        self.mirror = bool(mirror)
        self.mean = _check_mean(mean)
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"FaceTransform(size={self.size}, resize={self.resize}, train={self.train}, "
            f"mirror={self.mirror}, mean={self.mean!r})"
        )

    def __call__(
        self, sample: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        rng = generator if generator is not None else self.generator
        out = {
            key: (normalize_image(value, self.mean) if key == "image" else _as_tensor(value, key))
            for key, value in sample.items()
        }
        image = F.interpolate(
            out["image"][None],
            size=(self.resize, self.resize),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        margin = self.resize - self.size
        if self.train:
            top = int(torch.randint(0, margin + 1, (), generator=rng))
            left = int(torch.randint(0, margin + 1, (), generator=rng))
        else:
            top = left = margin // 2
        image = image[:, top : top + self.size, left : left + self.size]
        if self.train and self.mirror and bool(torch.rand((), generator=rng) < 0.5):
            image = image.flip(-1)
        out["image"] = image.contiguous()
        for key in ("age", "gender"):
            if key in out:
                out[key] = out[key].to(torch.int64)
        return out


class TransformedDataset(Dataset):
    """``base[i]`` passed through ``transform``.

    With ``seed=None`` the transform draws from its own generator or torch's global RNG. With an
    int ``seed`` sample ``i`` of epoch ``e`` uses ``sample_generator(seed, e, i)``: augmentation
    is a pure function of ``(seed, epoch, index)``, the same in any DataLoader worker and after a
    resume (call :meth:`set_epoch` before creating each epoch's iterator, as with
    ``DistributedSampler``).

    Example:
        >>> import torch
        >>> base = [{"image": torch.zeros(4, 4, 3, dtype=torch.uint8)}]
        >>> data = TransformedDataset(base, TrainTransform(crop=3), seed=0)
        >>> torch.equal(data[0]["image"], data[0]["image"]), len(data)
        (True, 1)
    """

    def __init__(
        self,
        base: Dataset | list,
        transform: Callable[..., dict[str, torch.Tensor]] | None,
        seed: int | None = None,
    ) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (only matters with ``seed``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.base[index]
        if self.transform is None:
            return sample
        if self.seed is None:
            return self.transform(sample)
        if index < 0:
            index += len(self)
        return self.transform(sample, generator=sample_generator(self.seed, self.epoch, index))

    def __repr__(self) -> str:
        return (
            f"TransformedDataset({type(self.base).__name__}(len={len(self)}), {self.transform!r}, "
            f"seed={self.seed})"
        )
