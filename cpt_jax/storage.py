"""Files on local disks and in object stores (`gs://bucket/...`) alike, through etils' epath (as
Orbax uses): `gs://` needs the `gcs` extra (gcsfs). Local writes go through a temporary file and a
rename; an object-store object appears only once whole, so it is written directly.

Preparing something once when independent jobs ask for it at the same time (`exclusive`) is for
local and network (NFS) filesystems only."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

log = logging.getLogger("cpt_jax")


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


@contextlib.contextmanager
def exclusive(target: str | os.PathLike) -> Iterator[None]:
    """Hold, for the block, the lock on preparing `target` (a local path): the callers that
    prepare it at once, in any process on this machine or on others sharing the filesystem, hold
    it one at a time. A caller checks that `target` is ready, takes the lock if not, and checks
    again before building, so that those that waited reuse what the first one built.

    The lock is an flock on the file `.<name>.lock` beside `target` (its folder is created if
    missing), made on first use and never deleted: deleting it would let two processes lock two
    different files of one name. The kernel drops the lock when its holder exits, even when
    killed. Not reentrant: taking a lock this process already holds waits forever."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Opened for writing: NFS emulates flock with byte-range locks, which need a writable file.
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", target)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, local or gs://; [] where there is none."""
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
