"""The training math against independent references: the bf16 embedding gradient against the
float32 model's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import models, train

# XLA's CPU backend spends most of a small test's time optimising programs that then run once.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _init(mcfg: models.ModelConfig, seed: int = 0) -> dict:
    key = jax.random.key(seed)
    return jax.jit(lambda k: models.init_params(mcfg, k)).lower(key).compile(FAST_COMPILE)(key)


def test_bf16_embedding_gradient_of_a_frequent_token_is_summed_in_float32():
    """A token that fills half of an 8 x 256 batch: its embedding row's gradient is a sum over
    ~1000 occurrences, which in bf16 would be off by about 25%."""
    one_layer = lambda **kw: dataclasses.replace(models.model_config("test", 64, **kw), layers=1)  # noqa: E731
    params = _init(one_layer())
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (8, 257))
    tokens[:, :-1][rng.random((8, 256)) < 0.5] = 7
    tokens = jnp.asarray(tokens, jnp.int32)

    def embed_grad(dtype):
        graphdef = models.spec(one_layer(dtype=dtype, loss_chunk=0)).graphdef
        grad = jax.grad(lambda p: train.token_losses(graphdef, p, tokens)[0])
        return jax.jit(grad).lower(params).compile(FAST_COMPILE)(params)["embed"]

    g32, g16 = embed_grad("float32"), embed_grad("bfloat16")
    rel = np.linalg.norm(g16 - g32, axis=1) / np.linalg.norm(g32, axis=1)
    assert rel[7] < 0.01, rel[7]  # measured 0.3% (25% when the table is cast before the gather)
    assert np.median(np.delete(rel, 7)) < 0.01  # the other rows: bf16's own rounding
