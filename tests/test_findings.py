"""The findings' verdicts are computed, and they flip when the data says otherwise: each rule on
hand-made numbers, then the whole report on a sweep whose evals are generated from known laws."""

import dataclasses
import json
import os

import numpy as np
import pytest

from cpt_jax import sweep
from cpt_jax.config import load_file
from cpt_jax.scaling import findings, laws
from cpt_jax.scaling import replay as replay_law
from cpt_jax.scaling.report import write_report

from helpers import MINI

SIZES = {1e5: ([1e5, 2e5, 4e5], [6.0, 5.6, 5.3]), 3e5: ([3e5, 6e5, 1.2e6], [5.5, 5.1, 4.8])}


def test_transfer_holds_only_where_cpt_reaches_scratchs_loss_sooner():
    ahead = {n: (d, [x - 0.3 for x in loss]) for n, (d, loss) in SIZES.items()}
    v = findings.transfer(SIZES, ahead)
    assert v.holds and all(row["tokens_cpt"] < row["tokens_scratch"] for row in v.numbers.values())
    behind = {n: (d, [x + 0.1 for x in loss]) for n, (d, loss) in SIZES.items()}
    assert not findings.transfer(SIZES, behind).holds  # CPT points above scratch's: it never gets there
    mixed = {1e5: ahead[1e5], 3e5: behind[3e5]}
    assert not findings.transfer(SIZES, mixed).holds  # "at every size"
    # log-linear interpolation between points: 5.6 -> 5.3 from 2e5 to 4e5 reaches 5.45 at 2e5 * sqrt(2)
    assert findings.tokens_to_reach(np.array([1e5, 2e5, 4e5]), np.array([6.0, 5.6, 5.3]), 5.45) == (
        pytest.approx(2e5 * 2 ** 0.5), "at")
    assert findings.tokens_to_reach(np.array([1e5, 2e5]), np.array([6.0, 5.6]), 6.5) == (1e5, "below")


@pytest.mark.parametrize("gcpt, gscratch, errors, holds", [
    ((0.08, (0.05, 0.11)), (0.0, (-0.02, 0.02)), (0.011, 0.009), True),
    ((0.08, (-0.01, 0.11)), (0.0, (-0.02, 0.02)), (0.011, 0.009), False),  # gamma's interval reaches 0
    ((0.08, (0.05, 0.11)), (0.07, (0.06, 0.09)), (0.011, 0.009), False),  # scratch transfers as much
    ((0.08, (0.05, 0.11)), (0.0, (-0.02, 0.02)), (0.009, 0.011), False),  # Chinchilla fits CPT better
])
def test_cpt_law_rule(gcpt, gscratch, errors, holds):
    assert findings.cpt_law(gcpt[0], gcpt[1], gscratch[0], gscratch[1], *errors).holds is holds


def test_allocation_rule():
    gap = np.random.default_rng(0).normal(0.04, 0.01, 200)
    assert findings.allocation(0.43, 0.39, gap).holds
    assert not findings.allocation(0.43, 0.41, gap - 0.03).holds  # the interval straddles 0
    assert not findings.allocation(0.39, 0.43, -gap).holds
    assert np.isnan(findings.allocation_exponent(0.3, 0.2, 0.25))  # beta' <= gamma: no optimum


def test_replay_rule():
    rise = {0.0: 1.2, 0.05: 0.3, 0.5: -0.1}
    assert findings.replay(rise, 1.1, (0.8, 1.5), [0.005, 0.01], 0.02).holds
    assert not findings.replay(rise, 1.1, (0.8, 1.5), [0.005, 0.05], 0.02).holds  # one ratio ends elsewhere
    assert not findings.replay({0.0: 0.2, 0.5: 0.4}, 1.1, (0.8, 1.5), [0.01], 0.02).holds  # replay did not help
    assert not findings.replay(rise, 1.1, (-0.2, 1.5), [0.01], 0.02).holds
    assert not findings.replay(rise, 1.1, (0.8, 1.5), [], 0.02).holds  # no equal-compute comparison at all


# --- The report on generated evals --------------------------------------------------------------
SCRATCH = laws.ChinchillaFit(E=1.8, A=60.0, B=300.0, alpha=0.35, beta=0.33)
# Below scratch at these sizes and budgets, with a_cpt = 0.2 / (0.35 + 0.2 - 0.06) = 0.41 < a_scratch = 0.49.
CPT = laws.CPTFit(E=1.8, A=60.0, B_prime=100.0, alpha=0.35, beta_prime=0.2, gamma=0.06)
FORGET = replay_law.ReplayFit(K=0.9, kappa=0.3, r0=0.02, rho=1.2)
SOURCE_LOSS = 4.0


