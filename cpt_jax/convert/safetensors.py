"""Safetensors files with numpy alone (no torch): memory-mapped reads, one tensor at a time, and
sharded writes with the `model.safetensors.index.json` that transformers reads.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from cpt_jax.storage import parse_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {  # the format's codes
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} past the end)")
        header = parse_json(f.read(n), path)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def json_file(path: str | os.PathLike) -> Any:
    """A model dir's JSON file (config.json, the index), parsed; malformed: one ValueError naming it."""
    return parse_json(Path(path).read_bytes(), path)


def _check_tensors(path: Path, header: dict, start: int, size: int) -> None:
    """Every tensor's dtype, shape and byte range well formed, inside the file, none overlapping."""
    spans = []
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: tensor {name}: data_offsets {offsets!r} are not 0 <= begin <= end")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name}: shape {shape!r} is not a list of sizes")
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"tensor {name} in {path} has dtype {info.get('dtype')}, not one of {sorted(DTYPES)}")
        begin, end = (start + o for o in offsets)
        if end > size:
            raise ValueError(f"{path}: tensor {name} needs bytes [{begin}, {end}) but the file has {size} "
                             f"(truncated?)")
        want = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[info["dtype"]]).itemsize
        if end - begin != want:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes [{begin}, {end}) for shape "
                             f"{shape} of {info['dtype']}, which takes {want}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path}: tensors {a} and {b}: data_offsets overlap")


class SafetensorsReader:
    """Every tensor of a model dir (`model.safetensors`, or shards listed by the index), by name."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        if (directory / INDEX).is_file():
            weight_map = json_file(directory / INDEX)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{directory / INDEX}: no weight_map object")
            files = {}
            for name, shard in weight_map.items():
                # A shard is a file of the model dir: a path could read a file from anywhere.
                if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
                    raise ValueError(f"{directory / INDEX}: weight_map[{name!r}] = {shard!r} is not a file name "
                                     f"in {directory}")
                files.setdefault(shard, name)
            for shard, name in files.items():
                if not (directory / shard).is_file():
                    raise FileNotFoundError(f"{directory / shard} is missing: {INDEX} lists tensor {name} in it")
            paths = [directory / f for f in files]
        elif (directory / SINGLE).is_file():
            paths = [directory / SINGLE]
        else:
            raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX}")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in paths:
            header, start = _header(path)
            _check_tensors(path, header, start, os.path.getsize(path))
            for name, info in header.items():
                self._where[name] = (path, info, start)
        self._maps: dict[Path, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the tensor in the memory-mapped file (no copy until it is used)."""
        if name not in self._where:
            raise KeyError(f"tensor {name} is not in the checkpoint")
        path, info, start = self._where[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, np.uint8, mode="r")
        begin, end = info["data_offsets"]
        return self._maps[path][start + begin:start + end].view(DTYPES[info["dtype"]]).reshape(info["shape"])


def _write_file(path: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict) -> None:
    header, offset = {"__metadata__": metadata}, 0
    for name, a in tensors:
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def write(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
          max_shard_bytes: int = 2 << 30) -> list[str]:
    """Writes `tensors` (consumed one by one, so a generator holds at most one shard) as
    `model.safetensors`, or as numbered shards plus the index when they exceed `max_shard_bytes`.
    Returns the file names."""
    directory = Path(directory)
    groups: list[list[str]] = []  # tensor names per written shard
    shard: list[tuple[str, np.ndarray]] = []
    size = total = 0

    def flush():
        _write_file(directory / f"shard-{len(groups):05d}.tmp", shard, {"format": "pt"})
        groups.append([name for name, _ in shard])

    for name, a in tensors:
        if shard and size + a.nbytes > max_shard_bytes:
            flush()
            shard, size = [], 0
        shard.append((name, a))
        size += a.nbytes
        total += a.nbytes
    flush()
    n = len(groups)
    if n == 1:
        (directory / "shard-00000.tmp").rename(directory / SINGLE)
        return [SINGLE]
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, f in enumerate(files):
        (directory / f"shard-{i:05d}.tmp").rename(directory / f)
    weight_map = {name: f for f, group in zip(files, groups) for name in group}
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files + [INDEX]
