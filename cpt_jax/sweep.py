"""The size sweep behind the scaling-law fits, and its report.

  python -m cpt_jax.sweep --config configs/sweeps/mini.py --sweep_dir /tmp/mini [--backend local|slurm|print]
                          [--only SIZE,...] [--config.FIELD=VALUE ...]
  python -m cpt_jax.sweep run --config configs/sweeps/mini.py --sweep_dir /tmp/mini --run tiny/cpt_r0.05
  python -m cpt_jax.sweep report --sweep_dir /tmp/mini

A sweep config gives sizes, token budgets (tokens per parameter) and replay ratios; each size
expands into a source run (the source language from scratch), a target-from-scratch run per
budget, and a CPT run per budget and replay ratio initialised from that size's source run. Every
run is an ordinary `cpt_jax.main` run in SWEEP_DIR/<size>/<kind>, so finished runs are skipped
and unfinished ones resume; the runs get the sweep command's own config file and `--config.X`
overrides, and `sweep run` exits as `cpt_jax.main` does (cpt_jax.runner). Backends: `local`
runs them one after another (each in its own process; a failed run is reported and the runs
that depend on it are skipped), `slurm` writes and submits an array job whose CPT tasks wait for
their source task, `print` prints one command per run (for TPU pods, see launch/).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys

import ml_collections
from absl import app, flags

from cpt_jax import models, runner
from cpt_jax.config import ConfigError
from cpt_jax.rundir import RunDir
from cpt_jax.runner import RunError

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Where the sweep's runs, plan and report go.")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm", "print"], "How the runs are launched.")
_ONLY = flags.DEFINE_list("only", [], "Sizes to run, comma-separated (default: all of the config's).")
_RUN = flags.DEFINE_string("run", None, "With `run`: the run to train, e.g. tiny/cpt_r0.05.")

KINDS = ("source", "scratch", "cpt")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # "<size>/<kind>", the run's dir under the sweep dir
    kind: str  # source | scratch | cpt
    size: str
    params: int  # N
    tokens: int  # D planned (batches x sequence length x steps)
    replay_ratio: float
    depends_on: str | None  # the run whose checkpoint this one starts from
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)


def paper_batch_tokens(params: int) -> int:
    """The paper's batch: 1M tokens up to 1B parameters, 2M up to 2.5B, 4M above."""
    return 1 << 20 if params <= 1e9 else 2 << 20 if params <= 2.5e9 else 4 << 20


