"""Next-token cross-entropy through the output head, without the [batch, seq, vocab] logits.

The plain way (`chunk=0`) materialises float32 logits for every position, and autodiff keeps
them, and the softmax, for the backward pass: at batch 16 x 2048 positions x 32k vocabulary that
is 4 GiB per buffer. The fused way walks the sequence in chunks of `chunk` positions and, for
each, computes the logits, the loss and right away the gradients with respect to the hidden
states and the head (softmax minus one-hot, times the mean's 1/n), so only one chunk of logits
is ever alive and nothing is recomputed: the same three head matmuls as the plain backward.
Logits and their statistics are float32 whatever the compute dtype. With `softcap` > 0 (Gemma 2)
the logits are cap * tanh(logits / cap), and the gradient through the cap is applied in place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cpt_jax import sharding


def cross_entropy(x: jax.Array, w: jax.Array, labels: jax.Array, chunk: int = 0, weights: jax.Array | None = None,
                  softcap: float = 0.0, count: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Final hidden states x [b, t, d] (compute dtype), head w [d, vocab] (float32), labels [b, t]
    -> (mean token loss, per-token losses [b, t]), float32. The mean is differentiable; the
    per-token losses are reported values and carry no gradient. `weights` [b, t] (1 counted, 0
    not): the mean is over the counted positions only. `count`: what the sum of the counted
    losses is divided by, in place of their number here (a microbatch's loss is its sum over
    the whole batch's count, so that the microbatches' losses and gradients add up to the batch's)."""
    if count is None:
        count = positions_counted(weights, labels.shape)
    if chunk <= 0:
        losses = _chunk_losses(x, w, labels, softcap)
        return _mean(losses, weights, count), jax.lax.stop_gradient(losses)
    local = x.shape[1] // _shards(x.shape[1])  # the positions each context shard holds
    chunk = min(chunk, local)
    if local % chunk:
        raise ValueError(f"model.loss_chunk={chunk} does not divide the {local} positions of a row per context shard")
    mean, losses = _fused(x, w, labels, weights, count, chunk, softcap)
    return mean, jax.lax.stop_gradient(losses)


def positions_counted(weights: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """The number of positions of a [b, t] `shape` that `weights` count (None: all), at least 1:
    a batch with nothing to predict has loss 0, not NaN."""
    return jnp.maximum(math.prod(shape) if weights is None else weights.sum(), 1.0)


def _mean(losses: jax.Array, weights: jax.Array | None, count: jax.Array) -> jax.Array:
    return (losses if weights is None else losses * weights).sum() / count


def logits(x: jax.Array, w: jax.Array, softcap: float = 0.0) -> jax.Array:
    """Hidden states [b, t, d] through the head [d, vocab]: float32 logits from compute-dtype
    operands, capped to softcap * tanh(z / softcap) when `softcap` > 0."""
    z = jnp.einsum("btd,dv->btv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    z = softcap * jnp.tanh(z / softcap) if softcap else z
    return sharding.constrain(z, ("batch", "length", "vocab"))


def _chunk_losses(x, w, labels, softcap):
    z = logits(x, w, softcap)
    label_logit = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - label_logit


def _shards(t: int) -> int:
    """The context shards a sequence of `t` positions is split over (as sharding.RULES splits "length")."""
    shards = sharding.context_size()
    return shards if t % shards == 0 else 1


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
    """[b, t, ...] -> [steps, b, shards x chunk, ...]: the scan walks the sequence, batch stays
    sharded. Over a context axis of n shards, step i takes chunk i of each shard's t / n positions,
    so each device computes the logits of its own positions, `chunk` at a time."""
    b, t, shards = a.shape[0], a.shape[1], _shards(a.shape[1])
    a = jnp.moveaxis(a.reshape(b, shards, t // (shards * chunk), chunk, *a.shape[2:]), 2, 0)
    return a.reshape(a.shape[0], b, shards * chunk, *a.shape[4:])


def _unchunk(a: jax.Array, chunk: int) -> jax.Array:
    """The inverse of `_chunks`."""
    steps, b, shards = a.shape[0], a.shape[1], a.shape[2] // chunk
    a = jnp.moveaxis(a.reshape(steps, b, shards, chunk, *a.shape[3:]), 0, 2)
    return a.reshape(b, steps * shards * chunk, *a.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(x, w, labels, weights, count, chunk, softcap):
    xs = (_chunks(x, chunk), _chunks(labels, chunk))
    losses = _unchunk(jax.lax.map(lambda xs: _chunk_losses(xs[0], w, xs[1], softcap), xs), chunk)
    return _mean(losses, weights, count), losses


def _fused_fwd(x, w, labels, weights, count, chunk, softcap):
    # d mean / d token loss: one number, or per position where weights say which count.
    scale = 1.0 / count if weights is None else _chunks(weights / count, chunk)

    def step(dw, xs):
        x_c, y_c, s_c = xs
        z = logits(x_c, w, softcap)
        lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(y_c, z.shape[-1], dtype=jnp.float32)
        losses = lse[..., 0] - jnp.sum(z * onehot, axis=-1)
        g = (jnp.exp(z - lse) - onehot) * (scale if s_c is None else s_c[..., None])
        if softcap:  # d cap * tanh(u / cap) / du = 1 - tanh^2
            g = g * (1 - jnp.square(z / softcap))
        g = g.astype(x.dtype)
        dx = jnp.einsum("bcv,dv->bcd", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", x_c, g, preferred_element_type=jnp.float32)
        return sharding.constrain(dw, ("embed", "vocab")), (losses, dx.astype(x.dtype))

    xs = (_chunks(x, chunk), _chunks(labels, chunk), None if weights is None else scale)
    dw, (losses, dx) = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), xs)
    losses = _unchunk(losses, chunk)
    return (_mean(losses, weights, count), losses), (_unchunk(dx, chunk), dw.astype(w.dtype))


def _fused_bwd(chunk, softcap, res, cotangents):
    dx, dw = res
    g = cotangents[0]  # the per-token losses leave through stop_gradient: their cotangent is zero
    return (dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), None, None, None)  # weights, count: data


_fused.defvjp(_fused_fwd, _fused_bwd)
