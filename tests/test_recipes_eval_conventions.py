"""The evaluation conventions of the recipes: the default upsampling of predictions is TF1's legacy
``resize_bilinear`` (checked against an independent NumPy implementation written from TF's
formula), the loss at the input size follows the same choice, and the MTAN metric convention
differs from the official one exactly where MTAN's code does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipes.configs import apply_overrides, get_config, registry
from recipes.errors import ConfigError
from recipes.losses import multitask_loss, segmentation_loss
from recipes.metrics import NormalMeter, SegmentationMeter
from recipes.scoring import _meters

# ----------------------------------------------------------------------------- independent reference


def tf1_legacy_resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """N×C×H×W → N×C×out_h×out_w as TF1 ``tf.image.resize_bilinear(align_corners=False)``
    (``resize_bilinear_op.cc``, legacy scaler): ``in = float32(i) · float32(in_size / out_size)``,
    ``lower = floor(in)``, ``upper = min(ceil(in), in_size − 1)``, ``lerp = in − floor(in)``;
    ``top = tl + (tr − tl)·x_lerp``, ``bottom = bl + (br − bl)·x_lerp``,
    ``out = top + (bottom − top)·y_lerp``."""

    def weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(in_size / out_size)
        source = np.arange(out_size, dtype=np.float32) * scale  # float32, as TF
        floor = np.floor(source)
        lower = np.maximum(floor.astype(np.int64), 0)
        upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
        return lower, upper, (source - floor).astype(np.float64)

    y_low, y_high, y_lerp = weights(x.shape[2], out_h)
    x_low, x_high, x_lerp = weights(x.shape[3], out_w)
    x = x.astype(np.float64)
    top_left = x[:, :, y_low][:, :, :, x_low]
    top_right = x[:, :, y_low][:, :, :, x_high]
    bottom_left = x[:, :, y_high][:, :, :, x_low]
    bottom_right = x[:, :, y_high][:, :, :, x_high]
    top = top_left + (top_right - top_left) * x_lerp
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


def reference_segmentation(
    logits: np.ndarray, labels: np.ndarray, classes: int
) -> dict[str, float]:
    """mIoU (classes with TP + FP + FN = 0 excluded) and pixel accuracy, in %."""
    upsampled = tf1_legacy_resize_bilinear(logits, *labels.shape[1:])
    predicted = upsampled.argmax(axis=1)
    valid = labels < classes
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels[valid], predicted[valid]), 1)
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive[union > 0] / union[union > 0]
    return {"mIoU": 100 * iou.mean(), "pixel_acc": 100 * true_positive.sum() / confusion.sum()}


def reference_normals(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Angles pooled over the valid pixels: mean, median, RMSE, % within ≤ 11.25 / 22.5 / 30."""
    upsampled = tf1_legacy_resize_bilinear(pred, *target.shape[2:])
    unit_pred = upsampled / np.linalg.norm(upsampled, axis=1, keepdims=True)
    unit_target = target / np.linalg.norm(target, axis=1, keepdims=True)
    cosine = (unit_pred * unit_target).sum(axis=1)
    angles = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))[mask]
    out = {
        "mean": angles.mean(),
        "median": np.median(angles),
        "rmse": math.sqrt((angles**2).mean()),
    }
    out |= {f"within_{t:g}": 100 * np.mean(angles <= t) for t in (11.25, 22.5, 30.0)}
    return out


# ----------------------------------------------------------------------------- default evaluation

# Output stride 8 of a 321×427 input: 41×54 predictions; ratios 321/41 and 427/54 are not integers.
LOW, HIGH = (41, 54), (321, 427)


def random_scores(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 40, size=(1, *HIGH))
    labels[rng.random(labels.shape) < 0.1] = 255
    target = rng.normal(size=(2, 3, *HIGH))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    return {
        "logits": rng.normal(size=(1, 40, *LOW)),
        "labels": labels,
        "pred": rng.normal(size=(2, 3, *LOW)),
        "target": target,
        "mask": rng.random((2, *HIGH)) < 0.8,
    }


