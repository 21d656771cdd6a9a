"""Context parallelism: with each row's sequence split over the mesh's context axis, attention
(ring attention, with packed documents, a sliding window, soft-capping), the loss, its gradients
and a few AdamW updates equal the unsharded model's to float32 rounding; bad meshes fail in the
config checks."""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cpt_jax import checks, models, sharding, update
from cpt_jax import config as config_lib
from cpt_jax.errors import ConfigError
from cpt_jax.models import attention, context_parallel

from helpers import small_config

MESHES = [(1, 1, 1, 8), (2, 1, 1, 4), (1, 2, 2, 2)]
B, T, VOCAB, EOS, STEPS = 4, 32, 64, 1, 3
TOL = dict(rtol=1e-5, atol=1e-6)


def _documents(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
    """Segment ids [b, t]: rows packed with documents of a few to a dozen tokens."""
    return np.cumsum(rng.random((b, t)) < 0.15, axis=1).astype(np.int32)


# (window, softcap, documents, keys per tile): tiles of 4 split each device's key block in several.
CASES = {"documents+window": (5, 0.0, True, 4), "documents+softcap": (0, 3.0, True, 4),
         "causal": (0, 0.0, False, context_parallel.BLOCK)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_ring_attention_matches_unsharded(mesh_shape, case):
    window, softcap, documents, block = CASES[case]
    rng = np.random.default_rng(0)
    b, t, heads, kv_heads, hd = 2, 64, 4, 2, 8
    q, k, v, d_out = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (heads, kv_heads, kv_heads,
                                                                                             heads))
    segments = jnp.asarray(_documents(rng, b, t)) if documents else None

    def run(attend):  # the output, and the gradients of <output, d_out> with respect to q, k, v
        def both(q, k, v):
            out, vjp = jax.vjp(attend, q, k, v)
            return out, vjp(d_out)
        return jax.jit(both)(q, k, v)

    out, grads = run(lambda q, k, v: attention.causal_attention(q, k, v, "xla", segments, window, None, softcap))
    with jax.set_mesh(sharding.make_mesh(mesh_shape)):
        ring_out, ring_grads = run(lambda q, k, v: context_parallel.ring_attention(q, k, v, segments, window, None,
                                                                                   softcap, block))
    np.testing.assert_allclose(ring_out, out, **TOL)
    for got, want in zip(ring_grads, grads):
        np.testing.assert_allclose(got, want, **TOL)


def _model() -> models.ModelConfig:
    # Layer 0 within a window of 6 positions, layer 1 over all (both kernels in the scanned layers);
    # loss chunks of 2 positions, so each device's cross-entropy takes several.
    return models.model_config("test", VOCAB, sliding_window=6, full_attention_layers=(1,), loss_chunk=2)


def _tokens(seed: int) -> np.ndarray:
    tokens = np.random.default_rng(seed).integers(2, VOCAB, (B, T + 1), dtype=np.int32)
    tokens[np.random.default_rng(seed + 1).random(tokens.shape) < 0.12] = EOS  # packed documents
    return tokens


@functools.cache
def _train(mesh_shape: tuple[int, ...]):
    """(loss and gradients of the first batch at init, per-step losses and grad norms, final params
    on the host and on the devices, the compiled step's HLO) of STEPS updates over `mesh_shape`
    (() : one device)."""
    devices = jax.devices()[:1] if not mesh_shape else jax.devices()
    mesh = sharding.make_mesh(mesh_shape or (1, 1, 1), devices)
    opt = config_lib.base().optimizer
    opt.peak_lr = 1e-2  # big enough that a wrong update shows in 3 steps
    steps = update.compile_steps(_model(), opt, total_steps=10, mesh=mesh, batch_size=B, seq_len=T, num_sources=1,
                                 document_end=EOS)
    graphdef = steps.spec.graphdef
    loss_fn = jax.jit(jax.value_and_grad(lambda p, tokens: update.token_losses(graphdef, p, tokens, EOS)[0]),
                      in_shardings=(steps.state_sharding.params, steps.batch_sharding["tokens"]))
    with jax.set_mesh(mesh):
        params = steps.init_params(jax.random.key(0))
        first = jax.device_get(loss_fn(params, _tokens(0)))
        state = update.TrainState(jax.device_put(np.int32(0), steps.state_sharding.step), params,
                                 steps.init_opt_state(params))
        metrics = []
        for i in range(STEPS):
            batch = {"tokens": _tokens(i), "source": np.zeros(B, np.int32)}
            state, m = steps.train(state, {k: jax.device_put(v, steps.batch_sharding[k]) for k, v in batch.items()})
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
    return first, np.array(metrics), jax.device_get(state.params), state.params, steps.program.as_text()


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_train_step_matches_one_device(mesh_shape):
    (ref_loss, ref_grads), ref_metrics, ref_params, *_ = _train(())
    (loss, grads), metrics, params, _, hlo = _train(mesh_shape)
    assert "collective-permute" in hlo  # the ring ran, not XLA attention over gathered keys
    assert ref_metrics[0, 0] != ref_metrics[-1, 0]  # training moved
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
    np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params)


def test_context_axis_shards_the_parameters_too():
    *_, params, _ = _train((1, 1, 1, 8))
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))  # noqa: E731
    assert spec(params["embed"]) == (None, "context")  # (vocab, embed): ZeRO-3 over the context axis
    assert spec(params["layers"]["q"]) == (None, "context", None, None)  # (layers, embed, heads, head_dim)


def test_a_mesh_of_three_entries_has_a_context_axis_of_one():
    assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2, 1)
    assert sharding.mesh_shape((1, 1, -1, 4), 8) == (1, 1, 2, 4)
    mesh = sharding.make_mesh((2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
    assert sharding.context_size(mesh) == 1 and sharding.context_size(sharding.make_mesh((1, 1, 1, 8))) == 8


def _config(*overrides: str) -> ml_collections.ConfigDict:
    return small_config("--config.mesh.shape=(1,1,2,4)", "--config.model.loss_chunk=0", *overrides)


@pytest.mark.parametrize("overrides,message", [
    (["--config.seq_len=34"], "seq_len=34 does not split over the context axis of mesh.shape=(1, 1, 2, 4) "
                              "(4 devices): it must be a multiple of 4"),
    (["--config.model.attention=cudnn"], "model.attention='cudnn' cannot attend across the context axis"),
    (["--config.model.attention=splash"], "model.attention='splash' cannot attend across the context axis"),
    (["--config.model.loss_chunk=3"], "model.loss_chunk=3 does not divide the 8 positions per context shard"),
    (["--config.mesh.shape=(1,1,1,4)"], "mesh.shape=(1, 1, 1, 4) uses 4 devices but 8 are available"),
    (["--config.mesh.shape=(2,1,1,8)"], "mesh.shape=(2, 1, 1, 8) does not divide the 8 available devices"),
    (["--config.mesh.shape=(1,1,1,1,8)"], "must have 3 entries"),
])
def test_bad_context_axis_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        checks.check_config(_config(*overrides))


def test_a_good_context_axis_passes_the_checks():
    mesh = checks.check_config(_config())
    assert sharding.context_size(mesh) == 4
