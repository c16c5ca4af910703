"""nddrify.load on damaged and foreign files: every case is a CheckpointError naming the file.

One real checkpoint (two TinyCNN tasks, saved with their specs) is written once; each case derives
a bad file from its bytes, deterministically (every random choice comes from a generator seeded
with the case's name): truncations, flipped bytes in each region of the zip archive, members
deleted, renamed, duplicated, added or replaced, payloads of the wrong kind, files that are not
checkpoints at all. Byte flips target the bytes that carry content or structure (member data,
signatures, names, the central directory's CRCs, sizes and offsets). The fields no zip reader
uses — timestamps, version fields, the padding torch puts in local headers, the local copies of
CRCs and sizes — are left alone: flipping them leaves the same content, which loads correctly.
"""

from __future__ import annotations

import argparse
import io
import pickle
import random
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nddrify
from nddrify.checkpoint import atomic_save
from nddrify.errors import CheckpointError

SEED = 2024
SPECS = ["tests.models:TinyCNN", "tests.models:TinyCNN"]


@dataclass(frozen=True)
class Good:
    """The intact checkpoint's bytes, its payload and where its zip structures lie."""

    data: bytes
    payload: dict
    members: dict[str, tuple[int, int, int]]  # name: (local header, data start, data end)
    central: dict[str, int]  # name: offset of its central-directory entry
    end: int  # offset of the end-of-central-directory record

    def member(self, suffix: str) -> tuple[str, tuple[int, int, int]]:
        return next((n, m) for n, m in self.members.items() if n.endswith(suffix))

    def tensors(self) -> list[tuple[int, int, int]]:
        return [m for n, m in self.members.items() if "/data/" in n and m[2] > m[1]]


def _layout(data: bytes) -> Good:
    archive = zipfile.ZipFile(io.BytesIO(data))
    members = {}
    for info in archive.infolist():
        start = info.header_offset
        name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])
        begin = start + 30 + name_length + extra_length
        members[info.filename] = (start, begin, begin + info.compress_size)
    central, offset = {}, archive.start_dir
    while data[offset : offset + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack(
            "<HHH", data[offset + 28 : offset + 34]
        )
        central[data[offset + 46 : offset + 46 + name_length].decode()] = offset
        offset += 46 + name_length + extra_length + comment_length
    payload = torch.load(io.BytesIO(data), weights_only=True)
    return Good(data, payload, members, central, data.rindex(b"PK\x05\x06"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only 2 fusion levels"
        fused = nddrify.fuse(SPECS, example_input=x).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path_factory.mktemp("good") / "fused.pt"
    nddrify.save(fused, path)
    loaded = nddrify.load(path).eval()  # the intact file loads, with the same outputs
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), fused(x)))
    return _layout(path.read_bytes())


Case = Callable[[Good, random.Random, Path], None]
CASES: dict[str, Case] = {}


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


Region = Callable[[Good, random.Random], tuple[int, int]]


def _flip(region: Region) -> Case:
    def case(good: Good, rng: random.Random, path: Path) -> None:
        start, end = region(good, rng)
        data = bytearray(good.data)
        data[rng.randrange(start, end)] ^= rng.randrange(1, 256)
        _write(path, bytes(data))

    return case


def _truncate(at: Callable[[Good, random.Random], int]) -> Case:
    return lambda good, rng, path: _write(path, good.data[: at(good, rng)])


