"""optimizer.freeze (frozen values stay bit-identical, wholly frozen leaves keep no moments, a
frozen slice of a leaf does not move, bad patterns fail before compile) and init_from_optimizer
(the source's moments and Adam count, this run's own step and schedule from 0)."""

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import checkpoint, checks, freeze, inference, loop, models, sharding, trainer, update
from cpt_jax.config import base
from cpt_jax.errors import ConfigError
from cpt_jax.convert.vocab import extend_vocab
from cpt_jax.rundir import RunDir

from helpers import setup, small_config


def _opt(**fields):
    opt = base().optimizer
    opt.update(dict(peak_lr=1e-2, warmup_steps=1, weight_decay=0.1, **fields))
    return opt


def _steps(mcfg, patterns, n=3, seed=0):
    """(params before, params after, opt_state after) of n real train steps at the 'test' size."""
    opt = _opt(freeze=patterns)
    spec = models.spec(mcfg)
    mask = freeze.resolve(patterns, spec.abstract_params)
    args = update.schedule_args(opt, 10)
    step = jax.jit(functools.partial(update.train_step, schedule=args, graphdef=spec.graphdef, opt=opt,
                                     num_sources=1, frozen=mask))
    params = models.init_params(mcfg, jax.random.key(seed))
    state = update.TrainState(jnp.int32(0), params, update.optimizer(opt, args, frozen=mask).init(params))
    rng = np.random.default_rng(seed)
    for _ in range(n):
        batch = {"tokens": jnp.asarray(rng.integers(0, mcfg.vocab_size, (4, 17)), jnp.int32),
                 "source": jnp.zeros(4, jnp.int32)}
        state, m = step(state, batch)
        assert int(m["nonfinite"]) == 0
    return params, state.params, state.opt_state


def _adam(opt_state) -> optax.ScaleByAdamState:
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=checkpoint._is_adam) if checkpoint._is_adam(x))


def _same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_frozen_leaves_are_bit_identical_and_keep_no_moments():
    before, after, opt_state = _steps(models.model_config("test", 64), ("embed", "lm_head", "layers/*norm"))
    for name in ("embed", "lm_head"):  # weight decay would move them with a zero gradient
        assert _same(after[name], before[name]), name
    assert _same(after["layers"]["attn_norm"], before["layers"]["attn_norm"])
    for name in ("q", "down"):
        assert not np.array_equal(after["layers"][name], before["layers"][name]), name
    assert not np.array_equal(after["final_norm"], before["final_norm"])
    adam = _adam(opt_state)
    for moments in (adam.mu, adam.nu):
        assert isinstance(moments["embed"], optax.MaskedNode) and isinstance(moments["lm_head"], optax.MaskedNode)
        assert isinstance(moments["layers"]["mlp_norm"], optax.MaskedNode)
        assert moments["layers"]["q"].shape == before["layers"]["q"].shape
    assert isinstance(adam.count["embed"], optax.MaskedNode)
    assert all(np.all(np.asarray(c) == 3) for c in jax.tree.leaves(adam.count))  # one Adam count per row


def test_a_layer_slice_keeps_those_layers_and_trains_the_others():
    mcfg = models.model_config("micro", 64)  # 3 layers
    before, after, opt_state = _steps(mcfg, ("layers/0-1/q", "layers/1"))
    layers_b, layers_a = before["layers"], after["layers"]
    assert _same(layers_a["q"][:2], layers_b["q"][:2]) and not np.array_equal(layers_a["q"][2], layers_b["q"][2])
    for name in ("k", "up", "attn_norm"):
        assert _same(layers_a[name][1], layers_b[name][1]), name
        assert not np.array_equal(layers_a[name][0], layers_b[name][0]), name
        assert not np.array_equal(layers_a[name][2], layers_b[name][2]), name
    mu = _adam(opt_state).mu["layers"]
    assert mu["q"].shape == layers_b["q"].shape  # a partly frozen leaf keeps its moments whole...
    assert not np.any(np.asarray(mu["q"][:2])) and np.any(np.asarray(mu["q"][2]))  # ...zero where frozen
    assert not np.any(np.asarray(mu["k"][1])) and np.any(np.asarray(mu["k"][0]))


def test_wholly_frozen_leaves_shrink_the_compiled_step_by_their_moments():
    mcfg, mesh = models.model_config("test", 64), sharding.make_mesh((-1, 1, 1))  # params replicated
    mem = {p: update.compile_steps(mcfg, _opt(freeze=p), 10, mesh, 8, 16, 1).memory for p in ((), ("embed", "lm_head"))}
    saved = mem[()].argument_size_in_bytes - mem[("embed", "lm_head")].argument_size_in_bytes
    # mu and nu of two [64, 64] float32 leaves, and their Adam counts (one int32 per vocabulary row), per device
    assert saved == 2 * 2 * 64 * 64 * 4 + 2 * 64 * 4


