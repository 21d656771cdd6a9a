"""WSD cooldown branches: a branch is its stable run's own continuation (same state, step and
data; only the learning rate after the branch point differs), and a branch that could not be one
is refused before anything is compiled or written."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from cpt_jax import checkpoint, checks, trainer
from cpt_jax.config import base
from cpt_jax.errors import ConfigError
from cpt_jax.rundir import RunDir

from helpers import setup, small_config

STABLE = ("--config.total_steps=12", "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=3",
          "--config.keep_steps=(8,9,10)", "--config.checkpoint_every=100", "--config.eval_every=100",
          "--config.log_every=1")


def branch(stable, *more):
    # wsd over 10 steps with decay_frac 0.2 decays over steps 8..9: the branch point is step 8.
    return small_config("--config.total_steps=10", "--config.optimizer.schedule=wsd",
                        "--config.optimizer.warmup_steps=3", "--config.optimizer.decay_frac=0.2",
                        f"--config.branch_from={stable}", "--config.branch_step=8",
                        "--config.checkpoint_every=1", "--config.keep_checkpoints=5", "--config.eval_every=100",
                        "--config.log_every=1", *more)


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stable") / "run")
    trainer.train_run(small_config(*STABLE), path)
    return path


def _restorer(config, probe: str):
    """(workdir, step) -> the leaves of params and optimizer state of that checkpoint, as numpy."""
    abstract = trainer.compile_run(setup(config, probe)).abstract_state

    def state(workdir, step):
        params, opt_state, _ = checkpoint.Checkpointer(RunDir.of(workdir).checkpoints, read_only=True).restore(
            step, abstract.params, abstract.opt_state)
        return [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    return state


def test_a_branch_continues_its_stable_run_exactly_until_its_lr_decays(stable, tmp_path):
    config = branch(stable)
    trainer.train_run(config, str(tmp_path / "branch"))
    s = {r["step"]: r for r in RunDir.of(stable).read_metrics() if "train/loss" in r}
    b = {r["step"]: r for r in RunDir.of(str(tmp_path / "branch")).read_metrics() if "train/loss" in r}
    assert sorted(b) == [9, 10]  # it starts at the branch point, not at 0
    # Step 9 (update 8): same params, batch and lr. Step 10: the same params and batch (its loss is
    # taken before the update), a decayed lr.
    for step in (9, 10):
        assert b[step]["train/loss"] == s[step]["train/loss"] and b[step]["train/tokens"] == s[step]["train/tokens"]
    assert b[9]["train/lr"] == s[9]["train/lr"] and b[10]["train/lr"] < s[10]["train/lr"]
    state = _restorer(config, str(tmp_path / "probe"))
    assert all(np.array_equal(x, y) for x, y in zip(state(str(tmp_path / "branch"), 9), state(stable, 9)))
    # params and optimizer moments equal bit for bit after update 9; after update 10, with another lr, not
    assert not all(np.array_equal(x, y) for x, y in zip(state(str(tmp_path / "branch"), 10), state(stable, 10)))


@pytest.mark.parametrize("change, message", [
    (("--config.data.replay_ratio=0.5",), r"was trained with another config \(data.replay_ratio: 0.25 -> 0.5\)"),
    (("--config.optimizer.warmup_steps=0",), r"learning rate differs from it before branch_step=8 \(first at step 1\)"),
    (("--config.branch_step=7",), r"has no checkpoint at branch_step=7 \(it has \[8, 9, 10, 12\]"),
    (("--config.init_from=/x",), "init_from and branch_from are both set"),
])
def test_a_branch_that_would_not_continue_its_run_is_refused_before_work(stable, tmp_path, change, message):
    workdir = tmp_path / "branch"
    with pytest.raises(ConfigError, match=message):
        trainer.train_run(branch(stable, *change), str(workdir))
    assert not workdir.exists()


def test_config_diff_reads_a_new_field_as_its_default_but_adds_no_default_source():
    config = base()
    config.data.sources = ml_collections.ConfigDict({"en": {"kind": "bible", "lang": "en"},
                                                     "fr": {"kind": "bible", "lang": "fr"}})
    saved = json.loads(config.to_json())
    del saved["eval_steps"]  # written before the field existed: it reads as its default
    assert checks.config_diff(saved, config, ()) == ""  # base()'s own "zh" source is not the run's
    config.data.sources = ml_collections.ConfigDict({"en": {"kind": "bible", "lang": "en"}})
    assert checks.config_diff(saved, config, ()) == ("data.sources.fr.kind: 'bible' -> '(absent)'; "
                                                     "data.sources.fr.lang: 'fr' -> '(absent)'")
