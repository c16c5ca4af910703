"""The paper's single-task networks by name, and loading local weight files.

The networks live in flat modules beside this one (all names are re-exported here):

* :mod:`recipes.nets_vgg` — :func:`deeplab_vgg16`, DeepLab-LargeFOV VGG-16 with BatchNorm, as the
  official NDDR code (Tables 1–4, 6; output stride 8, a 321×321 crop gives 41×41), and
  :func:`vgg16_classifier`, VGG-16 with a 100-way (age) or 2-way (gender) classifier (Table 7);
* :mod:`recipes.nets_resnet` — :func:`deeplab_resnet101`, dilated ResNet-101 (output stride 8)
  with an ASPP head (Table 5), in DeepLab v2's Caffe layout or torchvision's;
* :mod:`recipes.nets_alexnet` — :func:`alexnet_fcn32s`, AlexNet FCN-32s as in cross-stitch
  networks (Table A1), Caffe's AlexNet or torchvision's;
* :mod:`recipes.tf_pooling` — TF ``'SAME'`` max pooling (``tf_same_pooling=True``).

Every model is a plain ``nn.Module`` that :func:`nddrify.fuse` traces as is; ``points="auto"``
picks the paper's fusion points (pool1..pool5 for the VGGs: ``features.6, .13, .23, .33, .44``
for DeepLab VGG-16; the stem's ``backbone.maxpool`` and ``backbone.layer1..layer4`` for the ResNet;
AlexNet's three pools — the cross-stitch placement pool1, pool2, conv3, conv4, pool5 is
``features.2, .5, .7, .9, .12`` in torchvision's layout, ``features.pool1, .pool2, .relu3, .relu4,
.pool5`` in Caffe's). :data:`MODELS` names the builders (the ``_caffe`` entries are the paper's
layouts), :data:`HEAD_NAMES` the final classifier modules that train at 10× (weights) and 20×
(biases) the base lr, :func:`model_options` the builder options a recipe config selects.
:func:`load_pretrained` loads local weight files (ImageNet-style torchvision state dicts,
Caffe-named conversions, or single-task checkpoints) by name and shape.

Example:
    >>> import torch
    >>> model = build_model("deeplab_vgg16", 40)
    >>> tuple(model(torch.randn(1, 3, 65, 65)).shape)
    (1, 40, 9, 9)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from .nets_alexnet import BilinearUpsample, FCN32s, alexnet_fcn32s, caffe_alexnet_features
from .nets_common import OFFICIAL_BN_EPS, OFFICIAL_BN_MOMENTUM, freeze_batch_norm
from .nets_resnet import ASPPv2, DeepLabResNet, caffe_layer_names, deeplab_resnet101
from .nets_vgg import DeepLabVGG, deeplab_vgg16, vgg16_classifier
from .tf_pooling import TFSameMaxPool2d, use_tf_same_pooling

__all__ = [
    "DeepLabVGG",
    "DeepLabResNet",
    "ASPPv2",
    "FCN32s",
    "BilinearUpsample",
    "TFSameMaxPool2d",
    "deeplab_vgg16",
    "deeplab_resnet101",
    "alexnet_fcn32s",
    "vgg16_classifier",
    "load_weights_only",
    "caffe_alexnet_features",
    "caffe_layer_names",
    "freeze_batch_norm",
    "use_tf_same_pooling",
    "MODELS",
    "HEAD_NAMES",
    "TF_SAME_OFFICIAL",
    "build_model",
    "model_options",
    "load_pretrained",
    "read_state_dict",
    "OFFICIAL_BN_EPS",
    "OFFICIAL_BN_MOMENTUM",
]


def _named(builder: Callable[..., nn.Module], name: str, **fixed: Any) -> Callable[..., nn.Module]:
    """``builder`` with some options fixed (a registry entry of its own)."""
    made = functools.partial(builder, **fixed)
    made.__name__ = name  # type: ignore[attr-defined]
    made.__doc__ = (
        f"{builder.__name__}(num_outputs, {', '.join(f'{k}={v!r}' for k, v in fixed.items())}, ...)"
    )
    return made


#: Model builders by name: ``build_model(name, num_outputs, **options)``.
#: ``deeplab_resnet101_caffe`` is DeepLab v2's ResNet-101 (Caffe layout, frozen BN: Table 5) and
#: ``alexnet_fcn32s_caffe`` FCN's Caffe AlexNet (Table A1); the names without ``_caffe`` are the
#: torchvision layouts.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplab_vgg16": deeplab_vgg16,
    "deeplab_resnet101": deeplab_resnet101,
    "deeplab_resnet101_caffe": _named(
        deeplab_resnet101, "deeplab_resnet101_caffe", layout="caffe", frozen_bn=True
    ),
    "alexnet_fcn32s": alexnet_fcn32s,
    "alexnet_fcn32s_caffe": _named(alexnet_fcn32s, "alexnet_fcn32s_caffe", layout="caffe"),
    "vgg16_classifier": vgg16_classifier,
}

#: The final classifier module(s) of each model (10× weight / 20× bias lr, official DeepLab
#: convention); pass as ``nddrify.param_groups(..., head=HEAD_NAMES[name])``.
HEAD_NAMES: dict[str, list[str]] = {
    "deeplab_vgg16": ["head.fc8"],
    "deeplab_resnet101": ["head.classifier"],
    "deeplab_resnet101_caffe": ["head.classifier"],
    "alexnet_fcn32s": ["head.score"],
    "alexnet_fcn32s_caffe": ["head.score"],
    "vgg16_classifier": ["classifier.6"],
}


def build_model(name: str, num_outputs: int, **options: Any) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS`.

    Example:
        >>> build_model("deeplab_vgg16", 3).head.fc8.out_channels
        3
    """
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is not known; choose one of {sorted(MODELS)}.")
    return MODELS[name](num_outputs, **options)


