"""The accelerator fast paths give the plain path's loss and gradients: the fused chunked
cross-entropy against optax on whole logits, the splash-attention kernel (Pallas, interpret mode on
CPU, sharded with shard_map over the 8-device mesh) against XLA attention, and bfloat16 compute
against float32, within float32 or bfloat16 tolerance. Also which kernel `auto` picks where."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpt_jax import models, sharding, update
from cpt_jax.models import attention
from cpt_jax.models.cross_entropy import cross_entropy

VOCAB = 97


def _relerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------- cross-entropy


def _reference(x, w, labels, softcap=0.0):
    """optax on the whole float32 logits (soft-capped as Gemma 2's), differentiated by autodiff."""
    def loss(x, w):
        logits = x.astype(jnp.float32) @ w
        logits = softcap * jnp.tanh(logits / softcap) if softcap else logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize(("dtype", "chunk", "tol", "softcap"), [
    ("float32", 0, 1e-6, 0.0), ("float32", 4, 1e-6, 0.0), ("float32", 16, 1e-6, 0.0),
    ("float32", 0, 1e-6, 2.0), ("float32", 4, 1e-6, 2.0),  # a cap well inside the logits' range
    # bf16 operands, float32 accumulation: a few bf16 roundings (2^-8 relative) per product.
    ("bfloat16", 4, 2e-2, 0.0),
])
def test_cross_entropy_matches_optax(dtype, chunk, tol, softcap):
    rng = np.random.default_rng(0)
    b, t, d = 3, 16, 24
    x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, VOCAB)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32)
    ref_loss, (ref_dx, ref_dw) = _reference(x, w, labels, softcap)
    if softcap:  # the cap matters to this comparison
        assert abs(float(_reference(x, w, labels)[0]) - float(ref_loss)) > 0.1

    def f(x, w):
        return cross_entropy(x.astype(dtype), w, labels, chunk, softcap=softcap)

    (loss, per_token), (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, w)
    assert loss.dtype == per_token.dtype == dw.dtype == jnp.float32
    assert per_token.shape == (b, t)
    np.testing.assert_allclose(float(per_token.mean()), float(loss), rtol=1e-6)
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) < tol
    assert _relerr(dx, ref_dx) < tol, _relerr(dx, ref_dx)
    assert _relerr(dw, ref_dw) < tol, _relerr(dw, ref_dw)


def test_cross_entropy_chunk_must_divide():
    x = jnp.zeros((1, 12, 8))
    with pytest.raises(ValueError, match="loss_chunk=5"):
        cross_entropy(x, jnp.zeros((8, VOCAB)), jnp.zeros((1, 12), jnp.int32), 5)


def test_fused_cross_entropy_keeps_one_chunk_of_logits():
    """The point of the fused path: the compiled gradient holds no [b, t, vocab] buffer."""
    b, t, d, v = 4, 512, 64, 8192
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

    def temp_bytes(chunk):
        grad = jax.grad(lambda x, w, y: cross_entropy(x, w, y, chunk)[0], argnums=(0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    assert temp_bytes(0) > logits_bytes  # the plain path keeps the whole logits (and more)
    assert temp_bytes(64) < logits_bytes / 2


# ---------------------------------------------------------------- whole model, sharded


# Gemma 2's differences: windowed and global layers (a branch per layer in the scan), caps on the
# attention and output logits, norms around each branch.
GEMMA2 = (("norms", "sandwich"), ("norm_offset", 1.0), ("activation", "gelu_tanh"), ("embed_scale", True),
          ("sliding_window", 40), ("full_attention_layers", (1,)), ("attn_softcap", 3.0), ("final_softcap", 8.0))


@functools.cache
def _loss_and_grads(dtype: str, attn: str, loss_chunk: int, scan_layers: bool, remat: str,
                    document_end: int | None = None, family: tuple = ()):
    """Train loss and gradients of the `test` size at seq 128 on a (2, 2, 2) mesh of 8 devices;
    with `document_end`, rows of documents 23 tokens long packed as documents; `family`: model
    fields as (name, value) pairs."""
    cfg = models.model_config("test", VOCAB, dtype=dtype, attention=attn, loss_chunk=loss_chunk,
                              scan_layers=scan_layers, remat=remat, **dict(family))
    s = models.spec(cfg)
    mesh = sharding.make_mesh((2, 2, 2))
    p_sh = sharding.param_shardings(s.abstract_params, s.axes, mesh)
    rng = np.random.default_rng(0)
    # O(1) weights so attention is peaked and every part of the model matters.
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * (0.3 if a.ndim > 1 else 1.0)
                                                + (a.ndim == 1), jnp.float32), s.abstract_params)
    tokens = rng.integers(0, VOCAB, (8, 129))
    if document_end is not None:
        tokens[tokens == document_end] = 0
        tokens[:, 22::23] = document_end
    with jax.set_mesh(mesh):
        params = jax.device_put(params, p_sh)
        tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), sharding.batch_sharding(mesh))
        fn = jax.jit(jax.value_and_grad(lambda p, t: update.token_losses(s.graphdef, p, t, document_end)[0]))
        loss, grads = fn(params, tokens)
    return float(loss), jax.tree.map(np.asarray, grads)


PLAIN = ("float32", "xla", 0, False, "none")


