"""Scale-out and faults, as users meet them: `python -m cpt_jax.main` in subprocesses where the
process is what is tested (two processes on 127.0.0.1, gloo collectives, 4 CPU devices each,
against one process with 8; SIGTERM; SIGKILL at random moments of a run that saves every other
step), the same command line in this process where it is not (an uninterrupted run, resuming, a
corrupted latest checkpoint, injected NaN gradients, a workdir of another config): helpers.run_main
ends a run as the command does (exit code, one-line message).

Every run is compared with one uninterrupted run of the same config (`baseline`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cpt_jax import inference, models, sweep
from cpt_jax.storage import read_jsonl

from helpers import MINI, ROOT, comparable, run_main

pytestmark = pytest.mark.slow

STEPS = 40
ARGS = ["--config", "configs/bible.py:test", "--config.batch_size=8", "--config.seq_len=32",
        "--config.data.replay_ratio=0.25", "--config.data.eval_batches=2", "--config.log_every=5",
        "--config.eval_every=10", "--config.checkpoint_every=10", f"--config.total_steps={STEPS}",
        "--config.mesh.shape=(2,2,2)"]


def start(workdir, *extra, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "cpt_jax.main", "--workdir", str(workdir), *ARGS, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_here(capsys, workdir, *extra):
    """The same command as `start`, in this process (8 devices): (exit code, stderr)."""
    capsys.readouterr()
    rc = run_main(workdir, *ARGS, *extra)
    return rc, capsys.readouterr().err


def metrics(workdir):
    """Everything logged but wall-clock speed."""
    return comparable(read_jsonl(os.path.join(str(workdir), "metrics.jsonl")))


def final_params(workdir):
    model, _ = inference.load(str(workdir))
    return {k: np.asarray(v) for k, v in _flat(models.params_of(model))}


def _flat(tree, prefix=""):
    for k, v in tree.items():
        yield from _flat(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + k, v)]


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def steps_saved(workdir):
    """Complete steps: orbax writes a step under a temporary name and renames it when done."""
    ckpts = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(ckpts) if p.isdigit()) if os.path.isdir(ckpts) else []


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("baseline")
    assert run_main(workdir, *ARGS) == 0
    return metrics(workdir), final_params(workdir), workdir


def assert_same_run(workdir, baseline, exact=True):
    want_metrics, want_params, _ = baseline
    got = metrics(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in want_metrics]
    params = final_params(workdir)
    if exact:
        assert got == want_metrics
        for k, v in want_params.items():
            np.testing.assert_array_equal(params[k], v, err_msg=k)
    else:  # gloo between processes sums in another order than one process does: float roundoff
        for a, b in zip(got, want_metrics):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)
        # AdamW divides by sqrt(v): for rarely seen embedding rows (v ~ 0) roundoff in a gradient
        # moves the update. Within a tenth of one step at the peak lr (3e-3) is roundoff; a wrong
        # batch or gradient would move whole steps (measured: 2.3e-5 at most, in 26 embedding values).
        for k, v in want_params.items():
            np.testing.assert_allclose(params[k], v, rtol=0, atol=3e-4, err_msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_baseline_learns_with_its_replay_share(baseline):
    """The uninterrupted run every other is compared with: it evaluates both languages, trains on
    the configured share of English replay (logged), and learns."""
    records = baseline[0]
    last = records[-1]
    assert last["step"] == STEPS and "eval/en/loss" in last and "eval/zh/loss" in last
    assert abs(last["data/en_fraction"] - 0.25) < 0.01  # replay share, logged
    assert last["eval/zh/loss"] < records[0]["eval/zh/loss"] - 0.5  # it learned


def test_sigterm_saves_exits_0_and_resumes_equal(tmp_path, baseline, capsys):
    # Step 10 the only periodic save (the signal to send SIGTERM): any later one is the step in
    # flight, however late the signal lands (on a busy machine it could land on step 20).
    proc = start(tmp_path, "--config.checkpoint_every=1000", "--config.keep_steps=(10,)")
    wait_for(tmp_path / "checkpoints" / "10", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert steps_saved(tmp_path)[:-1] == [10], steps_saved(tmp_path)
    saved = steps_saved(tmp_path)[-1]
    assert 10 < saved < STEPS, saved  # the step in flight, not a periodic one
    assert f"preempted (SIGTERM): saved {tmp_path}/checkpoints/{saved}" in err

    corrupt = tmp_path.parent / (tmp_path.name + "_corrupt")
    shutil.copytree(tmp_path, corrupt)
    rc, err = run_here(capsys, tmp_path)  # the same command again
    assert rc == 0, err
    assert f"resumed {tmp_path} at step {saved}" in err
    assert_same_run(tmp_path, baseline)

    # The copy: its latest checkpoint corrupted -> the previous one, with a warning naming both.
    previous = steps_saved(corrupt)[-2]
    params_dir = corrupt / "checkpoints" / str(saved) / "params"
    for root, _, files in os.walk(params_dir):
        for name in files:
            if name != "_METADATA" and os.path.getsize(os.path.join(root, name)) > 64:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(32)
    rc, err = run_here(capsys, corrupt)
    assert rc == 0, err
    assert f"checkpoint {corrupt}/checkpoints/{saved} cannot be restored" in err
    assert f"using {corrupt}/checkpoints/{previous} instead" in err
    assert f"resumed {corrupt} at step {previous}" in err
    assert (corrupt / "checkpoints" / f"{saved}.corrupt").is_dir()  # moved aside, not deleted
    assert_same_run(corrupt, baseline)


def test_sigkill_at_random_moments_always_resumes(tmp_path, baseline, capsys):
    """Saves every other step overlap training; kills land at random moments of them."""
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        done = max(steps_saved(tmp_path), default=0)
        proc = start(tmp_path, "--config.checkpoint_every=2")
        deadline = time.time() + 300
        while proc.poll() is None and max(steps_saved(tmp_path), default=0) <= done:  # a save of its own
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert "cannot be restored" not in err, err  # its resume found a valid latest step
        if done:
            assert f"resumed {tmp_path} at step {done}" in err
        if proc.returncode == 0:
            break
        kills += 1
    assert kills >= 2
    rc, err = run_here(capsys, tmp_path, "--config.checkpoint_every=2")
    assert rc == 0 and "cannot be restored" not in err, err
    assert_same_run(tmp_path, baseline)


def test_nan_stops_keeping_last_good_checkpoint_then_skip_goes_on(tmp_path, capsys):
    rc, err = run_here(capsys, tmp_path, "--config.inject_nan_at=(23,)")
    assert rc == 1
    assert "non-finite loss or gradient norm in 1 step(s) by step 25" in err
    assert f"last good checkpoint, {tmp_path}/checkpoints/20" in err
    assert steps_saved(tmp_path)[-1] == 20

    rc, err = run_here(capsys, tmp_path, "--config.inject_nan_at=(23,)", "--config.nonfinite=skip")
    assert rc == 0, err
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == STEPS and np.isfinite(rows[-1]["train/loss"])
    assert [r["train/nonfinite_steps"] for r in rows if r["step"] in (20, 25, 40)] == [0, 1, 1]


def test_workdir_of_another_config_is_refused(tmp_path, baseline, capsys):
    with open(baseline[2] / "config.json") as f:
        config = json.load(f)
    config["seed"], config["optimizer"]["peak_lr"], config["log_every"] = 3, 1.0, 7  # log_every may change
    with open(tmp_path / "config.json", "w") as f:  # as a run of another config left it
        json.dump(config, f)
    before = sorted(os.listdir(tmp_path))
    rc, err = run_here(capsys, tmp_path)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"config error: workdir {tmp_path} was made by a different config")
    assert "(optimizer.peak_lr: 1.0 -> 0.003; seed: 3 -> 0)" in line
    assert sorted(os.listdir(tmp_path)) == before  # nothing written



def test_two_processes_both_sent_sigterm_save_one_step_and_resume_equal(tmp_path, baseline):
    """As a scheduler preempts a job: every process gets SIGTERM; JAX's preemption sync point has
    them all save the same step and exit 0; the re-run (two processes again) finishes the run. Two
    processes, each step of the run in one of the two jobs, equal one process with 8 devices."""
    def two(*extra):
        port = free_port()
        return [start(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      f"--process_id={i}", *extra, devices=4) for i in range(2)]

    procs = two()
    wait_for(tmp_path / "checkpoints" / "10", procs[0])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    saved = steps_saved(tmp_path)[-1]
    assert 10 < saved < STEPS, saved
    for err in errs:  # both processes stopped at the same step and name it
        assert f"preempted (SIGTERM): saved {tmp_path}/checkpoints/{saved}" in err, err
    procs = two()
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert f"resumed {tmp_path} at step {saved}" in errs[0]
    assert "step 40/40" in errs[0] and "step 40/40" not in errs[1]  # one log: process 0's
    assert_same_run(tmp_path, baseline, exact=False)


# --- `python -m cpt_jax.sweep run`, the command every sweep backend launches, ends as main does.
SWEEP = """
import runpy
def get_config():
    c = runpy.run_path({mini!r})['get_config']()
    c.sizes, c.batch_size, c.eval_points = ('test',), 8, 4
    c.branches, c.replay_study.size = False, ''
    c.source_tokens_per_param, c.tokens_per_param = 0.0355, (0.0355,)  # 46 steps
    c.base.seq_len = 32
    c.base.data.eval_batches = 2
    c.base.mesh.shape = (2, 2, 2)
    return c