#: The models whose official code pools as TF ``'SAME'`` (``tf_same_pooling="auto"`` turns it on):
#: DeepLab VGG-16 (the official NDDR TF code). AlexNet FCN-32s and DeepLab v2's ResNet-101 are
#: Caffe networks (pools rounding up), so ``auto`` keeps their pools.
TF_SAME_OFFICIAL = frozenset({"deeplab_vgg16"})


def model_options(model: str, tf_same_pooling: str = "auto") -> dict[str, Any]:
    """The :func:`build_model` options that recipe config fields select for ``model``.

    ``tf_same_pooling`` (the config field): ``"on"`` / ``"off"``, or ``"auto"`` — on for the
    models in :data:`TF_SAME_OFFICIAL`. Models not in :data:`MODELS` get no options.

    Example:
        >>> model_options("deeplab_vgg16"), model_options("alexnet_fcn32s_caffe")
        ({'tf_same_pooling': True}, {'tf_same_pooling': False})
        >>> model_options("alexnet_fcn32s_caffe", "on"), model_options("demo_cnn", "on")
        ({'tf_same_pooling': True}, {})
    """
    if model not in MODELS:
        return {}
    if tf_same_pooling not in ("auto", "on", "off"):
        raise ConfigError(f"tf_same_pooling={tf_same_pooling!r}: use auto, on or off.")
    on = tf_same_pooling == "on" or (tf_same_pooling == "auto" and model in TF_SAME_OFFICIAL)
    return {"tf_same_pooling": on}


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load a local state-dict file into ``model`` wherever name and shape match.

    The file (read with ``weights_only=True``) holds a state dict — e.g. torchvision's
    ``vgg16_bn`` ImageNet weights, or a single-task checkpoint — or a dict holding one under
    ``"state_dict"`` or ``"model"``. Models with an ``adapt_state_dict`` (:class:`FCN32s`,
    :class:`DeepLabResNet`) map foreign layouts first (AlexNet fc6/fc7 → convs, torchvision or
    Caffe layer names). DeepLab's fc6 is not derived from an
    ImageNet fc6 (the original subsamples it); it stays at its init.

    Returns:
        The model's state-dict keys that were not loaded (missing from the file or of another
        shape), in model order.

    Raises:
        DatasetNotFoundError: ``path`` does not exist.
        DatasetFormatError: the file holds no state dict.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/weights.pt"
        >>> torch.save(torch.nn.Conv2d(3, 8, 1).state_dict(), path)
        >>> load_pretrained(torch.nn.Conv2d(3, 4, 1), path)  # other shapes: nothing loaded
        ['weight', 'bias']
    """
    state = read_state_dict(
        path,
        "pretrained weights",
        "pass the path of a local state-dict file (e.g. torch.save(torchvision.models.vgg16_bn("
        "weights=...).state_dict(), path) on a machine with downloads, or a single-task checkpoint)",
    )
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state = adapt(state)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    return [k for k in own if k not in matched]


def load_weights_only(path: str, what: str, advice: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a :class:`DatasetFormatError` naming
    ``what`` and ``advice`` when it fails (torch's own text, which may advise
    ``weights_only=False``, is cut to its first sentence).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"w": torch.ones(1)}, path)
        >>> load_weights_only(path, "weights", "re-save it")["w"].tolist()
        [1.0]
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().split("\n")[0].split(". ")[0]
        raise DatasetFormatError(
            f"{what} {path!r} could not be read as a weights-only torch file "
            f"({type(error).__name__}: {reason}); {advice}."
        ) from None


def read_state_dict(
    path: str | os.PathLike[str], what: str, missing_hint: str
) -> Mapping[str, torch.Tensor]:
    """Read a state dict (names → tensors) from a local file with ``weights_only=True``; one held
    under ``"state_dict"`` or ``"model"`` (a training checkpoint) is unwrapped.

    ``what`` names the file in errors (``"pretrained weights"``); ``missing_hint`` says how to get
    it when it does not exist.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/ckpt.pt"
        >>> torch.save({"model": torch.nn.Linear(2, 1).state_dict(), "step": 3}, path)
        >>> sorted(read_state_dict(path, "weights", "train first"))
        ['bias', 'weight']
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{what} {path!r} does not exist: {missing_hint}.")
    obj = load_weights_only(
        path,
        what,
        "it may be truncated, another kind of file, or hold Python objects a safe load refuses: "
        "re-export it as a plain state dict (torch.save(model.state_dict(), path))",
    )
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise DatasetFormatError(
            f"{what} {path!r} hold no state dict (a mapping of names to tensors, possibly under "
            "'state_dict' or 'model')."
        )
    return obj
