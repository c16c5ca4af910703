"""Tests of recipes.data: on-disk formats (written for real into tmp_path), exact label values and
masks, the official augmentation's invariants, IMDB-WIKI ages / filter / split, and errors."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat
from torch.utils.data import DataLoader

from recipes.data import (
    DATASETS,
    NUM_OUTPUTS,
    TASKS,
    EvalTransform,
    FaceTransform,
    NYUv2,
    NYUv2MTAN,
    SyntheticScenes,
    TrainTransform,
    TransformedDataset,
    build_dataset,
    write_nyuv2_mtan,
    write_nyuv2_official,
)
from recipes.data.imdb_wiki import (
    FaceRecord,
    IMDBWiki,
    birth_year,
    filter_records,
    filter_report,
    matlab_datenum_to_datetime,
    read_imdb_wiki_mat,
    subject_split,
    write_imdb_wiki_mat,
    write_synthetic_faces,
)
from recipes.data.synthetic import NYU40_CLASSES, SCENE_KINDS, render_scene
from recipes.data.transforms import (
    CAFFE_BGR_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_normals,
    encode_normals,
    normal_validity,
    normalize_image,
    sample_generator,
)
from recipes.errors import ConfigError, DatasetFormatError, DatasetNotFoundError

NAN = float("nan")


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: one thread avoids oversubscription stalls on a shared, loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DATENUM_2000_01_01 = 730486.0  # Matlab datenum(2000, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raw_sample(height: int = 6, width: int = 8) -> dict[str, torch.Tensor]:
    """A raw sample whose pixels say where they came from: image R = column, G = row; seg =
    column; normal x channel = 10 + column (raw encoding), (255, 255, 255) in column 0."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    image = torch.stack([cols * 20, rows * 20, torch.full_like(cols, 7)], dim=-1).to(torch.uint8)
    normal = torch.stack([10 + cols, torch.full_like(cols, 128), torch.full_like(cols, 200)], -1)
    normal = normal.to(torch.uint8)
    normal[:, 0] = 255
    return {"image": image, "seg": cols.to(torch.uint8).clone(), "normal": normal}


# --------------------------------------------------------------------------- normalisation


def test_caffe_bgr_normalisation_is_bgr_minus_official_mean() -> None:
    image = torch.tensor([[[10, 20, 30], [255, 0, 128]]], dtype=torch.uint8)
    out = normalize_image(image, "caffe_bgr")
    assert out.shape == (3, 1, 2) and out.dtype == torch.float32
    expected_first = [30 - CAFFE_BGR_MEAN[0], 20 - CAFFE_BGR_MEAN[1], 10 - CAFFE_BGR_MEAN[2]]
    assert out[:, 0, 0].tolist() == pytest.approx(expected_first, abs=1e-5)
    assert out[:, 0, 1].tolist() == pytest.approx(
        [128 - 104.00698793, 0 - 116.66876762, 255 - 122.67891434],
        abs=1e-4,  # float32
    )
    # Float images in [0, 1] (MTAN) are scaled to 0..255 first.
    assert torch.allclose(normalize_image(image.float() / 255.0, "caffe_bgr"), out, atol=1e-4)


def test_imagenet_and_none_normalisation() -> None:
    image = torch.tensor([[[51, 102, 153]]], dtype=torch.uint8)
    out = normalize_image(image, "imagenet")[:, 0, 0].tolist()
    expected = [(v / 255 - m) / s for v, m, s in zip((51, 102, 153), IMAGENET_MEAN, IMAGENET_STD)]
    assert out == pytest.approx(expected, abs=1e-6)
    assert normalize_image(image, "none")[:, 0, 0].tolist() == pytest.approx([0.2, 0.4, 0.6])
    with pytest.raises(ConfigError, match="mean='bgr'"):
        normalize_image(image, "bgr")
    with pytest.raises(DatasetFormatError, match="H×W×3"):
        normalize_image(torch.zeros(3, 4, 5, dtype=torch.uint8))


def test_normal_encoding_decoding() -> None:
    raw = torch.tensor([[128, 128, 255], [255, 255, 255], [0, 128, 128], [255, 255, 0]])
    unit, valid = decode_normals(raw.to(torch.uint8))
    assert valid.tolist() == [True, False, True, True]
    assert unit[1].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(unit[valid].norm(dim=1), torch.ones(3), atol=1e-6)
    v = 128 / 255 * 2 - 1
    norm = math.sqrt(2 * v * v + 1)
    assert unit[0].tolist() == pytest.approx([v / norm, v / norm, 1 / norm], abs=1e-6)
    # encode: round((n + 1) / 2 * 255), invalid -> 255 x 3.
    codes = encode_normals(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.28, -0.96, 0.0]]))
    assert codes.tolist() == [[128, 128, 255], [0, 128, 128], [163, 5, 128]]
    assert encode_normals(torch.zeros(1, 3)).tolist() == [[255, 255, 255]]
    # Round trip on real geometry: at most one code step, invalid pixels unchanged.
    scene = SyntheticScenes(1, size=(24, 32), seed=3)[0]
    again = encode_normals(*decode_normals(scene["normal"]))
    assert (again.int() - scene["normal"].int()).abs().max() <= 1
    assert torch.equal(normal_validity(again), scene["normal_mask"])


# --------------------------------------------------------------------------- TrainTransform


@pytest.mark.parametrize(
    ("size", "crop"), [((37, 53), (21, 33)), ((6, 8), (9, 11)), ((41, 41), 41), ((17, 30), 321)]
)
def test_train_crop_size_is_exact(size: tuple[int, int], crop) -> None:
    transform = TrainTransform(crop=crop)
    crop_hw = (crop, crop) if isinstance(crop, int) else crop
    raw = _raw_sample(*size)
    for seed in range(12):
        out = transform(raw, generator=_gen(seed))
        assert out["image"].shape == (3, *crop_hw) and out["image"].dtype == torch.float32
        assert out["seg"].shape == crop_hw and out["seg"].dtype == torch.int64
        assert out["normal"].shape == (3, *crop_hw) and out["normal"].dtype == torch.float32
        assert out["normal_mask"].shape == crop_hw and out["normal_mask"].dtype == torch.bool


