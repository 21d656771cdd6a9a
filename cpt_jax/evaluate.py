"""Downstream evaluation of a checkpoint with EleutherAI's lm-evaluation-harness, on the JAX model.

  python -m cpt_jax.evaluate --workdir RUN [--step N] --tasks bible_next_verse,piqa [--limit K] [--batch_size B]

The checkpoint is read as `cpt_jax.load` reads it (a run's workdir or a converted model;
no HF export) and scored by the harness backend of cpt_jax/harness.py. Task names are checked
(`tasks.resolve`) before any model is loaded. Results are written as the harness returns them
(results.json under --output, default WORKDIR/eval/step_N), and one line per task and metric is
printed. Bad input prints one `evaluate error:` line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

from cpt_jax import cli, harness, inference, models, storage
from cpt_jax import tasks as task_lib
from cpt_jax.errors import ConfigError
from cpt_jax.rundir import RunDir

CLI = cli.Command(__doc__, label="evaluate error", required=("workdir", "tasks"))
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir or a converted model's dir.", flag_values=CLI.flags)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=CLI.flags)
_TASKS = flags.DEFINE_list("tasks", None, "Comma-separated harness task or group names.", flag_values=CLI.flags)
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many documents per task.", flag_values=CLI.flags)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Rows per scoring batch.", flag_values=CLI.flags)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "Tokens of context at most.", flag_values=CLI.flags)
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: the checkpoint's).", flag_values=CLI.flags)
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A dir of your own harness task YAML files.",
                                    flag_values=CLI.flags)
_OUTPUT = flags.DEFINE_string("output", None, "Results dir (default: WORKDIR/eval/step_N).", flag_values=CLI.flags)

log = logging.getLogger(__name__)


def summary_lines(results: dict) -> list[str]:
    """One line per task: its metrics."""
    return [f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(harness.metric_values(metrics).items()))
            for task, metrics in sorted(results["results"].items())]


def evaluate_checkpoint() -> None:
    try:
        names = task_lib.resolve(_TASKS.value, _INCLUDE_PATH.value)  # before any model is loaded
        run = RunDir.of(_WORKDIR.value)
        step = run.latest_step() if _STEP.value is None else _STEP.value
        if step is None:
            raise FileNotFoundError(f"--workdir {_WORKDIR.value}: no checkpoint there")
        model, tokenizer = inference.load(_WORKDIR.value, step, _DTYPE.value)
        scorer = harness.Scorer(models.spec(model.cfg), tokenizer, _BATCH_SIZE.value, _MAX_LENGTH.value)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(str(e)) from None
    results = scorer.evaluate(models.params_of(model), names, _LIMIT.value, _INCLUDE_PATH.value)
    path = write_results(results, _OUTPUT.value or os.path.join(run.path, "eval", f"step_{step}"),
                         within=_OUTPUT.value or run.path)
    for line in summary_lines(results):
        print(line)
    log.info("results in %s", path)


def write_results(results: dict, out: str, within: str) -> str:
    """OUT/results.json; returns its path. The workdir may be downloaded or shared, so no link
    in it below `within` may carry the results elsewhere."""
    path = os.path.join(out, "results.json")
    keep = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better")
    storage.write_atomic(path, json.dumps({k: results[k] for k in keep if k in results}, indent=2, default=str),
                         within=within)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.evaluate ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(evaluate_checkpoint, argv)


if __name__ == "__main__":
    sys.exit(main())
