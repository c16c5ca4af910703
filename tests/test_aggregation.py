"""Shared parameters of fused and hard-sharing models, and gradient aggregation through TorchJD:
the update equals the aggregator applied to the per-task Jacobian of the shared parameters."""

from __future__ import annotations

import pytest
import torch
import torchvision

import nddrify
from nddrify.aggregation import (
    AGGREGATORS,
    aggregate_backward,
    make_aggregator,
    shared_parameters,
)
from nddrify.errors import FusedModelError, FusionConfigError

torchjd = pytest.importorskip("torchjd", reason="the mtl extra: pip install 'nddrify[mtl]'")


def small_models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [torchvision.models.resnet18(num_classes=3), torchvision.models.resnet18(num_classes=3)]


def test_shared_parameters_of_an_nddr_model() -> None:
    fused = nddrify.fuse(small_models(), example_input=torch.randn(1, 3, 64, 64))
    found = shared_parameters(fused)
    names = [n for n, _ in fused.named_parameters()]
    # upstream of the last level (layer4's end): both backbones and nddr1..nddr4 are shared
    assert "task1.conv1.weight" in found.shared and "task0.layer4.1.bn2.bias" in found.shared
    assert {n for n in found.shared if n.startswith("nddr")} == {
        n for n in names if n.split(".")[0] in {"nddr1", "nddr2", "nddr3", "nddr4"}
    }
    # the last level's per-task conv and norm feed one task each, as do the heads
    assert set(found.by_task["task0"]) == {
        "nddr5.convs.0.weight",
        "nddr5.norms.0.weight",
        "nddr5.norms.0.bias",
        "task0.fc.weight",
        "task0.fc.bias",
    }
    assert len(found.shared) + sum(map(len, found.by_task.values())) + len(found.unused) == len(
        names
    )


def test_shared_parameters_of_cross_stitch_and_share_models() -> None:
    stitched = nddrify.fuse(
        small_models(), fusion="cross_stitch", example_input=torch.randn(1, 3, 64, 64)
    )
    found = shared_parameters(stitched)
    # one K×K matrix per level: each level's mixing weights reach every task, the last one too
    assert {n.split(".")[0] for n in found.shared if n.startswith("nddr")} == {
        f"nddr{i}" for i in range(1, 6)
    }
    assert set(found.by_task["task1"]) == {"task1.fc.weight", "task1.fc.bias"}
    shared = nddrify.share(small_models(), example_input=torch.randn(1, 3, 64, 64))
    with pytest.raises(FusedModelError, match="pass example_input"):
        shared_parameters(shared)
    trunk = shared_parameters(shared, torch.randn(2, 3, 64, 64))
    assert trunk.shared and all(n.startswith("shared.") for n in trunk.shared)
    assert all(not n.startswith("shared.") for t in trunk.by_task.values() for n in t)


def test_running_statistics_are_untouched() -> None:
    fused = nddrify.fuse(small_models(), example_input=torch.randn(1, 3, 64, 64)).eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    shared_parameters(fused)
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())
    assert not fused.training


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "imtlg", "alignedmtl", "graddrop"])
def test_update_is_the_aggregated_jacobian(name: str) -> None:
    fused = nddrify.fuse(small_models(), example_input=torch.randn(1, 3, 32, 32)).train()
    found = shared_parameters(fused)
    params = dict(fused.named_parameters())
    x, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def task_losses() -> list[torch.Tensor]:
        torch.manual_seed(1)  # GradDrop draws at random: the same draws on both sides
        out = fused(x)
        return [torch.nn.functional.cross_entropy(o, targets) for o in out]

    buffers = {k: v.clone() for k, v in fused.named_buffers()}
    # by hand: the per-task gradient rows of the shared parameters, then the aggregator
    losses = task_losses()
    shared = [params[n] for n in found.shared]
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    torch.manual_seed(2)
    expected = make_aggregator(name)(torch.stack(rows))
    head = torch.autograd.grad(sum(losses), [params["task0.fc.weight"]])[0]
    with torch.no_grad():
        for k, v in fused.named_buffers():
            v.copy_(buffers[k])
    fused.zero_grad(set_to_none=True)
    aggregator = make_aggregator(name)
    losses = task_losses()
    torch.manual_seed(2)
    aggregate_backward(losses, fused, aggregator, shared=found)
    got = torch.cat([params[n].grad.flatten() for n in found.shared])
    # fp32: TorchJD's Jacobian (vmap) and autograd.grad sum in different orders
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.allclose(params["task0.fc.weight"].grad, head, rtol=1e-5, atol=1e-7)


def test_unknown_aggregator_and_bad_options() -> None:
    with pytest.raises(FusionConfigError, match="unknown aggregator 'upgard'"):
        make_aggregator("upgard")
    with pytest.raises(FusionConfigError, match="aggregator 'mgda'"):
        make_aggregator("mgda", nonsense=1)
    assert {"upgrad", "mgda", "pcgrad", "cagrad", "nashmtl", "imtlg", "alignedmtl"} <= set(
        AGGREGATORS
    )
