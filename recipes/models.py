"""The paper's single-task networks, built from torchvision parts (``weights=None``: no downloads).

* :func:`deeplab_vgg16` — DeepLab-LargeFOV VGG-16 with BatchNorm, as the official NDDR code
  (Tables 1–4, 6); output stride 8, a 321×321 crop gives 41×41.
* :func:`deeplab_resnet101` — dilated ResNet-101 (output stride 8) with an ASPP head (Table 5).
* :func:`alexnet_fcn32s` — AlexNet FCN-32s as in cross-stitch networks (Table A1).
* :func:`vgg16_classifier` — VGG-16 with a 100-way (age) or 2-way (gender) classifier (Table 7).

Every model is a plain ``nn.Module`` that :func:`nddrify.fuse` traces as is; ``points="auto"``
picks the paper's fusion points (pool1..pool5 for the VGGs: ``features.6, .13, .23, .33, .44``
for DeepLab VGG-16; the stem's ``backbone.maxpool`` and ``backbone.layer1..layer4`` for the ResNet;
AlexNet's three pools — the cross-stitch placement pool1, pool2, conv3, conv4, pool5 is
``features.2, .5, .7, .9, .12``). :data:`HEAD_NAMES` lists the final classifier modules that train at 10× (weights) and
20× (biases) the base lr. :func:`load_pretrained` loads local weight files (ImageNet-style
torchvision state dicts or single-task checkpoints) by name and shape.

Example:
    >>> import torch
    >>> model = build_model("deeplab_vgg16", 40)
    >>> tuple(model(torch.randn(1, 3, 65, 65)).shape)
    (1, 40, 9, 9)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import vgg
from torchvision.models.segmentation.deeplabv3 import ASPP

from .errors import ConfigError, DatasetFormatError, DatasetNotFoundError

__all__ = [
    "DeepLabVGG",
    "DeepLabResNet",
    "ASPPv2",
    "FCN32s",
    "BilinearUpsample",
    "deeplab_vgg16",
    "deeplab_resnet101",
    "alexnet_fcn32s",
    "vgg16_classifier",
    "MODELS",
    "HEAD_NAMES",
    "build_model",
    "load_pretrained",
    "read_state_dict",
    "OFFICIAL_BN_EPS",
    "OFFICIAL_BN_MOMENTUM",
]

#: BatchNorm settings of the official TF/slim code: decay 0.95 (PyTorch momentum 0.05), eps 1e-3.
OFFICIAL_BN_EPS = 1e-3
OFFICIAL_BN_MOMENTUM = 0.05


class DeepLabVGG(nn.Module):
    """DeepLab-LargeFOV VGG-16: ``features`` (the modified torchvision VGG features) → ``head``.

    Built by :func:`deeplab_vgg16`; ``head.fc8`` is the classifier.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def deeplab_vgg16(
    num_outputs: int, *, batch_norm: bool = True, official_bn: bool = True
) -> DeepLabVGG:
    """DeepLab-LargeFOV VGG-16 (with BN after every conv, as the official NDDR code).

    ``features`` is torchvision's ``vgg16_bn`` (``vgg16`` without BN) feature stack with the
    module indices kept, so a torchvision ImageNet state dict loads into it unchanged:

    * pool1–pool3: 3×3 max pool, stride 2, padding 1. This is TF ``'SAME'`` pooling:
      ``ceil(H/2)`` rows (321 → 161 → 81 → 41). For odd sizes (the paper's 321 crops) the
      windows are TF's too; for even sizes TF pads only at the end, so values may shift by one
      pixel while the size stays ``H/2``.
    * pool4: 3×3 max pool, stride 1, padding 1; conv5_1..conv5_3: dilation 2, padding 2.
    * pool5: 3×3 stride-1 max pool (``features.43``; ``.30`` without BN) followed by a 3×3
      stride-1 average pool (``features.44``; ``.31``) that, like TF ``'SAME'``, averages over
      the valid pixels only (``count_include_pad=False``).

    ``head``: ``fc6`` 3×3 conv, dilation 12 → 1024, BN, ReLU, Dropout(0.5); ``fc7`` 1×1 → 1024,
    BN, ReLU, Dropout(0.5); ``fc8`` 1×1 → ``num_outputs`` with bias (no BN, no activation). With
    BN, fc6/fc7 have no bias (slim drops it when a normalizer follows); head init is Xavier
    uniform with zero biases (the official arg scope). The conv1_1..conv5_3 convs keep
    torchvision's biases so ImageNet ``vgg16_bn`` weights load (4,224 parameters more than slim).

    Args:
        num_outputs: output channels (40 NYUv2 classes, 3 for surface normals).
        batch_norm: BN after every conv (official NDDR code); ``False`` gives the original
            DeepLab-LargeFOV (``vgg16`` features, biased fc6/fc7, no BN).
        official_bn: set every BN to the official eps 1e-3 and momentum 0.05 (PyTorch's
            defaults are 1e-5 and 0.1).

    Returns:
        A :class:`DeepLabVGG`; output stride 8 (a 321×321 input gives 41×41 outputs).

    Example:
        >>> import torch
        >>> model = deeplab_vgg16(3)
        >>> tuple(model(torch.randn(2, 3, 65, 65)).shape)
        (2, 3, 9, 9)
    """
    _check_outputs(num_outputs, "deeplab_vgg16")
    # torchvision's own VGG-16 feature builder (config "D"), with torchvision's conv init; the
    # classifier is never built (it would cost 120M parameters of init for nothing).
    layers = list(vgg.make_layers(vgg.cfgs["D"], batch_norm=batch_norm))
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    for stage, index in enumerate(pools):
        stride = 2 if stage < 3 else 1
        layers[index] = nn.MaxPool2d(3, stride=stride, padding=1)
    for index in range(pools[3] + 1, pools[4]):
        if isinstance(layers[index], nn.Conv2d):
            layers[index].dilation = (2, 2)
            layers[index].padding = (2, 2)
    layers.append(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False))
    features = nn.Sequential(*layers)

    head_layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, in_channels, kernel, dilation in (("6", 512, 3, 12), ("7", 1024, 1, 1)):
        head_layers[f"fc{name}"] = nn.Conv2d(
            in_channels,
            1024,
            kernel,
            padding=dilation if kernel == 3 else 0,
            dilation=dilation,
            bias=not batch_norm,
        )
        if batch_norm:
            head_layers[f"bn{name}"] = nn.BatchNorm2d(1024)
        head_layers[f"relu{name}"] = nn.ReLU(inplace=True)
        head_layers[f"drop{name}"] = nn.Dropout(0.5)
    head_layers["fc8"] = nn.Conv2d(1024, num_outputs, 1)
    head = nn.Sequential(head_layers)
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    model = DeepLabVGG(features, head)
    if batch_norm and official_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps, module.momentum = OFFICIAL_BN_EPS, OFFICIAL_BN_MOMENTUM
    return model