def test_padding_uses_ignore_and_invalid_codes_exactly() -> None:
    raw = _raw_sample(5, 7)
    out = TrainTransform(crop=(9, 10), scale=None, mirror=False, ignore_index=255)(raw)
    # Padded bottom/right only: the crop window must start at (0, 0) (padded size == crop).
    assert torch.equal(out["seg"][:5, :7], raw["seg"].long())
    assert (out["seg"][5:, :] == 255).all() and (out["seg"][:, 7:] == 255).all()
    assert (out["image"][:, 5:, :] == 0).all() and (out["image"][:, :, 7:] == 0).all()
    assert torch.equal(out["image"][:, :5, :7], normalize_image(raw["image"]))
    assert (out["normal"][:, 5:, :] == 255).all() and (out["normal"][:, :, 7:] == 255).all()
    expected_mask = torch.zeros(9, 10, dtype=torch.bool)
    expected_mask[:5, 1:7] = True  # column 0 holds invalid normals
    assert torch.equal(out["normal_mask"], expected_mask)
    # Another ignore index; unit-vector normals pad with 0.
    unit_raw = dict(raw)
    unit_raw["normal"], unit_raw["normal_mask"] = decode_normals(raw["normal"])
    out = TrainTransform(crop=9, scale=None, mirror=False, ignore_index=100)(unit_raw)
    assert (out["seg"][5:] == 100).all() and (out["normal"][:, :, 7:] == 0).all()
    assert torch.equal(out["normal"][:, :5, :7], unit_raw["normal"].permute(2, 0, 1))


def test_mirror_is_consistent_and_keeps_normal_x_by_default() -> None:
    raw = _raw_sample(6, 8)
    flipped_seen = unflipped_seen = 0
    for seed in range(16):
        out = TrainTransform(crop=(6, 8), scale=None, mean="none")(raw, generator=_gen(seed))
        column_from_image = (out["image"][0] * 255).round().long() // 20
        # image, seg and normals moved together, whichever way
        assert torch.equal(out["seg"], column_from_image)
        valid = out["normal_mask"]
        assert torch.equal(valid, column_from_image != 0)
        assert torch.equal(out["normal"][0][valid].long(), 10 + column_from_image[valid])
        if out["seg"][0, 0] == 7:
            flipped_seen += 1
            assert out["seg"][0].tolist() == list(range(7, -1, -1))
        else:
            unflipped_seen += 1
            assert out["seg"][0].tolist() == list(range(8))
    assert flipped_seen > 0 and unflipped_seen > 0


def test_mirror_negates_normal_x_on_request() -> None:
    raw = _raw_sample(4, 5)
    transform = TrainTransform(crop=(4, 5), scale=None, negate_normal_x=True, mean="none")
    outs = [transform(raw, generator=_gen(seed)) for seed in range(10)]
    flipped = [o for o in outs if o["seg"][0, 0] == 4]
    kept = [o for o in outs if o["seg"][0, 0] == 0]
    assert flipped and kept
    for out in flipped:
        columns = out["seg"]
        valid = out["normal_mask"]
        assert torch.equal(out["normal"][0][valid].long(), 255 - (10 + columns[valid]))
        assert (out["normal"][:, ~valid] == 255).all()  # invalid stays invalid
        assert (out["normal"][1:][:, valid] == torch.tensor([[128.0], [200.0]])).all()
    for out in kept:
        assert torch.equal(
            out["normal"][0][out["normal_mask"]].long(), 10 + out["seg"][out["normal_mask"]]
        )
    # unit vectors: x -> -x
    unit_raw = {"image": raw["image"], "normal": decode_normals(raw["normal"])[0]}
    out = transform(
        unit_raw, generator=_gen(next(s for s in range(10) if outs[s]["seg"][0, 0] == 4))
    )
    assert torch.equal(out["normal"][0], -unit_raw["normal"][..., 0].flip(-1))


def test_random_scale_matches_the_drawn_factor_and_range() -> None:
    raw = _raw_sample(40, 60)
    transform = TrainTransform(crop=100, scale=(0.5, 1.5), mirror=False)
    heights = []
    for seed in range(40):
        out = transform(raw, generator=_gen(seed))
        factor = 0.5 + 1.0 * torch.rand((), generator=_gen(seed), dtype=torch.float32)
        expected_h = int(torch.tensor(40.0) * factor)
        expected_w = int(torch.tensor(60.0) * factor)
        valid = out["seg"] != 255
        rows, cols = valid.any(dim=1).sum().item(), valid.any(dim=0).sum().item()
        assert (rows, cols) == (expected_h, expected_w)
        assert valid[:rows, :cols].all()  # padding only bottom/right; offsets are 0 here
        assert 20 <= rows < 60 and 30 <= cols < 90
        heights.append(rows)
        # nearest resizing creates no new labels / normals
        assert set(out["seg"].unique().tolist()) <= set(range(60)) | {255}
        codes = set(out["normal"][0].unique().long().tolist())
        assert codes <= set(range(11, 70)) | {255}
        assert torch.equal(out["normal_mask"], normal_validity(out["normal"].to(torch.uint8), 0))
    assert min(heights) <= 25 and max(heights) >= 55


