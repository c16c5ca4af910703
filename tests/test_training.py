"""param_groups: official lr and weight-decay conventions, and schedulers that keep them."""

from __future__ import annotations

import torch
import torchvision

import nddrify
from nddrify.layers import FusionLayer


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_follow_the_official_conventions() -> None:
    fused = nddrify.fuse([torchvision.models.vgg11(), torchvision.models.vgg11()])
    groups = {g["name"]: g for g in nddrify.param_groups(fused, lr=1e-3, head=["classifier.6"])}
    assert set(groups) == {
        "fusion",
        "fusion_no_decay",
        "head",
        "head_bias",
        "base",
        "base_no_decay",
    }

    fusion_params = [
        p for m in fused.modules() if isinstance(m, FusionLayer) for p in m.parameters()
    ]
    assert _ids(groups["fusion"]["params"]) | _ids(groups["fusion_no_decay"]["params"]) == _ids(
        fusion_params
    )
    # 1×1 weights are decayed, their BN affine is not; both at 100× lr.
    assert all(p.dim() == 4 for p in groups["fusion"]["params"])
    assert all(p.dim() == 1 for p in groups["fusion_no_decay"]["params"])
    assert groups["fusion"]["lr"] == groups["fusion_no_decay"]["lr"] == 0.1
    assert (groups["fusion"]["weight_decay"], groups["fusion_no_decay"]["weight_decay"]) == (
        2.5e-4,
        0,
    )

    head_weights = {id(fused.get_submodule(f"{t}.classifier.6").weight) for t in ("task0", "task1")}
    head_biases = {id(fused.get_submodule(f"{t}.classifier.6").bias) for t in ("task0", "task1")}
    assert _ids(groups["head"]["params"]) == head_weights and groups["head"]["lr"] == 1e-2
    assert _ids(groups["head_bias"]["params"]) == head_biases and groups["head_bias"]["lr"] == 2e-2
    assert groups["head_bias"]["weight_decay"] == 0

    conv_bias = fused.get_submodule("task0.features.0").bias
    assert id(conv_bias) in _ids(groups["base_no_decay"]["params"])
    assert groups["base"]["weight_decay"] == 2.5e-4 and groups["base"]["lr"] == 1e-3
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(fused.parameters()))


def test_multiplicative_scheduler_keeps_the_multipliers() -> None:
    fused = nddrify.fuse([torchvision.models.resnet18(), torchvision.models.resnet18()])
    optimizer = torch.optim.SGD(nddrify.param_groups(fused, lr=1e-3), lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / 100) ** 0.9)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    for group in optimizer.param_groups:
        assert abs(group["lr"] / (1e-3 * group["lr_mult"]) - 0.9**0.9) < 1e-9


def test_param_groups_on_a_plain_model_have_no_fusion_group() -> None:
    groups = nddrify.param_groups(torchvision.models.resnet18(), lr=0.01, fusion_lr_mult=1000)
    assert {g["name"] for g in groups} == {"base", "base_no_decay"}
