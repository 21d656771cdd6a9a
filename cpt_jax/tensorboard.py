"""TensorBoard scalar events, written without tensorboardX or TensorFlow.

tensorboardX imports torch whenever torch is installed (2.5-4 s), paid by every training process
of a sweep; scalars need only a few bytes of protobuf, encoded here by hand.

Format: an event file is a sequence of TFRecords (uint64 length, masked CRC32C of it, data,
masked CRC32C of the data); each record's data is a serialized `tensorboard.Event` proto.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import socket
import struct
import time

from cpt_jax import storage

# --- CRC32C (Castagnoli), as TFRecord frames use it ------------------------------------------

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    # TFRecord masks CRCs so that a CRC of data that itself holds CRCs stays well distributed.
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# --- protobuf wire format: the few field kinds Event and Summary need --------------------------

def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # negative int64s are sent as their 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int64(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _double(field: int, x: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", x)


def _float(field: int, x: float) -> bytes:
    try:
        packed = struct.pack("<f", x)
    except OverflowError:  # beyond float32's range: infinity, as protobuf's own float cast gives
        packed = struct.pack("<f", math.copysign(math.inf, x))
    return _key(field, 5) + packed


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def file_version_event(wall_time: float) -> bytes:
    """Event{wall_time: 1, file_version: 3}: the first record TensorBoard expects."""
    return _double(1, wall_time) + _bytes(3, b"brain.Event:2")


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """Event{wall_time: 1, step: 2, summary: 5 = Summary{value: 1 = Value{tag: 1, simple_value: 2}}}."""
    summary_value = _bytes(1, tag.encode("utf-8")) + _float(2, value)
    return _double(1, wall_time) + _int64(2, step) + _bytes(5, _bytes(1, summary_value))


_file_ids = itertools.count()  # two writers of one process in one second get distinct files


class EventWriter:
    """Writes scalars to `logdir/events.out.tfevents.<time>.<host>.<pid>.<n>`, the name TensorBoard
    globs for. `logdir` may be local or a URL epath knows (gs://): an object cannot be appended to,
    so a remote file is kept in memory and rewritten whole on each flush (as metrics.jsonl is)."""

    def __init__(self, logdir: str):
        self.remote = storage.is_remote(logdir)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        if self.remote:  # no folder to make: write_atomic makes what the store needs
            self.path = f"{logdir.rstrip('/')}/{name}"
            self._file: io.BytesIO | io.BufferedWriter = io.BytesIO()
        else:
            os.makedirs(logdir, exist_ok=True)
            self.path = os.path.join(logdir, name)
            self._file = open(self.path, "wb")
        self._file.write(tfrecord(file_version_event(time.time())))
        self.flush()  # the file exists (and TensorBoard lists the run) from the start

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(tfrecord(scalar_event(tag, float(value), int(step), time.time())))

    def flush(self) -> None:
        if self.remote:
            storage.write_atomic(self.path, self._file.getvalue())
        else:
            self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
