"""Preparation started by independent jobs at the same time (a SLURM array of a sweep on an empty
cache): one prepares each unit, the others wait and reuse it; none fails, none reads a half-built
result, nothing is built twice. Real processes throughout, since the lock is between processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every process: wait for the start signal, then check -> lock -> check again -> build. The build
# is slow and leaves a visibly partial file while it runs, so a reader that skipped the lock
# would see it; a builder appends its pid to builds.log.
_WORKER = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    from cpt_jax.storage import exclusive, write_atomic
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(sys.argv[1]); result = root / "result"
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


def _workers(root: Path, n: int, *extra: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), *extra], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def test_one_of_many_processes_builds_and_all_read_the_whole_result(tmp_path):
    procs = _workers(tmp_path, 6)
    time.sleep(3)  # all started and polling for the signal
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    assert [out.strip() for out, _ in outs] == ["complete"] * 6
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # exactly one built
    waited = [err.count(f"waiting for another process preparing {tmp_path / 'result'}") for _, err in outs]
    assert max(waited) == 1 and sum(waited) >= 1, waited  # logged once by each that waited
    assert sorted(os.listdir(tmp_path)) == [".result.lock", "builds.log", "go", "result"]  # the lock file stays


def test_a_killed_holder_releases_the_lock(tmp_path):
    (tmp_path / "go").touch()
    [holder] = _workers(tmp_path, 1, "hang")
    deadline = time.time() + 60
    while not (tmp_path / "partial").exists():
        assert holder.poll() is None and time.time() < deadline, holder.communicate()
        time.sleep(0.01)
    [waiter] = _workers(tmp_path, 1)
    time.sleep(2)
    assert waiter.poll() is None  # blocked behind the holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "complete", err
    assert len((tmp_path / "builds.log").read_text().split()) == 2  # the killed one, then the waiter
