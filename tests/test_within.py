"""``fuse(models, within=...)``: fuse named submodules (a detector's backbone) and get K task
models that share the fused trunk, exact at identity init, with a cache that runs it once."""

from __future__ import annotations

import copy
import gc
import io
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

import nddrify
from nddrify.errors import ModelsError
from nddrify.submodules import SharedTrunkModels, TrunkBranch

IDENTITY: dict[str, Any] = {"init": (1.0, 0.0), "norm": None, "activation": None}
MOBILENET_POINTS = {"det": ["body.1", "body.3", "body.6"], "seg": ["1", "3", "6"]}


class ListModel(nn.Module):
    """Takes a list of images (so the whole model cannot be traced) around a traceable
    ``backbone``; a head shares one parameter with the backbone (tied weights)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(16, classes, 1)
        self.scale = self.backbone[0].bias  # tied to the backbone

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(list(images))
        out = self.head(self.backbone(x)) * self.scale.sum()
        return [o for o in out if o.numel() > 0]


def small_pair(**options: Any) -> tuple[ListModel, ListModel, SharedTrunkModels]:
    a, b = ListModel(3).eval(), ListModel(2).eval()
    example = torch.randn(1, 3, 32, 32)
    models = nddrify.fuse(
        {"a": a, "b": b}, within="backbone", example_input=example, **{**IDENTITY, **options}
    )
    return a, b, models


def counting(models: SharedTrunkModels) -> list[int]:
    calls: list[int] = []
    models.trunk.register_forward_hook(lambda *args: calls.append(1))
    return calls


def detector() -> nn.Module:
    return fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        min_size=128,
        max_size=128,
        box_score_thresh=0.0,  # random weights score ~1/num_classes: keep boxes to compare
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=50,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=50,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
        box_detections_per_img=20,
    ).eval()


@pytest.fixture(scope="module")
def det_seg() -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor], SharedTrunkModels]:
    torch.manual_seed(0)
    det = detector()
    seg = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    before = {f"det.{k}": v.clone() for k, v in det.state_dict().items()}
    before.update({f"seg.{k}": v.clone() for k, v in seg.state_dict().items()})
    models = nddrify.fuse(
        {"det": det, "seg": seg},
        points=MOBILENET_POINTS,
        within="backbone",
        example_input=torch.randn(1, 3, 128, 128),
        **IDENTITY,
    )
    return det, seg, before, models


def images() -> list[torch.Tensor]:
    return [torch.rand(3, 100, 150)]  # resized to 85×128, padded to 96×128


# -- a detector and a segmentation model: exact, originals untouched, trunk once -----------------


def test_detector_and_segmenter_are_exact_at_identity_and_share_one_trunk_run(det_seg) -> None:
    det, seg, before, models = det_seg
    assert isinstance(models, SharedTrunkModels) and list(models) == ["det", "seg"]
    fused_det, fused_seg = models["det"], models["seg"]
    assert type(fused_det) is type(det) and isinstance(fused_det.backbone, TrunkBranch)
    assert fused_det.backbone.out_channels == 256  # read through to the fused copy
    assert fused_det.backbone.trunk is fused_seg.backbone.trunk is models.trunk
    calls = counting(models)
    pictures = images()
    with torch.no_grad():
        batch = fused_det.transform(pictures)[0].tensors  # what the detector's backbone sees
        detections = fused_det(pictures)
        masks = fused_seg(batch)["out"]
        assert len(calls) == 1  # the segmenter took its kept output
        assert models.pending == ()
        expected = det(pictures)
        expected_masks = seg(batch)["out"]
    assert [len(d["boxes"]) for d in detections] == [20]
    for got, want in zip(detections, expected):
        assert (got["boxes"] - want["boxes"]).abs().max() <= 1e-4
        assert (got["scores"] - want["scores"]).abs().max() <= 1e-4
        assert torch.equal(got["labels"], want["labels"])
    assert masks.shape == (1, 4, 96, 128) and (masks - expected_masks).abs().max() <= 1e-5
    after = {f"det.{k}": v for k, v in det.state_dict().items()}
    after.update({f"seg.{k}": v for k, v in seg.state_dict().items()})
    assert after.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in after.items())
    assert isinstance(det.backbone, torchvision.models.detection.backbone_utils.BackboneWithFPN)


def test_the_shared_trunk_is_counted_once(det_seg) -> None:
    det, seg, _, models = det_seg

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    heads = count(det) - count(det.backbone) + count(seg) - count(seg.backbone)
    assert count(models) == count(models.trunk) + heads
    nddr = count(models.trunk) - count(det.backbone) - count(seg.backbone)
    assert nddr == sum(count(getattr(models.trunk, f"nddr{i}")) for i in (1, 2, 3)) > 0


def test_copies_keep_the_trunk_shared_and_state_dicts_round_trip() -> None:
    _, b, models = small_pair()
    twin = copy.deepcopy(models)
    assert twin["a"].backbone.trunk is twin["b"].backbone.trunk is twin.trunk
    assert twin.trunk is not models.trunk and twin.pending == ()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for name, parameter in twin.trunk.named_parameters():
            if name.startswith("nddr"):
                parameter.mul_(0.5)
        assert not torch.equal(twin["b"].backbone(x), b.backbone(x))
        twin.load_state_dict(models.state_dict())
        assert torch.equal(twin["b"].backbone(x), b.backbone(x))
        twin.clear_cache()
        restored = torch.load(_saved(twin), weights_only=False)
        assert torch.equal(restored["b"].backbone(x), b.backbone(x))


def _saved(module: nn.Module) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_training_runs_with_losses_and_gradients_reach_the_fusion_layers(det_seg) -> None:
    _, _, _, shared = det_seg
    models = copy.deepcopy(shared).train()
    calls = counting(models)
    pictures = images()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 80.0]]), "labels": torch.tensor([1])}]
    batch, _ = models["det"].transform(pictures, targets)
    losses = models["det"](pictures, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    masks = models["seg"](batch.tensors)["out"]
    assert len(calls) == 1
    total = sum(losses.values()) + masks.square().mean()
    total.backward()
    grads = [p.grad for n, p in models.trunk.named_parameters() if n.startswith("nddr")]
    assert len(grads) == 6  # 3 levels × 2 tasks' 1×1 convolutions
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# -- the cache: once for the same tensor, never stale, nothing kept ----------------------------


def test_the_same_or_an_equal_tensor_runs_the_trunk_once_and_anything_else_recomputes() -> None:
    a, b, models = small_pair()
    originals = {"a": a.backbone, "b": b.backbone}
    calls = counting(models)

    def runs(*steps: tuple[str, torch.Tensor], exact: bool = True) -> int:
        """Run each task's trunk on its tensor; the number of fused-trunk runs it took."""
        before = len(calls)
        for task, x in steps:
            out = models[task].backbone(x)
            assert not exact or torch.equal(out, originals[task](x))
        models.clear_cache()
        return len(calls) - before

    x, other = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert runs(("a", x), ("b", x)) == 1  # the same tensor
        assert runs(("b", x), ("a", x)) == 1
        assert runs(("a", x), ("b", x.clone())) == 1  # an equal tensor
        assert runs(("a", x), ("b", other)) == 2
        assert runs(("a", x), ("b", x.to(memory_format=torch.channels_last))) == 2
        assert runs(("a", x), ("a", x), ("b", x)) == 2  # a second pass of a
        assert runs(("a", x), ("b", x), ("b", x)) == 2  # b's kept output is read once
        models["a"].backbone(x)
        x.mul_(2)  # modified in place: b must see the new values
        assert runs(("b", x)) == 1
        models["a"].backbone(x)
        models.trunk.nddr1.convs[0].weight.add_(0.1)  # the weights changed (an optimizer step)
        assert runs(("b", x), exact=False) == 1
        models.trunk.nddr1.convs[0].weight.sub_(0.1)
        models["a"].backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast changed
            assert runs(("b", x), exact=False) == 1
        models["a"].backbone(x)
        models.float()  # .to() and friends drop the kept outputs
        assert models.pending == ()
        models["a"].backbone(x)
        assert models.pending == ("b",)
        models.clear_cache()
        assert models.pending == ()
        models["a"].backbone(x)
    assert runs(("b", x)) == 1  # grad mode changed
    with torch.inference_mode():
        y = torch.randn(2, 3, 16, 16)
        assert runs(("a", y), ("b", y)) == 1
        models["a"].backbone(y)
        y.add_(1)  # an inference tensor has no version: compared by content
        assert runs(("b", y)) == 1
    with torch.no_grad():
        models["a"].backbone(x)
        models.train()  # train/eval changed (batch norm statistics move: last)
        assert runs(("b", x), exact=False) == 1


