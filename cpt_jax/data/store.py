"""Packed random-access token store: tokenize a text source once, then read rows by index.

A store directory holds:

    manifest.json   written last and atomically; a directory without it is never read
    rows.npy        int32 [n_rows, seq_len + 1], memory-mapped read-only by open_store
    parts/          build scratch, removed once the manifest exists: plan.json and one
                    token stream per chunk of documents (part-000000.npy, ...)

Packing: the rows are exactly ``pack(all documents, seq_len, framing)`` (`packing.py`: each
document framed as [BOS] text EOS). Each chunk of ``chunk_docs`` documents is tokenized into its
unpacked stream of framed documents, and finalizing concatenates the streams in order and cuts
them into rows. So chunk
boundaries lose nothing and the rows do not depend on chunk_docs or workers; only the final
partial row (< seq_len + 1 tokens) is dropped, counted in the manifest as dropped_tokens.

Parallelism: the parent reads each chunk's texts (so a split need not be picklable) and hands
them to ``workers`` processes, each holding a copy of the tokenizer, pickled once per process.
With workers > 1 the tokenizer must therefore be picklable: cpt_jax's sentencepiece and HF
tokenizers are. Processes are spawned, not forked, because the caller may already run JAX
threads; so the calling script must guard its entry point with ``if __name__ == "__main__"``
(as spawn requires). workers=1 runs in-process and needs no pickling.

Resume: a part file is written under a temp name and renamed, so one that exists is complete;
plan.json ties the parts to (source, tokenizer, n_docs, chunk_docs), and a different plan
discards them.

Concurrency: build_store calls on one directory, from any processes at once (independent jobs
started together on one machine or on a shared filesystem), build it once: one builds under the
directory's lock (`cpt_jax.storage.exclusive`), the others wait for it and open its result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cpt_jax.data.packing import Framing
from cpt_jax.storage import atomic_path, exclusive

log = logging.getLogger("cpt_jax")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROWS = "rows.npy"
PARTS = "parts"
_COPY_BLOCK = 1 << 22  # tokens per write when concatenating parts (16 MB)


class TextSplit(Protocol):
    def __len__(self) -> int: ...

    def texts(self, start: int, stop: int) -> list[str]: ...


class StoreTokenizer(Protocol):
    eos_id: int
    vocab_size: int
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> Sequence[Sequence[int]]: ...


@dataclasses.dataclass
class Store:
    rows: np.ndarray  # np.memmap int32 [n_rows, seq_len + 1], read-only
    manifest: dict[str, Any]
    path: Path


def open_store(out_dir: str | os.PathLike, *, expect: dict[str, Any] | None = None) -> Store:
    """Memory-map a built store; O(1) in its size (reads the manifest and the array header).

    Raises FileNotFoundError if the store was never built or its build did not finish, and
    ValueError naming the key and both values if a manifest entry differs from ``expect``
    (values as JSON gives them back: lists, not tuples).
    """
    path = Path(out_dir)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a prepared token store (no {MANIFEST}: never built, or "
                                f"its build did not finish); run build_store") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: store format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
    for key, want in (expect or {}).items():
        got = manifest.get(key, "<missing>")
        if got != want:
            raise ValueError(f"{path}: store has {key}={got!r}, expected {key}={want!r}")
    rows = np.load(path / ROWS, mmap_mode="r")
    shape = (manifest["n_rows"], manifest["seq_len"] + 1)
    if rows.dtype != np.int32 or rows.shape != shape:
        raise ValueError(f"{path / ROWS}: {rows.dtype} {rows.shape}, manifest says int32 {shape}")
    return Store(rows, manifest, path)


def store_ready(out_dir: str | os.PathLike, expect: dict[str, Any]) -> bool:
    """Whether open_store(out_dir, expect=expect) would succeed."""
    try:
        open_store(out_dir, expect=expect)
    except (OSError, ValueError):
        return False
    return True


def build_store(split: TextSplit, tokenizer: StoreTokenizer, seq_len: int, out_dir: str | os.PathLike, *,
                source: str, meta: dict | None = None, chunk_docs: int = 4096, workers: int = 2,
                framing: Framing | None = None) -> Store:
    """Tokenize, frame (default: no BOS, the tokenizer's EOS) and pack ``split`` into a store at
    ``out_dir`` (see the module docstring).

    A no-op if a store with the same source, tokenizer, framing, seq_len, document count and
    ``meta`` (JSON-serializable, kept in the manifest) is already there, or once another process
    building it has finished; otherwise finished parts of an interrupted build are reused. Raises
    ValueError if a token id is outside [0, vocab_size) or the source yields less than one row.
    """
    if seq_len < 1 or chunk_docs < 1 or workers < 1:
        raise ValueError(f"need seq_len, chunk_docs, workers >= 1, got {seq_len}, {chunk_docs}, {workers}")
    out = Path(out_dir)
    n_docs = len(split)
    framing = framing or Framing(None, int(tokenizer.eos_id))
    identity = {
        "format": FORMAT_VERSION, "source": source, "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": int(tokenizer.vocab_size), "eos_id": framing.eos_id, "seq_len": seq_len,
        "n_docs": n_docs, "dtype": "int32",
        "meta": json.loads(json.dumps(meta or {})),  # as it will read back from the manifest
    }
    if framing.bos_id is not None:  # absent without BOS: stores built before framing was configurable
        identity["bos_id"] = framing.bos_id
    if store_ready(out, identity):
        return open_store(out, expect=identity)
    if workers > 1:
        try:
            pickle.dumps(tokenizer)
        except Exception as e:
            raise TypeError(f"workers={workers} ships the tokenizer to worker processes by pickle, but "
                            f"{type(tokenizer).__name__} does not pickle ({e}); pass workers=1") from e

    # One builder at a time: the others wait here, then find the store built. So the temp files
    # and parts found below are a killed build's, never a live one's.
    with exclusive(out):
        if store_ready(out, identity):
            return open_store(out, expect=identity)
        log.info("tokenizing %d documents of %s into %s", n_docs, source, out)
        _build(split, tokenizer, seq_len, out, identity, framing, source, chunk_docs, workers)
    return open_store(out, expect=identity)


def _build(split: TextSplit, tokenizer: StoreTokenizer, seq_len: int, out: Path, identity: dict[str, Any],
           framing: Framing, source: str, chunk_docs: int, workers: int) -> None:
    """build_store's work, done under the lock."""
    n_docs = identity["n_docs"]
    # Drop a stale manifest first, so a crash mid-rebuild cannot pair it with new rows.
    (out / MANIFEST).unlink(missing_ok=True)
    parts = out / PARTS
    for litter in [*out.glob(".*.tmp"), *parts.glob(".*.tmp")]:  # temp files of killed builds
        litter.unlink()
    _start_plan(parts, {k: identity[k] for k in ("format", "source", "tokenizer_fingerprint", "vocab_size",
                                                 "eos_id", "bos_id", "n_docs") if k in identity}
                | {"chunk_docs": chunk_docs})

    n_chunks = -(-n_docs // chunk_docs)
    todo = [i for i in range(n_chunks) if not _part_path(parts, i).exists()]
    _tokenize_chunks(split, tokenizer, framing, todo, parts, chunk_docs, n_docs, source, workers)

    n_tokens, n_rows = _write_rows([_part_path(parts, i) for i in range(n_chunks)], seq_len, out / ROWS,
                                   source, n_docs)
    manifest = {**identity, "n_tokens": n_tokens, "n_rows": n_rows,
                "dropped_tokens": n_tokens - n_rows * (seq_len + 1)}
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(parts)


def _start_plan(parts: Path, plan: dict[str, Any]) -> None:
    """Keep existing parts only if they were made under the same plan."""
    plan_file = parts / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        shutil.rmtree(parts)
    if not plan_file.exists():
        parts.mkdir(parents=True, exist_ok=True)
        with atomic_path(plan_file) as tmp:
            tmp.write_text(json.dumps(plan, sort_keys=True))


def _part_path(parts: Path, chunk: int) -> Path:
    return parts / f"part-{chunk:06d}.npy"


def _tokenize_chunks(split: TextSplit, tokenizer: StoreTokenizer, framing: Framing, todo: list[int], parts: Path,
                     chunk_docs: int, n_docs: int, source: str, workers: int) -> None:
    def job(chunk: int) -> tuple:
        start, stop = chunk * chunk_docs, min((chunk + 1) * chunk_docs, n_docs)
        texts = split.texts(start, stop)
        if len(texts) != stop - start:
            raise ValueError(f"source {source!r}: texts({start}, {stop}) returned {len(texts)} documents")
        return texts, framing, _part_path(parts, chunk), source, start

    workers = min(workers, len(todo))
    if workers <= 1:  # in-process: nothing to gain from starting a worker
        for chunk in todo:
            _write_part(tokenizer, *job(chunk))
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(tokenizer,))
    pending: set[Future] = set()
    try:
        for chunk in todo:
            if len(pending) >= 2 * workers:  # bounds the texts held in memory
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()  # a worker's error stops the build now
            pending.add(pool.submit(_write_part_in_worker, *job(chunk)))
        for f in wait(pending).done:
            f.result()
    finally:
        # On error, running chunks still finish and keep their parts for the resume.
        pool.shutdown(cancel_futures=True)


_worker_tokenizer: StoreTokenizer | None = None


def _init_worker(tokenizer: StoreTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # Exit when the parent dies (e.g. SIGKILL): the pool's queues would never tell a worker so.
    threading.Thread(target=_exit_with_parent, args=(multiprocessing.parent_process().sentinel,),
                     daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _write_part_in_worker(texts: list[str], framing: Framing, path: Path, source: str, first_doc: int) -> None:
    _write_part(_worker_tokenizer, texts, framing, path, source, first_doc)


def _write_part(tokenizer: StoreTokenizer, texts: list[str], framing: Framing, path: Path, source: str,
                first_doc: int) -> None:
    """Tokenize one chunk into its stream of framed documents, checked, written atomically."""
    ids = tokenizer.encode_batch(texts)
    if len(ids) != len(texts):
        raise ValueError(f"source {source!r}: tokenizer returned {len(ids)} token lists for {len(texts)} texts")
    bos = int(framing.bos_id is not None)
    ends = np.cumsum([bos + len(t) + 1 for t in ids], dtype=np.int64)
    stream = np.empty(int(ends[-1]) if len(ids) else 0, np.int32)
    for toks, end in zip(ids, ends):
        stream[end - 1 - len(toks):end - 1] = toks
    stream[ends - 1] = framing.eos_id
    if bos:
        stream[ends - 2 - np.array([len(t) for t in ids], np.int64)] = framing.bos_id
    bad = (stream < 0) | (stream >= tokenizer.vocab_size)
    if bad.any():
        pos = int(np.argmax(bad))
        doc = first_doc + int(np.searchsorted(ends, pos, side="right"))
        raise ValueError(f"source {source!r}: document {doc} has token id {int(stream[pos])}, "
                         f"outside [0, vocab_size={tokenizer.vocab_size})")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, stream)


def _write_rows(part_files: list[Path], seq_len: int, dest: Path, source: str, n_docs: int) -> tuple[int, int]:
    """Concatenate the part streams into rows.npy, dropping the final partial row.
    Returns (tokens before packing, rows)."""
    streams = [np.load(p, mmap_mode="r") for p in part_files]
    n_tokens = sum(s.size for s in streams)
    width = seq_len + 1
    n_rows = n_tokens // width
    if n_rows == 0:
        raise ValueError(f"source {source!r} is too small to pack: {n_tokens} tokens (framed, "
                         f"{n_docs} documents) make no row of seq_len + 1 = {width} tokens")
    left = n_rows * width
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        # An .npy header then raw bytes: open_store can np.load(mmap_mode="r") it.
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                                 "shape": (n_rows, width)})
        for s in streams:
            take = min(s.size, left)
            for a in range(0, take, _COPY_BLOCK):
                f.write(s[a:min(a + _COPY_BLOCK, take)].data)
            left -= take
    return n_tokens, n_rows