@pytest.mark.parametrize("pattern, message", [
    ("layers/qq", "'layers/qq' matches no parameter (they are: embed, final_norm, layers/attn_norm"),
    ("layers/0-2", "'layers/0-2': layer 2 is out of range (the model has 2 layers, 0-1)"),
    ("layers/3-1", "'layers/3-1': the layer range 3-1 is empty"),
    ("embed/0", "'embed/0': a layer index (N or N-M) comes right after 'layers/'"),
    ("layers//q", "'layers//q' has an empty path component"),
    ("", "'' is not a parameter path"),
    ("old_vocab", "'old_vocab' is the vocabulary before extend-vocab, but the model was not made by"),
])
def test_a_bad_pattern_is_one_line_naming_the_field(pattern, message):
    spec = models.spec(models.model_config("test", 64))
    with pytest.raises(ConfigError) as e:
        freeze.resolve((pattern,), spec.abstract_params)
    assert str(e.value).startswith("optimizer.freeze: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_freezing_everything_is_refused():
    spec = models.spec(models.model_config("test", 64))
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze.resolve(("embed", "layers", "final_norm", "lm_head"), spec.abstract_params)


def test_a_bad_pattern_fails_the_run_before_compile(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "cpt_jax"), pytest.raises(ConfigError, match="'layers/7' matches|out of range"):
        trainer.train_run(small_config("--config.optimizer.freeze=('layers/7',)"), str(tmp_path / "run"))
    assert "compiled train step" not in caplog.text and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="'layers/0-x' matches no parameter"):  # not a range: a glob
        trainer.train_run(small_config("--config.optimizer.freeze=('layers/0-x',)"), str(tmp_path / "run"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-step run whose embeddings were frozen: its AdamW state has no moments for them."""
    path = str(tmp_path_factory.mktemp("source") / "run")
    trainer.train_run(small_config("--config.total_steps=3", "--config.optimizer.freeze=('embed',)"), path)
    return path


def _start(config, workdir):
    plan = setup(config, workdir)
    steps = trainer.compile_run(plan)
    with jax.set_mesh(plan.mesh):
        ckpt = checkpoint.Checkpointer(plan.dir.checkpoints)
        state, start = trainer.restore_or_init(plan, steps, ckpt)
        ckpt.close()
    return plan, steps, state, start


def test_init_from_optimizer_takes_the_moments_and_count_but_starts_at_step_0(source, tmp_path, caplog):
    config = small_config(f"--config.init_from={source}", "--config.init_from_optimizer=True",
                          "--config.optimizer.warmup_steps=2")
    with caplog.at_level(logging.INFO, "cpt_jax"):
        plan, steps, state, start = _start(config, str(tmp_path / "run"))
    assert start is None and int(state.step) == 0
    src = checkpoint.Checkpointer(RunDir.of(source).checkpoints, read_only=True)
    probe = trainer.compile_run(setup(small_config("--config.optimizer.freeze=('embed',)"), str(tmp_path / "probe")))
    _, theirs, _ = src.restore(3, probe.abstract_state.params, probe.abstract_state.opt_state)
    ours, theirs = _adam(state.opt_state), _adam(theirs)
    for count in (ours.count, theirs.count):  # the bias correction of the moments it came with
        assert all(np.all(np.asarray(count[name]) == 3) for name in ("lm_head", "final_norm"))
        assert np.all(np.asarray(count["layers"]["q"]) == 3)
    assert not np.any(np.asarray(ours.count["embed"]))  # fresh moments: their own count, from 0
    for field in ("mu", "nu"):
        for name in ("lm_head", "final_norm"):
            assert _same(getattr(ours, field)[name], getattr(theirs, field)[name]), (field, name)
        assert _same(getattr(ours, field)["layers"]["q"], getattr(theirs, field)["layers"]["q"])
        assert not np.any(np.asarray(getattr(ours, field)["embed"]))  # none there: fresh zeros, logged
    assert "fresh (zero) AdamW moments for: embed (none there" in caplog.text
    # The schedule is the run's own: warmup step 0, lr 0, so the first update moves nothing (a
    # schedule on Adam's restored count would be at step 3, past the warmup).
    with jax.set_mesh(plan.mesh), loop.HostBatches(plan.mixture, config.batch_size, config.total_steps,
                                                   steps.batch_sharding, 0) as batches:
        after, m = steps.train(jax.tree.map(jnp.copy, state), batches.next())
    assert float(m["lr"]) == 0.0 and int(after.step) == 1
    assert all(_same(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)))


def test_without_init_from_optimizer_the_moments_are_fresh(source, tmp_path):
    _, _, state, _ = _start(small_config(f"--config.init_from={source}"), str(tmp_path / "run"))
    adam = _adam(state.opt_state)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves((adam.count, adam.mu, adam.nu)))


def test_init_from_optimizer_needs_init_from_with_an_optimizer_state(english_model, tmp_path):
    with pytest.raises(ConfigError, match="init_from_optimizer=True takes the optimizer state of init_from, which"):
        checks.check_config(small_config("--config.init_from_optimizer=True"))
    with pytest.raises(ConfigError) as e:
        checks.check_start(small_config(f"--config.init_from={english_model}", "--config.init_from_optimizer=True"))
    assert str(e.value) == (f"init_from_optimizer: init_from={english_model!r} has no optimizer state (step 0 holds "
                            f"params only, as a converted model does)")


def test_old_vocab_trains_only_the_rows_extend_vocab_added(english_model, tmp_path):
    ext = str(tmp_path / "ext")
    report = extend_vocab(english_model, ext, base().data, "zh", 4000)
    old, _ = inference.load(english_model)
    v = old.cfg.vocab_size
    assert report["old_vocab_size"] == v
    config = small_config("--config.model.size=init_from", f"--config.init_from={ext}", "--config.total_steps=3",
                          "--config.optimizer.freeze=('layers','final_norm','old_vocab')")
    trainer.train_run(config, str(tmp_path / "run"))
    start, _ = inference.load(ext)
    end, _ = inference.load(str(tmp_path / "run"))
    assert _same(end.embed[...][:v], start.embed[...][:v]) and _same(end.lm_head[...][:, :v], start.lm_head[...][:, :v])
    assert not np.array_equal(end.embed[...][v:], start.embed[...][v:])
    assert not np.array_equal(end.lm_head[...][:, v:], start.lm_head[...][:, v:])
    assert _same(end.layers.q[...], start.layers.q[...]) and _same(end.final_norm[...], start.final_norm[...])
    # A later stage from that run still knows the old vocabulary.
    assert RunDir.of(str(tmp_path / "run")).meta().vocab_extension["old_vocab_size"] == v


@pytest.mark.slow  # two runs and a resume: half a minute
def test_a_resumed_frozen_run_equals_an_uninterrupted_one(tmp_path):
    args = ("--config.total_steps=6", "--config.checkpoint_every=3", "--config.keep_checkpoints=3",
            "--config.optimizer.freeze=('embed','layers/0')")
    whole = tmp_path / "whole"
    trainer.train_run(small_config(*args), str(whole))
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "6")  # as if it had stopped after saving step 3
    trainer.train_run(small_config(*args), str(cut))
    plan = setup(small_config(*args), str(tmp_path / "probe"))
    abstract = trainer.compile_run(plan).abstract_state
    state = lambda d: jax.tree.leaves(checkpoint.Checkpointer(RunDir.of(str(d)).checkpoints, read_only=True)  # noqa
                                      .restore(6, abstract.params, abstract.opt_state)[:2])
    assert all(_same(a, b) for a, b in zip(state(whole), state(cut)))
    records = lambda d: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in RunDir.of(str(d))  # noqa
                         .read_metrics()]
    assert records(whole) == records(cut)


@pytest.mark.slow  # four compiles in a subprocess; the in-process memory test above is the fast one
def test_the_memory_bench_reports_the_moments_saved():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "bench/freeze_memory.py", "--size", "test", "--vocab_size", "256",
                          "--old_vocab", "200", "--batch_size", "8", "--seq_len", "16"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {tuple(r["freeze"]): r for r in map(json.loads, out.stdout.splitlines())}
    none, heads = rows[()], rows[("embed", "lm_head")]
    # mu, nu of embed and lm_head, and their Adam counts (one int32 per vocabulary row)
    assert none["opt_state_bytes"] - heads["opt_state_bytes"] == 2 * 2 * 256 * 64 * 4 + 2 * 256 * 4
    assert heads["compiled_args_bytes"] < none["compiled_args_bytes"] and heads["frozen_params"] == 2 * 256 * 64
    assert rows[("layers/0-0",)]["opt_state_bytes"] == none["opt_state_bytes"]  # a slice keeps its moments whole