def test_kept_outputs_are_freed_once_read_or_replaced() -> None:
    _, _, models = small_pair()
    branch_a, branch_b = models["a"].backbone, models["b"].backbone
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        branch_a(x)
        kept = weakref.ref(models.branches()["b"]._cache.entry.pending["b"])
        out = branch_b(x)
        assert kept() is out
        del out
        gc.collect()
        assert kept() is None  # the cache let go of it once read
        branch_a(x)
        kept = weakref.ref(models.branches()["b"]._cache.entry.pending["b"])
        branch_a(torch.randn(2, 3, 16, 16))  # a new input replaces the kept output
        gc.collect()
        assert kept() is None


def test_a_backward_pass_drops_the_kept_outputs_and_summed_losses_share_one_run() -> None:
    _, _, models = small_pair()
    models.train()
    branch_a, branch_b = models["a"].backbone, models["b"].backbone
    calls = counting(models)
    x = torch.randn(2, 3, 16, 16)
    branch_a(x).sum().backward()  # frees the graph b's kept output hangs from
    assert models.pending == ()
    branch_b(x).sum().backward()  # so b runs the trunk again, and its backward works
    assert len(calls) == 2
    (branch_a(x).sum() + branch_b(x).sum()).backward()
    assert len(calls) == 3


def test_calling_the_models_runs_every_task() -> None:
    a, _, models = small_pair()
    calls = counting(models)
    x = torch.randn(2, 3, 16, 16)
    pictures = list(x)
    with torch.no_grad():
        out = models(pictures)  # one input for every task
        assert len(calls) == 1 and out.keys() == {"a", "b"}
        assert all(torch.equal(o, e) for o, e in zip(out["a"], a(pictures)))
        out = models({"a": pictures, "b": pictures[:1]})  # one input per task
        assert len(out["b"]) == 1 and len(calls) == 3
    with pytest.raises(ModelsError, match=r"no input for task\(s\) \['b'\]"):
        models({"a": pictures})


