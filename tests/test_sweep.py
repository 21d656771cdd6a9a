"""The sweep: expansion into runs and links, backends, skipping and failures, and a reduced mini
sweep run for real with its report."""

import json
import os
import subprocess
import sys

import pytest

from cpt_jax import sweep
from cpt_jax.config import load_file
from cpt_jax.scaling.report import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "configs", "sweeps", "mini.py")
PAPER = os.path.join(ROOT, "configs", "sweeps", "paper.py")


def test_mini_expands_into_sources_scratch_and_linked_cpt_runs(tmp_path):
    runs = sweep.expand(load_file(MINI), str(tmp_path))
    assert [r.name for r in runs] == [f"{s}/{k}" for s in ("test", "micro", "tiny")
                                      for k in ("source", "scratch", "cpt_r0.05")]
    by = {r.name: r for r in runs}
    cpt = by["micro/cpt_r0.05"]
    assert cpt.depends_on == "micro/source" and cpt.config.init_from == str(tmp_path / "micro" / "source")
    assert (cpt.config.data.target, cpt.config.data.replay, cpt.config.data.replay_ratio) == ("zh", "en", 0.05)
    assert by["micro/source"].config.data.target == "en" and by["micro/source"].config.data.replay_ratio == 0
    assert by["micro/scratch"].config.init_from == ""
    for r in runs:  # 0.2 tokens per parameter, in whole steps
        assert r.tokens == r.config.total_steps * 16 * 128 and 0.2 * r.params <= r.tokens < 0.2 * r.params + 16 * 128
    assert [r.size for r in sweep.expand(load_file(MINI), str(tmp_path), only=("tiny",))] == ["tiny"] * 3
    with pytest.raises(ValueError, match="'huge' is not a known size"):
        sweep.expand(load_file(MINI), str(tmp_path), only=("huge",))


def test_paper_sweep_uses_the_papers_batches_and_budgets(tmp_path):
    runs = {r.name: r for r in sweep.expand(load_file(PAPER), str(tmp_path))}
    assert len(runs) == 42 * 3
    for size, batch in (("49m", 512), ("1085m", 1024), ("2808m", 2048)):  # 1M, 2M, 4M tokens of 2048
        r = runs[f"{size}/cpt_r0.05"]
        assert r.config.batch_size == batch and r.params == int(size[:-1]) * 10**6
        assert r.tokens == pytest.approx(20 * r.params, rel=0.01)
        assert r.config.optimizer.warmup_frac == 0.05 and r.config.seq_len == 2048


def test_slurm_backend_writes_two_linked_array_jobs(tmp_path):
    runs = sweep.expand(load_file(MINI), str(tmp_path))
    cmds = sweep.launch_slurm(runs, str(tmp_path), MINI, load_file(MINI).slurm, submit=False)
    assert cmds[0].startswith("sbatch --parsable --array=0-5 ") and cmds[1].startswith("sbatch --parsable --array=0-2")
    assert "--dependency=afterok:" in cmds[1]
    script = (tmp_path / "sweep_b.sbatch").read_text()
    assert "RUNS=(test/cpt_r0.05 micro/cpt_r0.05 tiny/cpt_r0.05)" in script
    assert '--run "${RUNS[$SLURM_ARRAY_TASK_ID]}"' in script


def sweep_cli(*args):
    return subprocess.run([sys.executable, "-m", "cpt_jax.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_reduced_mini_sweep_runs_skips_reports_failures_and_writes_its_report(tmp_path):
    config = tmp_path / "ci_sweep.py"
    config.write_text(
        "import runpy\n"
        "def get_config():\n"
        f"    c = runpy.run_path({MINI!r})['get_config']()\n"
        "    c.sizes = ('test', 'micro')\n"
        "    c.source_tokens_per_param, c.tokens_per_param = 0.05, (0.05,)\n"
        "    c.batch_size, c.base.seq_len, c.eval_points = 8, 64, 4\n"
        "    return c\n")
    out = tmp_path / "sweep"
    (out / "test").mkdir(parents=True)
    (out / "test" / "source").write_text("not a dir")  # test/source cannot run: it and its CPT fail
    r = sweep_cli("--config", str(config), "--sweep_dir", str(out))
    assert r.returncode == 1
    assert "[sweep] test/cpt_r0.05: skipped, test/source failed" in r.stdout
    assert "2 run(s) failed or skipped: test/source, test/cpt_r0.05" in r.stdout, r.stdout
    os.remove(out / "test" / "source")
    r = sweep_cli("--config", str(config), "--sweep_dir", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[sweep] test/scratch: finished already" in r.stdout and "[sweep] micro/source: finished already" in r.stdout
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in report
    data = json.loads((out / "report.json").read_text())
    assert set(data["forgetting"]) == {"test/cpt_r0.05", "micro/cpt_r0.05"}
    for png in ("loss_vs_tokens.png", "forgetting.png"):
        assert (out / png).stat().st_size > 1000