def expand(sweep: ml_collections.ConfigDict, sweep_dir: str, only: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the sweep, sources first, each with its full `cpt_jax.main` config."""
    unknown = [s for s in (*sweep.sizes, *only) if s not in models.SIZES]
    if unknown:
        raise ValueError(f"sizes: {unknown[0]!r} is not a known size; known: {', '.join(models.SIZES)}")
    vocab = sweep.base.model.vocab_size or sweep.base.data.tokenizer.vocab_size
    runs = []
    for size in sweep.sizes:
        if only and size not in only:
            continue
        # N: the paper's own parameter figure for its sizes (its fits and 20x budgets use it), else the true count.
        paper_m = models.SIZES[size].paper_m
        n = paper_m * 10**6 if paper_m else models.model_config(
            size, vocab, tie_embeddings=sweep.base.model.tie_embeddings).param_count()
        batch = sweep.batch_size or max(1, paper_batch_tokens(n) // sweep.base.seq_len)

        def run(kind: str, tpp: float, target: str, ratio: float, init: str | None, suffix: str = "") -> Run:
            steps = max(sweep.eval_points, math.ceil(tpp * n / (batch * sweep.base.seq_len)))
            c = copy.deepcopy(sweep.base)
            c.model.size, c.batch_size, c.total_steps = size, batch, steps
            c.data.target, c.data.replay, c.data.replay_ratio = target, sweep.source, ratio
            c.init_from = os.path.join(sweep_dir, init) if init else ""
            c.eval_every = max(1, steps // sweep.eval_points)
            c.log_every = max(1, min(c.log_every, c.eval_every))
            c.checkpoint_every = c.eval_every * max(1, sweep.eval_points // 4)
            name = f"{size}/{kind}{suffix}"
            return Run(name, kind, size, n, steps * batch * sweep.base.seq_len, ratio, init, c)

        source = run("source", sweep.source_tokens_per_param, sweep.source, 0.0, None)
        runs.append(source)
        for tpp in sweep.tokens_per_param:
            budget = "" if len(sweep.tokens_per_param) == 1 else f"_{tpp:g}x"
            runs.append(run("scratch", tpp, sweep.target, 0.0, None, budget))
            for r in sweep.replay_ratios:
                runs.append(run("cpt", tpp, sweep.target, r, source.name, f"_r{r:g}{budget}"))
    return runs


def finished(run: Run, sweep_dir: str) -> bool:
    step = RunDir.of(os.path.join(sweep_dir, run.name)).latest_step()
    return step is not None and step >= run.config.total_steps


def _run_command(config_args: list[str], sweep_dir: str, name: str, python: str = sys.executable) -> list[str]:
    """`config_args`: --config FILE and the sweep command's overrides."""
    return [python, "-m", "cpt_jax.sweep", "run", *config_args, "--sweep_dir", sweep_dir, "--run", name]


def write_plan(runs: list[Run], sweep_dir: str, config_args: list[str], target: str, source: str) -> None:
    """sweep.json: what the report needs to know about every run."""
    os.makedirs(sweep_dir, exist_ok=True)
    plan = {"config": config_args, "target": target, "source": source,
            "runs": [{k: v for k, v in dataclasses.asdict(r).items() if k != "config"} for r in runs]}
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(plan, f, indent=2)


def launch_local(runs: list[Run], sweep_dir: str, config_args: list[str]) -> list[str]:
    """Runs every unfinished run in order; returns the names of the runs that failed or were
    skipped because what they start from failed."""
    failed: list[str] = []
    for run in runs:
        if run.depends_on in failed:
            print(f"[sweep] {run.name}: skipped, {run.depends_on} failed", flush=True)
            failed.append(run.name)
            continue
        if finished(run, sweep_dir):
            print(f"[sweep] {run.name}: finished already", flush=True)
            continue
        print(f"[sweep] {run.name}: N={run.params:,} D={run.tokens:,} ({run.config.total_steps} steps)", flush=True)
        if subprocess.run(_run_command(config_args, sweep_dir, run.name)).returncode:
            print(f"[sweep] {run.name}: FAILED (its log is above; re-running the sweep resumes it)", flush=True)
            failed.append(run.name)
    return failed


def slurm_script(runs: list[Run], sweep_dir: str, config_args: list[str], slurm: ml_collections.ConfigDict) -> str:
    """An sbatch array script over the runs that are not finished; CPT tasks wait for their
    source task through a dependency on the same array."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=cpt_sweep", f"#SBATCH --output={sweep_dir}/slurm-%A_%a.out"]
    lines += [f"#SBATCH --{k}={v}" for k, v in slurm.items() if v not in ("", None)]
    names = [r.name for r in runs]
    lines += ["RUNS=(" + " ".join(shlex.quote(n) for n in names) + ")",
              " ".join(shlex.quote(a) for a in _run_command(config_args, sweep_dir, "", python="python")[:-1])
              + ' "${RUNS[$SLURM_ARRAY_TASK_ID]}"']
    return "\n".join(lines) + "\n"


def launch_slurm(runs: list[Run], sweep_dir: str, config_args: list[str], slurm: ml_collections.ConfigDict,
                 submit: bool = True) -> list[str]:
    """Two array jobs: sources and scratch runs first, CPT runs after (afterok on the first).
    Returns the sbatch commands (with submit=False, only written and returned)."""
    todo = [r for r in runs if not finished(r, sweep_dir)]
    first = [r for r in todo if r.kind != "cpt"]
    second = [r for r in todo if r.kind == "cpt"]
    commands = []
    job_id = None
    for part, group in (("a", first), ("b", second)):
        if not group:
            continue
        path = os.path.join(sweep_dir, f"sweep_{part}.sbatch")
        with open(path, "w") as f:
            f.write(slurm_script(group, sweep_dir, config_args, slurm))
        cmd = ["sbatch", "--parsable", f"--array=0-{len(group) - 1}"]
        if part == "b" and job_id:
            cmd.append(f"--dependency=afterok:{job_id}")
        cmd.append(path)
        commands.append(" ".join(cmd))
        if submit:
            job_id = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
            print(f"[sweep] submitted {path} as job {job_id}")
        else:
            job_id = "$JOB_A"  # the commands, for the user to run: JOB_A=$(sbatch ... sweep_a.sbatch)
    return commands


def main(args: list[str]) -> None:
    command = args[0] if args else "launch"
    if args[1:] or command not in ("launch", "run", "report"):
        raise app.UsageError(f"unexpected arguments: {args}; commands: run, report (default: launch the sweep)")
    if not _SWEEP_DIR.value:
        raise app.UsageError("--sweep_dir is required")
    sweep_dir = os.path.abspath(_SWEEP_DIR.value)
    if command == "report":
        from cpt_jax.scaling.report import write_report

        print(write_report(sweep_dir))
        return
    if runner.CONFIG.value is None:
        raise app.UsageError("--config is required")
    sweep = runner.CONFIG.value
    try:
        runs = expand(sweep, sweep_dir, tuple(_ONLY.value))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if command == "run":  # one run, in this process
        run = next((r for r in runs if r.name == _RUN.value), None)
        if run is None:
            raise ConfigError(f"--run {_RUN.value!r} is not in the sweep")
        from cpt_jax import trainer

        trainer.run_all(run.config, os.path.join(sweep_dir, run.name))
        return
    # The runs are launched with this command's config file and overrides.
    config_args = runner.config_args(sys.argv)
    write_plan(runs, sweep_dir, config_args, sweep.target, sweep.source)
    if _BACKEND.value == "print":
        for run in runs:
            if not finished(run, sweep_dir):
                print(" ".join(shlex.quote(a) for a in _run_command(config_args, sweep_dir, run.name)))
    elif _BACKEND.value == "slurm":
        launch_slurm(runs, sweep_dir, config_args, sweep.slurm)
    else:
        failed = launch_local(runs, sweep_dir, config_args)
        if failed:
            print(f"[sweep] {len(failed)} run(s) failed or skipped: {', '.join(failed)}", flush=True)
            raise RunError(f"{len(failed)} run(s) of the sweep failed or were skipped; re-running resumes them")
        if sweep.report:
            from cpt_jax.scaling.report import write_report

            print(write_report(sweep_dir))


if __name__ == "__main__":
    runner.main(main)