def test_augmentation_is_reproducible_from_generator_global_rng_and_seeded_dataset() -> None:
    raw = SyntheticScenes(1, size=(24, 32), seed=5)[0]
    transform = TrainTransform(crop=(20, 28))
    a, b = transform(raw, generator=_gen(11)), transform(raw, generator=_gen(11))
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(3)
    c = transform(raw)
    state = torch.get_rng_state()
    d = transform(raw)
    torch.set_rng_state(state)  # resuming from a saved torch RNG state replays exactly
    e = transform(raw)
    assert all(torch.equal(d[k], e[k]) for k in d)
    torch.manual_seed(3)
    assert all(torch.equal(c[k], v) for k, v in transform(raw).items())

    dataset = TransformedDataset(SyntheticScenes(3, size=(24, 32), seed=5), transform, seed=9)
    first = dataset[2]
    assert torch.equal(first["image"], dataset[2]["image"])
    assert torch.equal(
        first["image"], transform(dataset.base[2], generator=sample_generator(9, 0, 2))["image"]
    )
    dataset.set_epoch(1)
    assert not torch.equal(first["image"], dataset[2]["image"])


def test_eval_transform_center_crop_and_pad_to_multiple() -> None:
    raw = _raw_sample(6, 8)
    out = EvalTransform()(raw)
    assert torch.equal(out["seg"], raw["seg"].long())
    assert torch.equal(out["image"], normalize_image(raw["image"]))
    out = EvalTransform(center_crop=(4, 4))(raw)
    assert torch.equal(out["seg"], raw["seg"].long()[1:5, 2:6])
    out = EvalTransform(pad_to_multiple=5)(raw)
    assert out["seg"].shape == (10, 10)
    assert (out["seg"][6:] == 255).all() and (out["seg"][:, 8:] == 255).all()
    assert not out["normal_mask"][6:].any()


def test_face_transform_shapes_and_determinism() -> None:
    raw = {"image": torch.randint(0, 256, (50, 41, 3), dtype=torch.uint8), "age": 33, "gender": 0}
    train = FaceTransform(size=24, resize=28, train=True)
    out = train(raw, generator=_gen(1))
    assert out["image"].shape == (3, 24, 24)
    assert out["age"].dtype == torch.int64 and int(out["age"]) == 33 and int(out["gender"]) == 0
    assert torch.equal(out["image"], train(raw, generator=_gen(1))["image"])
    evaluation = FaceTransform(size=24, resize=28)
    assert torch.equal(evaluation(raw)["image"], evaluation(raw)["image"])
    with pytest.raises(ConfigError, match="size"):
        FaceTransform(size=300, resize=256)


# --------------------------------------------------------------------------- synthetic scenes


def test_synthetic_scenes_are_deterministic_nyu_raw_samples() -> None:
    scenes = SyntheticScenes(4, size=(48, 64), seed=0)
    sample = scenes[1]
    assert sample["image"].shape == (48, 64, 3) and sample["image"].dtype == torch.uint8
    assert sample["seg"].shape == (48, 64) and sample["seg"].dtype == torch.uint8
    assert sample["normal"].shape == (48, 64, 3) and sample["normal"].dtype == torch.uint8
    again = SyntheticScenes(4, size=(48, 64), seed=0)[1]
    assert all(torch.equal(sample[k], again[k]) for k in sample)
    assert not torch.equal(sample["image"], scenes[2]["image"])
    assert not torch.equal(sample["image"], SyntheticScenes(4, size=(48, 64), seed=1)[1]["image"])
    labels = set()
    for i in range(4):
        labels |= set(scenes[i]["seg"].unique().tolist())
    assert labels <= set(NYU40_CLASSES.values()) and {0, 1} <= labels
    thirteen = SyntheticScenes(2, size=(48, 64), seed=0, num_classes=13)[1]["seg"].unique()
    assert set(thirteen.tolist()) <= {kind.nyu13 for kind in SCENE_KINDS.values()}


def test_synthetic_normals_follow_the_geometry() -> None:
    scenes = SyntheticScenes(12, size=(48, 64), seed=2)
    checked = {"floor": 0, "ceiling": 0, "wall": 0, "window": 0}
    for i in range(len(scenes)):
        sample = scenes[i]
        unit, valid = decode_normals(sample["normal"])
        seg = sample["seg"]
        assert torch.equal(valid, sample["normal_mask"])
        assert torch.equal(~valid, seg == NYU40_CLASSES["window"])  # only glass lacks normals
        assert torch.allclose(unit[valid].norm(dim=-1), torch.ones(int(valid.sum())), atol=1e-5)
        # camera frame: x right, y down, z forward; pitch in [-0.35, -0.05] rad
        floor, ceiling, wall = seg == 1, seg == 21, seg == 0
        assert (unit[floor][:, 1] < -0.93).all()
        assert (unit[ceiling][:, 1] > 0.93).all()
        assert (unit[wall][:, 1].abs() < 0.35).all()
        # Surfaces face the camera: n . ray < 0. Rays have z = 1 and |x|, |y| below ~0.67 and
        # 0.5 (focal length >= 0.75 width), so n_z < 0.84 everywhere and n_z < 0.02 mid-image.
        assert (unit[valid][:, 2] < 0.84).all()
        middle = unit[23:25, 31:33][valid[23:25, 31:33]]
        assert (middle[:, 2] < 0.02).all()
        for name, mask in (("floor", floor), ("ceiling", ceiling), ("wall", wall)):
            checked[name] += int(mask.sum())
        checked["window"] += int((~valid).sum())
    assert all(count > 0 for count in checked.values())


def test_synthetic_depth_and_speed() -> None:
    import time

    sample = render_scene((96, 128), sample_generator(0, 0), with_depth=True)
    assert sample["depth"].shape == (96, 128) and (sample["depth"] > 0.05).all()
    assert (sample["depth"] < 8.0).all()
    timings = []
    for index in range(6):
        start = time.perf_counter()
        render_scene((96, 128), sample_generator(1, index))
        timings.append(time.perf_counter() - start)
    # ~5-10 ms on one loaded CPU core; the fastest of 6 is robust to other processes' load
    assert min(timings) < 0.05, timings
    with pytest.raises(ConfigError, match="num_classes=20"):
        SyntheticScenes(1, num_classes=20)


