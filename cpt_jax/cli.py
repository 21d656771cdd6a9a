"""How every entry point that trains or prepares starts and ends: `cpt_jax.main`, `cpt_jax.sweep`
(and so each run its backends launch) and `cpt_jax.data.prepare` share these flags and this one
mapping of outcomes to exit codes:

    0  finished, or preempted (SIGTERM) after saving: the same command resumes
    1  a run error (a non-finite loss); the message names the last good checkpoint
    2  bad input (a config field, a file, a flag), found before anything is written

Logging is set up once here, and a job that spans several processes joins `jax.distributed`
before any device is touched (explicit flags, TPU pod slices and SLURM: cpt_jax.distributed).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from cpt_jax import distributed
from cpt_jax.errors import ConfigError, Preempted, RunError
from cpt_jax.metrics import setup_logging

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:arg]; any field can "
                                         "be overridden: --config.optimizer.peak_lr=1e-4.")
COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a run over several "
                                  "processes started by hand (TPU pods and SLURM jobs are detected).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "With --coordinator_address: how many processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", -1, "With --coordinator_address: this process's index.")

log = logging.getLogger("cpt_jax")


def run(job: Callable[[], object], *, label: str = "config error", join_processes: bool = True) -> int:
    """Runs `job()` and returns the exit code for how it ended. `label` starts the one line that
    bad input prints; `join_processes=False` for tools that never span processes."""
    setup_logging()
    try:
        if join_processes:
            try:
                distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        job()
    except ConfigError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        log.warning("%s", e)  # the scheduler restarts the job, which resumes
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad flag or `--config.X` override reported in one line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
        while isinstance(e, BaseException) and e.args:  # ml_collections nests KeyError in AttributeError
            e = e.args[0]
        detail = "; ".join(line.strip("\"' ") for line in str(e).splitlines())
        field = detail.split(";")[0]
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + field)]
        if bad:
            detail = f"{bad[0].removeprefix('--')}: no such config field{detail.removeprefix(field)}"
        print(f"config error: {detail}", file=sys.stderr)
        sys.exit(2)


def main(job: Callable[[list[str]], object], **kwargs) -> None:
    """The `__main__` of an absl entry point: `job(positional args)` under `run`."""
    app.run(lambda argv: sys.exit(run(lambda: job(argv[1:]), **kwargs)), flags_parser=parse_flags)


def config_args(argv: list[str]) -> list[str]:
    """`--config FILE` (absolute) and the `--config.X` overrides of this command line, each as
    one `--config.X=V`: how the commands it launches get the same config."""
    file, sep, arg = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")
    out = ["--config", os.path.abspath(file) + sep + arg]
    for i, a in enumerate(argv):
        if a.startswith("--config."):
            out.append(a if "=" in a else f"{a}={argv[i + 1]}")
    return out
