"""VGG-16 networks of the paper: :func:`deeplab_vgg16` (DeepLab-LargeFOV with BN, Tables 1–4, 6)
and :func:`vgg16_classifier` (Table 7), from torchvision parts (``weights=None``: no downloads).

Fusion points (``points="auto"``): pool1..pool5, ``features.6, .13, .23, .33, .44`` for DeepLab
VGG-16 with BN (``features.4, .9, .16, .23, .30`` for the classifier).

Example:
    >>> import torch
    >>> tuple(deeplab_vgg16(40)(torch.randn(1, 3, 65, 65)).shape)
    (1, 40, 9, 9)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.models import vgg

from .nets_common import OFFICIAL_BN_EPS, OFFICIAL_BN_MOMENTUM, check_num_outputs
from .tf_pooling import use_tf_same_pooling

__all__ = ["DeepLabVGG", "deeplab_vgg16", "vgg16_classifier"]


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
    num_outputs: int,
    *,
    batch_norm: bool = True,
    official_bn: bool = True,
    tf_same_pooling: bool = False,
) -> DeepLabVGG:
    """DeepLab-LargeFOV VGG-16 (with BN after every conv, as the official NDDR code).

    ``features`` is torchvision's ``vgg16_bn`` (``vgg16`` without BN) feature stack with the
    module indices kept, so a torchvision ImageNet state dict loads into it unchanged:

    * pool1–pool3: 3×3 max pool, stride 2, padding 1. This is TF ``'SAME'`` pooling:
      ``ceil(H/2)`` rows (321 → 161 → 81 → 41). For odd sizes (the paper's 321 crops) the
      windows are TF's too; for even sizes TF pads only at the end, so values may shift by one
      pixel while the size stays ``H/2`` (``tf_same_pooling=True`` pools as TF there).
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
        tf_same_pooling: pool1–pool5's max pools pad as TF ``'SAME'``
            (:class:`~recipes.tf_pooling.TFSameMaxPool2d`): the official code's windows at even
            sizes too (480×640 evaluation). Odd sizes, e.g. the 321 crops, give the same values
            either way; the module indices, shapes and fusion points are unchanged.

    Returns:
        A :class:`DeepLabVGG`; output stride 8 (a 321×321 input gives 41×41 outputs).

    Example:
        >>> import torch
        >>> model = deeplab_vgg16(3)
        >>> tuple(model(torch.randn(2, 3, 65, 65)).shape)
        (2, 3, 9, 9)
    """
    check_num_outputs(num_outputs, "deeplab_vgg16")
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
    if tf_same_pooling:
        use_tf_same_pooling(model.features)
    return model


def vgg16_classifier(
    num_classes: int, *, batch_norm: bool = False, tf_same_pooling: bool = False
) -> nn.Module:
    """torchvision ``vgg16`` (``vgg16_bn`` with ``batch_norm=True``) whose last Linear
    (``classifier.6``) has ``num_classes`` outputs: 100 ages (0..99) or 2 genders.
    ``tf_same_pooling`` swaps its 2×2 max pools for TF ``'SAME'`` ones (the same at even sizes).

    Example:
        >>> vgg16_classifier(100).classifier[6]
        Linear(in_features=4096, out_features=100, bias=True)
    """
    check_num_outputs(num_classes, "vgg16_classifier")
    base = torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16
    model = base(weights=None, num_classes=num_classes)
    if tf_same_pooling:
        use_tf_same_pooling(model.features)
    return model