# --------------------------------------------------------------------------- NYUv2 official


def test_official_layout_round_trip_is_pixel_exact(tmp_path: Path) -> None:
    train = SyntheticScenes(3, size=(30, 40), seed=0)
    test = SyntheticScenes(2, size=(30, 40), seed=1)
    write_nyuv2_official(train, tmp_path, "train")
    write_nyuv2_official(test, tmp_path, "test")
    lines = (tmp_path / "list" / "training_seg.txt").read_text().splitlines()
    assert lines[0] == "/nyu_train_val/img/train_0000.png /nyu_train_val/seg/train_0000.png"
    normal_lines = (tmp_path / "list" / "testing_normal_mask.txt").read_text().splitlines()
    assert normal_lines == [
        f"/nyu_train_val/img/test_{i:04d}.png /nyu_train_val/normal_mask/test_{i:04d}.png"
        for i in range(2)
    ]
    with Image.open(tmp_path / "nyu_train_val" / "seg" / "train_0000.png") as png:
        assert png.mode == "L"
    with Image.open(tmp_path / "nyu_train_val" / "normal_mask" / "train_0000.png") as png:
        assert png.mode == "RGB"
    for split, source in (("train", train), ("test", test)):
        data = NYUv2(tmp_path, split)
        assert len(data) == len(source)
        for i in range(len(source)):
            got, expected = data[i], source[i]
            for key in ("image", "seg", "normal", "normal_mask"):
                assert got[key].dtype == expected[key].dtype
                assert torch.equal(got[key], expected[key]), (split, i, key)
    unit = NYUv2(tmp_path, "test", normals="unit")[1]
    expected_unit, expected_mask = decode_normals(test[1]["normal"])
    assert torch.equal(unit["normal"], expected_unit) and torch.equal(
        unit["normal_mask"], expected_mask
    )


def test_official_layout_exact_values_and_mask(tmp_path: Path) -> None:
    """Files written by hand the way the official preprocessing stores them."""
    folder = tmp_path / "nyu_train_val"
    for name in ("img", "seg", "normal_mask"):
        (folder / name).mkdir(parents=True)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    seg = np.array([[0, 39, 255], [5, 255, 12]], dtype=np.uint8)
    normal = np.array(
        [
            [[255, 255, 255], [255, 255, 0], [128, 128, 255]],
            [[0, 0, 0], [255, 255, 255], [255, 0, 255]],
        ],
        dtype=np.uint8,
    )
    Image.fromarray(image).save(folder / "img" / "0001.png")
    Image.fromarray(seg).save(folder / "seg" / "0001.png")
    Image.fromarray(normal).save(folder / "normal_mask" / "0001.png")
    (tmp_path / "list").mkdir()
    # paths without the leading "/" work too; blank lines are skipped
    (tmp_path / "list" / "testing_seg.txt").write_text(
        "nyu_train_val/img/0001.png nyu_train_val/seg/0001.png\n\n"
    )
    (tmp_path / "list" / "testing_normal_mask.txt").write_text(
        "/nyu_train_val/img/0001.png /nyu_train_val/normal_mask/0001.png\n"
    )
    sample = NYUv2(tmp_path, "test")[0]
    assert sample["image"].numpy().tolist() == image.tolist()
    assert sample["seg"].tolist() == [[0, 39, 255], [5, 255, 12]]
    assert sample["normal_mask"].tolist() == [[False, True, True], [True, False, True]]
    out = EvalTransform()(sample)
    assert out["seg"].tolist() == [[0, 39, 255], [5, 255, 12]]
    assert out["normal"][:, 0, 2].tolist() == [128.0, 128.0, 255.0]  # raw values kept (official)


def test_official_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        NYUv2(tmp_path / "missing")
    with pytest.raises(DatasetNotFoundError) as info:
        NYUv2(tmp_path, "train")
    message = str(info.value)
    assert f"expected list/training_seg.txt under {tmp_path}" in message
    assert "dataset=synthetic" in message and "write_nyuv2_official" in message
    with pytest.raises(ConfigError, match="split='dev'"):
        NYUv2(tmp_path, "dev")

    write_nyuv2_official(SyntheticScenes(2, size=(8, 8)), tmp_path, "train")
    seg_list = tmp_path / "list" / "training_seg.txt"
    good = seg_list.read_text()
    seg_list.write_text(good + "only_one_path.png\n")
    with pytest.raises(DatasetFormatError, match=r"training_seg.txt:3: expected '<image> <label>'"):
        NYUv2(tmp_path, "train")
    seg_list.write_text(good.splitlines()[0] + "\n")
    with pytest.raises(DatasetFormatError, match="do not name the same images"):
        NYUv2(tmp_path, "train")
    seg_list.write_text(good)
    (tmp_path / "nyu_train_val" / "normal_mask" / "train_0001.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 file.*missing.*train_0001.png"):
        NYUv2(tmp_path, "train")

    write_nyuv2_official(SyntheticScenes(1, size=(8, 8)), tmp_path, "test")
    bad_seg = np.full((8, 8), 40, dtype=np.uint8)
    Image.fromarray(bad_seg).save(tmp_path / "nyu_train_val" / "seg" / "test_0000.png")
    with pytest.raises(DatasetFormatError, match=r"holds label 40: expected 0..39 or 255"):
        NYUv2(tmp_path, "test")[0]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        tmp_path / "nyu_train_val" / "seg" / "test_0000.png"
    )
    with pytest.raises(DatasetFormatError, match="1-channel"):
        NYUv2(tmp_path, "test")[0]
    Image.fromarray(np.zeros((7, 8), np.uint8)).save(
        tmp_path / "nyu_train_val" / "seg" / "test_0000.png"
    )
    with pytest.raises(DatasetFormatError, match="sizes differ"):
        NYUv2(tmp_path, "test")[0]


