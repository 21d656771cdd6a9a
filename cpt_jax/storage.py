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
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etils import epath

from cpt_jax.errors import ConfigError

log = logging.getLogger("cpt_jax")


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path, or the URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def refuse_links(folder: str | os.PathLike, within: str | os.PathLike) -> None:
    """Raise ValueError unless `folder` lies in `within` through no link: a link planted in a
    downloaded or shared directory would send a write anywhere the user can write. `within`
    itself (the directory the user named) may be a link."""
    rel = os.path.relpath(folder, within)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ValueError(f"{folder}: outside {within}; refusing to write there")
    p = Path(within)
    for part in Path(rel).parts:
        p = p / part
        if p.is_symlink():
            raise ValueError(f"{p}: a symbolic link; refusing to write through it")


def private_dir(path: str | os.PathLike, mode: int = 0o700) -> Path:
    """`path`, a local folder whose contents cpt_jax trusts (its cache, a data dir, a compilation
    cache), created with `mode` (less the umask) if missing. ConfigError unless this user owns it
    and no one else can write it: whoever can, can plant what is then trusted (a `done` marker, a
    compiled program). A sticky bit does not help: others could still create the folders used."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:
        raise ConfigError(f"{path}: not a folder") from None
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); cpt_jax trusts "
                          f"what it finds there, so it must be yours")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path}: writable by others (mode {stat.S_IMODE(st.st_mode):o}); cpt_jax trusts what it "
                          f"finds there: chmod go-w {path}")
    return path


@contextlib.contextmanager
def atomic_path(dest: Path, within: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temp path in dest's (local) folder; move it onto dest only on success, so a crash
    never leaves a partial file under the final name. The move replaces a link at dest instead of
    writing through it; with `within`, a folder below it that is a link is refused
    (`refuse_links`). The file gets 0666 less the umask, as open() would give it."""
    dest = Path(dest)
    if within is not None:
        refuse_links(dest.parent, within)
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:  # tempfile.mkstemp would make it 0600 whatever the umask
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes, within: str | os.PathLike | None = None) -> None:
    """`path` (local or remote) holds `data` afterwards, never a part of it; the one writer of
    the project's files (see `atomic_path` for links and `within`)."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        dest = epath.Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return
    with atomic_path(Path(path), within) as tmp:
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
    # O_NOFOLLOW: a lock file planted as a link fails here instead of creating its target.
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
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


def parse_json(text: str | bytes, where: str | os.PathLike) -> Any:
    """JSON from a file that may be malformed: one ValueError naming `where` (a deeply nested
    document raises RecursionError in the parser)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: malformed JSON: {type(e).__name__}: {str(e)[:200]}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, local or gs://; [] where there is none."""
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
