"""Your own models and data for ``python -m recipes.train byo`` (recipes/README.md shows this file).

Two single-task networks and a dataset of ``(image, {task: target})`` samples; nothing here
imports the recipes. Train a fused pair with one command (saved as ``mymod.py``, run beside it):

    python -m recipes.train byo --models seg=mymod:make_seg,depth=mymod:make_depth \\
        --dataset mymod:ToyScenes --losses seg=ce,depth=l1 --steps 100 --batch-size 8

Example:
    >>> image, targets = ToyScenes("train")[0]
    >>> tuple(image.shape), tuple(targets["seg"].shape), tuple(targets["depth"].shape)
    ((3, 32, 32), (32, 32), (1, 32, 32))
    >>> tuple(make_seg()(image[None]).shape), tuple(make_depth()(image[None]).shape)
    ((1, 4, 8, 8), (1, 1, 8, 8))
"""

import torch
from torch import nn
from torch.utils.data import Dataset

COLORS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9], [0.8, 0.8, 0.1]])
DEPTHS = torch.tensor([4.0, 1.0, 2.0, 3.0])  # depth of each class; class 0 is the background


class SmallNet(nn.Module):
    """Three conv-BN-ReLU stages ending in max pools (strides 2, 2, 1) and a 1×1 head."""

    def __init__(self, out_channels: int, width: int = 16) -> None:
        super().__init__()
        layers, channels = [], 3
        for out, stride in ((width, 2), (2 * width, 2), (2 * width, 1)):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out)]
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=stride, padding=1)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_seg(num_classes: int = 4) -> nn.Module:
    """Segmentation network: one score map per class (output stride 4)."""
    return SmallNet(num_classes)


def make_depth() -> nn.Module:
    """Depth network: one map (output stride 4)."""
    return SmallNet(1)


class ToyScenes(Dataset):
    """Rectangles of 3 classes on a background: ``(image, {"seg": labels, "depth": depth})``.

    ``split`` is "train" (8 scenes) or "test" (4 others); scene ``i`` is drawn from a generator
    seeded by ``i`` and the split, so ``__getitem__`` is deterministic (bit-exact resume).
    """

    def __init__(self, split: str = "train", size: int = 32) -> None:
        self.split, self.size = split, size
        self.count = 8 if split == "train" else 4

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(index + (1000 if self.split == "test" else 0))
        labels = torch.zeros(self.size, self.size, dtype=torch.int64)
        for cls in (1, 2, 3):
            top, left = torch.randint(0, self.size - 8, (2,), generator=generator).tolist()
            height, width = torch.randint(6, 16, (2,), generator=generator).tolist()
            labels[top : top + height, left : left + width] = cls
        noise = 0.05 * torch.randn(3, self.size, self.size, generator=generator)
        image = COLORS[labels].permute(2, 0, 1) + noise
        depth = DEPTHS[labels][None]
        labels[0], labels[-1] = 255, 255  # unlabelled rows: ignored by the ce loss
        return image, {"seg": labels, "depth": depth}
