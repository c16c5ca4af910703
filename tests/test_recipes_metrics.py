"""recipes.losses and recipes.metrics against values computed by hand on tiny tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from recipes.errors import ConfigError
from recipes.losses import (
    LOSS_WEIGHTS,
    TASK_LOSSES,
    age_loss,
    gender_loss,
    multitask_loss,
    normal_loss,
    resize_labels,
    segmentation_loss,
)
from recipes.metrics import (
    METERS,
    AgeMeter,
    GenderMeter,
    NormalMeter,
    SegmentationMeter,
    format_table,
    sync_meter,
)

LN = math.log


def normals(*vectors: tuple[float, float, float], dtype: torch.dtype = torch.float64):
    """1×3×1×P tensor holding the given vectors as pixels."""
    return torch.tensor(vectors, dtype=dtype).T.reshape(1, 3, 1, len(vectors))


def at_angle(degrees: float) -> tuple[float, float, float]:
    """A unit vector ``degrees`` away from +z."""
    theta = math.radians(degrees)
    return (math.sin(theta), 0.0, math.cos(theta))


# ----------------------------------------------------------------------------- losses


def seg_logits() -> torch.Tensor:
    """1×3×2×2 logits with simple softmaxes: zeros; [ln 2, 0, 0]; anything; [0, 0, ln 3]."""
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 1] = LN(2)
    logits[0, :, 1, 0] = torch.tensor([5.0, -1.0, 2.0])
    logits[0, 2, 1, 1] = LN(3)
    return logits


SEG_TARGET_4X4 = torch.tensor(
    [[[1, 7, 0, 7], [7, 7, 7, 7], [255, 7, 2, 7], [7, 7, 7, 7]]]
)  # nearest to 2×2 picks rows/cols 0 and 2: [[1, 0], [255, 2]] (7 would be an invalid class)


def test_segmentation_loss_at_output_stride_uses_nearest_labels() -> None:
    assert resize_labels(SEG_TARGET_4X4, (2, 2)).tolist() == [[[1, 0], [255, 2]]]
    loss = segmentation_loss(seg_logits(), SEG_TARGET_4X4)
    # ln 3 (uniform, label 1) + ln 2 (p = 2/4, label 0) + ln 5/3 (p = 3/5, label 2); 255 ignored
    assert loss.item() == pytest.approx((LN(3) + LN(2) + LN(5 / 3)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(LN(10) / 3, abs=1e-6)


def test_segmentation_loss_at_input_upsamples_the_logits() -> None:
    logits = torch.tensor([LN(3), 0.0]).reshape(1, 2, 1, 1)  # p = (3/4, 1/4) everywhere
    target = torch.tensor([[[0, 1, 255], [0, 0, 1]]])
    loss = segmentation_loss(logits, target, at="input")
    assert loss.item() == pytest.approx((3 * LN(4 / 3) + 2 * LN(4)) / 5, abs=1e-6)


def test_segmentation_loss_with_every_pixel_ignored_is_zero_and_differentiable() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(1, 3, 2, 2))


def test_normal_loss_is_the_mean_cosine_distance_over_valid_pixels() -> None:
    pred = normals((1, 0, 0), (0, 1, 0), (3, 3, 0), (-1, 0, 0), dtype=torch.float32)
    # raw (0..255-like) targets: normalised inside; the last pixel is invalid
    target = normals((200, 0, 0), (0, 0, 5), (255, 0, 0), (255, 0, 0), dtype=torch.float32)
    mask = torch.tensor([[[True, True, True, False]]])
    expected = (0.0 + 1.0 + (1 - 1 / math.sqrt(2))) / 3
    assert normal_loss(pred, target, mask).item() == pytest.approx(expected, abs=1e-6)
    assert normal_loss(7 * pred, target, mask).item() == pytest.approx(expected, abs=1e-6)
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert normal_loss(pred.requires_grad_(), target, none).item() == 0.0


def test_normal_loss_at_output_and_at_input() -> None:
    pred = normals((0, 0, 1), (0, 1, 0), dtype=torch.float32)  # 1×3×1×2
    target = torch.zeros(1, 3, 2, 4)
    target[0, 2, 0, 0] = 1.0  # picked (row 0, col 0): same as pred → 0
    target[0, 0, 0, 2] = 1.0  # picked (row 0, col 2): orthogonal to (0, 1, 0) → 1
    target[0, 1, 1, :] = -1.0  # row 1 is never picked
    target[0, 1, 0, 1] = target[0, 1, 0, 3] = -1.0
    mask = torch.ones(1, 2, 4, dtype=torch.bool)
    assert normal_loss(pred, target, mask).item() == pytest.approx(0.5, abs=1e-6)
    constant = normals((0, 0, 1), dtype=torch.float32)  # upsampled: (0, 0, 1) everywhere
    wide = torch.zeros(1, 3, 1, 3)
    wide[0, :, 0, 0] = torch.tensor([0.0, 0.0, 2.0])  # 0
    wide[0, :, 0, 1] = torch.tensor([0.0, 0.0, -1.0])  # 2
    wide[0, :, 0, 2] = torch.tensor([1.0, 0.0, 0.0])  # 1
    loss = normal_loss(constant, wide, torch.ones(1, 1, 3, dtype=torch.bool), at="input")
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_age_and_gender_losses_are_cross_entropy() -> None:
    assert age_loss(torch.zeros(2, 100), torch.tensor([3, 99])).item() == pytest.approx(LN(100))
    logits = torch.tensor([[LN(3), 0.0], [LN(3), 0.0]])
    assert gender_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(
        (LN(4 / 3) + LN(4)) / 2
    )


def test_multitask_loss_weights_normals_by_20() -> None:
    assert LOSS_WEIGHTS == {"seg": 1.0, "normal": 20.0, "age": 1.0, "gender": 1.0}
    assert set(TASK_LOSSES) == {"seg", "normal", "age", "gender"}
    outputs = {"seg": seg_logits(), "normal": normals((0, 1, 0), dtype=torch.float32)}
    batch = {
        "seg": SEG_TARGET_4X4,
        "normal": torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1),
        "normal_mask": torch.ones(1, 1, 1, dtype=torch.bool),
    }
    total, parts = multitask_loss(outputs, batch)
    assert parts["seg"].item() == pytest.approx(LN(10) / 3, abs=1e-6)
    assert parts["normal"].item() == pytest.approx(1.0, abs=1e-6)
    assert total.item() == pytest.approx(LN(10) / 3 + 20.0, abs=1e-5)
    total, _ = multitask_loss(outputs, batch, weights={"seg": 2.0, "normal": 0.5})
    assert total.item() == pytest.approx(2 * LN(10) / 3 + 0.5, abs=1e-5)


def test_multitask_loss_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="'depth' has no loss"):
        multitask_loss({"depth": torch.zeros(1, 1, 1, 1)}, {})
    with pytest.raises(ConfigError, match=r"missing \['normal_mask'\]"):
        multitask_loss({"normal": torch.zeros(1, 3, 1, 1)}, {"normal": torch.zeros(1, 3, 1, 1)})
    with pytest.raises(ConfigError, match="at='pixels'"):
        segmentation_loss(seg_logits(), SEG_TARGET_4X4, at="pixels")


# ----------------------------------------------------------------------------- segmentation


GT = torch.tensor([[[0, 0, 1, 1, 2, 255, 9]]])  # 255 ignored; 9 is no class of 4: not scored
PRED = torch.tensor([[[0, 1, 1, 1, 0, 3, 3]]])  # class 3 only predicted on unscored pixels


@pytest.mark.parametrize("absent, miou", [("exclude", 100 / 3), ("zero", 25.0)])
def test_segmentation_meter_absent_class_conventions(absent: str, miou: float) -> None:
    """IoU: class 0 = 1/3, class 1 = 2/3, class 2 = 0, class 3 has TP + FP + FN = 0."""
    meter = SegmentationMeter(num_classes=4, absent=absent)
    meter.update(PRED, GT)
    assert meter.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    result = meter.compute()
    assert result["mIoU"] == pytest.approx(miou)
    assert result["pixel_acc"] == pytest.approx(60.0)
    iou = meter.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(iou[3])


def test_segmentation_meter_upsamples_scores_and_pools_the_dataset() -> None:
    meter = SegmentationMeter(num_classes=4)
    scores = torch.tensor([0.0, 1.0, 3.0, 2.0]).reshape(1, 4, 1, 1)  # argmax 2, upsampled
    meter.update(scores, torch.tensor([[[2, 2], [1, 255]]]))
    assert meter.compute() == pytest.approx({"mIoU": 100 / 3, "pixel_acc": 200 / 3})
    meter.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))
    # one confusion matrix over both images: IoU_1 = 2/3, IoU_2 = 2/3 (not the mean of per-image mIoUs)
    assert meter.compute() == pytest.approx({"mIoU": 200 / 3, "pixel_acc": 80.0})


def test_segmentation_meter_merge_equals_one_meter() -> None:
    whole, first, second = (SegmentationMeter(num_classes=4) for _ in range(3))
    whole.update(PRED, GT)
    whole.update(torch.tensor([[[3, 3]]]), torch.tensor([[[3, 2]]]))
    first.update(PRED, GT)
    second.update(torch.tensor([[[3, 3]]]), torch.tensor([[[3, 2]]]))
    first.merge(second)
    assert torch.equal(first.confusion, whole.confusion)
    third = SegmentationMeter(num_classes=4)
    third.merge(whole.state_dict())
    assert third.compute() == whole.compute()
    with pytest.raises(ConfigError, match="expected another SegmentationMeter"):
        third.merge(NormalMeter())


def test_segmentation_meter_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="absent='skip'"):
        SegmentationMeter(absent="skip")
    meter = SegmentationMeter(num_classes=3)
    with pytest.raises(ConfigError, match=r"scores must be N×3×h×w"):
        meter.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"must lie in 0\.\.2"):
        meter.update(torch.tensor([[[5]]]), torch.tensor([[[0]]]))


# ----------------------------------------------------------------------------- normals


def test_normal_meter_thresholds_are_inclusive_and_invalid_pixels_excluded() -> None:
    angles = [11.25, 11.26, 22.5, 30.0, 90.0, 180.0]
    pred = normals(*(at_angle(a) for a in angles), at_angle(45.0))
    target = normals(*[(0.0, 0.0, 1.0)] * 7)
    mask = torch.tensor([[[True] * 6 + [False]]])  # the 45° pixel is invalid
    meter = NormalMeter()
    meter.update(pred, target, mask)
    stored = meter.state_dict()["angles"]
    assert stored[[0, 2, 3, 4, 5]].tolist() == [11.25, 22.5, 30.0, 90.0, 180.0]  # exact
    result = meter.compute()
    assert result["within_11.25"] == pytest.approx(100 / 6)  # 11.25 in, 11.26 out
    assert result["within_22.5"] == pytest.approx(300 / 6)
    assert result["within_30"] == pytest.approx(400 / 6)
    assert result["mean"] == pytest.approx(sum(angles) / 6, rel=1e-6)
    assert result["median"] == pytest.approx((22.5 + 30.0) / 2)
    assert result["rmse"] == pytest.approx(math.sqrt(sum(a * a for a in angles) / 6), rel=1e-6)


def test_normal_meter_pools_pixels_over_images_with_raw_targets_and_upsampling() -> None:
    meter = NormalMeter()
    # image 1: raw uint8 target (0, 0, 255) → +z; prediction at output stride (1×1) upsampled
    meter.update(
        normals(at_angle(60.0), dtype=torch.float32),
        torch.tensor([0, 0, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 2, 2),
        torch.tensor([[[True, True], [True, False]]]),
    )
    # image 2: one valid pixel
    meter.update(
        normals((0.0, 0.0, 1.0), dtype=torch.float32),
        normals((0.0, 0.0, 1.0), dtype=torch.float32),
        torch.ones(1, 1, 1, dtype=torch.bool),
    )
    result = meter.compute()
    assert meter.state_dict()["angles"].numel() == 4
    assert result["mean"] == pytest.approx((3 * 60.0 + 0.0) / 4, abs=1e-4)  # pooled, not per image
    assert result["median"] == pytest.approx(60.0, abs=1e-4)
    assert result["within_30"] == pytest.approx(25.0)


def test_normal_meter_merge_and_empty() -> None:
    empty = NormalMeter().compute()
    assert set(empty) == {"mean", "median", "rmse", "within_11.25", "within_22.5", "within_30"}
    assert all(math.isnan(v) for v in empty.values())
    first, second, whole = NormalMeter(), NormalMeter(), NormalMeter()
    first.update_angles(torch.tensor([1.0, 2.0]))
    second.update_angles(torch.tensor([3.0, 40.0]))
    whole.update_angles(torch.tensor([1.0, 2.0, 3.0, 40.0]))
    first.merge(second)
    assert first.compute() == whole.compute()
    assert whole.compute()["median"] == 2.5


def test_sync_meter_gathers_states_over_torch_distributed(tmp_path: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        meter = NormalMeter()
        meter.update_angles(torch.tensor([5.0, 15.0, 25.0]))
        before = meter.compute()
        assert sync_meter(meter) is meter
        assert meter.compute() == before
        seg = SegmentationMeter(num_classes=4)
        seg.update(PRED, GT)
        assert sync_meter(seg).confusion.sum().item() == 5
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- age, gender


def test_age_meter_uses_the_softmax_expectation() -> None:
    probabilities = torch.zeros(4, 100)
    probabilities[0, 30] = 1.0  # E = 30, true 25 → 5
    probabilities[1] = 1 / 100  # E = 49.5, true 40 → 9.5
    probabilities[2, 10] = probabilities[2, 20] = 0.5  # E = 15, true 15 → 0
    probabilities[3, 99] = 1.0  # E = 99, true 0 → 99
    meter = AgeMeter()
    meter.update(probabilities.log(), torch.tensor([25, 40, 15, 0]))
    result = meter.compute()
    assert result["mean_ae"] == pytest.approx((5 + 9.5 + 0 + 99) / 4)
    assert result["median_ae"] == pytest.approx((5 + 9.5) / 2)  # even count: mean of the middle
    other = AgeMeter()
    other.update(probabilities[:1].log(), torch.tensor([31]))
    meter.merge(other)
    assert meter.compute()["median_ae"] == pytest.approx(5.0)  # errors 0, 1, 5, 9.5, 99


def test_gender_meter_accuracy_and_merge() -> None:
    meter = GenderMeter()
    meter.update(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    assert meter.compute()["accuracy"] == pytest.approx(200 / 3)
    other = GenderMeter()
    other.update(torch.tensor([1]), torch.tensor([1]))  # predicted labels work too
    meter.merge(other)
    assert meter.compute()["accuracy"] == pytest.approx(75.0)
    meter.reset()
    assert math.isnan(meter.compute()["accuracy"])


def test_meters_registry_and_update_batch() -> None:
    assert {task: factory().task for task, factory in METERS.items()} == {
        "seg": "seg",
        "normal": "normal",
        "age": "age",
        "gender": "gender",
    }
    normal = METERS["normal"]()
    batch = {
        "normal": normals((0.0, 0.0, 1.0)),
        "normal_mask": torch.ones(1, 1, 1, dtype=torch.bool),
    }
    normal.update_batch(normals(at_angle(30.0)), batch)
    assert normal.compute()["within_30"] == 100.0
    with pytest.raises(ConfigError, match=r"lacks \['gender'\]"):
        METERS["gender"]().update_batch(torch.zeros(1, 2), {"age": torch.zeros(1)})


# ----------------------------------------------------------------------------- table


def test_format_table_markdown_text() -> None:
    rows = {
        "Sing.": {
            "normal": {"mean": 15.6, "median": 12.3, "within_11.25": 46.4},
            "seg": {"mIoU": 33.5, "pixel_acc": 64.12},
        },
        "Ours": {"mIoU": 36.2, "within_11.25": 53.5, "median": 10.2, "mean": 13.94},
    }
    assert format_table(rows) == (
        "| Method | Mean | Med. | 11.25 | mIoU | PAcc |\n"
        "|:---|---:|---:|---:|---:|---:|\n"
        "| Sing. | 15.6 | 12.3 | 46.4 | 33.5 | 64.1 |\n"
        "| Ours | 13.9 | 10.2 | 53.5 | 36.2 | - |"
    )
    faces = [("Single-Task", {"mean_ae": 9.1, "median_ae": 7.4, "accuracy": 83.5, "loss": 0.25})]
    assert format_table(faces, columns=["accuracy", "mean_ae"], digits=2, first_column="") == (
        "|  | Acc. (%) | Mean AE |\n|:---|---:|---:|\n| Single-Task | 83.50 | 9.10 |"
    )
    assert format_table(faces).splitlines()[0] == (
        "| Method | Mean AE | Median AE | Acc. (%) | loss |"
    )


@pytest.mark.cuda
def test_losses_and_meters_on_cuda_match_the_cpu() -> None:
    device = torch.device("cuda")
    logits, target = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 16, 16))
    target[0, :3] = 255
    pred, normal_target = torch.randn(2, 3, 4, 4), torch.randint(0, 256, (2, 3, 16, 16))
    mask = torch.rand(2, 16, 16) > 0.3
    for at in ("output", "input"):
        cpu = segmentation_loss(logits, target, at=at) + normal_loss(
            pred, normal_target, mask, at=at
        )
        gpu = segmentation_loss(logits.to(device), target.to(device), at=at) + normal_loss(
            pred.to(device), normal_target.to(device), mask.to(device), at=at
        )
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
    for make, args in (
        (lambda: SegmentationMeter(num_classes=5), (logits, target)),
        (NormalMeter, (pred, normal_target, mask)),
        (AgeMeter, (torch.randn(6, 100), torch.randint(0, 100, (6,)))),
        (GenderMeter, (torch.randn(6, 2), torch.randint(0, 2, (6,)))),
    ):
        on_cpu, on_gpu = make(), make()
        on_cpu.update(*args)
        on_gpu.update(*(a.to(device) for a in args))
        assert on_gpu.compute() == pytest.approx(on_cpu.compute(), rel=1e-4)