# --------------------------------------------------------------------------- NYUv2 MTAN


def test_mtan_round_trip(tmp_path: Path) -> None:
    scenes = SyntheticScenes(3, size=(18, 24), seed=4, num_classes=13, with_depth=True)
    write_nyuv2_mtan(scenes, tmp_path, "test")
    image = np.load(tmp_path / "val" / "image" / "0.npy")
    label = np.load(tmp_path / "val" / "label" / "0.npy")
    depth = np.load(tmp_path / "val" / "depth" / "0.npy")
    normal = np.load(tmp_path / "val" / "normal" / "0.npy")
    assert image.shape == (18, 24, 3) and image.dtype == np.float32 and image.max() <= 1.0
    assert label.shape == (18, 24) and depth.shape == (18, 24, 1) and normal.shape == (18, 24, 3)
    data = NYUv2MTAN(tmp_path, "test", with_depth=True)
    assert len(data) == 3
    for i in range(3):
        got, raw = data[i], scenes[i]
        assert torch.equal(got["image"], raw["image"].float() / 255.0)
        assert got["seg"].dtype == torch.int64 and torch.equal(got["seg"], raw["seg"].long())
        unit, valid = decode_normals(raw["normal"])
        assert torch.equal(got["normal"], unit) and torch.equal(got["normal_mask"], valid)
        assert torch.equal(got["depth"], raw["depth"])
    # through the training transform (float image, unit normals) crops stay exact
    out = TrainTransform(crop=(16, 20))(data[0], generator=_gen(0))
    assert out["image"].shape == (3, 16, 20) and out["normal"].shape == (3, 16, 20)


def test_mtan_exact_label_mapping_and_mask(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    for name in ("image", "label", "depth", "normal"):
        (folder / name).mkdir(parents=True)
    np.save(folder / "image" / "0.npy", np.full((2, 2, 3), 0.5, dtype=np.float64))
    np.save(folder / "label" / "0.npy", np.array([[-1.0, 0.0], [12.0, 3.0]]))
    np.save(folder / "depth" / "0.npy", np.ones((2, 2, 1)))
    normal = np.zeros((2, 2, 3))
    normal[0, 1] = (0.0, 0.0, 1.0)
    normal[1, 0] = (0.6, 0.8, 0.0)
    np.save(folder / "normal" / "0.npy", normal)
    sample = NYUv2MTAN(tmp_path, "train")[0]
    assert sample["seg"].tolist() == [[255, 0], [12, 3]]
    assert sample["normal_mask"].tolist() == [[False, True], [True, False]]
    assert sample["image"].dtype == torch.float32 and float(sample["image"][0, 0, 0]) == 0.5
    out = TrainTransform(crop=4, scale=None, mirror=False, mean="none")(sample)
    assert out["seg"].tolist() == [[255, 0, 255, 255], [12, 3, 255, 255]] + [[255] * 4] * 2
    assert out["normal"][:, 1, 0].tolist() == pytest.approx([0.6, 0.8, 0.0])
    assert (out["normal"][:, 2:, :] == 0).all()

    np.save(folder / "label" / "0.npy", np.array([[-1.0, 13.0], [0.5, 3.0]]))
    with pytest.raises(DatasetFormatError, match=r"integers 0..12 and -1"):
        NYUv2MTAN(tmp_path, "train")[0]
    np.save(folder / "label" / "0.npy", np.zeros((3, 2)))
    with pytest.raises(DatasetFormatError, match="shapes differ"):
        NYUv2MTAN(tmp_path, "train")[0]
    (folder / "image" / "1.npy").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match=r"label/1.npy.*numbered 0..1"):
        NYUv2MTAN(tmp_path, "train")


def test_mtan_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        NYUv2MTAN(tmp_path / "nope")
    with pytest.raises(
        DatasetNotFoundError, match=r"expected val/image/ under .*dataset=synthetic"
    ):
        NYUv2MTAN(tmp_path, "test")


# --------------------------------------------------------------------------- IMDB-WIKI


def test_matlab_datenum_conversion_against_hand_computed_dates() -> None:
    # datenum(1980, 3, 15) = 723255: 7231 days before datenum(2000, 1, 1) = 730486
    # (7305 days from 1980-03-15 to 2000-03-15 with five Feb 29ths, minus the 74 days of 2000).
    assert matlab_datenum_to_datetime(723255.25) == datetime(1980, 3, 15, 6, 0)
    assert matlab_datenum_to_datetime(DATENUM_2000_01_01) == datetime(2000, 1, 1)
    assert matlab_datenum_to_datetime(367.0) == datetime(1, 1, 1)
    assert birth_year(DATENUM_2000_01_01 - 0.25) == 1999  # 1999-12-31 18:00
    assert birth_year(DATENUM_2000_01_01) == 2000
    for invalid in (0.0, 100.0, NAN, float("inf"), 1e12):
        assert birth_year(invalid) is None

    def record(dob: float, taken: int) -> FaceRecord:
        return FaceRecord("a.jpg", dob, taken, 1.0, 2.0, NAN)

    assert record(723255.25, 2010).age == 30
    assert record(DATENUM_2000_01_01, 2009).age == 9
    assert record(DATENUM_2000_01_01 - 0.25, 2009).age == 10
    assert record(0.0, 2009).age is None


