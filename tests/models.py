"""Small hand-written models the tests fuse (real nn.Modules, no mocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(channels_in: int, channels: list[int], dilation: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [
            nn.Conv2d(channels_in, c, 3, padding=dilation, dilation=dilation),
            nn.ReLU(inplace=True),
        ]
        channels_in = c
    return layers


class DeepLabLargeFOV(nn.Module):
    """DeepLab-LargeFOV VGG-16 (shared REFERENCE §2): 3×3 pools, pool4 and pool5 with stride 1,
    conv5 dilation 2, pool5 = max pool then avg pool, fc6 dilation 12; output stride 8."""

    def __init__(self, num_classes: int = 40, width: int = 1) -> None:
        super().__init__()
        c = [64 // width, 128 // width, 256 // width, 512 // width]
        self.features = nn.Sequential(
            *_block(3, [c[0], c[0]]),
            nn.MaxPool2d(3, 2, 1),  # pool1: features.4
            *_block(c[0], [c[1], c[1]]),
            nn.MaxPool2d(3, 2, 1),  # pool2: features.9
            *_block(c[1], [c[2]] * 3),
            nn.MaxPool2d(3, 2, 1),  # pool3: features.16
            *_block(c[2], [c[3]] * 3),
            nn.MaxPool2d(3, 1, 1),  # pool4: features.23 (stride 1)
            *_block(c[3], [c[3]] * 3, dilation=2),
            nn.MaxPool2d(3, 1, 1),  # pool5a: features.30
            nn.AvgPool2d(3, 1, 1),  # pool5b: features.31
        )
        self.head = nn.Sequential(
            nn.Conv2d(c[3], 1024 // width, 3, padding=12, dilation=12),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.5),
            nn.Conv2d(1024 // width, 1024 // width, 1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.5),
            nn.Conv2d(1024 // width, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: the skip connections bypass later encoder stages on the way to the output."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1 = DoubleConv(3, w)
        self.enc2 = DoubleConv(w, 2 * w)
        self.enc3 = DoubleConv(2 * w, 4 * w)
        self.bottleneck = DoubleConv(4 * w, 8 * w)
        self.pool = nn.MaxPool2d(2)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec3 = DoubleConv(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = DoubleConv(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = DoubleConv(2 * w, w)
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU stages with stride-2 convs, a residual block and a linear head."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class OptionalArgs(nn.Module):
    """A forward with optional arguments defaulting to None and a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        return self.net(x) * scale


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace ``Gate``."""

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x
            return -x

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.gate = DataDependent.Gate()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.gate(self.stem(x)))


class FunctionalDropout(nn.Module):
    """``F.dropout(x, training=self.training)``: fx bakes the mode into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.net(x), p=0.5, training=self.training)


class DeadBranch(nn.Module):
    """Computes a branch its output never uses (fx keeps such nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.unused = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.net(x)


class ImageMLP(nn.Module):
    """No spatial feature map anywhere: flatten, then linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ShapeReturning(nn.Module):
    """Has a node whose value is not a tensor (``x.size()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()
        return self.net(x).reshape(size[0], -1)
