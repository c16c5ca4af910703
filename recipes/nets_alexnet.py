"""AlexNet FCN-32s (paper Table A1; the cross-stitch paper's pixel-task network), built from
torchvision parts (``weights=None``: no downloads).

Two layouts (:func:`alexnet_fcn32s`'s ``layout``):

* ``"caffe"`` — the Caffe AlexNet of FCN's ``voc-fcn-alexnet`` (CaffeNet order: conv → ReLU →
  pool → LRN), 96/256/384/384/256 channels, conv2/4/5 in two groups;
  ``alexnet_fcn32s_caffe`` in :data:`recipes.models.MODELS`, the paper rows' model. Its
  ``features`` are named as Caffe's layers (``features.conv1`` … ``features.pool5``).
* ``"torchvision"`` — torchvision's single-GPU AlexNet (64/192/384/256/256, no groups, no LRN);
  ``alexnet_fcn32s``. ``features`` keeps torchvision's indices (``features.0`` … ``.12``).

Both: conv1 pads 100, pools round up (Caffe), fc6/fc7 are 6×6 and 1×1 convs, ``head.score``
(zero init) and a fixed bilinear ×32 upsampling cropped to the input.

Example:
    >>> import torch
    >>> tuple(alexnet_fcn32s(3, layout="caffe")(torch.randn(1, 3, 65, 70)).shape)
    (1, 3, 65, 70)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import ConfigError
from .nets_common import check_num_outputs
from .tf_pooling import use_tf_same_pooling

__all__ = ["BilinearUpsample", "FCN32s", "alexnet_fcn32s", "caffe_alexnet_features"]


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
    """AlexNet FCN-32s: ``features`` (AlexNet's convs, conv1 padding 100, pools in ceil mode as
    Caffe) → ``head`` (fc6 6×6 conv 4096, fc7 1×1 4096, ``score``) → ×32 bilinear upsampling
    cropped to the input size."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, upsample: BilinearUpsample):
        super().__init__()
        self.features = features
        self.head = head
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.head(self.features(x)), x)

    def adapt_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a torchvision ``alexnet`` state dict's fc6/fc7 (``classifier.1``/``.4``), or a
        Caffe-named one's (``conv1``…``conv5``, ``fc6``, ``fc7``, FCN's ``score_fr``), onto this
        model; inner-product fc6/fc7 become the 6×6 and 1×1 convs (FCN's
        "convolutionalisation")."""
        own = self.state_dict()
        adapted = {}
        for key, value in state.items():
            layer = key.rpartition(".")[0]
            if key not in own and f"features.{key}" in own:
                key = f"features.{key}"
            elif layer == "score_fr":
                key = key.replace("score_fr", "head.score", 1)
            adapted[key] = value
        for linear, conv, kernel in (
            ("classifier.1", "head.fc6", 6),
            ("classifier.4", "head.fc7", 1),
            ("fc6", "head.fc6", 6),
            ("fc7", "head.fc7", 1),
        ):
            weight = adapted.pop(f"{linear}.weight", None)
            bias = adapted.pop(f"{linear}.bias", None)
            if weight is None:
                continue
            if weight.dim() == 2 and weight.shape[1] % (kernel * kernel) == 0:
                channels = weight.shape[1] // (kernel * kernel)
                weight = weight.reshape(weight.shape[0], channels, kernel, kernel)
            adapted[f"{conv}.weight"] = weight  # a conv already (FCN) or of another shape
            if bias is not None:
                adapted[f"{conv}.bias"] = bias
        return adapted


def caffe_alexnet_features() -> nn.Sequential:
    """The Caffe AlexNet's conv layers as FCN's ``voc-fcn-alexnet`` has them (CaffeNet order:
    pool before LRN), conv1 padded by 100, pools rounding up.

    ``conv1`` 11×11/4 → 96, ``pool1`` 3×3/2, ``norm1`` LRN (5, α 1e-4, β 0.75, k 1: Caffe's
    α/n convention is PyTorch's), ``conv2`` 5×5 → 256 in 2 groups, ``pool2``, ``norm2``,
    ``conv3`` 3×3 → 384, ``conv4`` 3×3 → 384 in 2 groups, ``conv5`` 3×3 → 256 in 2 groups,
    ``pool5``; a ReLU after every conv (``relu1`` …).

    Example:
        >>> [name for name, m in caffe_alexnet_features().named_children() if "pool" in name]
        ['pool1', 'pool2', 'pool5']
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    specs = (  # name, in, out, kernel, stride, padding, groups, then what follows the ReLU
        ("1", 3, 96, 11, 4, 100, 1, ("pool", "norm")),
        ("2", 96, 256, 5, 1, 2, 2, ("pool", "norm")),
        ("3", 256, 384, 3, 1, 1, 1, ()),
        ("4", 384, 384, 3, 1, 1, 2, ()),
        ("5", 384, 256, 3, 1, 1, 2, ("pool",)),
    )
    for name, cin, cout, kernel, stride, padding, groups, after in specs:
        layers[f"conv{name}"] = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups)
        layers[f"relu{name}"] = nn.ReLU(inplace=True)
        for kind in after:
            if kind == "pool":
                layers[f"pool{name}"] = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            else:
                layers[f"norm{name}"] = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    return nn.Sequential(layers)


def alexnet_fcn32s(
    num_outputs: int, *, layout: str = "torchvision", tf_same_pooling: bool = False
) -> FCN32s:
    """AlexNet FCN-32s (Long et al.; the cross-stitch paper's pixel-task network, Table A1).

    ``layout="caffe"``: the Caffe AlexNet (:func:`caffe_alexnet_features`; the paper's, via
    FCN); ``"torchvision"``: torchvision's AlexNet features (indices kept, so its ImageNet
    state dict loads). ``tf_same_pooling``: the max pools pad as TF ``'SAME'`` instead of
    Caffe's round-up (the same windows at even sizes, not at odd ones; not FCN's).

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
    check_num_outputs(num_outputs, "alexnet_fcn32s")
    if layout == "caffe":
        features = caffe_alexnet_features()
    elif layout == "torchvision":
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
    else:
        raise ConfigError(
            f"alexnet_fcn32s: layout={layout!r} is not known; use 'caffe' or 'torchvision'."
        )
    if tf_same_pooling:
        use_tf_same_pooling(features)
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