def test_mat_file_has_the_real_structure_and_round_trips(tmp_path: Path) -> None:
    records = [
        FaceRecord(
            "01/nm0000001_rm1_1899-5-10_1968.jpg",
            693726.0,
            1968,
            1.0,
            1.46,
            NAN,
            name="Fred Astaire",
            celeb_id=1,
            face_location=(1.0, 2.0, 30.0, 40.0),
        ),
        FaceRecord(
            "02/nm0000002_rm2_1924-9-16_2004.jpg",
            702986.0,
            2004,
            0.0,
            float("-inf"),
            NAN,
            name="Lauren Bacall",
            celeb_id=2,
            face_location=(5.0, 6.0, 7.0, 8.0),
        ),
        FaceRecord(
            "02/nm0000002_rm3_1924-9-16_1974.jpg",
            702986.0,
            1974,
            NAN,
            3.2,
            1.1,
            name="Lauren Bacall",
            celeb_id=2,
            face_location=(0.5, 0.5, 9.5, 9.5),
        ),
    ]
    path = write_imdb_wiki_mat(records, tmp_path / "imdb.mat")
    mat = loadmat(path)
    struct = mat["imdb"]
    assert struct.shape == (1, 1)
    assert struct.dtype.names == (
        "dob",
        "photo_taken",
        "full_path",
        "gender",
        "name",
        "face_location",
        "face_score",
        "second_face_score",
        "celeb_names",
        "celeb_id",
    )
    entry = struct[0, 0]
    assert entry["dob"].shape == (1, 3) and entry["full_path"].shape == (1, 3)
    assert entry["full_path"][0, 1][0] == records[1].full_path  # cell of char arrays
    assert entry["face_location"][0, 0].tolist() == [[1.0, 2.0, 30.0, 40.0]]
    assert [entry["celeb_names"][0, i][0] for i in range(2)] == ["Fred Astaire", "Lauren Bacall"]
    assert math.isnan(entry["gender"][0, 2]) and entry["face_score"][0, 1] == float("-inf")
    back = read_imdb_wiki_mat(path)
    assert back == records
    assert [r.age for r in back] == [1968 - 1899, 2004 - 1924, 1974 - 1924]

    wiki = [
        FaceRecord(
            "17/10000217_1981-05-05_2009.jpg", 723671.0, 2009, 1.0, 4.3, NAN, name="Sami Jauhojärvi"
        ),
        FaceRecord("48/10000548_1925-04-04_1964.jpg", 703186.0, 1964, 1.0, 2.6, NAN, name=""),
    ]
    back = read_imdb_wiki_mat(write_imdb_wiki_mat(wiki, tmp_path / "wiki.mat"))
    assert back == wiki and back[0].celeb_id is None
    assert [r.subject for r in back] == ["Sami Jauhojärvi", "path:48/10000548_1925-04-04_1964.jpg"]
    assert [r.age for r in back] == [28, 39]


def test_filter_counts() -> None:
    def record(path: str, **changes) -> FaceRecord:
        fields = {
            "dob": DATENUM_2000_01_01,
            "photo_taken": 2020,
            "gender": 1.0,
            "face_score": 2.5,
            "second_face_score": NAN,
            "celeb_id": 1,
        }
        fields.update(changes)
        return FaceRecord(path, **fields)

    records = [
        record("kept1"),
        record("kept_age0", photo_taken=2000, gender=0.0),
        record("kept_age99", photo_taken=2099, celeb_id=2),
        record("no_face", face_score=float("-inf")),
        record("no_face_nan", face_score=NAN),
        record("two_faces", second_face_score=0.8),
        record("gender_nan", gender=NAN),
        record("gender_bad", gender=0.5),
        record("age_100", photo_taken=2100),
        record("age_negative", photo_taken=1999),
        record("dob_invalid", dob=5.0),
    ]
    assert filter_report(records) == {
        "kept": 3,
        "subjects": 2,
        "age_out_of_range": 3,
        "multiple_faces": 1,
        "no_face": 2,
        "unknown_gender": 2,
    }
    assert [r.full_path for r in filter_records(records)] == ["kept1", "kept_age0", "kept_age99"]
    assert [r.full_path for r in filter_records(records, max_age=20)] == ["kept1", "kept_age0"]


def test_subject_split_is_disjoint_and_seeded() -> None:
    records = [
        FaceRecord(f"{i}.jpg", DATENUM_2000_01_01, 2010, 1.0, 2.0, NAN, celeb_id=i % 10)
        for i in range(53)
    ]
    train, test = subject_split(records, test_subjects=3, seed=0)
    train_subjects, test_subjects = {r.subject for r in train}, {r.subject for r in test}
    assert len(test_subjects) == 3 and len(train_subjects) == 7
    assert not train_subjects & test_subjects
    assert len(train) + len(test) == 53
    assert sorted(r.full_path for r in train + test) == sorted(r.full_path for r in records)
    assert [r.full_path for r in test] == [
        r.full_path for r in records if r.subject in test_subjects
    ]
    assert subject_split(records, 3, seed=0) == (train, test)
    assert any(subject_split(records, 3, seed=s)[1] != test for s in range(1, 5))
    with pytest.raises(ConfigError, match="there are 10 subjects"):
        subject_split(records, test_subjects=10)
    wiki = [
        FaceRecord(f"{i}.jpg", DATENUM_2000_01_01, 2010, 1.0, 2.0, NAN, name=f"n{i % 4}")
        for i in range(8)
    ]
    train, test = subject_split(wiki, test_subjects=2, seed=1)
    assert len({r.name for r in test}) == 2 and not {r.name for r in train} & {r.name for r in test}