# -- the forms of ``within`` ------------------------------------------------------------------


def test_one_name_per_task_a_dict_and_dotted_names() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ListModel(3)

        def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
            return self.inner(images)

    a, b = ListModel(3).eval(), Wrapped().eval()
    example = torch.randn(1, 3, 32, 32)
    for within in (
        ["backbone", "inner.backbone"],
        {"task1": "inner.backbone", "task0": "backbone"},
    ):
        models = nddrify.fuse([a, b], within=within, example_input=example, **IDENTITY)
        assert list(models) == ["task0", "task1"] and models[1] is models["task1"]
        assert isinstance(models[1].inner.backbone, TrunkBranch)
        pictures = list(torch.randn(2, 3, 16, 16))
        with torch.no_grad():
            out_a, out_b = models(pictures)  # a tuple, as the models were a list
            assert all(torch.equal(o, e) for o, e in zip(out_a, a(pictures)))
            assert all(torch.equal(o, e) for o, e in zip(out_b, b(pictures)))


def test_tied_weights_stay_tied_to_the_fused_trunk() -> None:
    _, _, models = small_pair()
    fused_a = models["a"]
    assert fused_a.scale is models.trunk.a[0].bias  # the head's tie to the backbone is kept
    assert all(p is not q for p in fused_a.head.parameters() for q in models.trunk.parameters())


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("within", "message"),
    [
        ("backbon", r"task 'a' \(ListModel\) has no submodule 'backbon'.*did you mean 'backbone'"),
        (
            "neck",
            r"task 'a' \(ListModel\) has no submodule 'neck'.*submodules are \['backbone', 'head'\]",
        ),
        (["backbone"], r"within gives 1 submodule name\(s\) for 2 tasks \['a', 'b'\]"),
        ({"a": "backbone", "c": "backbone"}, r"within names unknown task\(s\) \['c'\]"),
        ({"a": "backbone"}, r"within misses \['b'\]"),
        (["backbone", 3], r"task 'b': within must name a submodule with a string"),
        (["backbone", "backbone.0.weight"], r"task 'b' .*no submodule 'backbone.0.weight'"),
    ],
)
def test_a_bad_within_names_the_task_and_suggests_names(within: Any, message: str) -> None:
    with pytest.raises(ModelsError, match=message):
        nddrify.fuse({"a": ListModel(), "b": ListModel()}, within=within)


