"""DeepLab-LargeFOV VOC weights (the official NDDR-CNN start): reading the official TF V2
checkpoint (written here byte by byte from the format: a LevelDB-style table of
``BundleEntryProto`` entries and a raw data shard), ``.npz``, caffe-tensorflow ``.npy`` through
``convert``, loading into ``deeplab_vgg16`` with exact HWIO → OIHW checks, and the config starts.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.builders import build_network
from recipes.configs import apply_overrides, get_config, validate
from recipes.deeplab_weights import (
    DEFAULT_VOC_WEIGHTS,
    FORMAT,
    LAYERS,
    convert,
    load_deeplab_voc,
    main,
    read_voc_weights,
)
from recipes.errors import ConfigError, DatasetFormatError, DatasetNotFoundError
from recipes.models import deeplab_vgg16
from recipes.paper_configs import PRETRAINED_WEIGHTS, VOC_WEIGHTS
from recipes.tf_checkpoint import read_tf_checkpoint

# ----------------------------------------------------------------------------- a TF V2 writer


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(entries: list[tuple[bytes, bytes]], restart_every: int = 4) -> bytes:
    """A LevelDB table block: prefix-compressed keys, a restart point every few entries."""
    out, restarts, last = bytearray(), [], b""
    for index, (key, value) in enumerate(entries):
        shared = 0
        if index % restart_every:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    return (
        bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    )


def _literal_snappy(raw: bytes) -> bytes:
    """Snappy of ``raw`` as one literal (valid snappy: exercises the compressed-block path)."""
    size = len(raw) - 1
    extra = (size.bit_length() + 7) // 8
    return _varint(len(raw)) + bytes([(59 + extra) << 2]) + size.to_bytes(extra, "little") + raw


def write_tf_checkpoint(
    prefix: Path, tensors: dict[str, np.ndarray], *, snappy: bool = False
) -> None:
    """Write ``tensors`` as TF's ``tf.train.Saver`` V2 does: ``PREFIX.data-00000-of-00001`` (raw
    little-endian bytes) and ``PREFIX.index`` (header at key "", entries sorted by name, two data
    blocks, an index block, an empty metaindex block, the 48-byte footer with the table magic)."""
    dtypes = {np.dtype("float32"): 1, np.dtype("int64"): 9}
    data, entries = bytearray(), []
    for name in sorted(tensors):
        array = np.asarray(tensors[name])  # tobytes() is C order; 0-d stays 0-d
        shape = b"".join(_field(2, _field(1, d)) for d in array.shape)
        entry = _field(1, dtypes[array.dtype]) + _field(2, shape)
        entry += (_field(4, len(data)) if data else b"") + _field(5, array.nbytes)
        entry += _varint(6 << 3 | 5) + struct.pack("<I", 0)  # crc32c (not checked by the reader)
        entries.append((name.encode(), entry))
        data += array.tobytes()
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    header = _field(1, 1) + _field(3, _field(1, 1))  # num_shards 1, little-endian (default)
    entries = [(b"", header), *entries]
    half = len(entries) // 2
    out, index = bytearray(), []
    for chunk in (entries[:half], entries[half:]):
        raw = _block(chunk)
        body, kind = (_literal_snappy(raw), 1) if snappy else (raw, 0)
        index.append((chunk[-1][0], _varint(len(out)) + _varint(len(body))))
        out += body + bytes([kind]) + b"\0\0\0\0"
    handles = []
    for block in (_block([]), _block(index)):
        handles.append(_varint(len(out)) + _varint(len(block)))
        out += block + b"\0" * 5
    footer = (handles[0] + handles[1]).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    Path(f"{prefix}.index").write_bytes(bytes(out + footer))


# ----------------------------------------------------------------------------- fixtures

_RNG = np.random.default_rng(0)


def _hwio(layer: str, classes: int | None = None) -> np.ndarray:
    kernel, cin, cout = LAYERS[layer]
    return _RNG.standard_normal((kernel, kernel, cin, classes or cout), dtype=np.float32)


def _official_tensors(layers: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Slim names as in ``model.ckpt-init-slim``, real shapes, plus what a Saver also writes."""
    scopes = {"fc6": "fc6", "fc7": "fc7", "fc8": "fc8_voc12"}
    tensors: dict[str, np.ndarray] = {"global_step": np.array(20000, dtype=np.int64)}
    for layer in layers:
        scope = scopes[layer] if layer in scopes else f"conv{layer[4]}/{layer}"
        weights = _hwio(layer)
        tensors[f"vgg_16/{scope}/weights"] = weights
        tensors[f"vgg_16/{scope}/biases"] = _RNG.standard_normal(weights.shape[3], np.float32)
    tensors["vgg_16/conv1/conv1_1/weights/Momentum"] = np.ones((3, 3, 3, 64), np.float32)
    return tensors


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    prefix = tmp_path_factory.mktemp("voc") / "model.ckpt-init-slim"
    tensors = _official_tensors(("conv1_1", "conv1_2", "fc6", "fc7", "fc8"))
    write_tf_checkpoint(prefix, tensors)
    return prefix, tensors