def test_imdb_wiki_dataset_on_real_files(tmp_path: Path) -> None:
    mat = write_synthetic_faces(
        tmp_path / "imdb_crop", num_subjects=6, images_per_subject=3, size=20, seed=1
    )
    report = filter_report(read_imdb_wiki_mat(mat))
    assert report == {
        "kept": 18,
        "subjects": 6,
        "multiple_faces": 6,
        "no_face": 6,
        "unknown_gender": 3,
    }
    train = IMDBWiki(tmp_path, "imdb", "train", test_subjects=2)  # finds imdb_crop/imdb.mat
    test = IMDBWiki(tmp_path / "imdb_crop", "imdb", "test", test_subjects=2)
    assert (len(train), len(test)) == (12, 6)
    assert not {r.subject for r in train.records} & {r.subject for r in test.records}
    sample = test[0]
    record = test.records[0]
    assert sample["image"].shape == (20, 20, 3) and sample["image"].dtype == torch.uint8
    assert int(sample["age"]) == record.age and int(sample["gender"]) == int(record.gender)
    name_year = record.full_path.rsplit("_", 1)[1].removesuffix(".jpg")
    born = int(record.full_path.rsplit("_", 2)[1].split("-")[0])
    assert record.age == int(name_year) - born
    wiki_mat = write_synthetic_faces(
        tmp_path / "wiki_crop", num_subjects=3, images_per_subject=2, source="wiki"
    )
    wiki = IMDBWiki(wiki_mat.parent, "wiki", "all")
    assert len(wiki) == 6 and all(r.celeb_id is None for r in wiki.records)


def test_imdb_wiki_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        IMDBWiki(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError) as info:
        IMDBWiki(tmp_path)
    assert f"expected imdb.mat under {tmp_path}" in str(info.value)
    assert "imdb-wiki" in str(info.value)
    (tmp_path / "imdb.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetFormatError, match="not a readable MATLAB"):
        read_imdb_wiki_mat(tmp_path / "imdb.mat")
    savemat(tmp_path / "imdb.mat", {"other": np.zeros(3)})
    with pytest.raises(DatasetFormatError, match="holds no 'imdb' struct"):
        read_imdb_wiki_mat(tmp_path / "imdb.mat", "imdb")
    struct = np.empty((1, 1), dtype=[("dob", object), ("photo_taken", object)])
    struct[0, 0]["dob"] = np.zeros((1, 2))
    struct[0, 0]["photo_taken"] = np.zeros((1, 2))
    savemat(tmp_path / "imdb.mat", {"imdb": struct})
    with pytest.raises(DatasetFormatError, match=r"lacks field\(s\) \['full_path'"):
        read_imdb_wiki_mat(tmp_path / "imdb.mat")
    mat = write_synthetic_faces(tmp_path / "faces", num_subjects=2, images_per_subject=1)
    data = IMDBWiki(mat.parent, split="all")
    (mat.parent / data.records[0].full_path).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"listed in imdb.mat"):
        data[0]
    with pytest.raises(ConfigError, match="test_subjects=2000"):
        IMDBWiki(mat.parent, split="train")


# --------------------------------------------------------------------------- build_dataset


def test_registries() -> None:
    assert sorted(DATASETS) == ["imdb", "nyuv2", "nyuv2_mtan", "synthetic", "wiki"]
    assert TASKS == {
        "nyuv2": ["seg", "normal"],
        "nyuv2_mtan": ["seg", "normal"],
        "synthetic": ["seg", "normal"],
        "imdb": ["age", "gender"],
        "wiki": ["age", "gender"],
    }
    assert NUM_OUTPUTS["nyuv2"] == {"seg": 40, "normal": 3}
    assert NUM_OUTPUTS["nyuv2_mtan"] == {"seg": 13, "normal": 3}
    assert NUM_OUTPUTS["wiki"] == {"age": 100, "gender": 2}


def test_build_dataset_synthetic_in_memory_and_on_disk(tmp_path: Path) -> None:
    train = build_dataset(
        "synthetic",
        None,
        "train",
        train=True,
        crop=(40, 48),
        num_images=3,
        size=(32, 40),
        aug_seed=0,
    )
    assert isinstance(train.transform, TrainTransform) and len(train) == 3
    batch = next(iter(DataLoader(train, batch_size=3)))
    assert batch["image"].shape == (3, 3, 40, 48) and batch["seg"].shape == (3, 40, 48)
    assert batch["normal"].shape == (3, 3, 40, 48) and batch["normal_mask"].dtype == torch.bool
    test = build_dataset("synthetic", None, "test", num_images=2, size=(32, 40))
    assert isinstance(test.transform, EvalTransform) and test[0]["image"].shape == (3, 32, 40)
    # train and test scenes differ; the default crop is the scene size
    assert not torch.equal(test.base[0]["image"], train.base[0]["image"])
    assert build_dataset("synthetic", num_images=1, size=(32, 40))[0]["seg"].shape == (32, 40)

    on_disk = build_dataset("synthetic", tmp_path, "test", num_images=2, size=(32, 40))
    assert isinstance(on_disk.base, NYUv2) and (tmp_path / "list" / "testing_seg.txt").is_file()
    for i in range(2):
        assert all(torch.equal(on_disk[i][k], test[i][k]) for k in test[i])
    unit = build_dataset("synthetic", None, "test", num_images=1, size=(32, 40), normals="unit")
    assert torch.allclose(unit[0]["normal"].norm(dim=0)[unit[0]["normal_mask"]], torch.tensor(1.0))


def test_build_dataset_real_formats_and_errors(tmp_path: Path) -> None:
    write_nyuv2_official(SyntheticScenes(2, size=(20, 24)), tmp_path / "nyu", "train")
    nyu = build_dataset("nyuv2", tmp_path / "nyu", "train", crop=17, mean="imagenet", aug_seed=1)
    assert nyu[1]["image"].shape == (3, 17, 17)
    write_nyuv2_mtan(SyntheticScenes(2, size=(20, 24), num_classes=13), tmp_path / "mtan", "test")
    mtan = build_dataset("nyuv2_mtan", tmp_path / "mtan", "test", pad_to_multiple=8)
    assert mtan[0]["seg"].shape == (24, 24)
    mat = write_synthetic_faces(tmp_path / "imdb_crop", num_subjects=4, images_per_subject=2)
    faces = build_dataset("imdb", mat.parent, "train", crop=24, resize=28, test_subjects=1)
    assert len(faces) == 6 and faces[0]["image"].shape == (3, 24, 24)
    assert sorted(faces[0]) == ["age", "gender", "image"]

    with pytest.raises(ConfigError, match="dataset 'coco' is unknown"):
        build_dataset("coco", None, "train")
    with pytest.raises(DatasetNotFoundError, match=r"needs root=.*dataset=synthetic"):
        build_dataset("nyuv2", None, "train")
    with pytest.raises(DatasetNotFoundError, match=r"expected list/training_seg.txt"):
        build_dataset("nyuv2", tmp_path, "train")
    with pytest.raises(ConfigError, match="split='dev'"):
        build_dataset("synthetic", None, "dev")


