"""Data pipeline throughput on this machine; prints one JSON object.

  python bench/data.py                       # defaults below, ~1 min on 2 cores
  python bench/data.py --rows 20000 --steps 300

1. prepare: the demo's data pipeline from nothing into a fresh data dir, stage by stage: the two
   Bible sources as TFDS array_record datasets, the sentencepiece tokenizer (8000 pieces)
   trained on their train splits, then the four token stores (train/eval x en/zh) at seq 2048
   (tokens/s counts tokens incl. EOS). The corpus archives come from the download cache.
2. loader: Mixture({"a": 0.95, "b": 0.05}).batch(step, 64) over two stores at seq 2048. The
   stores are written by build_store from a synthetic split: each document is 2048 random ids
   made by a stand-in tokenizer (no text is tokenized), so each becomes exactly one row. The
   store files were just written, so they are in the page cache: this measures index math and
   memory copies, not disk reads. The same batches over [n, 1] arrays give the index math alone.
3. first batch: open_store x2 + Mixture(...) + batch(step) at step 0 and step 1,000,000, in
   this process with fresh objects (nothing cached but the page cache).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from cpt_jax import cli
from cpt_jax.config import base
from cpt_jax.data import Mixture, pipeline, sources
from cpt_jax.data.store import build_store, open_store

CLI = cli.Command(__doc__, label="bench error")
_ROWS = flags.DEFINE_integer("rows", 20000, "Rows of synthetic store a (b gets a tenth).", flag_values=CLI.flags)
_STEPS = flags.DEFINE_integer("steps", 300, "Timed batches per step pattern.", flag_values=CLI.flags)

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


def bench_prepare(tmp: Path) -> dict:
    d = base().data
    d.dir = str(tmp / "data")
    root = pipeline.data_dir(d)
    specs = pipeline.source_specs(d)
    t = time.perf_counter()
    for spec in specs.values():
        sources.prepare(spec, root)
    sources_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = pipeline.tokenizer(d, specs, root)
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    data = pipeline.build(d, seq_len=2048)
    stores_s = time.perf_counter() - t
    n_tokens = sum(m["n_tokens"] for m in data.manifests.values())
    return {"corpus": "bible kjv+cuv, en and zh", "n_docs": sum(m["n_docs"] for m in data.manifests.values()),
            "sources_s": round(sources_s, 2), "tokenizer_s": round(tokenizer_s, 2),
            "tokenizer": {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint},
            "stores": {"seq_len": 2048, "build_s": round(stores_s, 2), "n_tokens": n_tokens,
                       "tokens_per_s": round(n_tokens / stores_s)},
            "end_to_end_tokens_per_s": round(n_tokens / (sources_s + tokenizer_s + stores_s))}


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
                      "index_math_only_ms": round(index * 1e3, 3)}

    first = {}
    for step in (0, 1_000_000):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            opened = {n: open_store(p, expect={"seq_len": seq_len}) for n, p in paths.items()}
            Mixture({n: s.rows for n, s in opened.items()}, WEIGHTS, seed=0).batch(step, batch)
            times.append(time.perf_counter() - t)
        first[f"step_{step}_ms"] = round(float(np.median(times)) * 1e3, 3)
    # The same at a billion rows per source (zero-copy [n, 1] views): the row permutation is
    # evaluated only at the drawn indices, so resuming does not scale with the store.
    huge = {n: np.broadcast_to(np.zeros((1, 1), np.int32), (10**9, 1)) for n in WEIGHTS}
    t = time.perf_counter()
    Mixture(huge, WEIGHTS, seed=0).batch(1_000_000, batch)
    first["step_1000000_1e9_rows_index_only_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    first["note"] = "median of 5; open_store x2 + Mixture() + batch(step); page cache warm"
    return out, first


def bench() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        prepare = bench_prepare(Path(tmp))
        loader, first = bench_loader(Path(tmp), _ROWS.value, _STEPS.value)
    print(json.dumps({
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "prepare": prepare, "loader": loader, "first_batch": first,
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`python bench/data.py ARGS...` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
