"""Several hosts, as two processes on 127.0.0.1 (gloo collectives, 4 CPU devices each): every
process's rows of the global batch come from the batch sharding's addressable indices, so any mesh
gets the right global batch, tensor parallelism across hosts included; hosts whose tokenizer or
data differ refuse to start; and a Cloud TPU VM joins the multi-process runtime by JAX's own
detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax._src import clusters, hardware_utils

from cpt_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(workdir) -> list[dict]:
    """Everything a run logged but wall-clock speed."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in f]


def two_processes(args_of, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`python ARGS` as processes 0 and 1 of a job (`args_of(process_id, port)`), 4 CPU devices each."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, *args_of(i, port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_a_cloud_tpu_vm_joins_by_jax_detection(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    distributed.initialize()
    assert calls == []  # no TPU here, no flags: one process
    # A TPU VM's chips on the PCI bus (what JAX's start-up counts); worker 0's address, as JAX's
    # detection reads it from the metadata server
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    monkeypatch.setattr(clusters.ClusterEnv, "auto_detect_unset_distributed_params",
                        lambda *args: ("10.0.0.2:8476", 4, 1, None))
    distributed.initialize()
    # jax.distributed.initialize() finds the rest itself; the coordinator listens on its own address only
    assert calls == [{"coordinator_address": "10.0.0.2:8476", "coordinator_bind_address": "10.0.0.2:8476"}]


def test_the_coordinator_listens_on_its_own_address_only(monkeypatch):
    """JAX's coordinator service, unauthenticated, listens on every interface (`[::]:PORT`) unless
    told where: it is bound to the coordinator's address, given or detected (SLURM's first node);
    JAX_COORDINATOR_BIND_ADDRESS still says otherwise."""
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    distributed.initialize("127.0.0.1:1234", 2, 0)
    assert calls.pop()["coordinator_bind_address"] == "127.0.0.1:1234"
    for var, value in {"SLURM_JOB_ID": "4096", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[001-002]",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    distributed.initialize()
    assert calls.pop() == {"coordinator_address": "node001:61440", "coordinator_bind_address": "node001:61440"}
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:61440")
    distributed.initialize()
    assert calls.pop() == {"coordinator_address": "node001:61440"}  # JAX reads the variable


SCRIPT = textwrap.dedent("""\
    import sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from cpt_jax import distributed, sharding
    from cpt_jax.errors import ConfigError

    distributed.initialize(f"127.0.0.1:{sys.argv[2]}", 2, int(sys.argv[1]))
    out = open(sys.argv[3], "w")
    b = 8
    tokens = np.arange(b * 3, dtype=np.int32).reshape(b, 3)
    for shape in [(1, 1, 8), (2, 1, 4), (1, 2, 4), (4, 2, 1)]:
        mesh = sharding.make_mesh(shape)
        shardings = {"tokens": sharding.batch_sharding(mesh, 2), "source": sharding.batch_sharding(mesh, 1)}
        rows = sharding.process_rows(shardings["tokens"], b)
        batch = sharding.to_device({"tokens": tokens[rows], "source": rows.astype(np.int32)}, shardings, b)
        whole = multihost_utils.process_allgather(batch, tiled=True)
        same = np.array_equal(whole["tokens"], tokens) and np.array_equal(whole["source"], np.arange(b))
        print(shape, rows.tolist(), same, file=out)
    distributed.check_same("the tokenizer", "abc")
    try:
        distributed.check_same("the tokenizer", f"fingerprint{jax.process_index()}")
    except ConfigError as e:
        print(e, file=out)
    """)


@pytest.mark.slow
def test_every_mesh_gets_the_global_batch_and_differing_hosts_are_named(tmp_path):
    outs = [tmp_path / f"process{i}.txt" for i in range(2)]
    runs = two_processes(lambda i, port: ["-c", SCRIPT, str(i), str(port), str(outs[i])], timeout=300)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    # The script's own file: Gloo's C++ notes share stdout and can split a printed line
    lines = [path.read_text().splitlines() for path in outs]
    # (1,1,8): the batch is split over no axis that crosses the processes: both build every row
    assert lines[0][0] == lines[1][0] == "(1, 1, 8) [0, 1, 2, 3, 4, 5, 6, 7] True"
    assert lines[0][1:4] == ["(2, 1, 4) [0, 1, 2, 3] True", "(1, 2, 4) [0, 1, 2, 3] True", "(4, 2, 1) [0, 1, 2, 3] True"]
    assert lines[1][1:4] == ["(2, 1, 4) [4, 5, 6, 7] True", "(1, 2, 4) [4, 5, 6, 7] True", "(4, 2, 1) [4, 5, 6, 7] True"]
    for i, r in enumerate(runs):
        assert lines[i][4] == ("the tokenizer differs between processes: process(es) [1] have another than process 0 "
                               f"(this one's: fingerprint{i}); each host prepared its own, from other sources or "
                               "settings")


ARGS = ["-m", "cpt_jax.main", "--config", "configs/bible.py:test", "--config.batch_size=8", "--config.seq_len=32",
        "--config.data.replay_ratio=0.25", "--config.data.eval_batches=2", "--config.log_every=5",
        "--config.eval_every=10", "--config.checkpoint_every=10", "--config.total_steps=10"]


@pytest.mark.slow
def test_tensor_parallelism_across_two_hosts_trains_as_one_process(tmp_path):
    mesh = "--config.mesh.shape=(1,1,8)"
    one = subprocess.run([sys.executable, *ARGS, mesh, "--workdir", str(tmp_path / "one")], cwd=ROOT,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = two_processes(lambda i, port: [*ARGS, mesh, "--workdir", str(tmp_path / "two"),
                                          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}"])
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    want, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):  # gloo sums in another order than one process: float roundoff only
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-5)


@pytest.mark.slow
def test_hosts_that_prepared_other_data_refuse_to_start(tmp_path):
    # Each host its own cache (as TPU VMs have), one of them with another tokenizer: both exit 2 before step 1.
    runs = two_processes(lambda i, port: [*ARGS, f"--config.data.dir={tmp_path / f'cache{i}'}",
                                          f"--config.data.tokenizer.vocab_size={4000 + 500 * i}",
                                          "--workdir", str(tmp_path / "run"), f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={i}"])
    for r in runs:
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1].startswith(
            "config error: the tokenizer differs between processes: process(es) [1] have another than process 0")
    assert not (tmp_path / "run" / "checkpoints").exists()
