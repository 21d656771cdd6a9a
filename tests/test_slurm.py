"""The sweep's slurm backend on a real one-node SLURM cluster (tests/slurm_local.sh: Debian's
slurm-wlm and munge, started here as root): the smallest size of a reduced mini sweep runs through
the data-preparation job and the array jobs; a failed scratch task holds back no CPT task; a task
sent SIGTERM is requeued, resumes from the step it saved and finishes, and the CPT run made from
it starts after that. No accounting on this cluster: jobs are followed with squeue and the runs'
checkpoints and logs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from cpt_jax import sweep
from cpt_jax.config import load_file
from cpt_jax.rundir import RunDir

from helpers import MINI, ROOT

pytestmark = pytest.mark.slow

SLURM_LOCAL = os.path.join(ROOT, "tests", "slurm_local.sh")
RUNS = ("test/source", "test/scratch", "test/cpt_r0.05")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}  # squeue's states of a job that will not run again by itself


def _running() -> bool:
    return shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True).stdout.count("is UP") > 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node cluster on this machine, started if it is not up (and then stopped at the end)."""
    if _running():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (tests/slurm_local.sh installs and starts daemons)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get to install slurm-wlm and munge with (tests/slurm_local.sh is for Debian/Ubuntu)")
    r = subprocess.run(["bash", SLURM_LOCAL, "start"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"tests/slurm_local.sh start failed:\n{r.stdout}\n{r.stderr}"
    yield
    subprocess.run(["bash", SLURM_LOCAL, "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")  # prepared once by the first sweep's preparation job


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    """The environment the sweep's jobs inherit from sbatch: this tree's cpt_jax, one CPU device
    per run (not the test suite's 8), and a shared XLA compilation cache (the tests', see
    conftest.py, else one of its own): the runs of one size compile the same steps, and a warm
    cache halves a run's time on 2 cores."""
    cache = {} if os.environ.get("JAX_COMPILATION_CACHE_DIR") else {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
            "XLA_FLAGS": "", **cache}


def write_config(path, data_dir, source_tokens_per_param=0.0899) -> str:
    """The mini sweep, reduced to a run per point: 58-step runs of size test, one CPU and 2 GiB
    per task (two at once)."""
    path.write_text(
        "import runpy\n"
        "def get_config():\n"
        f"    c = runpy.run_path({MINI!r})['get_config']()\n"
        f"    c.source_tokens_per_param, c.tokens_per_param = {source_tokens_per_param}, (0.0899,)\n"
        "    c.branches, c.replay_study.size = False, ''\n"
        "    c.batch_size, c.base.seq_len, c.eval_points = 8, 64, 4\n"
        f"    c.base.data.dir = {str(data_dir)!r}\n"
        "    c.slurm.update({'cpus-per-task': 1, 'mem': '2G', 'time': '30:00'})\n"
        "    return c\n")
    return str(path)


class Sweep:
    """A sweep submitted with --backend slurm --only test; its jobs are cancelled at the end."""

    def __init__(self, config: str, out, env: dict):
        self.config, self.out = config, out
        self.runs = {r.name: r for r in sweep.expand(load_file(config), str(out), only=("test",))}
        r = subprocess.run([sys.executable, "-m", "cpt_jax.sweep", "--config", config, "--sweep_dir", str(out),
                            "--backend", "slurm", "--only", "test"], cwd=out.parent, env=env, capture_output=True,
                           text=True, timeout=120)
        self.stdout = r.stdout
        submitted = re.findall(r"submitted (\S+) as job (\d+)", r.stdout)
        assert r.returncode == 0 and submitted, r.stdout + r.stderr
        self.jobs = [job for _, job in submitted]
        self.prepare = next((job for path, job in submitted if path.endswith("prepare.sbatch")), None)
        self.task = {}  # run name -> JOB_TASK, from the array scripts' RUNS and the tasks squeue lists
        for path, job in submitted:
            runs = next((shlex.split(line[6:-1]) for line in open(path).read().splitlines()
                         if line.startswith("RUNS=(")), None)
            if runs:
                for task in self.states(job):
                    self.task[runs[int(task.split("_")[1])]] = task

    def states(self, *jobs: str) -> dict[str, tuple[str, str]]:
        """JOB_TASK (or the job id of a job that is no array) -> (state, reason), while squeue shows it."""
        r = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs or self.jobs), "-o", "%i %T %r"],
                           capture_output=True, text=True)
        return {f[0]: (f[1], f[2]) for f in (line.split(None, 2) for line in r.stdout.splitlines()) if len(f) == 3}

    def finished(self, name: str) -> bool:
        return sweep.finished(self.runs[name], str(self.out))

    def done(self, *names: str) -> bool:
        """Each run finished (all its steps saved) and its task ended, exit 0."""
        states = self.states()
        return all(states.get(self.task[n], ("",))[0] == "COMPLETED" and self.finished(n) for n in names)

    def log(self, name: str) -> str:
        job, _, task = self.task[name].partition("_")
        path = self.out / f"slurm-{job}_{task}.out"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"==> {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("slurm-*.out")))

    def wait(self, done, timeout: float, what: str, poll: float = 2) -> None:
        """Polls until done(); fails at once when a job waits on a dependency that can never be met,
        or when no job is left pending or running."""
        deadline = time.time() + timeout
        while not done():
            states = self.states()
            never = [t for t, (_, reason) in states.items() if "DependencyNeverSatisfied" in reason]
            if never:
                pytest.fail(f"{what}: {never} wait forever (DependencyNeverSatisfied): {states}\n{self.logs()}")
            if states and all(s in ENDED for s, _ in states.values()):
                time.sleep(2)  # a run's last checkpoint lands as its task ends
                if done():
                    return
                pytest.fail(f"{what}: no job left to run: {states}\n{self.logs()}")
            if time.time() > deadline:
                pytest.fail(f"{what}: not after {timeout:.0f}s: {states}\n{self.logs()}")
            time.sleep(poll)

    def cancel(self) -> None:
        subprocess.run(["scancel", *self.jobs], capture_output=True)