def evaluate(meters: dict, data: dict[str, np.ndarray]) -> dict[str, float]:
    meters["seg"].update(torch.from_numpy(data["logits"]), torch.from_numpy(data["labels"]))
    meters["normal"].update(
        torch.from_numpy(data["pred"]),
        torch.from_numpy(data["target"]),
        torch.from_numpy(data["mask"]),
    )
    return meters["seg"].compute() | meters["normal"].compute()


def test_default_evaluation_matches_an_independent_tf1_legacy_resize() -> None:
    data = random_scores(0)
    expected = reference_segmentation(data["logits"], data["labels"], 40)
    expected |= reference_normals(data["pred"], data["target"], data["mask"])
    config = get_config("nyuv2_vgg16_nddr")  # the paper's defaults
    result = evaluate(_meters(config, ["seg", "normal"]), data)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert abs(result[key] - value) <= 1e-4, (key, result[key], value)
    # float32 scores (what recipes.scoring passes) give the same numbers
    single = {
        key: value.astype(np.float32) for key, value in data.items() if key in ("logits", "pred")
    }
    result32 = evaluate(_meters(config, ["seg", "normal"]), data | single)
    assert all(abs(result32[key] - value) <= 1e-4 for key, value in expected.items())
    # The same meters built without a config default to the same convention.
    plain = {"seg": SegmentationMeter(num_classes=40), "normal": NormalMeter()}
    assert evaluate(plain, data) == result
    # PyTorch's half-pixel resize gives other numbers: the check above can tell them apart.
    half_pixel = apply_overrides(config, ["eval_resize=align_corners_false"])
    other = evaluate(_meters(half_pixel, ["seg", "normal"]), data)
    assert max(abs(other[key] - expected[key]) for key in expected) > 1e-2


def test_paper_configs_evaluate_and_rescale_as_the_official_code() -> None:
    configs = registry()
    paper = [c for c in configs.values() if c.dataset in ("nyuv2", "imdb")]
    assert len(paper) > 30
    for config in paper:
        assert (config.eval_resize, config.rescale_resize) == ("tf_legacy", "tf_legacy")
        assert config.metrics_convention == "official"
    # the synthetic demo and your own models take the same defaults
    assert configs["synthetic_demo_nddr"].eval_resize == "tf_legacy"
    assert get_config("byo").rescale_resize == "tf_legacy"


def test_config_choices_are_checked() -> None:
    config = get_config("nyuv2_vgg16_nddr")
    with pytest.raises(
        ConfigError, match="eval_resize='bicubic' is not allowed; choose one of: tf"
    ):
        apply_overrides(config, ["eval_resize=bicubic"])
    with pytest.raises(ConfigError, match="metrics_convention='nyu' is not allowed"):
        apply_overrides(config, ["metrics_convention=nyu"])
    with pytest.raises(ConfigError, match="rescale_resize='area' is not allowed"):
        apply_overrides(config, ["rescale_resize=area"])
    with pytest.raises(ConfigError, match="resize='area' is not known"):
        SegmentationMeter(resize="area")


# ----------------------------------------------------------------------------- loss at the input size


def test_loss_at_input_upsamples_with_the_chosen_convention() -> None:
    # class-0 logits [0, 3] at 1×2 → 1×3: tf_legacy sources 0, 2/3, 4/3 → [0, 2, 3];
    # align_corners_false sources −1/6 (clamped), 1/2, 7/6 → [0, 1.5, 3]; align_corners_true
    # sources 0, 1/2, 1 → [0, 1.5, 3]. Class 1 logits 0; every label 1: CE = ln(1 + e^l0).
    logits = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    logits[0, 0, 0, 1] = 3.0
    target = torch.ones(1, 1, 3, dtype=torch.long)

    def expected(middle: float) -> float:
        return sum(math.log1p(math.exp(v)) for v in (0.0, middle, 3.0)) / 3

    legacy = segmentation_loss(logits, target, at="input")  # default: tf_legacy
    assert legacy.item() == pytest.approx(expected(2.0), abs=1e-6)
    for mode in ("align_corners_false", "align_corners_true"):
        value = segmentation_loss(logits, target, at="input", resize=mode).item()
        assert value == pytest.approx(expected(1.5), abs=1e-6)
    _, parts = multitask_loss(
        {"seg": logits}, {"seg": target}, at="input", resize="align_corners_true"
    )
    assert parts["seg"].item() == pytest.approx(expected(1.5), abs=1e-6)


