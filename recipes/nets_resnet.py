"""DeepLab ResNet-101 (paper Table 5): a dilated ResNet-101 (output stride 8) with an ASPP head,
built from torchvision's ResNet (``weights=None``: no downloads).

Two layouts (:func:`deeplab_resnet101`'s ``layout``):

* ``"caffe"`` — DeepLab v2's Caffe ResNet-101 (the paper's; ``deeplab_resnet101_caffe`` in
  :data:`recipes.models.MODELS`, with frozen BatchNorm): ResNet v1 blocks that stride in their
  first 1×1 conv (``layer2.0.conv1``), every block of ``layer3`` dilated 2 and of ``layer4``
  dilated 4, pool1 rounding up as Caffe;
* ``"torchvision"`` — torchvision's ResNet v1.5 blocks (stride in the 3×3 conv) with
  ``replace_stride_with_dilation`` (the first block of a dilated stage keeps the previous
  stage's dilation); ``deeplab_resnet101``.

Both have the same parameters (a torchvision ImageNet state dict loads into either) and the same
fusion points: ``backbone.maxpool`` and ``backbone.layer1..layer4`` (Caffe ``pool1``, ``res2c``,
``res3b3``, ``res4b22``, ``res5c``: :func:`caffe_layer_names`).

Example:
    >>> import torch
    >>> model = deeplab_resnet101(40, layout="caffe")
    >>> model.backbone.layer2[0].conv1.stride, model.backbone.layer2[0].conv2.stride
    ((2, 2), (1, 1))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from .errors import ConfigError
from .nets_common import check_num_outputs, freeze_batch_norm
from .tf_pooling import use_tf_same_pooling

__all__ = [
    "ASPPv2",
    "DeepLabResNet",
    "deeplab_resnet101",
    "caffe_layer_names",
    "RESNET101_BLOCKS",
]

#: Bottleneck blocks per stage of ResNet-101 (layer1..layer4; Caffe res2..res5).
RESNET101_BLOCKS = (3, 4, 23, 3)


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
    :meth:`adapt_state_dict` lets :func:`~recipes.models.load_pretrained` take a plain
    torchvision ResNet state dict (``layer1.0.conv1.weight`` → ``backbone.layer1.0.conv1.weight``)
    or one keyed by DeepLab v2's Caffe layer names (``res2a_branch2a.weight``,
    ``bn2a_branch2a.running_mean``, ``scale2a_branch2a.bias``, ``fc1_voc12_c0.weight``:
    :func:`caffe_layer_names`).
    """

    def __init__(self, resnet: torchvision.models.ResNet, head: nn.Module) -> None:
        super().__init__()
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in names))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prefix a torchvision ResNet's keys with ``backbone.`` (its ``fc`` is dropped) and
        rename Caffe-named keys (``<caffe layer>.<weight|bias|running_mean|running_var>``)."""
        own = self.state_dict()
        classifier = getattr(self.head, "classifier", None)
        caffe = caffe_layer_names(len(classifier) if isinstance(classifier, nn.ModuleList) else 0)
        adapted = {}
        for key, value in state.items():
            layer, _, param = key.rpartition(".")
            if key not in own and f"backbone.{key}" in own:
                key = f"backbone.{key}"
            elif key not in own and layer in caffe:
                key = f"{caffe[layer]}.{param}"
            adapted[key] = value
        return adapted


def deeplab_resnet101(
    num_outputs: int,
    *,
    aspp: str = "v2",
    rates: tuple[int, ...] | None = None,
    layout: str = "torchvision",
    frozen_bn: bool = False,
    tf_same_pooling: bool = False,
) -> DeepLabResNet:
    """DeepLab ResNet-101: a ResNet-101 with layer3 dilated 2 and layer4 dilated 4 (output
    stride 8, 321 → 41) and an ASPP head whose final conv(s) are ``head.classifier``.

    Args:
        num_outputs: output channels (40 classes, 3 for normals).
        aspp: ``"v2"`` (default) — DeepLab v2 ASPP-L, the head of the paper's DeepLab reference:
            four 3×3 convs 2048 → ``num_outputs`` with dilation 6, 12, 18, 24, outputs summed
            (:class:`ASPPv2`); ``"v3"`` — torchvision's DeepLab v3 ASPP (1×1 + three dilated 3×3
            + image pooling, 256 channels each, rates 12/24/36 for output stride 8), then 3×3 conv
            256, BN, ReLU and the 1×1 ``classifier``.
        rates: override the dilation rates.
        layout: ``"torchvision"`` — torchvision's ``resnet101(replace_stride_with_dilation=
            [False, True, True])``: ResNet v1.5 blocks (``layer2.0`` strides in its 3×3
            ``conv2``), ``layer3.0`` dilation 1 and ``layer4.0`` dilation 2 (a dilated stage's
            first block keeps the previous dilation), the rest 2 and 4. ``"caffe"`` — DeepLab
            v2's Caffe ResNet-101 (ResNet v1): ``layer2.0`` strides in its first 1×1 ``conv1``
            (Caffe ``res3a_branch2a``), every 3×3 of ``layer3`` has dilation 2 and of ``layer4``
            dilation 4 (``res4a``–``res4b22``, ``res5a``–``res5c``), and pool1 rounds up
            (``ceil_mode``, Caffe's pooling; 321 → 161 → 81 as DeepLab's 41×41 output needs).
            The parameters are the same.
        frozen_bn: the backbone's BatchNorms become ``FrozenBatchNorm2d``
            (:func:`~recipes.nets_common.freeze_batch_norm`): statistics and scale/shift fixed,
            as DeepLab v2 (``use_global_stats``, Scale ``lr_mult: 0``; its TF port trains no
            beta/gamma either). They stay in the state dict (as buffers) but are not parameters.
        tf_same_pooling: the stem's max pool pads as TF ``'SAME'`` (not DeepLab v2's: Caffe).

    Example:
        >>> import torch
        >>> head = ASPPv2(2048, 40)  # the default head, on its own
        >>> tuple(head(torch.randn(1, 2048, 5, 5)).shape)
        (1, 40, 5, 5)
    """
    check_num_outputs(num_outputs, "deeplab_resnet101")
    if layout not in ("torchvision", "caffe"):
        raise ConfigError(
            f"deeplab_resnet101: layout={layout!r} is not known; use 'torchvision' or 'caffe'."
        )
    resnet = torchvision.models.resnet101(
        weights=None, replace_stride_with_dilation=[False, True, True]
    )
    if layout == "caffe":
        first = resnet.layer2[0]
        first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
        for stage, dilation in ((resnet.layer3, 2), (resnet.layer4, 4)):
            for block in stage:
                block.conv2.dilation = block.conv2.padding = (dilation, dilation)
        resnet.maxpool.ceil_mode = True
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
    model = DeepLabResNet(resnet, head)
    if frozen_bn:
        freeze_batch_norm(model.backbone)
    if tf_same_pooling:
        use_tf_same_pooling(model.backbone)
    return model


def caffe_layer_names(aspp_branches: int = 4) -> dict[str, str]:
    """DeepLab v2 Caffe layer name → module of a :class:`DeepLabResNet` (Caffe's BatchNorm
    ``bn…`` and Scale ``scale…`` layers both map to the PyTorch BatchNorm).

    Caffe names a stage's blocks ``a, b, c`` (res2, res5) or ``a, b1, b2, …`` (res3: ``b1..b3``,
    res4: ``b1..b22``); a block's convs are ``branch2a/2b/2c`` and its projection ``branch1``.
    The fusion points are the stage ends: ``pool1`` (``backbone.maxpool``), ``res2c``
    (``backbone.layer1``), ``res3b3`` (``layer2``), ``res4b22`` (``layer3``), ``res5c``
    (``layer4``).

    Example:
        >>> names = caffe_layer_names()
        >>> names["res3a_branch2a"], names["scale4b22_branch2c"], names["fc1_voc12_c3"]
        ('backbone.layer2.0.conv1', 'backbone.layer3.22.bn3', 'head.classifier.3')
        >>> names["bn_conv1"], len(names)
        ('backbone.bn1', 316)
    """
    names = {"conv1": "backbone.conv1", "bn_conv1": "backbone.bn1", "scale_conv1": "backbone.bn1"}
    for stage, blocks in enumerate(RESNET101_BLOCKS, start=2):
        for index in range(blocks):
            if index == 0:
                block = "a"
            elif blocks <= 3:
                block = "abc"[index]
            else:
                block = f"b{index}"
            ours = f"backbone.layer{stage - 1}.{index}"
            convs = [("branch2a", "1"), ("branch2b", "2"), ("branch2c", "3")]
            for branch, number in convs:
                names[f"res{stage}{block}_{branch}"] = f"{ours}.conv{number}"
                names[f"bn{stage}{block}_{branch}"] = f"{ours}.bn{number}"
                names[f"scale{stage}{block}_{branch}"] = f"{ours}.bn{number}"
            if index == 0:
                names[f"res{stage}a_branch1"] = f"{ours}.downsample.0"
                names[f"bn{stage}a_branch1"] = f"{ours}.downsample.1"
                names[f"scale{stage}a_branch1"] = f"{ours}.downsample.1"
    for branch in range(aspp_branches):
        names[f"fc1_voc12_c{branch}"] = f"head.classifier.{branch}"
    return names