def _rezip(edit: Callable[[str, bytes], list[tuple[str, bytes]]]) -> Case:
    """Rewrite the archive member by member; ``edit`` gives each member's replacements."""

    def case(good: Good, rng: random.Random, path: Path) -> None:
        source = zipfile.ZipFile(io.BytesIO(good.data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about duplicate names
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
                for info in source.infolist():
                    for name, data in edit(info.filename, source.read(info)):
                        out.writestr(name, data)

    return case


def _payload(change: Callable[[dict], object]) -> Case:
    """Save (with atomic_save, as nddrify.save does) a payload derived from the good one."""

    def case(good: Good, rng: random.Random, path: Path) -> None:
        payload = {**good.payload, "state_dict": dict(good.payload["state_dict"])}
        atomic_save(change(payload), path)

    return case


def _member_data(suffix: str) -> Region:
    return lambda good, rng: good.member(suffix)[1][1:]


def _tensor_data(good: Good, rng: random.Random) -> tuple[int, int]:
    """The data of one tensor record, chosen at random."""
    _, start, end = rng.choice(good.tensors())
    return start, end


def _central(suffix: str, start: int, length: int) -> Region:
    def region(good: Good, rng: random.Random) -> tuple[int, int]:
        offset = next(o for n, o in good.central.items() if n.endswith(suffix))
        return offset + start, offset + start + length

    return region


# flipped bytes: signatures, names, member data, central directory, end record
for suffix in ("data.pkl", "data/0"):
    CASES[f"flip-local-signature-{suffix.replace('/', '-')}"] = _flip(
        lambda g, r, s=suffix: (g.member(s)[1][0], g.member(s)[1][0] + 4)
    )
for suffix in ("data.pkl", "/version", "data/0"):
    CASES[f"flip-local-name-{suffix.strip('/').replace('/', '-')}"] = _flip(
        lambda g, r, s=suffix: (
            g.member(s)[1][0] + 30,
            g.member(s)[1][0] + 30 + len(g.member(s)[0]),
        )
    )
for i in range(10):
    CASES[f"flip-pickle-{i}"] = _flip(_member_data("data.pkl"))
for i in range(10):
    CASES[f"flip-tensor-data-{i}"] = _flip(_tensor_data)
for suffix in ("/version", "byteorder", "data/1"):
    CASES[f"flip-member-{suffix.strip('/').replace('/', '-')}"] = _flip(_member_data(suffix))
for label, start, length in (
    ("signature", 0, 4),
    ("crc", 16, 4),
    ("sizes", 20, 8),
    ("name-length", 28, 2),
    ("offset", 42, 4),
    ("name", 46, 8),
):
    CASES[f"flip-central-{label}-pickle"] = _flip(_central("data.pkl", start, length))
    CASES[f"flip-central-{label}-tensor"] = _flip(_central("data/2", start, length))
CASES["flip-end-signature"] = _flip(lambda g, r: (g.end, g.end + 4))

# truncations
for label, at in {
    "0-bytes": lambda g, r: 0,
    "1-byte": lambda g, r: 1,
    "4-bytes": lambda g, r: 4,
    "local-header": lambda g, r: 29,
    "in-pickle": lambda g, r: g.member("data.pkl")[1][1] + 20,
    "after-pickle": lambda g, r: g.member("data.pkl")[1][2],
    "in-tensor-data": lambda g, r: sum(_tensor_data(g, r)) // 2,
    "central-directory": lambda g, r: min(g.central.values()),
    "mid-central-directory": lambda g, r: sorted(g.central.values())[3] + 10,
    "end-record": lambda g, r: g.end,
    "len-22": lambda g, r: len(g.data) - 22,
    "len-1": lambda g, r: len(g.data) - 1,
    **{f"random-{i}": lambda g, r: r.randrange(1, len(g.data)) for i in range(6)},
}.items():
    CASES[f"truncate-{label}"] = _truncate(at)


def _drop(suffix: str) -> Callable[[str, bytes], list[tuple[str, bytes]]]:
    return lambda n, d: [] if n.endswith(suffix) else [(n, d)]


def _rename(suffix: str, new: str) -> Callable[[str, bytes], list[tuple[str, bytes]]]:
    return lambda n, d: [(n[: -len(suffix)] + new if n.endswith(suffix) else n, d)]


def _replace(suffix: str, data: bytes) -> Callable[[str, bytes], list[tuple[str, bytes]]]:
    return lambda n, d: [(n, data if n.endswith(suffix) else d)]


# zip members deleted, renamed, duplicated, added, replaced (CRCs recomputed by zipfile)
CASES |= {
    "delete-data.pkl": _rezip(_drop("data.pkl")),
    "delete-tensor-record": _rezip(_drop("/data/0")),
    "delete-version": _rezip(_drop("/version")),
    "rename-data.pkl": _rezip(_rename("data.pkl", "data.pkl.bak")),
    "rename-tensor-record": _rezip(_rename("/data/0", "/data/0x")),
    "rename-out-of-folder": _rezip(_rename("archive/version", "other/version")),
    "duplicate-data.pkl": _rezip(lambda n, d: [(n, d)] * (2 if n.endswith("data.pkl") else 1)),
    "duplicate-tensor-record": _rezip(lambda n, d: [(n, d)] * (2 if n.endswith("data/1") else 1)),
    "extra-tensor-record": _rezip(
        lambda n, d: [(n, d)] + ([("archive/data/999", b"\x07" * 64)] if n.endswith("pkl") else [])
    ),
    "extra-member-elsewhere": _rezip(
        lambda n, d: [(n, d)] + ([("notes/readme.txt", b"hello")] if n.endswith("pkl") else [])
    ),
    "pickle-random-bytes": _rezip(_replace("data.pkl", random.Random(SEED).randbytes(300))),
    "pickle-of-a-list": _rezip(_replace("data.pkl", pickle.dumps([1, 2, 3], protocol=2))),
    "pickle-of-a-dict": _rezip(_replace("data.pkl", pickle.dumps({"a": 1}, protocol=2))),
    "pickle-with-a-class": _rezip(
        _replace("data.pkl", pickle.dumps(argparse.Namespace(lr=0.1), protocol=2))
    ),
    "pickle-cut-in-half": _rezip(lambda n, d: [(n, d[: len(d) // 2] if n.endswith("pkl") else d)]),
    "tensor-record-rewritten": _rezip(
        lambda n, d: [(n, bytes(255 - b for b in d) if n.endswith("/data/2") else d)]
    ),
    "tensor-record-shortened": _rezip(
        lambda n, d: [(n, d[: len(d) // 2] if n.endswith("/data/2") else d)]
    ),
    "byteorder-big": _rezip(_replace("byteorder", b"big")),
    "byteorder-garbage": _rezip(_replace("byteorder", b"middle")),
}


def _tampered(payload: dict) -> dict:
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] + 1e-3  # the old digest stays
    return payload


def _v2(payload: dict, **changes: object) -> dict:
    """A format-2 payload (no digest) with ``changes`` (``None``: the entry removed)."""
    payload = {**payload, "format": "nddrify.fused/2", **changes}
    return {k: v for k, v in payload.items() if k != "digest" and v is not None}


# payloads that load but are not an intact nddrify checkpoint
CASES |= {
    "payload-tampered-weights": _payload(_tampered),
    "payload-tampered-build": _payload(lambda p: {**p, "build": {**p["build"], "as_dict": True}}),
    "payload-without-digest": _payload(lambda p: {k: v for k, v in p.items() if k != "digest"}),
    "payload-without-build": _payload(lambda p: {k: v for k, v in p.items() if k != "build"}),
    "payload-v2-without-build": _payload(lambda p: _v2(p, build=None)),
    "payload-v2-state-dict-of-lists": _payload(lambda p: _v2(p, state_dict={"w": [1.0, 2.0]})),
    "payload-v2-no-tasks": _payload(lambda p: _v2(p, build={**p["build"], "plan": {"tasks": []}})),
    "payload-v2-plan-without-levels": _payload(
        lambda p: _v2(p, build={**p["build"], "plan": {"tasks": p["build"]["plan"]["tasks"]}})
    ),
    "payload-v2-training-not-bool": _payload(lambda p: _v2(p, training="yes")),
    "payload-newer-format": _payload(lambda p: {**p, "format": "nddrify.fused/9"}),
    "payload-older-format": _payload(lambda p: {**p, "format": "nddrify.fused/1"}),
    "payload-recipes-checkpoint": _payload(
        lambda p: {"format": "recipes.checkpoint/1", "step": 10, "model": p["state_dict"]}
    ),
    "payload-plain-state-dict": _payload(lambda p: p["state_dict"]),
    "payload-lightning-style": _payload(lambda p: {"epoch": 3, "state_dict": p["state_dict"]}),
    "payload-a-tensor": _payload(lambda p: torch.zeros(3)),
    "payload-a-list": _payload(lambda p: [1, 2, 3]),
}


def _legacy(good: Good, rng: random.Random, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(good.payload, file, _use_new_zipfile_serialization=False)


# files that are not torch.save archives at all
CASES |= {
    "text-file": lambda g, r, p: p.write_text("model weights are in the cloud\n"),
    "random-bytes": lambda g, r, p: _write(p, r.randbytes(1000)),
    "random-bytes-after-zip-magic": lambda g, r, p: _write(p, b"PK\x03\x04" + r.randbytes(1000)),
    "garbage-appended": lambda g, r, p: _write(p, g.data + r.randbytes(40)),
    "garbage-prepended": lambda g, r, p: _write(p, r.randbytes(40) + g.data),
    "legacy-torch-save": _legacy,
    "python-pickle": lambda g, r, p: _write(p, pickle.dumps({"format": "nddrify.fused/3"})),
    "a-folder": lambda g, r, p: p.mkdir(),
    "missing-file": lambda g, r, p: None,
}


def test_the_fuzz_covers_enough_cases() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", list(CASES))
def test_every_damaged_file_is_a_checkpoint_error(good: Good, tmp_path: Path, name: str) -> None:
    path = tmp_path / "fused.pt"
    CASES[name](good, random.Random(f"{SEED}-{name}"), path)
    if path.is_file():
        assert path.read_bytes() != good.data
    with pytest.raises(CheckpointError) as info:
        nddrify.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "weights_only=False" not in message and "Traceback" not in message


def test_a_recipes_checkpoint_is_named(good: Good, tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "recipes.checkpoint/1", "step": 3, "model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match=r"is not an nddrify checkpoint .*: it is a recipes "):
        nddrify.load(path)