def generated_sweep(root, cpt_law, noise=0.0003):
    """The mini sweep's plan, every run's metrics.jsonl written from the laws (with a relative
    `noise` on target losses): target loss of scratch and CPT points, the source loss of CPT
    runs as SOURCE_LOSS + the forgetting law (x 2% lognormal noise), and a replay run's target
    loss as its law at its own target tokens (so ratios agree at equal target compute)."""
    config = load_file(MINI)
    runs = sweep.expand(config, str(root))
    sweep.write_plan(runs, str(root), ["--config", MINI], config)
    rng = np.random.default_rng(0)
    for run in runs:
        d_target = (1 - run.replay_ratio) * run.tokens
        record = {"step": run.config.total_steps, "train/tokens": float(run.tokens)}
        if run.kind == "source":
            record["eval/en/loss"] = SOURCE_LOSS
        else:
            law = SCRATCH if run.kind == "scratch" else cpt_law
            record["eval/zh/loss"] = float(laws.predict(law, run.params, d_target) * (1 + noise * rng.normal()))
            if run.kind == "cpt":
                rise = float(replay_law.predict_rise(FORGET, run.replay_ratio, d_target))
                record["eval/en/loss"] = SOURCE_LOSS + rise * np.exp(0.02 * rng.normal())
        os.makedirs(root / run.name, exist_ok=True)
        (root / run.name / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return root


@pytest.mark.parametrize("cpt_law, expected", [
    (CPT, {"transfer": True, "cpt_law": True, "allocation": True, "replay": True}),
    # CPT points above scratch's (gamma 0 and a larger data term): findings 1-3 false, 4 untouched
    (dataclasses.replace(CPT, B_prime=450.0, beta_prime=0.33, gamma=0.0),
     {"transfer": False, "cpt_law": False, "allocation": False, "replay": True}),
])
def test_report_verdicts_follow_the_data(tmp_path, cpt_law, expected):
    root = generated_sweep(tmp_path, cpt_law)
    write_report(str(root), bootstrap=40)
    data = json.loads((root / "report.json").read_text())
    assert {k: v["holds"] for k, v in data["findings"].items()} == expected, json.dumps(data["findings"], indent=1)
    report = (root / "report.md").read_text()
    assert report.count(": **holds**") == sum(expected.values())
    assert report.count(": **does not hold**") == 4 - sum(expected.values())
    if expected["replay"]:
        # 15 points recover the law (the interval's coverage is test_replay's, on a larger design)
        true = replay_law.critical_ratio(FORGET, data["replay"]["at_tokens"], data["replay"]["epsilon"])
        assert data["replay"]["critical_ratio"] == pytest.approx(true, rel=0.1)
        assert data["replay"]["fit"]["rho"] == pytest.approx(FORGET.rho, rel=0.1)
        assert 0 < data["replay"]["critical_interval"][0] < data["replay"]["critical_interval"][1] < 1


def test_report_collects_downstream_accuracy_against_compute(tmp_path):
    """In-loop task metrics (eval_tasks) of every finished scratch and CPT run, by compute."""
    root = generated_sweep(tmp_path, CPT)
    plan = json.loads((root / "sweep.json").read_text())
    written = {}
    for i, run in enumerate(r for r in plan["runs"] if r["kind"] in ("scratch", "cpt") and r["role"] != "stable"):
        path = root / run["name"] / "metrics.jsonl"
        record = json.loads(path.read_text())
        record["eval/bible_next_verse_zh/acc"] = written[run["name"]] = 0.25 + 0.01 * i
        path.write_text(json.dumps(record) + "\n")
    write_report(str(root), bootstrap=20)
    data = json.loads((root / "report.json").read_text())["downstream"]
    assert {name: d["acc"]["bible_next_verse_zh"] for name, d in data.items()} == written
    run = next(r for r in plan["runs"] if r["name"] in written)
    assert data[run["name"]]["flops"] == 6.0 * run["params"] * run["tokens"]
    assert "## Downstream accuracy" in (root / "report.md").read_text() and (root / "downstream.png").exists()