"""


def sweep_config(tmp_path) -> str:
    config = tmp_path / "sweep_config.py"
    config.write_text(SWEEP.format(mini=MINI))
    return str(config)


def sweep_run_here(tmp_path, sweep_dir) -> int:
    """`python -m cpt_jax.sweep run ... --run test/source` in this process (cpt_jax.sweep.main)."""
    return sweep.main(["run", "--config", sweep_config(tmp_path), "--sweep_dir", str(sweep_dir), "--run", "test/source"])


def sweep_run(tmp_path, sweep_dir, *extra, wait=True, devices=8):
    config = sweep_config(tmp_path)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.Popen([sys.executable, "-m", "cpt_jax.sweep", "run", "--config", config, "--sweep_dir",
                             str(sweep_dir), "--run", "test/source", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.fixture(scope="module")
def sweep_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_baseline")
    assert sweep_run_here(tmp, tmp / "whole") == 0
    whole = tmp / "whole" / "test" / "source"
    return metrics(whole), final_params(whole), whole


def test_sweep_run_sigterm_saves_exits_0_and_resumes_equal(tmp_path, sweep_baseline, capsys):
    run_dir = tmp_path / "killed" / "test" / "source"
    proc = sweep_run(tmp_path, tmp_path / "killed", wait=False)
    wait_for(run_dir / "checkpoints" / "11", proc)  # checkpoint_every: 11 steps of 46
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    saved = steps_saved(run_dir)[-1]
    assert 11 <= saved < 46 and f"preempted (SIGTERM): saved {run_dir}/checkpoints/{saved}" in err, err
    capsys.readouterr()
    rc = sweep_run_here(tmp_path, tmp_path / "killed")  # the same command again
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"resumed {run_dir} at step {saved}" in err
    assert_same_run(run_dir, sweep_baseline)


def test_sweep_run_spans_two_processes(tmp_path, sweep_baseline):
    """The command every sweep backend launches joins jax.distributed as main does."""
    port = free_port()
    procs = [sweep_run(tmp_path, tmp_path / "sweep", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}", wait=False, devices=4) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "step 46/46" in errs[0] and "step 46/46" not in errs[1]  # one log: process 0's
    assert_same_run(tmp_path / "sweep" / "test" / "source", sweep_baseline, exact=False)


def test_sweep_run_nonfinite_stop_exits_1_with_one_line(tmp_path):
    rc, err = sweep_run(tmp_path, tmp_path / "sweep", "--config.base.inject_nan_at=(14,)")
    run_dir = tmp_path / "sweep" / "test" / "source"
    assert rc == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: non-finite loss or gradient norm in 1 step(s) by step 22 (not applied); stopped with the last good "
        f"checkpoint, {run_dir}/checkpoints/11. --config.nonfinite=skip goes on past such steps")