class _Unsafe:
    """Any class: a pickle holding it is refused by ``torch.load(weights_only=True)``."""


def _oihw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(3, 2, 0, 1)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("snappy", [False, True])
def test_tf_checkpoint_reader_returns_every_numeric_tensor_exactly(
    tmp_path: Path, snappy: bool
) -> None:
    tensors = _official_tensors(("conv1_1", "fc7"))
    write_tf_checkpoint(tmp_path / "ckpt", tensors, snappy=snappy)
    read = read_tf_checkpoint(tmp_path / "ckpt")
    assert sorted(read) == sorted(tensors)
    for name, array in tensors.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)


def test_official_checkpoint_loads_with_exact_transposes(official: tuple[Path, dict]) -> None:
    prefix, tensors = official
    model = deeplab_vgg16(40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_deeplab_voc(model, f"{prefix}.index", strict=False)  # the .index path works too
    assert report.loaded == [
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "head.fc6.weight",
        "head.fc7.weight",
    ]
    w = tensors["vgg_16/conv1/conv1_1/weights"]
    assert torch.equal(model.features[0].weight, _oihw(w))
    assert model.features[0].weight[5, 2, 0, 1] == torch.tensor(
        w[0, 1, 2, 5]
    )  # [o,i,h,w]=[h,w,i,o]
    assert torch.equal(
        model.features[0].bias, torch.from_numpy(tensors["vgg_16/conv1/conv1_1/biases"])
    )
    assert torch.equal(model.features[3].weight, _oihw(tensors["vgg_16/conv1/conv1_2/weights"]))
    fc6 = tensors["vgg_16/fc6/weights"]
    assert tuple(model.head.fc6.weight.shape) == (1024, 512, 3, 3) and model.head.fc6.dilation == (
        12,
        12,
    )
    assert torch.equal(model.head.fc6.weight, _oihw(fc6))
    assert model.head.fc6.weight[1000, 511, 2, 0] == torch.tensor(fc6[2, 0, 511, 1000])
    assert torch.equal(model.head.fc7.weight, _oihw(tensors["vgg_16/fc7/weights"]))
    state = model.state_dict()
    for key in report.kept_at_init:  # fc8, BN, the layers the file lacks: as built
        assert torch.equal(state[key], before[key]), key
    assert (
        "head.fc8.weight" in report.kept_at_init
        and "features.1.running_mean" in report.kept_at_init
    )
    assert report.dropped == [
        "fc6 biases (our head.fc6 has none: BN follows)",
        "fc7 biases (our head.fc7 has none: BN follows)",
        "fc8 (the VOC classifier, 21 classes)",
    ]


def test_without_batch_norm_the_fc_biases_and_fc8_load(official: tuple[Path, dict]) -> None:
    prefix, tensors = official
    model = deeplab_vgg16(21, batch_norm=False)
    report = load_deeplab_voc(model, prefix, include_fc8=True, strict=False)
    assert report.dropped == [] and "features.2.weight" in report.loaded  # conv1_2 without BN
    assert torch.equal(model.head.fc6.bias, torch.from_numpy(tensors["vgg_16/fc6/biases"]))
    assert torch.equal(model.head.fc8.weight, _oihw(tensors["vgg_16/fc8_voc12/weights"]))


def test_fc8_into_another_class_count_names_the_shapes(official: tuple[Path, dict]) -> None:
    prefix, _ = official
    with pytest.raises(DatasetFormatError) as error:
        load_deeplab_voc(deeplab_vgg16(40), prefix, include_fc8=True, strict=False)
    message = str(error.value)
    assert str(prefix) in message and "layer fc8 (our head.fc8)" in message
    assert "(1, 1, 1024, 21); expected (1, 1, 1024, 40)" in message and "21 VOC classes" in message


def test_strict_load_names_the_missing_layers(official: tuple[Path, dict]) -> None:
    prefix, _ = official
    with pytest.raises(
        DatasetFormatError, match=r"lacks DeepLab layer\(s\) conv2_1, conv2_2, conv3_1"
    ):
        load_deeplab_voc(deeplab_vgg16(40), prefix)


def test_npz_in_slim_or_caffe_tensorflow_names(tmp_path: Path) -> None:
    w, b = _hwio("conv1_1"), _RNG.standard_normal(64, np.float32)
    fc7 = _hwio("fc7")
    np.savez(
        tmp_path / "slim.npz",
        **{"vgg_16/conv1/conv1_1/weights": w, "vgg_16/conv1/conv1_1/biases": b},
    )
    np.savez(
        tmp_path / "caffe.npz", **{"conv1_1/weights": w, "conv1_1/biases": b, "fc7/weights": fc7}
    )
    assert torch.equal(read_voc_weights(tmp_path / "slim.npz")["conv1_1.weight"], _oihw(w))
    read = read_voc_weights(tmp_path / "caffe.npz")
    assert list(read) == ["conv1_1.weight", "conv1_1.bias", "fc7.weight"]
    assert torch.equal(read["conv1_1.bias"], torch.from_numpy(b))
    assert torch.equal(read["fc7.weight"], _oihw(fc7))


def test_caffe_tensorflow_npy_needs_the_convert_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w, b = _hwio("conv1_1"), _RNG.standard_normal(64, np.float32)
    fc8 = _hwio("fc8")
    np.save(
        tmp_path / "voc.npy",
        {"conv1_1": {"weights": w, "biases": b}, "fc8_voc12": [fc8, np.zeros(21, np.float32)]},
    )
    with pytest.raises(DatasetFormatError, match=r"pickled dict.*recipes\.deeplab_weights convert"):
        read_voc_weights(tmp_path / "voc.npy")
    assert (
        main(["convert", str(tmp_path / "voc.npy"), str(tmp_path / "out" / "voc.pth"), "--no-fc8"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    converted = read_voc_weights(tmp_path / "out" / "voc.pth")  # torch.load(weights_only=True)
    assert list(converted) == ["conv1_1.weight", "conv1_1.bias"]
    assert torch.equal(converted["conv1_1.weight"], _oihw(w))
    assert convert(tmp_path / "voc.npy", tmp_path / "all.pth") == [
        "conv1_1.weight",
        "conv1_1.bias",
        "fc8.weight",
        "fc8.bias",
    ]
    model = deeplab_vgg16(3)
    assert load_deeplab_voc(model, tmp_path / "all.pth", strict=False).loaded == [
        "features.0.weight",
        "features.0.bias",
    ]
    assert torch.equal(model.features[0].weight, _oihw(w))


def test_convert_from_the_official_checkpoint_round_trips(
    official: tuple[Path, dict], tmp_path: Path
) -> None:
    prefix, _ = official
    convert(prefix, tmp_path / "voc.pth")
    original, converted = read_voc_weights(prefix), read_voc_weights(tmp_path / "voc.pth")
    assert list(original) == list(converted)
    assert all(torch.equal(original[k], converted[k]) for k in original)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_file_the_layer_and_the_shape(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"absent\.pth' do not exist.*deeplab_weights convert"
    ):
        load_deeplab_voc(deeplab_vgg16(3), tmp_path / "absent.pth")
    np.savez(tmp_path / "oihw.npz", **{"fc6/weights": np.zeros((1024, 512, 3, 3), np.float32)})
    with pytest.raises(DatasetFormatError) as error:
        load_deeplab_voc(deeplab_vgg16(3), tmp_path / "oihw.npz", strict=False)
    assert f"{str(tmp_path / 'oihw.npz')!r}: layer fc6 (our head.fc6)" in str(error.value)
    assert "HWIO shape (1024, 512, 3, 3); expected (3, 3, 512, 1024)" in str(error.value)
    np.savez(tmp_path / "flat.npz", **{"conv1_1/weights": np.zeros((27, 64), np.float32)})
    with pytest.raises(
        DatasetFormatError,
        match=r"conv1_1 weights .* shape \(27, 64\); expected HWIO \(3, 3, 3, 64\)",
    ):
        read_voc_weights(tmp_path / "flat.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetFormatError, match="holds no DeepLab-LargeFOV layer"):
        read_voc_weights(tmp_path / "other.npz")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "plain.pth")
    with pytest.raises(
        DatasetFormatError, match=r"not a file written by python -m recipes\.deeplab_weights"
    ):
        read_voc_weights(tmp_path / "plain.pth")
    torch.save(
        {"format": FORMAT, "layers": {}, "code": _Unsafe()},
        tmp_path / "unsafe.pth",
    )
    with pytest.raises(DatasetFormatError, match="weights-only torch file"):
        read_voc_weights(tmp_path / "unsafe.pth")
    with pytest.raises(ConfigError, match="deeplab_vgg16 only"):
        load_deeplab_voc(torch.nn.Conv2d(3, 3, 1), tmp_path / "oihw.npz", strict=False)


def test_broken_tf_checkpoints_are_format_errors(tmp_path: Path) -> None:
    write_tf_checkpoint(tmp_path / "ckpt", {"vgg_16/fc7/weights": _hwio("fc7")})
    data = tmp_path / "ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match=r"'vgg_16/fc7/weights' has 100 bytes"):
        read_voc_weights(tmp_path / "ckpt")
    (tmp_path / "v1.index").write_bytes(b"not a table" * 10)
    with pytest.raises(DatasetFormatError, match="not a TensorFlow V2 checkpoint index"):
        read_voc_weights(tmp_path / "v1")


# ----------------------------------------------------------------------------- configs and starts


def test_paper_rows_start_as_the_official_code() -> None:
    assert VOC_WEIGHTS == DEFAULT_VOC_WEIGHTS
    for prefix in ("nyuv2_vgg16", "nyuv2_vgg16_shortcut"):
        for method in ("single_seg", "single_normal", "mul"):
            cfg = get_config(f"{prefix}_{method}")
            assert (cfg.start, cfg.voc_weights, cfg.init_from) == (
                "voc_if_present",
                VOC_WEIGHTS,
                {},
            )
            assert cfg.pretrained == PRETRAINED_WEIGHTS["deeplab_vgg16"]
        assert get_config(f"{prefix}_nddr").start == "pretrained"  # fused: from our single tasks
    assert get_config("nyuv2_vgg16_nddr_from_voc").start == "voc"
    assert get_config("nyuv2_resnet101_single_seg").start == "pretrained"
    with pytest.raises(ConfigError, match=r"start='voc' .* needs model='deeplab_vgg16'"):
        validate(
            dataclasses.replace(
                get_config("nyuv2_alexnet_single_seg"), start="voc", voc_weights="x"
            )
        )
    with pytest.raises(ConfigError, match="needs voc_weights=PATH"):
        validate(dataclasses.replace(get_config("nyuv2_vgg16_single_seg"), voc_weights=""))
    with pytest.raises(ConfigError, match="start='imagenet' is not allowed"):
        validate(dataclasses.replace(get_config("nyuv2_vgg16_single_seg"), start="imagenet"))


def test_absent_voc_file_falls_back_to_imagenet_loudly(tmp_path: Path) -> None:
    imagenet = deeplab_vgg16(40).state_dict()
    torch.save(
        {k: v for k, v in imagenet.items() if k.startswith("features.")}, tmp_path / "in.pth"
    )
    absent = tmp_path / "voc.pth"
    cfg = apply_overrides(
        get_config("nyuv2_vgg16_single_seg"),
        [f"voc_weights={absent}", f"pretrained={tmp_path / 'in.pth'}", "crop=33"],
    )
    logged: list[str] = []
    network = build_network(cfg, log=logged.append)
    warning = [
        line for line in network.notes if line.startswith("WARNING: seg: start=voc_if_present")
    ]
    assert len(warning) == 1 and warning[0] in logged
    assert f"DeepLab VOC weights {str(absent)!r} are absent" in warning[0]
    assert "NOT the official start" in warning[0] and "fc6/fc7 at random init" in warning[0]
    assert torch.equal(network.module.seg.features[0].weight, imagenet["features.0.weight"])
    strict = apply_overrides(cfg, ["start=voc"])
    with pytest.raises(DatasetNotFoundError, match="deeplab_weights convert"):
        build_network(strict)


@pytest.mark.slow
def test_full_voc_file_is_the_default_start_of_single_and_mul(tmp_path: Path) -> None:
    """A whole DeepLab-LargeFOV file at real shapes (~82 MB): the strict default path."""
    tensors = _official_tensors(tuple(LAYERS))
    write_tf_checkpoint(tmp_path / "model.ckpt-init-slim", tensors)
    convert(tmp_path / "model.ckpt-init-slim", tmp_path / "voc.pth")
    for name in ("nyuv2_vgg16_single_normal", "nyuv2_vgg16_mul"):
        cfg = apply_overrides(
            get_config(name), [f"voc_weights={tmp_path / 'voc.pth'}", "crop=33", "mean=caffe_bgr"]
        )
        network = build_network(cfg)
        assert any("start=voc (official)" in line for line in network.notes)
        assert not any(line.startswith("WARNING") for line in network.notes)
        model = network.module.normal if name.endswith("normal") else network.module
        fc7 = dict(model.named_parameters())[
            next(k for k, _ in model.named_parameters() if k.endswith("fc7.weight"))
        ]
        assert torch.equal(fc7, _oihw(tensors["vgg_16/fc7/weights"]))
