"""The entry point as users run it, on the real corpus: `cpt_jax.main.main(argv)` in this process,
and `python -m cpt_jax.main` in a subprocess where the process itself is what is tested (its exit
code and stderr as a user sees them). SIGKILL, SIGTERM and several processes: test_faults.py."""

import json
import os
import subprocess
import sys

import pytest

from cpt_jax.main import main

from helpers import ROOT, SMALL


def cli(workdir, *args):
    cmd = [sys.executable, "-m", "cpt_jax.main", "--workdir", str(workdir), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("args,field", [
    (["--config.no_such_field=1"], "config.no_such_field"),
    (["--config.mesh.shape=(3,1,1)"], "mesh.shape"),
    (["--config.batch_size=10"], "batch_size"),
    (["--config.init_from=/nonexistent/run"], "init_from"),
    (["--config.data.target=fr"], "data.target"),
    (["--config.data.tokenizer.path=/nonexistent/tokenizer.json"], "data.tokenizer.path"),
    (["--config.model.vocab_size=100"], "model.vocab_size"),
])
def test_bad_input_fails_early_with_one_line_and_keeps_workdir(tmp_path, capsys, args, field):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 7, "train/loss": 1.0}\n')
    before = _snapshot(workdir)
    assert main(["--workdir", str(workdir), *SMALL, *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and field in errors[0], err
    assert "compiled train step" not in err
    assert _snapshot(workdir) == before


def test_bad_input_as_a_user_sees_it(tmp_path):
    """The process: exit code 2 and one line on stderr, no traceback, nothing written."""
    r = cli(tmp_path / "run", *SMALL, "--config.no_such_field=1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["config error: config.no_such_field: no such config field"], r.stderr
    assert not (tmp_path / "run").exists()


def test_a_workdir_resumes_another_config_only_with_allow_config_change(tmp_path, capsys):
    """Refused with its differing fields named and nothing written; with --allow_config_change the
    run resumes from its checkpoint under the new config."""
    args = ["--workdir", str(tmp_path), *SMALL, "--config.checkpoint_every=2", "--config.eval_every=2",
            "--config.log_every=2", "--config.data.eval_batches=1"]
    assert main([*args, "--config.total_steps=2"]) == 0
    changed = [*args, "--config.total_steps=4", "--config.optimizer.peak_lr=0.001"]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(changed) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"config error: workdir {tmp_path} was made by a different config (optimizer.peak_lr: 0.003 -> 0.001; "
        "total_steps: 2 -> 4); use another workdir, or --allow_config_change to resume it anyway")
    assert _snapshot(tmp_path) == before
    assert main([*changed, "--allow_config_change"]) == 0
    assert f"resumed {tmp_path} at step 2" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path) if "train/loss" in r][-1] == 4
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["peak_lr"] == 0.001


def test_demo_prints_its_table_from_the_runs(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--config", "configs/demo.py", "--config.runs.english.total_steps=8",
            "--config.runs.cpt.total_steps=4", "--config.runs.scratch.total_steps=4", "--config.eval_every=2",
            "--config.log_every=2", "--config.data.eval_batches=1", "--config.batch_size=8", "--config.seq_len=32",
            "--config.model.size=test", "--config.eval_tasks_limit=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cpt, scratch, english = (records(tmp_path / n) for n in ("cpt", "scratch", "english"))
    # The table is the runs' own numbers: CPT starts from the English model's final eval.
    assert cpt[0]["eval/en/loss"] == english[-1]["eval/en/loss"]
    acc = "eval/bible_next_verse_zh/acc"
    assert cpt[0][acc] == english[-1][acc]  # the source model's accuracy, before and after the handover
    assert "downstream accuracy" in out and f"{cpt[0][acc]:.3f} -> {cpt[-1][acc]:.3f}" in out
    assert f"{cpt[-1]['eval/zh/loss']:.3f}" in out and f"{scratch[-1]['eval/zh/loss']:.3f}" in out
    assert "forgetting" in out and (tmp_path / "summary.png").stat().st_size > 10_000
    assert cpt[-1]["train/tokens"] == scratch[-1]["train/tokens"]  # equal tokens
    # Re-running the finished demo trains nothing and prints the same table.
    assert main(args) == 0
    again = capsys.readouterr()
    assert "compiled train step" not in again.err
    assert again.out.split("wall time")[0] == out.split("wall time")[0]
