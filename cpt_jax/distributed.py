"""Joining JAX's multi-process runtime, and the few things a multi-process run must coordinate.

One process (a laptop, one GPU host) runs as is. A run over several processes calls
`jax.distributed.initialize` before any device is touched: explicitly (`--coordinator_address`,
`--num_processes`, `--process_id`, e.g. several processes on 127.0.0.1), or detected: on any Cloud
TPU VM (JAX finds the slice's other workers from the VM's metadata server, as MaxText and Levanter
let it) and under SLURM, where JAX finds the coordinator itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from typing import Callable, TypeVar

import jax
import numpy as np
from jax._src import clusters, hardware_utils  # JAX's own cluster and TPU detection (what its start-up uses)
from jax.experimental import multihost_utils

from cpt_jax.errors import ConfigError

log = logging.getLogger("cpt_jax")
T = TypeVar("T")


def detected_cluster() -> str | None:
    """"tpu" on a Cloud TPU VM (this host has TPU chips, or GKE names several workers), "slurm" in
    a SLURM job step of several tasks, else None."""
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    if chips or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Starts the multi-process runtime where the job has several processes; a no-op otherwise.
    Process 0's coordinator service, which takes connections unauthenticated, listens on the
    coordinator's address only, not on every interface (JAX's default, `[::]:PORT`), unless
    JAX_COORDINATOR_BIND_ADDRESS says where."""
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
                             f"--num_processes (got {num_processes}, {process_id})")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif detected_cluster():
        # The coordinator as jax.distributed.initialize() detects it (given one, it detects the rest).
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS") or \
            clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)[0]
        kwargs = dict(coordinator_address=coordinator) if coordinator else {}
    else:
        return
    if kwargs and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
        kwargs["coordinator_bind_address"] = kwargs["coordinator_address"]
    # Collectives between CPU processes go through gloo (GPU/TPU use NCCL/ICI; this changes nothing there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    if jax.process_index() != 0:  # one log for the run: process 0's; the others report only problems
        logging.getLogger("cpt_jax").setLevel(logging.WARNING)


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_same(what: str, value: str) -> None:
    """Every process has the same `value` (e.g. the fingerprints of its tokenizer and data stores,
    which each TPU VM prepares in its own local cache); else ConfigError naming those that differ
    from process 0."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        mine = f" (this one's: {value})" if len(value) <= 80 else ""
        raise ConfigError(f"{what} differs between processes: process(es) {differ} have another than process 0{mine}; "
                          f"each host prepared its own, from other sources or settings")


def main_first(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on process 0, then on the others: for work whose result lands in shared storage
    (preparing data, converting a model), which the others then find done instead of racing.
    Orders the processes of one job; independent jobs are kept apart by the preparation's own
    locks (`cpt_jax.storage.exclusive`)."""
    if is_main():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


class Preemption:
    """SIGTERM, seen at a step boundary. One process: a flag set by our handler; several: JAX's
    preemption sync point (its notifier catches SIGTERM), which every process reaches at the
    same step, so all of them save that step."""

    def __enter__(self) -> Preemption:
        self.multi, self.requested = jax.process_count() > 1, False
        if not self.multi:
            self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))
        return self

    def __exit__(self, *exc) -> None:
        if not self.multi:
            signal.signal(signal.SIGTERM, self.previous)

    def now(self, step: int) -> bool:
        return multihost_utils.reached_preemption_sync_point(step) if self.multi else self.requested
