"""The same training on 1 device and on 8-device meshes: equal losses and params, real shardings."""

import functools
import logging

import jax
import ml_collections
import numpy as np
import pytest

from cpt_jax import config as config_lib
from cpt_jax import models, sharding, update

B, T, VOCAB, STEPS = 8, 16, 256, 3
MESHES = [(8, 1, 1), (2, 4, 1), (1, 4, 2)]


def _opt() -> ml_collections.ConfigDict:
    opt = config_lib.base().optimizer
    opt.peak_lr = 1e-2  # big enough that a wrong update shows in 3 steps
    return opt


def _train(mesh_shape, devices, grad_accum=1):
    mcfg = models.model_config("test", VOCAB)
    mesh = sharding.make_mesh(mesh_shape, devices)
    opt = _opt()
    opt.grad_accum = grad_accum
    steps = update.compile_steps(mcfg, opt, total_steps=10, mesh=mesh, batch_size=B, seq_len=T, num_sources=2)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        params = steps.init_params(jax.random.key(0))
        state = update.TrainState(jax.device_put(np.int32(0), steps.state_sharding.step), params,
                                 steps.init_opt_state(params))
        losses = []
        for _ in range(STEPS):
            batch = {"tokens": rng.integers(0, VOCAB, (B, T + 1), dtype=np.int32),
                     "source": rng.integers(0, 2, (B,), dtype=np.int32)}
            batch = {k: jax.device_put(v, steps.batch_sharding[k]) for k, v in batch.items()}
            state, m = steps.train(state, batch)
            losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state


@functools.cache
def _trained(mesh_shape, one_device=False, grad_accum=1):
    """_train's result, once per arguments (a mesh's run serves every test that looks at it)."""
    return _train(mesh_shape, jax.devices()[:1] if one_device else jax.devices(), grad_accum)


@pytest.fixture(scope="module")
def single_device():
    return _trained((1, 1, 1), one_device=True)


def test_eight_devices_are_visible():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_mesh_matches_single_device(single_device, mesh_shape):
    ref_losses, ref_params, _ = single_device
    losses, params, _ = _trained(mesh_shape)
    assert ref_losses[0] != ref_losses[-1]  # training moved
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params)


def test_grad_accumulation_matches_full_batch(single_device):
    ref_losses, ref_params, _ = single_device
    losses, params, _ = _trained((1, 1, 1), one_device=True, grad_accum=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params)


def test_params_carry_intended_shardings():
    _, _, state = _trained((1, 4, 2))  # a mesh of test_mesh_matches_single_device
    p = state.params
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(p["embed"]) == ("tensor", "fsdp")  # (vocab, embed)
    assert spec(p["lm_head"]) == ("fsdp", "tensor")  # (embed, vocab)
    assert spec(p["layers"]["q"]) == (None, "fsdp", "tensor", None)  # (layers, embed, heads, head_dim)
    assert spec(p["layers"]["gate"]) == (None, "fsdp", "tensor")  # (layers, embed, mlp)
    assert spec(p["layers"]["down"]) == (None, "tensor", "fsdp")  # (layers, mlp, embed)
    assert spec(p["final_norm"]) == (None,)
    # Each device holds a real shard, not a replica: 1/8 of the 2-D embedding table.
    shard = p["embed"].addressable_shards[0].data
    assert shard.shape == (VOCAB // 2, models.model_config("test", VOCAB).hidden // 4)
    # Adam moments follow their parameters.
    mu = state.opt_state[1][0].mu
    assert mu["embed"].sharding == p["embed"].sharding


def test_indivisible_dimension_stays_replicated():
    mesh = sharding.make_mesh((1, 1, 8), jax.devices())
    # kv_heads=2 cannot split over tensor=8: replicated on that axis rather than an error.
    assert sharding.logical_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == \
        jax.sharding.PartitionSpec(None, None, None)
    assert sharding.logical_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == \
        jax.sharding.PartitionSpec(None, "tensor", None)


@pytest.mark.parametrize("shape,warned", [((1, 1, 8), ["heads=4", "kv_heads=2"]), ((1, 2, 4), ["kv_heads=2"]),
                                          ((1, 4, 2), [])])
def test_heads_the_tensor_axis_does_not_divide_are_replicated_with_a_warning(shape, warned, caplog):
    """The 'test' size has 4 heads and 2 kv heads: a warning names each kind the mesh's tensor axis
    cannot split, and those weights are replicated as it says."""
    model_spec = models.spec(models.model_config("test", VOCAB))
    with caplog.at_level(logging.WARNING, "cpt_jax"):
        shardings = sharding.param_shardings(model_spec.abstract_params, model_spec.axes,
                                             sharding.make_mesh(shape, jax.devices()))
    assert [r.getMessage().split()[1] for r in caplog.records] == warned
    assert all(f"mesh's tensor axis ({shape[2]} devices)" in r.getMessage() for r in caplog.records)
    layers = shardings["layers"]
    assert (layers["q"].spec[2], layers["o"].spec[1]) == ((None, None) if "heads=4" in warned else ("tensor",) * 2)
    assert layers["k"].spec[2] == (None if "kv_heads=2" in warned else "tensor")


@pytest.mark.parametrize("shape,msg", [((3, 1, 1), "does not divide"), ((2, 2, 1), "uses 4 devices"),
                                       ((-1, -1, 1), "at most one -1"), ((8, 1), "3 entries")])
def test_bad_mesh_names_the_field(shape, msg):
    with pytest.raises(ValueError, match=msg) as e:
        sharding.make_mesh(shape, jax.devices())
    assert "mesh.shape" in str(e.value)