@pytest.fixture
def submitted(job_env):
    sweeps = []

    def submit(config, out) -> Sweep:
        sweeps.append(Sweep(config, out, job_env))
        return sweeps[-1]

    yield submit
    for s in sweeps:
        s.cancel()


def test_slurm_sweep_prepares_data_first_and_finishes_every_run(slurm_cluster, submitted, tmp_path):
    data = tmp_path / "data"  # empty: the preparation job really prepares
    s = submitted(write_config(tmp_path / "sweep.py", data), tmp_path / "sweep")
    assert s.prepare and set(s.task) == set(RUNS), s.stdout
    s.wait(lambda: s.done(*RUNS), 300, "every run finished")
    prepared = (s.out / f"slurm-prepare-{s.prepare}.out").read_text()
    assert "training a 4000-piece bpe tokenizer" in prepared and " documents of zh into " in prepared
    for name in RUNS:
        log = s.log(name)
        assert f"[sweep] {name}: task {s.task[name]}" in log, log
        assert "training a" not in log and "tokenizing" not in log, log  # found everything prepared
        assert f"step {s.runs[name].config.total_steps}/{s.runs[name].config.total_steps}" in log, log
    assert f"initialised params from {s.out}/test/source (step 58)" in s.log("test/cpt_r0.05")


def test_slurm_failed_scratch_task_holds_back_no_cpt_task(slurm_cluster, submitted, data_dir, tmp_path):
    (tmp_path / "sweep" / "test").mkdir(parents=True)
    (tmp_path / "sweep" / "test" / "scratch").write_text("not a dir")  # the scratch run fails at its start
    s = submitted(write_config(tmp_path / "sweep.py", data_dir), tmp_path / "sweep")
    s.wait(lambda: s.done("test/cpt_r0.05"), 300, "test/cpt_r0.05 finished though test/scratch failed")
    assert s.done("test/source") and not s.finished("test/scratch")
    assert s.states()[s.task["test/scratch"]][0] == "FAILED"
    assert "test/scratch is a file, not a directory" in s.log("test/scratch")  # exit 2


