"""The update itself: it learns, its schedule is the paper's, and eval averages honestly."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpt_jax import config as config_lib
from cpt_jax import models, update


def _opt(**fields):
    opt = config_lib.base().optimizer
    opt.update(fields)
    return opt


def test_schedule_warmup_and_end():
    lr = update.schedule(_opt(peak_lr=2e-4, warmup_frac=0.05, min_lr_frac=0.1), total_steps=1000)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(25)), 1e-4, rtol=1e-6)  # halfway through warmup
    np.testing.assert_allclose(float(lr(50)), 2e-4, rtol=1e-6)  # warmup ends at 5% of the steps
    np.testing.assert_allclose(float(lr(525)), 1.1e-4, rtol=1e-5)  # cosine midpoint: (peak + min) / 2
    np.testing.assert_allclose(float(lr(1000)), 2e-5, rtol=1e-6)  # ends at 10% of peak


def test_wsd_schedule_boundaries():
    """Warmup 0 -> peak over warmup_steps, peak through the stable phase, then the decay over the
    last decay_frac of the steps, reaching min_lr_frac x peak one step after the last."""
    for shape, mid in (("linear", 0.5), ("1-sqrt", 1 - np.sqrt(0.5))):
        lr = update.schedule(_opt(schedule="wsd", peak_lr=1e-3, warmup_steps=10, decay_frac=0.2, min_lr_frac=0.1,
                                 decay_shape=shape), total_steps=100)
        assert float(lr(0)) == 0.0
        np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
        np.testing.assert_allclose([float(lr(s)) for s in (10, 50, 80)], 1e-3, rtol=1e-6)  # stable to step 80
        np.testing.assert_allclose(float(lr(90)), 1e-4 + 9e-4 * mid, rtol=1e-5)  # halfway through the decay
        np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
        assert float(lr(81)) < 1e-3
    assert update.decay_steps(_opt(decay_frac=0.2), 100) == 20


def test_constant_and_rsqrt_schedules():
    const = update.schedule(_opt(schedule="constant", peak_lr=1e-3, warmup_frac=0.1), total_steps=100)
    np.testing.assert_allclose([float(const(s)) for s in (0, 5, 10, 99, 10_000)], [0, 5e-4, 1e-3, 1e-3, 1e-3],
                               rtol=1e-6)
    rsqrt = update.schedule(_opt(schedule="rsqrt", peak_lr=1e-3, warmup_steps=16), total_steps=100)
    np.testing.assert_allclose([float(rsqrt(s)) for s in (8, 16, 64, 256)], [5e-4, 1e-3, 5e-4, 2.5e-4], rtol=1e-6)


def test_init_from_rewarms_from_zero():
    """A schedule counts the run's own steps: every run (one from init_from too) starts at lr 0."""
    for name in update.SCHEDULES:
        assert float(update.schedule(_opt(schedule=name), 50)(0)) == 0.0


def test_tiny_model_overfits_one_batch():
    mcfg = models.model_config("test", 64)
    opt = config_lib.base().optimizer
    opt.peak_lr, opt.weight_decay = 3e-3, 0.0
    args = update.schedule_args(opt, 200)
    tx = update.optimizer(opt, args)
    spec = models.spec(mcfg)
    step = jax.jit(functools.partial(update.train_step, schedule=args, graphdef=spec.graphdef, opt=opt,
                                     num_sources=1))
    params = models.init_params(mcfg, jax.random.key(0))
    state = update.TrainState(jnp.int32(0), params, tx.init(params))
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 64, (4, 33)), jnp.int32), "source": jnp.zeros(4, jnp.int32)}
    first = None
    for _ in range(150):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert first > 3.5  # about log(64) = 4.16 at init
    assert float(m["loss"]) < 0.2, float(m["loss"])
    assert int(state.step) == 150


def test_per_source_loss_splits_the_batch():
    mcfg = models.model_config("test", 64)
    opt = config_lib.base().optimizer
    args = update.schedule_args(opt, 10)
    tx = update.optimizer(opt, args)
    spec = models.spec(mcfg)
    params = models.init_params(mcfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (6, 17)), jnp.int32)
    source = jnp.array([0, 1, 1, 0, 1, 1], jnp.int32)
    step = jax.jit(functools.partial(update.train_step, schedule=args, graphdef=spec.graphdef, opt=opt,
                                     num_sources=2))
    _, m = step(update.TrainState(jnp.int32(0), params, tx.init(params)), {"tokens": tokens, "source": source})
    # Independent: cross-entropy from the model's logits with optax.
    logits = nnx.merge(spec.graphdef, params)(tokens[:, :-1])
    per_row = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])).sum(axis=1)
    np.testing.assert_allclose(m["source_count"], [2 * 16, 4 * 16])  # counted tokens
    np.testing.assert_allclose(m["source_loss_sum"], [per_row[[0, 3]].sum(), per_row[[1, 2, 4, 5]].sum()], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], per_row.sum() / (6 * 16), rtol=1e-6)


def test_eval_step_masks_padding_rows():
    mcfg = models.model_config("test", 64)
    spec = models.spec(mcfg)
    params = models.init_params(mcfg, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 9)), jnp.int32)
    total, count = (x.sum() for x in update.eval_step(params, tokens, jnp.array([1, 1, 1, 0], jnp.float32),
                                                      graphdef=spec.graphdef))  # sums by position
    # Independent: cross-entropy from the logits with optax on the 3 real rows only.
    logits = nnx.merge(spec.graphdef, params)(tokens[:3, :-1])
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:3, 1:])
    np.testing.assert_allclose(float(total) / float(count), float(ref.mean()), rtol=1e-5)
    assert float(count) == 3 * 8


def test_runs_that_differ_only_in_schedule_share_one_compiled_step(tmp_path):
    """The schedule is an argument of the compiled step: a stable phase and its cooldown branches
    (other schedule, other length) hit the compilation cache; another batch size does not."""
    script = f"""
import os, jax
jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "cache")!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from cpt_jax import models, sharding, update
from cpt_jax.config import base
mcfg, mesh = models.model_config("test", 64), sharding.make_mesh((-1, 1, 1))
def entries():
    return len(os.listdir({str(tmp_path / "cache")!r}))
opt = base().optimizer
update.compile_steps(mcfg, opt, 100, mesh, 8, 16, 2)
first = entries()
opt.schedule, opt.decay_frac, opt.peak_lr = "wsd", 0.3, 1e-2
update.compile_steps(mcfg, opt, 37, mesh, 8, 16, 2)
same = entries()
update.compile_steps(mcfg, opt, 37, mesh, 16, 16, 2)
print(first, same, entries())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, same, other = map(int, out.stdout.split())
    assert first > 0 and same == first and other > first