# ----------------------------------------------------------------------------- MTAN convention


def column(*vectors: tuple[float, float, float]) -> torch.Tensor:
    """1×3×1×P tensor of the given vectors."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, 3, 1, len(vectors))


def test_mtan_validity_needs_a_nonzero_component_sum() -> None:
    target = column((0.6, -0.6, 0.0), (0.0, 0.0, 1.0))  # the first sums to 0: MTAN drops it
    pred = column((0.0, 0.0, 1.0), (0.0, 0.0, 1.0))  # 90° from the first, 0° from the second
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    official, mtan = NormalMeter(), NormalMeter(convention="mtan")
    official.update(pred, target, mask)
    mtan.update(pred, target, mask)
    assert official.compute()["mean"] == pytest.approx(45.0)
    assert official.compute()["median"] == pytest.approx(45.0)
    assert mtan.compute()["mean"] == 0.0 and mtan.compute()["within_11.25"] == 100.0
    # a pixel the mask calls invalid stays out under both conventions
    mtan.reset()
    mtan.update(pred, target, torch.tensor([[[True, False]]]))
    assert mtan.compute()["mean"] != mtan.compute()["mean"]  # NaN: no batch had a valid pixel


def test_mtan_thresholds_are_strict() -> None:
    angles = torch.tensor([0.0, 11.25, 22.5, 30.0])
    official, mtan = NormalMeter(), NormalMeter(convention="mtan")
    official.update_angles(angles)
    mtan.update_angles(angles)
    within = ("within_11.25", "within_22.5", "within_30")
    assert [official.compute()[k] for k in within] == [50.0, 75.0, 100.0]  # ≤ t
    assert [mtan.compute()[k] for k in within] == [25.0, 50.0, 75.0]  # < t


def test_mtan_averages_per_batch_then_over_batches() -> None:
    batches = [torch.tensor([10.0, 20.0, 30.0]), torch.tensor([40.0]), torch.zeros(0)]
    official, mtan = NormalMeter(), NormalMeter(convention="mtan")
    for angles in batches:
        official.update_angles(angles)
        mtan.update_angles(angles)  # the empty batch is skipped
    pooled, averaged = official.compute(), mtan.compute()
    assert (pooled["mean"], pooled["median"]) == (25.0, 25.0)  # 10, 20, 30, 40
    assert pooled["rmse"] == pytest.approx(math.sqrt(3000 / 4))
    assert pooled["within_30"] == 75.0
    assert (averaged["mean"], averaged["median"]) == (30.0, 30.0)  # (20 + 40) / 2 twice
    assert averaged["rmse"] == pytest.approx((math.sqrt(1400 / 3) + 40.0) / 2)
    assert averaged["within_30"] == pytest.approx((200 / 3 + 0.0) / 2)  # 10, 20 of batch one
    # merging (DDP) keeps the batches: the same average as one meter
    first, second = NormalMeter(convention="mtan"), NormalMeter(convention="mtan")
    first.update_angles(batches[0])
    second.update_angles(batches[1])
    first.merge(second.state_dict())
    assert first.compute() == averaged
    with pytest.raises(ConfigError, match="same convention"):
        first.merge(official)


def test_mtan_convention_reaches_the_meters_and_is_refused_for_your_own_data() -> None:
    config = apply_overrides(
        get_config("nyuv2_vgg16_nddr"), ["dataset=nyuv2_mtan", "metrics_convention=mtan"]
    )
    meter = _meters(config, ["normal"])["normal"]
    assert (meter.convention, meter.resize) == ("mtan", "tf_legacy")
    with pytest.raises(ConfigError, match="metrics_convention='mtan' applies to the paper"):
        apply_overrides(
            get_config("byo"),
            [
                "models=seg=torch.nn:Conv2d(3, 2, 1)",
                "dataset=recipes.byo_example:ToyScenes",
                "losses=seg=ce",
                "metrics_convention=mtan",
            ],
        )