class ASPPv2(nn.Module):
    """DeepLab v2 ASPP-L: parallel 3×3 convs with dilations ``rates`` straight to the outputs,
    summed. ``classifier`` holds the branch convs (all of them are the final classifier)."""

    def __init__(
        self, in_channels: int, num_outputs: int, rates: tuple[int, ...] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.classifier = nn.ModuleList(
            nn.Conv2d(in_channels, num_outputs, 3, padding=rate, dilation=rate) for rate in rates
        )
        for conv in self.classifier:
            nn.init.normal_(conv.weight, std=0.01)  # DeepLab v2's Gaussian init
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier[0](x)
        for branch in self.classifier[1:]:
            out = out + branch(x)
        return out


class DeepLabResNet(nn.Module):
    """``backbone`` (a torchvision ResNet's stem and stages, without global pool and ``fc``)
    followed by ``head``.

    The stages sit in ``backbone`` (``backbone.layer1`` …), as in torchvision's own segmentation
    models: that keeps the head out of the backbone's stage list for ``points="auto"``.
    :meth:`adapt_state_dict` lets :func:`load_pretrained` take a plain torchvision ResNet state
    dict (``layer1.0.conv1.weight`` → ``backbone.layer1.0.conv1.weight``).
    """

    def __init__(self, resnet: torchvision.models.ResNet, head: nn.Module) -> None:
        super().__init__()
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prefix a torchvision ResNet's keys with ``backbone.`` (its ``fc`` is dropped)."""
        own = self.state_dict()
        return {
            (f"backbone.{k}" if k not in own and f"backbone.{k}" in own else k): v
            for k, v in state.items()
        }


def deeplab_resnet101(
    num_outputs: int, *, aspp: str = "v2", rates: tuple[int, ...] | None = None
) -> DeepLabResNet:
    """DeepLab ResNet-101: torchvision ``resnet101`` with ``replace_stride_with_dilation=[False,
    True, True]`` (layer3 dilation 2, layer4 dilation 4: output stride 8, 321 → 41) and an ASPP
    head whose final conv(s) are ``head.classifier``.

    Args:
        num_outputs: output channels (40 classes, 3 for normals).
        aspp: ``"v2"`` (default) — DeepLab v2 ASPP-L, the head of the paper's DeepLab reference:
            four 3×3 convs 2048 → ``num_outputs`` with dilation 6, 12, 18, 24, outputs summed
            (:class:`ASPPv2`); ``"v3"`` — torchvision's DeepLab v3 ASPP (1×1 + three dilated 3×3
            + image pooling, 256 channels each, rates 12/24/36 for output stride 8), then 3×3 conv
            256, BN, ReLU and the 1×1 ``classifier``.
        rates: override the dilation rates.

    Differences to DeepLab v2's Caffe ResNet-101: torchvision's bottlenecks stride in the 3×3
    conv (ResNet v1.5), the first block of a dilated stage keeps the previous stage's dilation
    (torchvision's rule), and BN is trainable here (freeze it in the training loop if wanted).

    Example:
        >>> import torch
        >>> head = ASPPv2(2048, 40)  # the default head, on its own
        >>> tuple(head(torch.randn(1, 2048, 5, 5)).shape)
        (1, 40, 5, 5)
    """
    _check_outputs(num_outputs, "deeplab_resnet101")
    resnet = torchvision.models.resnet101(
        weights=None, replace_stride_with_dilation=[False, True, True]
    )
    head: nn.Module
    if aspp == "v2":
        head = ASPPv2(2048, num_outputs, rates or (6, 12, 18, 24))
    elif aspp == "v3":
        classifier = nn.Conv2d(256, num_outputs, 1)
        head = nn.Sequential(
            OrderedDict(
                aspp=ASPP(2048, list(rates or (12, 24, 36)), 256),
                conv=nn.Conv2d(256, 256, 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(256),
                relu=nn.ReLU(inplace=True),
                classifier=classifier,
            )
        )
    else:
        raise ConfigError(f"deeplab_resnet101: aspp={aspp!r} is not known; use 'v2' or 'v3'.")
    return DeepLabResNet(resnet, head)


class BilinearUpsample(nn.Module):
    """FCN's fixed ×``factor`` upsampling: a transposed conv with a bilinear kernel (size
    ``2·factor − 1``, not trained: a buffer), one channel at a time, cropped to the input size
    at ``offset``.

    With the odd kernel, score pixel ``j`` sits at upsampled row ``factor·j + factor − 1`` and
    every output between two score pixels is their exact linear interpolation; outside the
    first and last score pixels only one contributes, so values fade towards the border (as in
    FCN; an argmax or a normal's direction is unchanged by it).
    """

    kernel: torch.Tensor

    def __init__(self, channels: int, factor: int = 32, offset: int = 10) -> None:
        super().__init__()
        self.factor, self.offset = factor, offset
        size = 2 * factor - 1
        ramp = 1 - (torch.arange(size, dtype=torch.float32) - (factor - 1)).abs() / factor
        kernel = torch.outer(ramp, ramp).expand(channels, 1, size, size).clone()
        self.register_buffer("kernel", kernel)

    def forward(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        up = F.conv_transpose2d(
            scores, self.kernel.to(scores.dtype), stride=self.factor, groups=scores.shape[1]
        )
        height, width = image.shape[-2], image.shape[-1]
        return up[:, :, self.offset : self.offset + height, self.offset : self.offset + width]


class FCN32s(nn.Module):
    """AlexNet FCN-32s: ``features`` (torchvision AlexNet features, conv1 padding 100, pools in
    ceil mode as Caffe) → ``head`` (fc6 6×6 conv 4096, fc7 1×1 4096, ``score``) → ×32 bilinear
    upsampling cropped to the input size."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, upsample: BilinearUpsample):
        super().__init__()
        self.features = features
        self.head = head
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.head(self.features(x)), x)

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a torchvision ``alexnet`` state dict's fc6/fc7 (``classifier.1``/``.4``) onto the
        convolutional ``head.fc6``/``head.fc7`` (FCN's "convolutionalisation")."""
        adapted = dict(state)
        for linear, conv, kernel in (
            ("classifier.1", "head.fc6", 6),
            ("classifier.4", "head.fc7", 1),
        ):
            weight = adapted.pop(f"{linear}.weight", None)
            bias = adapted.pop(f"{linear}.bias", None)
            if (
                weight is not None
                and weight.dim() == 2
                and weight.shape[1] % (kernel * kernel) == 0
            ):
                channels = weight.shape[1] // (kernel * kernel)
                adapted[f"{conv}.weight"] = weight.reshape(
                    weight.shape[0], channels, kernel, kernel
                )
                if bias is not None:
                    adapted[f"{conv}.bias"] = bias
        return adapted


def alexnet_fcn32s(num_outputs: int) -> FCN32s:
    """AlexNet FCN-32s (Long et al.; the cross-stitch paper's pixel-task network, Table A1).

    Following Caffe's ``fcn-alexnet``: conv1 pads 100 pixels (so any input size works), the max
    pools round up (``ceil_mode=True``), fc6/fc7 become 6×6 and 1×1 convs, ``head.score`` is a 1×1
    conv to ``num_outputs`` (zero init, as FCN), and a fixed bilinear ×32 upsampling is cropped to
    the input size at offset 10 — score pixel ``j`` is centred on input row ``32·j + 21`` (conv1
    stride 4 pad 100, three stride-2 pools, 6×6 fc6), i.e. upsampled row ``32·j + 31``.

    Example:
        >>> import torch
        >>> tuple(alexnet_fcn32s(3)(torch.randn(1, 3, 65, 70)).shape)
        (1, 3, 65, 70)
    """
    _check_outputs(num_outputs, "alexnet_fcn32s")
    with torch.device("meta"):  # skip initialising torchvision's 58M-parameter classifier
        features = torchvision.models.alexnet(weights=None).features
    features = features.to_empty(device="cpu")
    for module in features:
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()  # torchvision's AlexNet keeps PyTorch's default init
    features[0].padding = (100, 100)
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    head = nn.Sequential(
        OrderedDict(
            fc6=nn.Conv2d(256, 4096, 6),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(0.5),
            fc7=nn.Conv2d(4096, 4096, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout(0.5),
            score=nn.Conv2d(4096, num_outputs, 1),
        )
    )
    nn.init.zeros_(head.score.weight)
    nn.init.zeros_(head.score.bias)
    return FCN32s(features, head, BilinearUpsample(num_outputs, factor=32, offset=10))


def vgg16_classifier(num_classes: int, *, batch_norm: bool = False) -> nn.Module:
    """torchvision ``vgg16`` (``vgg16_bn`` with ``batch_norm=True``) whose last Linear
    (``classifier.6``) has ``num_classes`` outputs: 100 ages (0..99) or 2 genders.

    Example:
        >>> vgg16_classifier(100).classifier[6]
        Linear(in_features=4096, out_features=100, bias=True)
    """
    _check_outputs(num_classes, "vgg16_classifier")
    base = torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16
    return base(weights=None, num_classes=num_classes)


def _check_outputs(num_outputs: Any, model: str) -> None:
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(
            f"{model}: num_outputs must be a positive int (e.g. 40 classes, 3 normal channels), "
            f"got {num_outputs!r}."
        )


#: Model builders by name: ``build_model(name, num_outputs, **options)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "deeplab_vgg16": deeplab_vgg16,
    "deeplab_resnet101": deeplab_resnet101,
    "alexnet_fcn32s": alexnet_fcn32s,
    "vgg16_classifier": vgg16_classifier,
}

#: The final classifier module(s) of each model (10× weight / 20× bias lr, official DeepLab
#: convention); pass as ``nddrify.param_groups(..., head=HEAD_NAMES[name])``.
HEAD_NAMES: dict[str, list[str]] = {
    "deeplab_vgg16": ["head.fc8"],
    "deeplab_resnet101": ["head.classifier"],
    "alexnet_fcn32s": ["head.score"],
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


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load a local state-dict file into ``model`` wherever name and shape match.

    The file (read with ``weights_only=True``) holds a state dict — e.g. torchvision's
    ``vgg16_bn`` ImageNet weights, or a single-task checkpoint — or a dict holding one under
    ``"state_dict"`` or ``"model"``. Models with an ``adapt_state_dict`` (:class:`FCN32s`) map
    foreign layouts first (AlexNet fc6/fc7 → convs). DeepLab's fc6 is not derived from an
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
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's own text may advise weights_only=False: keep its first sentence only
        reason = str(error).strip().split("\n")[0].split(". ")[0]
        raise DatasetFormatError(
            f"{what} {path!r} could not be read as a weights-only torch file "
            f"({type(error).__name__}: {reason}); it may be truncated, another kind of file, or "
            "hold Python objects a safe load refuses: re-export it as a plain state dict "
            "(torch.save(model.state_dict(), path))."
        ) from None
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
