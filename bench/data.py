"""Data pipeline throughput on this machine; prints one JSON object.

  python bench/data.py                       # defaults below, ~1 min on 2 cores
  python bench/data.py --rows 20000 --steps 300

1. prepare: build_store on the bilingual Bible corpus (KJV + CUV chapters, en and zh, repeated
   --repeat times) with the cached demo tokenizer, at workers=1 and workers=2 (including the
   start of the worker processes); tokens/s counts tokens incl. EOS. encode_batch_only_s is
   the tokenizer alone, in-process (sentencepiece already uses threads there).
2. loader: Mixture({"a": 0.95, "b": 0.05}).batch(step, 64) over two stores at seq 2048. The
   stores are written by build_store from a synthetic split: each document is 2048 random ids
   made by a stand-in tokenizer (no text is tokenized), so each becomes exactly one row. The
   store files were just written, so they are in the page cache: this measures index math and
   memory copies, not disk reads. The same batches over [n, 1] arrays isolate the index math.
3. first batch: open_store x2 + Mixture(...) + batch(step) at step 0 and step 1,000,000, in
   this process with fresh objects (nothing cached but the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cpt_jax.data import Mixture, Tokenizer, default_cache_dir, load_bible, train_tokenizer
from cpt_jax.data.store import build_store, open_store

WEIGHTS = {"a": 0.95, "b": 0.05}


class ListSplit:
    def __init__(self, docs: list[str]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def texts(self, start: int, stop: int) -> list[str]:
        return self.docs[start:stop]


class RandomIdsTokenizer:
    """Stand-in: the text "i" becomes 2048 random ids seeded by i (arrays, not lists: the store
    accepts any int sequences, and this keeps the synthetic build short)."""

    eos_id, vocab_size, fingerprint = 0, 32000, "random-ids"

    def __init__(self, doc_len: int):
        self.doc_len = doc_len

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.random.default_rng(int(t)).integers(1, self.vocab_size, self.doc_len, dtype=np.int32)
                for t in texts]


def bench_prepare(tmp: Path, repeat: int) -> dict:
    cache = default_cache_dir()
    bible = load_bible(cache)
    docs = [d.text for lang in ("en", "zh") for d in bible[lang]] * repeat
    cached = sorted(cache.glob("bilingual/*vocab8000*/tokenizer.model"))
    if cached:
        tok, tok_from = Tokenizer.load(cached[0]), str(cached[0])
    else:
        lines = [v for lang in ("en", "zh") for d in bible[lang] for v in d.verses]
        tok, tok_from = train_tokenizer(lines, tmp / "tok.model", 8000), "trained here on all verses"
    out = {"corpus": f"bible kjv+cuv chapters x{repeat}", "n_docs": len(docs),
           "text_mb": round(sum(len(d.encode()) for d in docs) / 1e6, 2),
           "tokenizer": {"from": tok_from, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint},
           "seq_len": 2048, "chunk_docs": 128}
    t = time.perf_counter()
    tok.encode_batch(docs)
    out["encode_batch_only_s"] = round(time.perf_counter() - t, 3)  # sentencepiece's own threads
    for workers in (1, 2):
        t = time.perf_counter()
        store = build_store(ListSplit(docs), tok, 2048, tmp / f"bible-w{workers}", source="bible",
                            chunk_docs=128, workers=workers)
        s = time.perf_counter() - t
        n = store.manifest["n_tokens"]
        out[f"workers{workers}"] = {"build_s": round(s, 3), "n_tokens": n, "n_rows": store.manifest["n_rows"],
                                    "tokens_per_s": round(n / s)}
    return out


def _time_batches(mix: Mixture, steps: np.ndarray, batch: int) -> float:
    mix.batch(int(steps[0]), batch)  # warm-up
    t = time.perf_counter()
    for s in steps:
        mix.batch(int(s), batch)
    return (time.perf_counter() - t) / len(steps)


def bench_loader(tmp: Path, rows: int, steps: int, batch: int = 64, seq_len: int = 2048) -> tuple[dict, dict]:
    tok = RandomIdsTokenizer(seq_len)  # + EOS = one row per document
    t = time.perf_counter()
    paths = {}
    for name, n in (("a", rows), ("b", max(1, rows // 10))):
        paths[name] = tmp / f"synthetic-{name}"
        build_store(ListSplit([str(i) for i in range(n)]), tok, seq_len, paths[name], source=name,
                    chunk_docs=2048, workers=1)
    build_s = time.perf_counter() - t
    stores = {name: open_store(p) for name, p in paths.items()}
    mb = sum(s.rows.nbytes for s in stores.values()) / 1e6

    rng = np.random.default_rng(0)
    patterns = {"consecutive_from_1e6": 1_000_000 + np.arange(steps),
                "random_in_0_1e8": rng.integers(0, 10**8, steps)}
    out = {"rows": {n: s.rows.shape[0] for n, s in stores.items()}, "store_mb": round(mb),
           "synthetic_build_s": round(build_s, 2), "batch": batch, "seq_len": seq_len,
           "timed_batches": steps, "weights": WEIGHTS}
    for label, ss in patterns.items():
        full = _time_batches(Mixture({n: s.rows for n, s in stores.items()}, WEIGHTS, seed=0), ss, batch)
        # Same draws over [n, 1] arrays: what batch() costs without copying 8 KB rows.
        index = _time_batches(Mixture({n: np.zeros((s.rows.shape[0], 1), np.int32) for n, s in stores.items()},
                                      WEIGHTS, seed=0), ss, batch)
        out[label] = {"ms_per_batch": round(full * 1e3, 3), "tokens_per_s": round(batch * seq_len / full),
                      "index_math_ms": round(index * 1e3, 3), "row_copy_ms": round((full - index) * 1e3, 3)}

    first = {}
    for step in (0, 1_000_000):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            opened = {n: open_store(p, expect={"seq_len": seq_len}) for n, p in paths.items()}
            Mixture({n: s.rows for n, s in opened.items()}, WEIGHTS, seed=0).batch(step, batch)
            times.append(time.perf_counter() - t)
        first[f"step_{step}_ms"] = round(float(np.median(times)) * 1e3, 3)
    first["note"] = "median of 5; open_store x2 + Mixture() + batch(step); page cache warm"
    return out, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="rows of synthetic store a (b gets a tenth)")
    p.add_argument("--steps", type=int, default=300, help="timed batches per step pattern")
    p.add_argument("--repeat", type=int, default=3, help="copies of the corpus to prepare (amortizes process start)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        prepare = bench_prepare(Path(tmp), a.repeat)
        loader, first = bench_loader(Path(tmp), a.rows, a.steps)
    print(json.dumps({
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "prepare": prepare, "loader": loader, "first_batch": first,
    }, indent=2))


if __name__ == "__main__":
    main()
