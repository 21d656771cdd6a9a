"""Long-context evals: the held-out loss by position equals a naive reference that runs each
document alone through the model's plain logits (on one device, over fsdp, over a context axis;
rows packed as documents and concatenated); its bucket is checked before any work and kept out of
the log line; the passkey task hides its key where it says."""

import functools
import re
import types

import jax
import numpy as np
import pytest
from flax import nnx
from lm_eval.tasks import TaskManager

from cpt_jax import checks, evals, metrics, models, positions, sharding, tasks, update
from cpt_jax.config import expand_runs
from cpt_jax.errors import ConfigError

from helpers import config_of, small_config

VOCAB, EOS, T, ROWS, BATCH, WIDTH = 64, 1, 32, 11, 8, 8  # 11 rows: a second batch padded with masked rows


def _rows() -> np.ndarray:
    tokens = np.random.default_rng(0).integers(2, VOCAB, (ROWS, T + 1), dtype=np.int32)
    tokens[np.random.default_rng(1).random(tokens.shape) < 0.08] = EOS  # documents of about 12 tokens
    return tokens


@functools.cache
def _model():
    cfg = models.model_config("test", VOCAB, loss_chunk=8)
    return cfg, models.spec(cfg), models.init_params(cfg, jax.random.key(0))


def _naive(tokens: np.ndarray, document_end: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Loss sums and counts by position [T]: each document (a row's inputs up to and including an
    EOS) alone in a row of its own from position 0 (causal: what follows it does not matter), the
    log-softmax of its logits in float64; an EOS input predicts nothing. Concatenated: whole rows."""
    _, spec, params = _model()
    docs = []  # (inputs, targets) of each document
    for row in tokens:
        inputs, targets = row[:-1], row[1:]
        cuts = [i + 1 for i in range(T) if document_end is not None and inputs[i] == document_end]
        for start, end in zip([0, *cuts], [*cuts, T]):
            if end > start:
                docs.append((inputs[start:end], targets[start:end]))
    padded = np.full((len(docs), T), 2, np.int32)
    for i, (x, _) in enumerate(docs):
        padded[i, :len(x)] = x
    logits = np.asarray(jax.jit(lambda p, x: nnx.merge(spec.graphdef, p)(x))(params, padded), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    sums, counts = np.zeros(T), np.zeros(T)
    for i, (x, y) in enumerate(docs):
        for j in range(len(x)):
            if document_end is None or x[j] != document_end:
                sums[j] -= logp[i, j, y[j]]
                counts[j] += 1
    return sums, counts


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 8, 1), (1, 2, 1, 4)])
@pytest.mark.parametrize("document_end", [EOS, None], ids=["documents", "concat"])
def test_heldout_loss_by_position_equals_each_document_run_alone(mesh_shape, document_end):
    cfg, spec, params = _model()
    devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else jax.devices()
    mesh = sharding.make_mesh(mesh_shape, devices)
    steps = types.SimpleNamespace(  # the two members of update.Steps that heldout_losses uses
        batch_sharding={"tokens": sharding.batch_sharding(mesh, 2), "valid": sharding.batch_sharding(mesh, 1)},
        eval=jax.jit(functools.partial(update.eval_step, graphdef=spec.graphdef, document_end=document_end)))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.param_shardings(spec.abstract_params, spec.axes, mesh))
        got = evals.heldout_losses(steps, params, {"en": _rows()}, BATCH, position_bucket=WIDTH)
    sums, counts = _naive(_rows(), document_end)
    assert counts.sum() > 0 and (document_end is None or counts[-1] < counts[0])  # documents end inside rows
    np.testing.assert_allclose(got["eval/en/loss"], sums.sum() / counts.sum(), rtol=1e-5)
    want = {positions.key("en", s): sums[s:s + WIDTH].sum() / counts[s:s + WIDTH].sum() for s in range(0, T, WIDTH)}
    assert set(got) == {"eval/en/loss", *want}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, err_msg=k)


def test_buckets_and_curves_read_back_by_position():
    sums, counts = np.arange(10.0), np.array([1, 1, 1, 1, 0, 0, 0, 0, 2, 2])  # loss sums, tokens counted
    record = {"step": 3, "eval/zh/loss": 1.0, **positions.buckets("zh", sums, counts, 4)}
    assert record[positions.key("zh", 0)] == 6 / 4 and positions.key("zh", 4) not in record  # no token: left out
    assert record[positions.key("zh", 8)] == 17 / 4  # the last bucket, shorter
    starts, losses = positions.curve(record, "zh")
    assert starts.tolist() == [0, 8] and losses.tolist() == [1.5, 4.25]
    assert positions.sources([record]) == ["zh"] and not positions.is_key("eval/zh/loss")


def test_losses_by_position_stay_out_of_the_log_line():
    line = metrics.log_line(5, 10, {"eval/en/loss": 2.5, positions.key("en", 64): 2.25}, None)
    assert "en 2.5000" in line and "2.2500" not in line and "loss_pos" not in line


@pytest.mark.parametrize("bucket", [-1, 128])  # a float: ml_collections refuses it first
def test_a_bad_position_bucket_is_one_config_error_naming_the_field(bucket):
    with pytest.raises(ConfigError, match=re.escape(f"eval_position_bucket={bucket!r} must be an integer in [0, "
                                                    f"seq_len=128)")):
        checks.check_config(small_config("--config.seq_len=128", f"--config.eval_position_bucket={bucket}"))


@pytest.mark.parametrize("label,depth", [("1k", 0), ("4k", 50), ("32k", 100)])
def test_passkey_documents_hide_their_key_at_their_depth(label, depth):
    docs = tasks.passkey(tasks.PASSKEY_LENGTHS[label], depth)
    assert len(docs) == tasks.PASSKEY_KEYS and len({d["target"] for d in docs}) == len(docs)
    for d in docs:
        key = d["target"].strip()
        assert re.fullmatch(r"\d{5}", key) and d["context"].count(key) == 2  # in the needle only
        assert d["context"].endswith("What is the pass key? The pass key is")
        assert abs(len(d["context"]) - tasks.PASSKEY_LENGTHS[label]) < 100
        filler = d["context"].count("The grass is green.")
        before = d["context"][:d["context"].index(key)].count("The grass is green.")
        assert before == round(filler * depth / 100)
    assert tasks.passkey(tasks.PASSKEY_LENGTHS[label], depth) == docs  # seeded: the same files everywhere


def test_passkey_tasks_resolve_as_groups_by_length_and_all():
    names = tasks.resolve(["cpt_passkey", "cpt_passkey_2k", "cpt_passkey_8k_d75"])
    assert names == ["cpt_passkey", "cpt_passkey_2k", "cpt_passkey_8k_d75"]
    tm = tasks.manager()
    assert sorted(tasks._leaves(tm, "cpt_passkey_2k")) == sorted(f"cpt_passkey_2k_d{d}" for d in tasks.PASSKEY_DEPTHS)
    assert len(tasks._leaves(tm, "cpt_passkey")) == len(tasks.PASSKEY_LENGTHS) * len(tasks.PASSKEY_DEPTHS)
    # no name of ours shadows one of the harness's own (it has a `passkey`, LIBRA's)
    ours = {p.stem for p in tasks.task_dir().glob("*.yaml")}
    assert "cpt_passkey_2k_d50" in ours and not ours & set(TaskManager(verbosity="ERROR").all_tasks)


def test_the_long_context_config_expands_to_its_stages(tmp_path):
    """configs/long_context.py, locked as the command line leaves it: a run's dict fields
    (rope_parameters) replace the base's whole, and each stage passes the config checks on one CPU."""
    config = config_of(["--config", "configs/long_context.py"])
    config.lock()
    runs = {name: run for name, run, _ in expand_runs(config, str(tmp_path))}
    assert list(runs)[0] == "short" and set(runs) == {"short", "yarn_512", "base_512"}  # short first: both continue it
    assert runs["yarn_512"].model.rope_parameters.to_dict() == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert runs["base_512"].model.rope_parameters.to_dict() == {} == runs["short"].model.rope_parameters.to_dict()
    for name in ("yarn_512", "base_512"):
        assert runs[name].init_from == str(tmp_path / "short") and runs[name].seq_len == 4 * runs["short"].seq_len
        assert runs[name].seq_len * runs[name].batch_size == runs["short"].seq_len * runs["short"].batch_size
    for run in runs.values():
        checks.check_config(run, jax.devices()[:1])  # a laptop's CPU, as JAX sees it by default
