"""Files on local disks and in object stores (`gs://bucket/...`) alike, through etils' epath (as
Orbax uses): `gs://` needs the `gcs` extra (gcsfs). Local writes go through a temporary file and a
rename; an object-store object appears only once whole, so it is written directly."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path, or the URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path in dest's (local) folder; move it onto dest only on success,
    so a crash never leaves a partial file under the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files may be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """`path` (local or remote) holds `data` afterwards, never a part of it."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        dest = epath.Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
