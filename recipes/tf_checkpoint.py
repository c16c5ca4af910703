"""A small reader of TensorFlow V2 checkpoints (``PREFIX.index`` + ``PREFIX.data-*``), no
TensorFlow needed: the index is a LevelDB-style table (blocks of prefix-compressed keys, optional
snappy compression, a 48-byte footer ending in the table magic) whose values are
``BundleEntryProto`` protobufs (dtype, shape, shard, offset, size); the tensors are raw
little-endian bytes in the data shards. Used by :mod:`recipes.deeplab_weights` for the official
NDDR-CNN start (``models/vgg_deeplab_lfov/model.ckpt-init-slim``).

Example:
    >>> _snappy(bytes([6, 0x04]) + b"ab" + bytes([0x01, 2]))  # literal "ab", copy 4 from 2 back
    b'ababab'
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .errors import DatasetFormatError, DatasetNotFoundError

__all__ = ["read_tf_checkpoint", "TF_DTYPES"]

_HINT = "pass the prefix of a checkpoint written by tf.train.Saver (V2), e.g. model.ckpt-init-slim"

#: TensorFlow DataType enum → numpy dtype (numeric types only; others are skipped).
TF_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 6: "i1", 9: "<i8", 10: "?", 19: "<f2"}
_TABLE_MAGIC = 0xDB4775248B80FB57


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list[Any]]:
    """Protobuf wire format → field number → values (ints, or bytes when length-delimited)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos : pos + size]), pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _snappy(buf: bytes) -> bytes:
    """Decompress one raw snappy block (TF tables may snappy-compress their blocks)."""
    length, pos = _varint(buf, 0)
    out = bytearray()
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        if tag & 3 == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(buf[pos : pos + extra], "little")
                pos += extra
            out += buf[pos : pos + size + 1]
            pos += size + 1
            continue
        if tag & 3 == 1:
            size, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | buf[pos]
            pos += 1
        else:
            width = 2 if tag & 3 == 2 else 4
            size, offset = (tag >> 2) + 1, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        if not 0 < offset <= len(out):
            raise ValueError("snappy copy before the start")
        for _ in range(size):  # byte by byte: copies may overlap their own output
            out.append(out[-offset])
    if len(out) != length:
        raise ValueError("snappy length mismatch")
    return bytes(out)


def _table_block(data: bytes, handle: bytes) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    block, kind = data[offset : offset + size], data[offset + size : offset + size + 1]
    if len(block) != size or not kind:
        raise ValueError("block past the end of the file")
    if kind == b"\x01":
        return _snappy(block)
    if kind != b"\x00":
        raise ValueError(f"unknown block compression {kind[0]}")
    return block


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key = len(block) - 4 - 4 * restarts, 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def read_tf_checkpoint(
    prefix: str | os.PathLike[str], select: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """Read a TensorFlow V2 checkpoint (``PREFIX.index`` + ``PREFIX.data-*``) without TensorFlow.

    ``select(name)`` chooses what is read (default: every tensor of a numeric dtype). Partitioned
    variables, big-endian files and V1 (single-file) checkpoints are refused.

    Raises:
        DatasetNotFoundError: ``PREFIX.index`` or a data shard is missing.
        DatasetFormatError: the files are not a readable V2 checkpoint.

    Example:
        >>> read_tf_checkpoint("/nonexistent/model.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        recipes.errors.DatasetNotFoundError: TF checkpoint index '/nonexistent/model.ckpt.index' ...
    """
    prefix = os.fspath(prefix)
    index = prefix + ".index"
    if not os.path.isfile(index):
        raise DatasetNotFoundError(f"TF checkpoint index {index!r} does not exist: {_HINT}.")
    with open(index, "rb") as handle:
        data = handle.read()
    try:
        if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
            raise ValueError("no table footer (a V1 checkpoint or another file?)")
        _, pos = _varint(data, len(data) - 48)  # metaindex handle: offset, size
        _, pos = _varint(data, pos)
        entries: dict[str, bytes] = {}
        for _, handle_bytes in _block_entries(_table_block(data, data[pos : len(data) - 8])):
            for key, value in _block_entries(_table_block(data, handle_bytes)):
                entries[key.decode("utf-8")] = value
        header = _proto_fields(entries.pop("", b""))
    except (ValueError, struct.error, UnicodeDecodeError) as error:
        raise DatasetFormatError(
            f"{index!r} is not a TensorFlow V2 checkpoint index ({error}); export the weights "
            "with tf.train.Saver (V2) or as .npz of HWIO arrays."
        ) from None
    if header.get(2, [0])[0] != 0:
        raise DatasetFormatError(f"{index!r} is big-endian; only little-endian files are read.")
    shards = header.get(1, [1])[0]
    arrays: dict[str, np.ndarray] = {}
    for name, raw in entries.items():
        entry = _proto_fields(raw)
        dtype = TF_DTYPES.get(entry.get(1, [0])[0])
        if (select is not None and not select(name)) or dtype is None:
            continue
        if 7 in entry:
            raise DatasetFormatError(f"{index!r}: {name!r} is a partitioned variable (slices).")
        dims = _proto_fields(entry.get(2, [b""])[0]).get(2, [])
        shape = tuple(_proto_fields(d).get(1, [0])[0] for d in dims)
        shard, offset, size = (entry.get(k, [0])[0] for k in (3, 4, 5))
        path = f"{prefix}.data-{shard:05d}-of-{shards:05d}"
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"TF checkpoint data {path!r} (for {name!r}) is missing.")
        with open(path, "rb") as handle:
            handle.seek(offset)
            blob = handle.read(size)
        if len(blob) != size or size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise DatasetFormatError(
                f"{path!r}: {name!r} has {len(blob)} bytes, expected {size} for shape {shape}."
            )
        arrays[name] = np.frombuffer(blob, dtype=dtype).reshape(shape).copy()
    return arrays
