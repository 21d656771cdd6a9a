"""The size sweep behind the scaling-law fits, and its report.

  python -m cpt_jax.sweep --config configs/sweeps/mini.py --sweep_dir /tmp/mini [--backend local|slurm|print]
                          [--only SIZE,...] [--config.FIELD=VALUE ...]
  python -m cpt_jax.sweep run --config configs/sweeps/mini.py --sweep_dir /tmp/mini --run nano/source
  python -m cpt_jax.sweep report --sweep_dir /tmp/mini [--resamples 1000]
  python -m cpt_jax.sweep cost --config configs/sweeps/paper.py:branched

A sweep config gives sizes, token budgets (tokens per parameter) and replay ratios; each size
expands into a source run (the source language from scratch), then scratch runs and CPT runs
(per replay ratio, initialised from that size's source run): a run per budget, or with
`branches` one stable phase and a cooldown branch from it per budget (`expand`). Every run is an
ordinary `cpt_jax.main` run in SWEEP_DIR/<size>/<kind>, so finished runs are skipped and
unfinished ones resume; the runs get the sweep command's own config file and `--config.X`
overrides, and `sweep run` exits as `cpt_jax.main` does (cpt_jax.cli). Backends: `local`
runs them one after another in this process (a failed run is reported and the runs that start
from it are skipped), `slurm` submits a data-preparation job, then array jobs whose tasks each
wait for the task of the run they start from only, `print` prints the preparation command, then
one command per run (for TPU pods, see launch/). `cost` prints a plan's runs and FLOPs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from cpt_jax import cli, models, storage, trainer, update
from cpt_jax.data import pipeline
from cpt_jax.data.corpora import default_cache_dir
from cpt_jax.data.tokenizer import load_tokenizer, made_vocab_size
from cpt_jax.errors import ConfigError, Preempted, RunError
from cpt_jax.rundir import RunDir
from cpt_jax.scaling import languages
from cpt_jax.scaling.report import BOOTSTRAP, write_report

CLI = cli.Command(__doc__, config="The sweep config, e.g. configs/sweeps/mini.py[:arg]; any field can be overridden: "
                  "--config.base.seq_len=64.", processes=True, default_command="launch",
                  commands={"launch": ("config", "sweep_dir", "backend", "only"),
                            "run": ("config", "sweep_dir", "only", "run"),
                            "report": ("sweep_dir", "resamples"), "cost": ("config", "only", "sweep_dir")})
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Where the sweep's runs, plan and report go.",
                                 flag_values=CLI.flags)
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "slurm", "print"], "How the runs are launched.",
                             flag_values=CLI.flags)
_ONLY = flags.DEFINE_list("only", [], "Sizes to run, comma-separated (default: all of the config's).",
                          flag_values=CLI.flags)
_RUN = flags.DEFINE_string("run", None, "With `run`: the run to train, e.g. nano/cpt_r0.05_stable.", flag_values=CLI.flags)
_RESAMPLES = flags.DEFINE_integer("resamples", BOOTSTRAP, "With `report`: resamples of each bootstrap (fewer: a "
                                  "quicker, rougher report).", lower_bound=1, flag_values=CLI.flags)

KINDS = ("source", "scratch", "cpt")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # "<size>/<kind>...", the run's dir under the sweep dir
    kind: str  # source | scratch | cpt
    size: str
    params: int  # N: non-embedding parameters (all but the input embedding table), in every fit and budget
    tokens: int  # D at the run's end (batch x sequence length x total steps), branch points included
    trained: int  # tokens this run trains itself (a branch: its cooldown only)
    replay_ratio: float
    role: str  # run (its own schedule) | stable (a WSD stable phase: no point of its own) | branch (a cooldown)
    budget: float  # tokens per parameter of the point it gives (a stable run: of its last branch)
    depends_on: str | None  # the run whose checkpoint this one starts from
    seed: int  # 0: the base config's seed; k: the k-th repeat of seed_study (base seed + k)
    target: str  # the language it trains on (the source's, for a source run)
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)


def paper_batch_tokens(params: int) -> int:
    """The paper's batch: 1M tokens up to 1B parameters, 2M up to 2.5B, 4M above."""
    return 1 << 20 if params <= 1e9 else 2 << 20 if params <= 2.5e9 else 4 << 20