# -- heavier: Mask R-CNN, RetinaNet and FCN with ResNet backbones, three tasks -------------------


def _resnet18_fpn(returned: list[int]) -> nn.Module:
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = torchvision.models.resnet18()
    extra = LastLevelP6P7(256, 256) if returned == [2, 3, 4] else None
    return _resnet_fpn_extractor(body, 5, returned_layers=returned, extra_blocks=extra)


@pytest.mark.slow
def test_mask_rcnn_retinanet_and_fcn_fuse_through_their_backbones_exactly() -> None:
    from torchvision.models.detection import MaskRCNN, RetinaNet
    from torchvision.models.segmentation import fcn_resnet50

    small: dict[str, Any] = {"min_size": 128, "max_size": 128}
    builders: dict[str, Callable[[], nn.Module]] = {
        "inst": lambda: MaskRCNN(
            _resnet18_fpn([1, 2, 3, 4]), num_classes=3, box_score_thresh=0.0, **small
        ),
        "det": lambda: RetinaNet(
            _resnet18_fpn([2, 3, 4]), num_classes=3, score_thresh=0.0, **small
        ),
        "seg": lambda: fcn_resnet50(weights=None, weights_backbone=None, num_classes=3),
    }
    originals = {task: build().eval() for task, build in builders.items()}
    stages = ["maxpool", "layer1", "layer2"]  # stride 4, 4, 8 in all three (FCN is dilated)
    points = {"inst": [f"body.{s}" for s in stages], "det": [f"body.{s}" for s in stages]}
    models = nddrify.fuse(
        originals,
        points={**points, "seg": stages},
        within="backbone",
        example_input=torch.randn(1, 3, 128, 128),
        **IDENTITY,
    )
    calls = counting(models)
    pictures = [torch.rand(3, 100, 140)]
    with torch.no_grad():
        batch = models["inst"].transform(pictures)[0].tensors
        got = {t: models[t](pictures) for t in ("inst", "det")}
        got_seg = models["seg"](batch)["out"]
        assert len(calls) == 1
        want = {t: originals[t](pictures) for t in ("inst", "det")}
        want_seg = originals["seg"](batch)["out"]
    for task in ("inst", "det"):
        for g, w in zip(got[task], want[task]):
            assert len(g["boxes"]) > 0 and torch.equal(g["labels"], w["labels"])
            assert (g["boxes"] - w["boxes"]).abs().max() <= 1e-4
    assert (got["inst"][0]["masks"] - want["inst"][0]["masks"]).abs().max() <= 1e-4
    assert (got_seg - want_seg).abs().max() <= 1e-5
