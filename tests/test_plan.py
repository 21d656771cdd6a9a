"""The compute-optimal planner: its numbers are the laws', its errors one line and exit 2."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cpt_jax.scaling import laws, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "cpt_jax.scaling.plan", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_json_plan_under_the_papers_law():
    out = _plan("--compute", "1e18,1e20", "--json")
    assert out.returncode == 0, out.stderr
    plans = json.loads(out.stdout)
    assert [p["compute"] for p in plans] == [1e18, 1e20]
    for p in plans:
        for name, law in (("scratch", laws.PAPER_SCRATCH), ("cpt", laws.PAPER_CPT)):
            n, d = laws.compute_optimal(law, p["compute"])
            assert (p[name]["N"], p[name]["D"]) == (pytest.approx(n), pytest.approx(d))
            assert 6 * p[name]["N"] * p[name]["D"] == pytest.approx(p["compute"])
            assert p[name]["loss"] == pytest.approx(laws.predict(law, n, d))
        # the FLOPs CPT needs for scratch's optimal loss: CPT's frontier reaches it there
        assert laws.optimal_loss(laws.PAPER_CPT, p["cpt_flops_to_scratch_loss"]) == pytest.approx(p["scratch"]["loss"])
    # the paper's Table 4 rows bracketing CPT's N_opt at 1e20 (2.36e8): 234m and 259m, with C / 6N tokens
    rows = plans[1]["cpt"]["nearest"]
    assert [r["size"] for r in rows] == ["234m", "259m"]
    assert rows[0]["D"] == pytest.approx(1e20 / (6 * 234e6))


def test_plan_with_a_sweeps_fits(tmp_path):
    report = tmp_path / "report.json"
    scratch = dataclasses.replace(laws.PAPER_SCRATCH, huber=1e-5)  # as a report.json holds them
    cpt = dataclasses.replace(laws.PAPER_CPT, B_prime=100.0, huber=2e-5)
    report.write_text(json.dumps({"scratch_fit": vars(scratch), "cpt_fit": vars(cpt)}))
    assert plan.load_fits(str(report)) == (scratch, cpt)
    p = plan.plan(scratch, cpt, 1e20, plan.size_rows(paper_n=False))
    assert p["saved"] == pytest.approx(1 - laws.compute_for_loss(cpt, p["scratch"]["loss"])[0] / 1e20)
    assert p["saved"] > 0  # this CPT law is below scratch's


@pytest.mark.parametrize("args, message", [
    (["--compute", "1e18,abc"], "plan error: --compute: 'abc' is not a positive number of FLOPs"),
    (["--compute", "0"], "plan error: --compute: '0' is not a positive number of FLOPs"),
    (["--compute", "1e18", "--fits", "{path}"], "plan error: --fits {path}: no fitted laws in it"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"findings": {}}))  # a report of a sweep with too few points to fit
    assert plan.main([a.format(path=path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(path=path)) and "\n" not in err
