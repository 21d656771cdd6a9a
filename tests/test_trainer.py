"""The run's checks and stages in-process: the one model-compatibility check (init_from and resume
alike) before anything is compiled or written, the workdir check, the kernel that is logged is the
one compiled."""

import dataclasses
import json
import logging
import os
import time

import jax
import pytest

from cpt_jax import checks, models, trainer
from cpt_jax.errors import ConfigError, RunError
from cpt_jax.metrics import Progress
from cpt_jax.rundir import RunDir
from cpt_jax.convert import save_model

from helpers import SMALL, run_main, setup, small_config


@pytest.fixture(scope="module")
def source_variants(tmp_path_factory):
    """Converted-model dirs with the run's tokenizer and the run's architecture but one field."""
    config = small_config()
    plan = setup(config, str(tmp_path_factory.mktemp("probe") / "run"))
    root = tmp_path_factory.mktemp("sources")
    variants = {"tie_embeddings": dict(tie_embeddings=True), "qkv_bias": dict(qkv_bias=True),
                "heads": dict(heads=8, head_dim=plan.model.head_dim), "kv_heads": dict(kv_heads=4)}
    out = {}
    for field, change in variants.items():
        cfg = dataclasses.replace(plan.model, **change)
        save_model(root / field, cfg, models.init_params(cfg, jax.random.key(0)), plan.data.tokenizer)
        out[field] = (str(root / field), plan.model.architecture()[field], getattr(cfg, field))
    return out


@pytest.mark.parametrize("field", ["tie_embeddings", "qkv_bias", "heads", "kv_heads"])
def test_init_from_of_another_model_is_refused_before_compile(source_variants, tmp_path, field, caplog):
    path, ours, theirs = source_variants[field]
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, "cpt_jax"), pytest.raises(ConfigError) as e:
        trainer.train_run(small_config(f"--config.init_from={path}"), str(workdir))
    assert f"init_from={path!r} holds another model" in str(e.value)
    assert f"{field}: {theirs!r} -> {ours!r}" in str(e.value)
    assert "compiled train step" not in caplog.text and not workdir.exists()


def test_resuming_a_checkpoint_of_another_model_is_refused_before_compile(source_variants, tmp_path, caplog):
    import shutil

    path, ours, theirs = source_variants["kv_heads"]
    workdir = tmp_path / "run"
    shutil.copytree(path, workdir)  # a workdir whose checkpoint 0 holds another model
    with caplog.at_level(logging.INFO, "cpt_jax"), pytest.raises(ConfigError) as e:
        trainer.train_run(small_config(), str(workdir))
    assert f"checkpoint {workdir}/checkpoints/0 holds another model (kv_heads: {theirs} -> {ours})" in str(e.value)
    assert "compiled train step" not in caplog.text


def test_workdir_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"--workdir {tmp_path}/file is a file, not a directory"):
        checks.check_workdir(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="cannot be created: .*/file is a file"):
        checks.check_workdir(str(tmp_path / "file" / "run"))
    assert (tmp_path / "file").read_text() == "x"


def test_logged_kernel_is_the_compiled_one(tmp_path, caplog):
    auto = setup(small_config(), str(tmp_path / "auto"))
    assert auto.model.attention == "xla"  # auto on CPU
    plan = setup(small_config("--config.model.attention=splash", "--config.seq_len=128"), str(tmp_path / "splash"))
    with caplog.at_level(logging.INFO, "cpt_jax"):
        steps = trainer.compile_run(plan)
    assert "float32 compute, splash attention" in caplog.text
    assert "splash" in steps.program.as_text()  # the Pallas kernel is in the compiled step
    assert plan.meta.model["attention"] == "splash"


def test_cli_init_from_of_another_model_exits_2_and_writes_nothing(source_variants, tmp_path, capsys):
    path, ours, theirs = source_variants["tie_embeddings"]
    assert run_main(tmp_path / "run", *SMALL, f"--config.init_from={path}") == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and f"tie_embeddings: {theirs} -> {ours}" in errors[0], stderr
    assert "Traceback" not in stderr and "compiled train step" not in stderr
    assert not (tmp_path / "run").exists()


def test_cli_workdir_that_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "run").write_text("mine")
    assert run_main(tmp_path / "run", *SMALL) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"config error: --workdir {tmp_path}/run is a file, not a directory"
    assert (tmp_path / "run").read_text() == "mine"


def test_a_workdir_from_before_a_field_existed_resumes_when_the_field_is_at_its_default(tmp_path):
    """Fields added to cpt_jax since a workdir was made read as their defaults there; another value
    is still a different config."""
    config = small_config()
    saved = json.loads(config.to_json())
    del saved["optimizer"]["schedule"], saved["branch_from"]  # as written before they existed
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    checks.check_resume(config, RunDir.of(str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"optimizer.schedule: 'cosine' -> 'wsd'"):
        checks.check_resume(small_config("--config.optimizer.schedule=wsd"), RunDir.of(str(tmp_path / "run")))


def test_a_good_steps_record_is_written_before_a_later_nonfinite_step_stops_the_run(tmp_path):
    """Step 3 is logged and checkpointed, step 4 is not finite: step 3's record is kept, and the
    resumed run's metrics hold every step once."""
    args = ("--config.total_steps=6", "--config.log_every=1", "--config.checkpoint_every=3", "--config.eval_every=3")
    workdir = str(tmp_path / "run")
    with pytest.raises(RunError, match="by step 4"):
        trainer.train_run(small_config(*args, "--config.inject_nan_at=(4,)"), workdir)
    assert [r["step"] for r in RunDir.of(workdir).read_metrics()] == [0, 1, 2, 3]
    trainer.train_run(small_config(*args), workdir)
    assert [r["step"] for r in RunDir.of(workdir).read_metrics()] == [0, 1, 2, 3, 4, 5, 6]


def test_the_speed_clock_starts_after_the_evals_before_step_1():
    """The first record's step time counts training only, not the (slow, compiling) initial evals."""
    class Writer:
        def write(self, step, scalars):
            self.last = scalars

    class Mixture:
        source_names = ["zh"]
        cumulative_counts = lambda self, step, b: {"zh": step * b}  # noqa: E731
        epochs = lambda self, step, b: {"zh": 0.0}  # noqa: E731

    writer = Writer()
    progress = Progress(writer, Mixture(), start_step=0, total_steps=2, batch_size=1, seq_len=1, flops_per_token=1.0,
                        check_nonfinite=lambda step, n: None)
    time.sleep(3.0)  # the initial evals
    progress.start({"eval/zh/loss": 1.0})
    m = {"loss": 1.0, "grad_norm": 1.0, "lr": 0.0, "nonfinite": 0, "source_loss_sum": [1.0], "source_count": [1.0]}
    progress.dispatched(m)
    progress.log(1, m, {})
    progress.flush()
    assert writer.last["perf/step_time_s"] < 1.5  # a step of no work, even on a loaded machine