@pytest.mark.parametrize(("fast", "loss_tol", "grad_tol"), [
    (("float32", "splash", 32, True, "dots_no_batch"), 1e-6, 1e-5),
    (("float32", "xla", 64, True, "full"), 1e-6, 1e-5),
    # bf16 keeps 8 significant bits (2^-8 = 0.4%): the loss, a mean over 1024 tokens, within one
    # such step; gradients, through two layers of bf16 matmuls, within 8 (measured: 0.01%, 2.3%).
    (("bfloat16", "splash", 32, True, "dots_no_batch"), 2**-8, 8 * 2**-8),
])
def test_fast_paths_same_loss_and_grads_as_plain(fast, loss_tol, grad_tol):
    loss0, grads0 = _loss_and_grads(*PLAIN)
    loss, grads = _loss_and_grads(*fast)
    assert abs(loss - loss0) / loss0 < loss_tol, (loss, loss0)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), g0 in zip(flat, jax.tree.leaves(grads0)):
        assert _relerr(g, g0) < grad_tol, (jax.tree_util.keystr(path), _relerr(g, g0))


def test_packed_documents_on_splash_sharded_same_loss_and_grads_as_plain():
    """data.packing="documents" through shard_map'd splash (segment ids split with the batch) and the
    fused cross-entropy's weights, against the plain path with the same documents."""
    loss0, grads0 = _loss_and_grads(*PLAIN, document_end=3)
    loss, grads = _loss_and_grads("float32", "splash", 32, True, "dots_no_batch", document_end=3)
    assert abs(loss - loss0) / loss0 < 1e-6, (loss, loss0)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert _relerr(g, g0) < 1e-5


def test_gemma2_on_splash_sharded_same_loss_and_grads_as_plain():
    """Soft-capped splash under shard_map, the per-layer branch between windowed and global layers in
    the scan and the capped fused cross-entropy, against XLA, unrolled layers and plain logits."""
    loss0, grads0 = _loss_and_grads(*PLAIN, family=GEMMA2)
    loss, grads = _loss_and_grads("float32", "splash", 32, True, "dots_no_batch", family=GEMMA2)
    assert abs(loss - loss0) / loss0 < 1e-6, (loss, loss0)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert _relerr(g, g0) < 1e-5
    uncapped, _ = _loss_and_grads(*PLAIN, family=tuple(kv for kv in GEMMA2 if "softcap" not in kv[0]))
    assert abs(uncapped - loss0) / loss0 > 1e-3  # the caps matter to this comparison


def test_bfloat16_is_really_used():
    """The bf16 path differs from float32 by more than float32 noise (else the test above is vacuous)."""
    loss0, _ = _loss_and_grads(*PLAIN)
    loss, _ = _loss_and_grads("bfloat16", "splash", 32, True, "dots_no_batch")
    assert abs(loss - loss0) / loss0 > 1e-6


# ---------------------------------------------------------------- kernel selection


@pytest.mark.parametrize(("platform", "dtype", "head_dim", "seq", "softcap", "capability", "expected"), [
    ("gpu", "bfloat16", 64, 2048, 0, 8.0, "cudnn"),
    ("gpu", "float16", 128, 2048, 0, 8.0, "cudnn"),
    ("gpu", "float32", 64, 2048, 0, 9.0, "xla"),  # cuDNN flash attention is half precision only
    ("gpu", "bfloat16", 256, 2048, 0, 8.0, "xla"),  # head_dim above cuDNN's 128 before Hopper
    ("gpu", "bfloat16", 256, 2048, 0, 9.0, "cudnn"),  # Gemma's 256 from Hopper on
    ("gpu", "bfloat16", 128, 2048, 50.0, 9.0, "xla"),  # cuDNN does not soft-cap
    ("tpu", "bfloat16", 128, 2048, 50.0, 0, "splash"),  # splash does
    ("tpu", "bfloat16", 256, 2048, 0, 0, "splash"),
    ("tpu", "bfloat16", 128, 200, 0, 0, "xla"),  # splash tiles by 128
    ("cpu", "bfloat16", 64, 2048, 0, 0, "xla"),
])
def test_auto_picks_the_platform_kernel(platform, dtype, head_dim, seq, softcap, capability, expected, monkeypatch):
    monkeypatch.setattr(attention, "_compute_capability", lambda: capability)
    kernel, why = attention.choose("auto", platform, dtype, head_dim, seq, softcap)
    assert kernel == expected
    # Where the platform has a fused kernel and XLA is taken, the reason is given (and logged).
    assert bool(why) == (kernel == "xla" and platform != "cpu")
    assert attention.choose("xla", platform, dtype, head_dim, seq, softcap) == ("xla", "")


def test_splash_lowers_to_the_tpu_kernel():
    """Compiled for a TPU, the splash path is a Mosaic kernel (exported here without a TPU)."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    kernel = jax.jit(lambda q, k, v: attention._splash(q, k, v, interpret=False))
    exported = jax.export.export(kernel, platforms=["tpu"])(q, kv, kv)
    assert "tpu_custom_call" in exported.mlir_module()


def test_splash_refuses_untiled_sequence():
    q = jnp.zeros((1, 200, 2, 8))
    with pytest.raises(ValueError, match="splash.*200"):
        attention.causal_attention(q, q, q, "splash")