def vocab_size(base: ml_collections.ConfigDict) -> int:
    """The vocabulary of the runs' models, as the trainer sizes it: `model.vocab_size`, else the
    tokenizer's, read from the file at `data.tokenizer.path` (else the one the runs make). Raises
    ValueError naming the field the runs would fail on."""
    t = base.data.tokenizer
    try:
        tokens = load_tokenizer(t.path).vocab_size if t.path else made_vocab_size(t.model_type, t.vocab_size)
    except (ValueError, OSError) as e:
        raise ValueError(f"base.data.tokenizer.path: {e}") from None
    if base.model.vocab_size and base.model.vocab_size < tokens:
        raise ValueError(f"base.model.vocab_size={base.model.vocab_size} is smaller than the tokenizer's {tokens}")
    return base.model.vocab_size or tokens


def ratios(sweep: ml_collections.ConfigDict, size: str) -> tuple[float, ...]:
    """The replay ratios of a size's CPT runs: the sweep's, plus the replay study's at its size."""
    study = sweep.get("replay_study")
    extra = tuple(study.ratios) if study and study.size == size else ()
    return tuple(dict.fromkeys((*sweep.replay_ratios, *extra)))


def targets(sweep: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The target languages: `targets` (a languages study: scratch and CPT into each), else `target`."""
    return tuple(sweep.get("targets") or (sweep.target,))


def fit_ratio(sweep: ml_collections.ConfigDict) -> float:
    """The replay ratio of the CPT runs the laws are fitted to (and seeds repeat)."""
    return sweep.get("fit_replay_ratio", sweep.replay_ratios[0])


def seeds(sweep: ml_collections.ConfigDict, size: str) -> range:
    """0 (the base seed), plus 1..count-1 at seed_study's size: its scratch and fitted CPT runs
    repeated with other seeds (init and data order for scratch, data order for CPT, which starts
    from the one source model), so the report can measure seed noise."""
    study = sweep.get("seed_study")
    return range(study.count if study and study.size == size else 1)


def dense_steps(dense: ml_collections.ConfigDict | None, steps: int) -> tuple[int, ...]:
    """`dense.count` eval steps log-spaced over the first `dense.fraction` of a run's steps: a CPT
    run's target loss may rise before it falls (the stability gap), within its first few steps."""
    if not dense:
        return ()
    last = max(1, int(dense.fraction * steps))
    return tuple(sorted({int(round(s)) for s in np.geomspace(1, last, dense.count)}))


def fitted_budgets(sweep: ml_collections.ConfigDict, n: int, params: dict[str, int]) -> list[float]:
    """Tokens per parameter of a size's scratch and fitted CPT points: `tokens_per_param`, and
    with `extend_to_largest` more budgets, doubling from the last, while their tokens stay within
    the largest size's last point. Every size then has points at the tokens of the sizes above
    it: the laws' N and D terms (and the CPT law's gamma, the N-dependence of its D term) are
    told apart by points at equal D, which budgets in proportion to N alone barely give."""
    budgets = sorted(sweep.tokens_per_param)
    most = budgets[-1] * max(params.values())
    while sweep.get("extend_to_largest") and 2 * budgets[-1] * n <= most:
        budgets.append(2 * budgets[-1])
    return budgets


def expand(sweep: ml_collections.ConfigDict, sweep_dir: str, only: tuple[str, ...] = ()) -> list[Run]:
    """Every run of the sweep, each after the run it starts from, with its full `cpt_jax.main`
    config. Per size: a source run, then for scratch and for CPT at each replay ratio either a
    run per token budget (the paper's protocol, the base schedule), or with `branches` one
    stable-phase run (constant LR) to the last branch point that keeps a checkpoint at each,
    and per budget a cooldown branch from it (wsd: the same step and data, the LR decayed)."""
    study = sweep.get("replay_study")
    named = (*sweep.sizes, *only, *([study.size] if study and study.size else []))
    unknown = [s for s in named if s not in models.SIZES]
    if unknown:
        raise ValueError(f"sizes: {unknown[0]!r} is not a known size; known: {', '.join(models.SIZES)}")
    for name in ("replay_study", "seed_study"):
        if sweep.get(name) and sweep[name].size and sweep[name].size not in sweep.sizes:
            raise ValueError(f"{name}.size={sweep[name].size!r} is not one of sizes {tuple(sweep.sizes)}")
    langs = targets(sweep)
    missing = [x for x in (sweep.source, *langs) if x not in sweep.base.data.sources]
    if missing:
        raise ValueError(f"source/targets: {missing[0]!r} is not one of base.data.sources "
                         f"({', '.join(sweep.base.data.sources)})")
    vocab = vocab_size(sweep.base)
    branched, seq = sweep.get("branches", False), sweep.base.seq_len
    params = {size: models.model_config(size, vocab, tie_embeddings=sweep.base.model.tie_embeddings
                                        ).non_embedding_params() for size in sweep.sizes}
    runs = []
    for size in sweep.sizes:
        if only and size not in only:
            continue
        n = params[size]
        batch = sweep.batch_size or max(1, paper_batch_tokens(n) // seq)
        steps_of = lambda tpp: max(sweep.eval_points, math.ceil(tpp * n / (batch * seq)))  # noqa: E731

        def run(name: str, kind: str, tpp: float, ratio: float, role: str, steps: int, depends_on: str | None,
                start: int = 0, evals: int = sweep.eval_points, seed: int = 0, target: str = sweep.target,
                **fields) -> Run:
            c = copy.deepcopy(sweep.base)
            c.model.size, c.batch_size, c.total_steps = size, batch, steps
            c.seed += seed
            c.data.target = sweep.source if kind == "source" else target
            c.data.replay, c.data.replay_ratio = sweep.source, ratio
            if len(langs) > 1:  # each run reads (and evaluates) only its own languages
                keep = {sweep.source, c.data.target}
                c.data.sources = ml_collections.ConfigDict({k: v for k, v in c.data.sources.items() if k in keep})
            if depends_on:
                c["branch_from" if role == "branch" else "init_from"] = os.path.join(sweep_dir, depends_on)
            c.eval_every = max(1, (steps - start) // evals)
            c.log_every = max(1, min(c.log_every, c.eval_every))
            c.checkpoint_every = c.eval_every * max(1, evals // 4)
            if kind == "cpt" and role != "branch":
                c.eval_steps = dense_steps(sweep.get("dense_evals"), steps)
            c.update_from_flattened_dict(fields)
            r = Run(f"{size}/{name}", kind, size, n, steps * batch * seq, (steps - start) * batch * seq, ratio,
                    role, tpp, depends_on, seed, c.data.target, c)
            runs.append(r)
            return r

        source = run("source", "source", sweep.source_tokens_per_param, 0.0, "run",
                     steps_of(sweep.source_tokens_per_param), None,
                     **({"optimizer.schedule": "wsd"} if branched else {}))
        for target, kind, ratio, seed in [
                (target, kind, ratio, seed) for target in langs for seed in seeds(sweep, size)
                for kind, ratio in [("scratch", 0.0)] + [("cpt", r) for r in ratios(sweep, size)]
                if not seed or kind == "scratch" or ratio == fit_ratio(sweep)]:
            label = (("scratch" if kind == "scratch" else f"cpt_r{ratio:g}") + (f"_{target}" if len(langs) > 1 else "")
                     + (f"_seed{seed}" if seed else ""))
            init = source.name if kind == "cpt" else None
            fitted = not seed and (kind == "scratch" or ratio == fit_ratio(sweep))
            budgets = fitted_budgets(sweep, n, params) if fitted else sorted(sweep.tokens_per_param)
            if not branched:
                for tpp in budgets:
                    suffix = "" if len(budgets) == 1 else f"_{tpp:g}x"
                    run(label + suffix, kind, tpp, ratio, "run", steps_of(tpp), init, seed=seed, target=target)
                continue
            # One warmup for the stable run and all its branches: 5% (warmup_frac) of the shortest.
            warmup = sweep.base.optimizer.warmup_steps or max(
                1, round(sweep.base.optimizer.warmup_frac * steps_of(budgets[0])))
            opt = copy.deepcopy(sweep.base.optimizer)
            opt.warmup_steps = warmup
            points = {tpp: steps_of(tpp) - update.decay_steps(opt, steps_of(tpp)) for tpp in budgets}
            if points[budgets[0]] <= warmup:
                raise ValueError(f"tokens_per_param={budgets[0]:g} at size {size}: {steps_of(budgets[0])} steps "
                                 f"leave no stable phase after a {warmup}-step warmup")
            stable = run(f"{label}_stable", kind, budgets[-1], ratio, "stable", max(points.values()), init, seed=seed,
                         target=target, **{"optimizer.schedule": "constant", "optimizer.warmup_steps": warmup,
                            "keep_steps": tuple(sorted(points.values()))})
            for tpp in budgets:  # a branch is a point: it evaluates (and saves) at its end
                steps = steps_of(tpp)
                run(f"{label}_{tpp:g}x", kind, tpp, ratio, "branch", steps, stable.name, start=points[tpp],
                    seed=seed, target=target, branch_step=points[tpp], eval_every=steps, checkpoint_every=steps,
                    **{"optimizer.schedule": "wsd", "optimizer.warmup_steps": warmup})
    return runs


def train_tokens(base: ml_collections.ConfigDict) -> dict[str, int]:
    """Tokens of each source's training split, from its token store (prepared here if missing,
    as the first run would)."""
    try:
        data = pipeline.build(base.data, base.seq_len)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {k.split("/")[0]: int(m["n_tokens"]) for k, m in data.manifests.items() if k.endswith("/train")}


def epochs(run: Run, train: dict[str, int]) -> dict[str, float]:
    """How many times a run reads each language's training split, from its first step (a branch
    with the stable phase it continues; a CPT run without its source model's)."""
    d = run.config.data
    read = {d.target: (1 - d.replay_ratio) * run.tokens}
    if d.replay_ratio:
        read[d.replay] = read.get(d.replay, 0.0) + d.replay_ratio * run.tokens
    return {lang: tokens / train[lang] for lang, tokens in read.items()}


def check_epochs(runs: list[Run], train: dict[str, int], most: float) -> None:
    """ConfigError naming the first run that would read a training split more than `most` times."""
    for run in runs:
        over = {lang: e for lang, e in epochs(run, train).items() if e > most}
        if over:
            lang, e = next(iter(over.items()))
            raise ConfigError(f"max_epochs={most:g}: {run.name} reads the {lang} training split {e:.2f} times "
                              f"({run.tokens:,} tokens, {train[lang]:,} in the split); fewer tokens per parameter, "
                              "smaller sizes or a larger corpus")


def flops(runs: list[Run]) -> dict[str, float]:
    """C = 6 N D of what the sweep trains, against the paper's protocol for the same points: a
    run per point from its start (from scratch or from the source model), sources alike."""
    spent = sum(6.0 * r.params * r.trained for r in runs)
    per_point = sum(6.0 * r.params * r.tokens for r in runs if r.role != "stable")
    return {"spent": spent, "one_run_per_point": per_point, "saved": 1 - spent / per_point if per_point else 0.0}


def finished(run: Run, sweep_dir: str) -> bool:
    step = RunDir.of(os.path.join(sweep_dir, run.name)).latest_step()
    return step is not None and step >= run.config.total_steps


def _run_command(config_args: list[str], sweep_dir: str, name: str, python: str = sys.executable) -> list[str]:
    """`config_args`: --config FILE and the sweep command's overrides."""
    return [python, "-m", "cpt_jax.sweep", "run", *config_args, "--sweep_dir", sweep_dir, "--run", name]


def write_plan(runs: list[Run], sweep_dir: str, config_args: list[str], sweep: ml_collections.ConfigDict,
               train: dict[str, int] | None = None) -> None:
    """sweep.json: what the report needs to know about the sweep and every run (with `train`,
    the tokens of each training split, each run's epochs)."""
    os.makedirs(sweep_dir, exist_ok=True)
    study = sweep.get("replay_study")
    plan = {"config": config_args, "target": targets(sweep)[0], "targets": list(targets(sweep)), "source": sweep.source,
            "branches": bool(sweep.get("branches", False)),
            "fit_replay_ratio": fit_ratio(sweep), "replay_study": study.to_dict() if study else None,
            "seed_study": sweep.seed_study.to_dict() if sweep.get("seed_study") else None,
            "findings": sweep.findings.to_dict() if "findings" in sweep else {},
            "flops": flops(runs), "train_tokens": train,
            # the languages study's similarity to the source, where the data is prepared to read
            "similarity": languages.similarities(sweep.base.data, sweep.source, targets(sweep))
            if train and len(targets(sweep)) > 1 else None,
            "runs": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "config"},
                      **({"epochs": epochs(r, train)} if train else {})} for r in runs]}
    storage.write_atomic(os.path.join(sweep_dir, "sweep.json"), json.dumps(plan, indent=2), within=sweep_dir)


def cost_table(runs: list[Run], train: dict[str, int] | None = None) -> str:
    """The runs of a plan and its FLOPs, against the one-run-per-point protocol; with `train`, the
    most epochs of each language's training split any run reads."""
    f = flops(runs)
    most: dict[str, tuple[float, str]] = {}
    for r in runs if train else ():
        for lang, e in epochs(r, train).items():
            most[lang] = max(most.get(lang, (0.0, "")), (e, r.name))
    reads = "".join(f"\nepochs of the {lang} training split ({train[lang]:,} tokens): at most {e:.2f} ({name})"
                    for lang, (e, name) in sorted(most.items()))
    sizes = dict.fromkeys((r.size, r.params) for r in runs)
    span = max(n for _, n in sizes) / min(n for _, n in sizes)
    roles = {role: sum(r.role == role for r in runs) for role in ("run", "stable", "branch")}
    ends = sum(r.role != "stable" and r.kind != "source" for r in runs)
    return (f"{len(runs)} runs ({roles['run']} whole runs, {roles['stable']} stable phases, {roles['branch']} "
            f"cooldown branches): {ends} scratch and CPT runs that end decayed, besides the sources\n"
            f"FLOPs (C = 6 N D): this plan {f['spent']:.3g}; a whole run for each of those ends "
            f"{f['one_run_per_point']:.3g} ({f['saved']:.1%} less)\n"
            f"sizes: {', '.join(f'{name} (N {n:,})' for name, n in sizes)}: {span:.1f}x in N" + reads)


def compilation_cache() -> str:
    """JAX_COMPILATION_CACHE_DIR, or the user's cache's `jax-cache`: compiled programs are code
    the runs execute, so never in the sweep dir (which may be shared or downloaded), and a local
    one only if this user alone can write it (storage.private_dir). A gs:// cache is taken as
    given."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_cache_dir() / "jax-cache")
    return cache if storage.is_remote(cache) else str(storage.private_dir(cache))


def launch_local(runs: list[Run], sweep_dir: str) -> list[str]:
    """Runs every unfinished run in order, in this process (one start of Python and JAX for all:
    seconds per run), each as `sweep run` would; returns the names of the runs that failed or
    were skipped because what they start from failed. The runs share a persistent compilation
    cache: runs of one size compile the same train step whatever their schedule and length."""
    jax.config.update("jax_compilation_cache_dir", compilation_cache())
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
        try:
            trainer.run_all(run.config, os.path.join(sweep_dir, run.name))
        except Preempted:
            raise  # saved: the same command resumes the sweep
        except Exception as e:  # noqa: BLE001  (one run's failure, whatever it is, ends that run only)
            what = "config error" if isinstance(e, ConfigError) else "run error" if isinstance(e, RunError) else None
            if what is None:
                cli.log.exception("%s failed", run.name)
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"[sweep] {run.name}: FAILED ({what or type(e).__name__}: {first}); re-running the sweep resumes it",
                  flush=True)
            failed.append(run.name)
        finally:
            jax.clear_caches()  # the run's programs; the next run's come from the persistent cache
    return failed


# ----------------------------------------------------------------------------------------------
# SLURM (and the print backend's commands, which follow the same plan)
# ----------------------------------------------------------------------------------------------
# The array script's own options; the sweep config's `slurm` options replace them (False drops one).
SLURM_DEFAULTS = {"signal": "B:TERM@300", "requeue": True, "open-mode": "append"}
PREPARE_CONFIG = "prepare_data.py"


def _sbatch_lines(options: dict) -> list[str]:
    """#SBATCH lines: a value of True is a bare flag; "", None and False drop the option."""
    out = []
    for k, v in options.items():
        if v is True:
            out.append(f"#SBATCH --{k}")
        elif v not in ("", None, False):
            out.append(f"#SBATCH --{k}={v}")
    return out


def _sbatch_path(path: str) -> str:
    """`path` as one argument of an #SBATCH line, which sbatch splits itself (double quotes group,
    a backslash escapes, an unescaped # ends the line); refused if it would end the line: the
    sweep directory may come from anywhere, and a line break would start a shell command."""
    if any(c in path for c in "\n\r\0"):
        raise ConfigError(f"--sweep_dir {path!r}: a line break in the path")
    return '"' + re.sub(r'([\\"#])', r"\\\1", path) + '"'


def write_prepare_config(sweep_dir: str, config_args: list[str]) -> str:
    """SWEEP_DIR/prepare_data.py: a run config for `python -m cpt_jax.data.prepare`, the sweep's
    base config. The runs differ from it only in model size, steps, batch and mixture weights
    (`expand`), none of which changes what is prepared (sources, tokenizer, token stores of every
    source at base.seq_len), so preparing it prepares the data of every run."""
    path = os.path.join(sweep_dir, PREPARE_CONFIG)
    # Names enter the code only as repr() literals: a directory name cannot close a string here.
    storage.write_atomic(path, '"""Written by `python -m cpt_jax.sweep`: the data every run of the sweep reads, for\n'
                         '`python -m cpt_jax.data.prepare --config` this file."""\n\n'
                         "from cpt_jax.config import load_file\n\n\n"
                         "def get_config():\n"
                         f"    return load_file({config_args[1]!r}).base\n", within=sweep_dir)
    return path


def _prepare_command(sweep_dir: str, config_args: list[str], python: str = sys.executable) -> list[str]:
    """The preparation of the base config, with the sweep's overrides of `base` (the others,
    sizes and budgets, change no data)."""
    base = [a.replace("--config.base.", "--config.", 1) for a in config_args if a.startswith("--config.base.")]
    return [python, "-m", "cpt_jax.data.prepare", "--config", os.path.join(sweep_dir, PREPARE_CONFIG), *base]


def print_commands(runs: list[Run], sweep_dir: str, config_args: list[str]) -> list[str]:
    """The print backend: the data preparation first, then one command per unfinished run, each
    after the run it starts from (runs that start from none may run at once)."""
    todo = [r for r in runs if not finished(r, sweep_dir)]
    if not todo:
        return []
    write_prepare_config(sweep_dir, config_args)
    return [" ".join(shlex.quote(a) for a in cmd) for cmd in
            [_prepare_command(sweep_dir, config_args), *(_run_command(config_args, sweep_dir, r.name) for r in todo)]]


def slurm_script(runs: list[Run], sweep_dir: str, config_args: list[str], slurm: ml_collections.ConfigDict) -> str:
    """The sbatch script of the sweep's array jobs: task i runs RUNS[i], through srun (one process
    per SLURM task, however many the options ask for). SIGTERM to the script (SLURM sends it
    `--signal` seconds before the time limit) is passed on to the run's tasks, which finish the
    step in flight and save; the task is then requeued (unless the job is being cancelled),
    whatever the run's exit code, and its next start resumes the run."""
    options = {**SLURM_DEFAULTS, **{k: v for k, v in slurm.items() if k != "prepare"}}
    lines = ["#!/bin/bash", "#SBATCH --job-name=cpt_sweep", "#SBATCH --output=" + _sbatch_path(f"{sweep_dir}/slurm-%A_%a.out"),
             *_sbatch_lines(options),
             "# Written by `python -m cpt_jax.sweep --backend slurm`, which submits it as array jobs: task i",
             "# runs RUNS[i]. SIGTERM (before the time limit, or scancel --batch --signal=TERM) is passed on",
             "# to the run, which saves; the task is then requeued and resumes.",
             "set -uo pipefail",
             "RUNS=(" + " ".join(shlex.quote(r.name) for r in runs) + ")",
             'run=${RUNS[$SLURM_ARRAY_TASK_ID]}',
             'task=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}  # this task alone (the array job id is all of them)',
             'echo "[sweep] $run: task $task on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"',
             "# srun does not take --cpus-per-task from the job (Slurm 22.05 on): pass it on.",
             'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi',
             'pid=""',
             "on_term() {",
             "  trap '' TERM",
             '  echo "[sweep] $run: SIGTERM: passing it on to the run (the tasks of job step $SLURM_JOB_ID.0)"',
             "  rc=0",
             "  # To the tasks, not to srun: srun would end the step, killing them before they save.",
             '  if [ -n "$pid" ]; then scancel --signal=TERM "$SLURM_JOB_ID.0"; wait "$pid" || rc=$?; fi',
             "  # A running job is requeued; one being cancelled (scancel also sends TERM) is left to end.",
             '  state=$(scontrol show job -o "$task")',
             '  if [[ "$state" == *" JobState=RUNNING "* ]]; then',
             '    echo "[sweep] $run: the run exited $rc; requeueing task $task"',
             '    scontrol requeue "$task"',
             "  else",
             '    echo "[sweep] $run: the run exited $rc; the job is ending, not requeued"',
             "  fi",
             "  exit 0",
             "}",
             "trap on_term TERM",
             "srun --kill-on-bad-exit=1 " + " ".join(  # one process per task of the job, however many
                 shlex.quote(a) for a in _run_command(config_args, sweep_dir, "", python="python")[:-1]) + ' "$run" &',
             "pid=$!",
             'wait "$pid"']
    return "\n".join(lines) + "\n"


def prepare_script(sweep_dir: str, config_args: list[str], slurm: ml_collections.ConfigDict) -> str:
    """The sbatch script of the data-preparation job: the runs' options (but for the array
    script's own: it is neither signalled nor requeued), with `slurm.prepare`'s in their place
    (e.g. no GPUs)."""
    options = {k: v for k, v in slurm.items() if k != "prepare" and k not in SLURM_DEFAULTS}
    options.update(slurm.get("prepare", {}))
    lines = ["#!/bin/bash", "#SBATCH --job-name=cpt_sweep_prepare",
             "#SBATCH --output=" + _sbatch_path(f"{sweep_dir}/slurm-prepare-%j.out"), *_sbatch_lines(options),
             "# Written by `python -m cpt_jax.sweep --backend slurm`: the data every run of the sweep reads;",
             "# the sweep's array jobs start once it succeeds.",
             "set -euo pipefail",
             " ".join(shlex.quote(a) for a in _prepare_command(sweep_dir, config_args, python="python"))]
    return "\n".join(lines) + "\n"


def launch_slurm(runs: list[Run], sweep_dir: str, config_args: list[str], slurm: ml_collections.ConfigDict,
                 submit: bool = True) -> list[str]:
    """Submits the unfinished runs: a data-preparation job, then array jobs of one script
    (sweep.sbatch, task i runs RUNS[i]). The runs that start from no unfinished run form one array,
    after the preparation; the runs that start from an unfinished run form an array per such run,
    after that run's own task only (afterok:JOB_TASK). So a failed run holds back only the runs
    that start from it (cancelled: --kill-on-invalid-dep). Returns the sbatch commands as shell
    lines; with submit=False they are only written and returned, job ids as shell variables."""
    todo = [r for r in runs if not finished(r, sweep_dir)]
    if not todo:
        return []
    os.makedirs(sweep_dir, exist_ok=True)
    write_prepare_config(sweep_dir, config_args)
    prepare, script = os.path.join(sweep_dir, "sweep_prepare.sbatch"), os.path.join(sweep_dir, "sweep.sbatch")
    storage.write_atomic(prepare, prepare_script(sweep_dir, config_args, slurm), within=sweep_dir)
    storage.write_atomic(script, slurm_script(todo, sweep_dir, config_args, slurm), within=sweep_dir)
    index = {r.name: i for i, r in enumerate(todo)}
    groups: dict[str | None, list[int]] = {}  # the unfinished run waited for -> the tasks that wait
    for i, r in enumerate(todo):  # in `expand` order, a run comes after the one it starts from
        groups.setdefault(r.depends_on if r.depends_on in index else None, []).append(i)
    commands = []

    def sbatch(var: str, args: list[str], path: str) -> str:
        cmd = ["sbatch", "--parsable", *args, path]
        if not submit:
            # the ids of earlier jobs are shell variables here, left unquoted: the rest is quoted
            commands.append(f"{var}=$({' '.join(a if '${' in a else shlex.quote(a) for a in cmd)})")
            return f"${{{var}}}"
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RunError(f"{' '.join(cmd)} failed: {r.stderr.strip()}"
                           + (f"; submitted before it: {'; '.join(commands)}" if commands else ""))
        commands.append(" ".join(shlex.quote(a) for a in cmd))
        return r.stdout.strip().split(";")[0]

    prepare_job = sbatch("PREPARE", [], prepare)
    if submit:
        print(f"[sweep] submitted {prepare} as job {prepare_job}: data preparation", flush=True)
    task: dict[str, str] = {}  # run name -> its array task, JOB_INDEX
    for n, (after, tasks) in enumerate(groups.items()):
        wait_for = prepare_job if after is None else task[after]
        job = sbatch(f"JOB_{n}", [f"--array={','.join(map(str, tasks))}", f"--dependency=afterok:{wait_for}",
                                  "--kill-on-invalid-dep=yes"], script)
        task.update({todo[i].name: f"{job}_{i}" for i in tasks})
        if submit:
            print(f"[sweep] submitted {script} as job {job} after {wait_for}: "
                  + ", ".join(f"{todo[i].name} ({job}_{i})" for i in tasks), flush=True)
    return commands


def sweep_command(command: str) -> None:
    if not _SWEEP_DIR.value and command != "cost":
        raise ConfigError("--sweep_dir is required")
    sweep_dir = os.path.abspath(_SWEEP_DIR.value or "SWEEP_DIR")
    if command == "report":
        if not os.path.isfile(os.path.join(sweep_dir, "sweep.json")):
            raise ConfigError(f"--sweep_dir {sweep_dir}: no sweep.json there (a sweep writes it when it starts)")
        print(write_report(sweep_dir, _RESAMPLES.value))
        return
    if CLI.config.value is None:
        raise ConfigError("--config is required")
    config = CLI.config.value
    try:
        runs = expand(config, sweep_dir, tuple(_ONLY.value))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if command == "cost":  # the plan's arithmetic and its data's size, nothing trained
        print(cost_table(runs, train_tokens(config.base)))
        return
    if command == "run":  # one run, in this process
        run = next((r for r in runs if r.name == _RUN.value), None)
        if run is None:
            raise ConfigError(f"--run {_RUN.value!r} is not in the sweep")
        trainer.run_all(run.config, os.path.join(sweep_dir, run.name))
        return
    # The runs are launched with this command's config file and overrides.
    config_args = CLI.config_args()
    # Locally the data is prepared here (the first run would): a plan that reads a split too often
    # stops before any run; SLURM and print prepare it in a job of their own.
    train = train_tokens(config.base) if _BACKEND.value == "local" else None
    if train and config.get("max_epochs"):
        check_epochs(runs, train, config.max_epochs)
    write_plan(runs, sweep_dir, config_args, config, train)
    if _BACKEND.value == "print":
        for line in print_commands(runs, sweep_dir, config_args):
            print(line)
    elif _BACKEND.value == "slurm":
        launch_slurm(runs, sweep_dir, config_args, config.slurm)
    else:
        failed = launch_local(runs, sweep_dir)
        if failed:
            print(f"[sweep] {len(failed)} run(s) failed or skipped: {', '.join(failed)}", flush=True)
            raise RunError(f"{len(failed)} run(s) of the sweep failed or were skipped; re-running resumes them")
        if config.report:
            print(write_report(sweep_dir))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.sweep [COMMAND] ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(sweep_command, argv)


if __name__ == "__main__":
    sys.exit(main())