def test_slurm_task_sent_sigterm_is_requeued_resumes_and_finishes(slurm_cluster, submitted, data_dir, tmp_path):
    # A longer source run (229 steps), so that SIGTERM lands mid-training.
    s = submitted(write_config(tmp_path / "sweep.py", data_dir, source_tokens_per_param=0.354), tmp_path / "sweep")
    total = s.runs["test/source"].config.total_steps
    assert total > 200
    s.wait(lambda: re.search(rf"step [1-9]\d*/{total}", s.log("test/source")), 240, "test/source training",
           poll=0.5)
    # What SLURM does --signal=B:TERM@300 before the time limit: TERM to the batch script only.
    subprocess.run(["scancel", "--batch", "--signal=TERM", s.task["test/source"]], check=True)
    s.wait(lambda: s.done("test/source"), 300, "test/source requeued, resumed and finished")
    s.wait(lambda: s.done(*RUNS), 240, "test/cpt_r0.05 and test/scratch finished")
    log = s.log("test/source")
    workdir = os.path.join(str(s.out), "test", "source")
    saved = re.search(rf"preempted \(SIGTERM\): saved {workdir}/checkpoints/(\d+)", log)
    assert saved and 0 < int(saved.group(1)) < total, log
    assert "[sweep] test/source: SIGTERM: passing it on to the run" in log
    assert f"the run exited 0; requeueing task {s.task['test/source']}" in log, log  # saved, then exit 0
    assert re.search(rf"\[sweep\] test/source: task {s.task['test/source']} on \S+, restart 1\n", log), log
    assert f"resumed {workdir} at step {saved.group(1)}" in log, log  # from the step it saved
    assert f"step {total}/{total}" in log
    assert RunDir.of(workdir).latest_step() == total
    assert "Restarts=1 " in subprocess.run(["scontrol", "show", "job", "-o", s.task["test/source"]],
                                           capture_output=True, text=True).stdout
    # The CPT run waited for the requeued task, and started from its last step.
    assert f"initialised params from {workdir} (step {total})" in s.log("test/cpt_r0.05")


def test_launch_script_at_its_time_limit_saves_the_step_reached_requeues_and_resumes(slurm_cluster, job_env,
                                                                                       tmp_path):
    """launch/slurm.sbatch under a real time limit: 2 minutes, the batch script signalled 70 s
    before it. The script passes SIGTERM to the tasks of its job step (srun's step), which save the
    step they reached and exit 0; the job is requeued, and the requeued job resumes at that step."""
    workdir, out = tmp_path / "run", tmp_path / "slurm-%j.out"
    r = subprocess.run(["sbatch", "--parsable", "--time=2", "--signal=B:TERM@70", "--ntasks-per-node=1",
                        "--cpus-per-task=1", "--mem=3G", "--gpus-per-node=0", f"--output={out}",
                        os.path.join(ROOT, "launch", "slurm.sbatch"), "configs/bible.py:test", str(workdir),
                        "--config.total_steps=1000000", "--config.checkpoint_every=1000000", "--config.batch_size=8",
                        "--config.seq_len=32", "--config.eval_every=1000000", "--config.log_every=20"],
                       cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log_path = tmp_path / f"slurm-{job}.out"
    log = lambda: log_path.read_text() if log_path.exists() else ""  # noqa: E731
    try:
        deadline = time.time() + 420
        while "resumed " not in log():
            assert time.time() < deadline, log()
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log()
    saved = re.search(rf"preempted \(SIGTERM\): saved {workdir}/checkpoints/(\d+)", text)
    assert saved and int(saved.group(1)) > 0, text  # the step reached, not a step of checkpoint_every
    assert f"SIGTERM: passing it on to the tasks of job step {job}.0" in text and f"requeueing job {job}" in text
    assert f"resumed {workdir} at step {saved.group(1)}" in text, text