def test_synthetic_scenes_are_learnable() -> None:
    """A tiny per-pixel network fitted for a few seconds beats the majority class by far and
    predicts normals far better than a constant: the images carry the labels' information."""
    torch.manual_seed(0)
    data = build_dataset(
        "synthetic",
        None,
        "train",
        crop=(32, 40),
        num_images=16,
        size=(32, 40),
        scale=None,
        mean="imagenet",
        normals="unit",
        aug_seed=0,
    )
    batch = next(iter(DataLoader(data, batch_size=16)))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 40 + 3, 1),
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    seg, normal, mask = batch["seg"], batch["normal"], batch["normal_mask"]
    for _ in range(200):
        out = net(batch["image"])
        pred_normal = torch.nn.functional.normalize(out[:, 40:], dim=1)
        cosine = (pred_normal * normal).sum(1)[mask]
        loss = torch.nn.functional.cross_entropy(out[:, :40], seg, ignore_index=255)
        loss = loss + (1 - cosine).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        out = net(batch["image"])
        valid = seg != 255
        accuracy = (out[:, :40].argmax(1) == seg)[valid].float().mean().item()
        majority = torch.bincount(seg[valid]).max().item() / valid.sum().item()
        angles = torch.rad2deg(
            torch.acos(
                (torch.nn.functional.normalize(out[:, 40:], dim=1) * normal)
                .sum(1)[mask]
                .clamp(-1, 1)
            )
        )
        mean_normal = torch.nn.functional.normalize(normal.permute(0, 2, 3, 1)[mask].mean(0), dim=0)
        constant = torch.rad2deg(
            torch.acos((normal.permute(0, 2, 3, 1)[mask] @ mean_normal).clamp(-1, 1))
        )
    assert accuracy > majority + 0.25, (accuracy, majority)
    assert angles.mean() < 0.7 * constant.mean(), (angles.mean(), constant.mean())


# ----------------------------------------------------------------------------- rescale convention


def _two_by_two() -> dict[str, torch.Tensor]:
    """A 2×2 sample: image red channel [[0, 90], [0, 90]] (green/blue 0), seg [[0, 1], [2, 3]],
    unit normals all +z."""
    image = torch.zeros(2, 2, 3, dtype=torch.uint8)
    image[:, 1, 0] = 90
    normal = torch.zeros(2, 2, 3)
    normal[..., 2] = 1.0
    return {"image": image, "seg": torch.tensor([[0, 1], [2, 3]]), "normal": normal}


@pytest.mark.parametrize(
    ("resize", "middle_red", "seg_rows"),
    [
        # sources 0, 2/3, 4/3: bilinear 90·2/3 = 60; nearest floor → rows/cols 0, 0, 1
        ("tf_legacy", 60.0, [[0, 0, 1], [0, 0, 1], [2, 2, 3]]),
        # half-pixel: sources −1/6 (clamped), 1/2, 7/6: bilinear 45; nearest floor((i+.5)·2/3)
        ("align_corners_false", 45.0, [[0, 1, 1], [2, 3, 3], [2, 3, 3]]),
        # sources 0, 1/2, 1: bilinear 45; nearest round half up → 0, 1, 1
        ("align_corners_true", 45.0, [[0, 1, 1], [2, 3, 3], [2, 3, 3]]),
    ],
)
def test_rescale_resizes_image_and_labels_with_one_convention(
    resize: str, middle_red: float, seg_rows: list[list[int]]
) -> None:
    transform = TrainTransform(crop=3, scale=(1.5, 1.5), mirror=False, mean="none", resize=resize)
    out = transform(_two_by_two(), generator=_gen(0))  # 2×2 · 1.5 → 3×3 = the crop: no offset
    red = (out["image"][0] * 255).tolist()
    assert red[0] == pytest.approx([0.0, middle_red, 90.0], abs=1e-4)
    assert red[2] == pytest.approx([0.0, middle_red, 90.0], abs=1e-4)
    assert out["seg"].tolist() == seg_rows
    assert out["normal_mask"].all() and (out["normal"][2] == 1).all()


def test_rescale_default_is_tf_legacy_and_unknown_modes_are_refused() -> None:
    assert TrainTransform().resize == "tf_legacy"
    assert build_dataset(
        "synthetic", split="train", num_images=1, size=(8, 8)
    ).transform.resize == ("tf_legacy")
    with pytest.raises(ConfigError, match="tf_legacy"):
        TrainTransform(resize="bicubic")


@pytest.mark.parametrize(
    ("overrides", "resize", "negate"),
    [
        ([], "tf_legacy", False),
        (["rescale_resize=align_corners_false"], "align_corners_false", False),
        (["metrics_convention=mtan"], "tf_legacy", True),  # MTAN negates x on flips
    ],
)
def test_config_reaches_the_training_transform(
    overrides: list[str], resize: str, negate: bool
) -> None:
    from recipes.configs import apply_overrides, get_config
    from recipes.loading import dataset_for

    config = apply_overrides(get_config("synthetic_demo_nddr"), ["synthetic_images=1", *overrides])
    transform = dataset_for(config, "train", train=True).transform
    assert (transform.resize, transform.negate_normal_x) == (resize, negate)
