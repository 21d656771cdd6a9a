"""Causal attention with the sequence split over the mesh's context axis: ring attention.

Each device of the context axis holds one contiguous block of every row's positions: its queries,
keys, values and segment ids. The key/value blocks (with their segment ids) travel around the ring
(`ppermute`), one hop per step; after n - 1 hops every query block has met every key block, and an
online softmax (running max and sum, in float32) folds the blocks in as they come, as flash
attention folds in tiles. Within a device a key block is taken in tiles of `block` keys, so the
scores alive at once are [queries of one device, block], never [t, t] nor [t / n, t].

Why a ring and not an all-gather of K/V: an all-gather keeps the whole row's keys and values on
every device (O(t)), and its autodiff keeps the [t / n, t] scores for the backward pass; at 128k
that no longer fits. The ring keeps one key block in flight, and its backward pass (a custom VJP,
flash-attention style) recomputes scores tile by tile from the saved log-sum-exp, passing the
keys' gradients around the ring with their block until they are back home: memory O(t / n) per
device. Communication is n - 1 hops of one K/V block forward, n of K/V plus their gradients
backward, which overlaps the block's compute on accelerators.

Exact: causality compares global positions (block index x block length + offset), documents
compare the segment ids that travel with their keys, a sliding window the same positions; tiles a
query cannot see (the future, or beyond the window) are skipped, which changes no result. Scores
are in float32 as in `attention.masked_attention`; soft-capping (Gemma 2) is applied per tile.
Causal load is unbalanced (the last block of a row attends to all, the first to itself); striped
or zig-zag layouts that balance it would reorder positions, and are left out.

Two structural choices keep it correct and small on every backend. The hops are a Python loop
and the window a traced value (not a `lax.cond` between a windowed and a full ring): XLA:CPU does
not order a collective inside a loop or conditional against those outside it, and the devices
deadlock. The tiles are a `while_loop`, not a scan: JAX keeps no values from inside one for the
backward pass, where a scan would let a remat policy that saves dots, or the layer scan's hoisting
of loop-invariant values (the masks), keep every tile's scores.

The blocks are computed in XLA whatever kernel the platform prefers: cuDNN and splash do not take
a query block offset against a key block, so a run with a context axis uses `auto` or `xla`
(`checks.check_config` says so).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cpt_jax import sharding
from cpt_jax.models import attention

# Scores no query may use, and the running maximum before any tile: finite, so that a row that has
# seen nothing yet rescales by exp(0), not by exp(-inf + inf).
_FLOOR = float(jnp.finfo(jnp.float32).min)
BLOCK = 512  # keys per tile within a device's key block (the whole block where this does not divide it)
KERNELS = ("auto", "xla")  # the model.attention settings a context axis runs


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, segment_ids: jax.Array | None,
                     window: int, windowed: bool | jax.Array, scale: float, softcap: float = 0.0) -> jax.Array:
    """A layer's attention (`attention.causal_attention`), within the sliding `window` where
    `windowed` (a bool, or traced in scanned layers of both kinds). By ring attention over the
    context axis of the mesh set (`jax.set_mesh`) where that axis is > 1 and divides the sequence;
    elsewhere by the kernel `impl`."""
    shards = sharding.context_size()
    if shards > 1 and q.shape[1] % shards == 0:
        return ring_attention(q, k, v, segment_ids, jnp.where(windowed, window, 0), scale, softcap)
    attend = lambda w: attention.causal_attention(q, k, v, impl, segment_ids, w, scale, softcap)  # noqa: E731
    if isinstance(windowed, bool):
        return attend(window if windowed else 0)
    return jax.lax.cond(windowed, lambda: attend(window), lambda: attend(0))  # both compiled, one runs per layer


class _Ring(NamedTuple):
    """The static settings of one ring attention."""

    shards: int  # devices on the context axis
    scale: float
    softcap: float
    block: int  # keys per tile


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
                   window: int | jax.Array = 0, scale: float | None = None, softcap: float = 0.0,
                   block: int = BLOCK) -> jax.Array:
    """q [b, t, heads, hd], k and v [b, t, kv_heads, hd], segment_ids [b, t] or None, under a mesh
    whose context axis divides t -> [b, t, heads, hd], as `attention.causal_attention`; `window`
    may be traced. Rows are split as "batch" is, heads as the kv heads are (so each device keeps
    whole query groups)."""
    mesh = jax.sharding.get_abstract_mesh()
    b, t, heads, hd = q.shape
    kv_heads = k.shape[2]
    ring = _Ring(sharding.context_size(mesh), hd ** -0.5 if scale is None else scale, softcap, block)
    rows, _, split_heads = sharding.logical_spec(("batch", None, "kv_heads"), (b, t, kv_heads), mesh)
    spec, seg_spec = P(rows, sharding.CONTEXT, split_heads, None), P(rows, sharding.CONTEXT)
    if segment_ids is None:  # one segment: the mask is causality (and the window) alone
        segment_ids = jnp.zeros((b, t), jnp.int32)

    def local(q, k, v, segments, window):
        groups = q.reshape(*q.shape[:2], k.shape[2], q.shape[2] // k.shape[2], hd)  # [b, tq, kv_heads, group, hd]
        return _ring(groups, k, v, segments, window, ring).reshape(q.shape)

    return jax.shard_map(local, in_specs=(spec, spec, spec, seg_spec, P()), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids, jnp.asarray(window, jnp.int32))


def _hop(*blocks: jax.Array, shards: int) -> list[jax.Array]:
    """Each device's blocks to the next device of the context axis (the last to the first)."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return [jax.lax.ppermute(x, sharding.CONTEXT, perm) for x in blocks]


def _scores(q, k_tile, q_pos, k_pos, q_seg, k_seg, window, ring: _Ring):
    """Scores [b, kv_heads, group, tq, tile] (float32, soft-capped) of queries q [b, tq, kv_heads,
    group, hd] against a key tile, and where the mask allows them."""
    s = jnp.einsum("bqkgd,bckd->bkgqc", q, k_tile, preferred_element_type=jnp.float32) * ring.scale
    if ring.softcap:
        s = ring.softcap * jnp.tanh(s / ring.softcap)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & ((window == 0) | (k_pos[None, :] > q_pos[:, None] - window))
    allowed = allowed[None] & (q_seg[:, :, None] == k_seg[:, None, :])  # [b, tq, tile]
    return s, allowed[:, None, None]


def _over_tiles(fn, carry, q_pos: jax.Array, k_blocks: list, first_key: jax.Array, window: jax.Array,
                ring: _Ring):
    """Folds `fn(carry, offset, key positions, *tiles) -> carry` over the tiles of a device's key
    blocks (offset: the tile's within them), which start at global position `first_key`, in a
    while loop; a tile no query sees (the future, or beyond the window) is skipped."""
    keys = k_blocks[0].shape[1]
    size = ring.block if keys % ring.block == 0 else keys

    def tile(c):
        i, carry = c
        offset = i * size
        start = first_key + offset
        seen = (start <= q_pos[-1]) & ((window == 0) | (start + size - 1 > q_pos[0] - window))
        tiles = [jax.lax.dynamic_slice_in_dim(x, offset, size, axis=1) for x in k_blocks]
        return i + 1, jax.lax.cond(seen, lambda: fn(carry, offset, start + jnp.arange(size), *tiles), lambda: carry)

    return jax.lax.while_loop(lambda c: c[0] < keys // size, tile, (0, carry))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, window: jax.Array, ring: _Ring) -> jax.Array:
    """The local computation: q [b, tq, kv_heads, group, hd], k, v [b, tk, kv_heads, hd], segments
    [b, tq] (of these positions: the keys' travel with them) -> [b, tq, kv_heads, group, hd]."""
    return _forward(q, k, v, segments, window, ring)[0]


def _forward(q, k, v, segments, window, ring: _Ring):
    """(the output, its log-sum-exp [b, kv_heads, group, tq] for the backward pass)."""
    me = jax.lax.axis_index(sharding.CONTEXT)
    b, tq, kv_heads, group, hd = q.shape
    q_pos = me * tq + jnp.arange(tq)

    def tile(state, _offset, k_pos, k_tile, v_tile, k_seg):  # the online softmax over one more tile
        out, top, total = state
        s, allowed = _scores(q, k_tile, q_pos, k_pos, segments, k_seg, window, ring)
        new_top = jnp.maximum(top, jnp.where(allowed, s, _FLOOR).max(axis=-1))
        p = jnp.where(allowed, jnp.exp(s - new_top[..., None]), 0.0)
        fade = jnp.exp(top - new_top)  # the earlier tiles' terms, rescaled to the new maximum
        pv = jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), v_tile, preferred_element_type=jnp.float32)
        return out * fade[..., None] + pv, new_top, total * fade + p.sum(axis=-1)

    state = (jnp.zeros((b, kv_heads, group, tq, hd), jnp.float32), jnp.full((b, kv_heads, group, tq), _FLOOR),
             jnp.zeros((b, kv_heads, group, tq), jnp.float32))
    kv = [k, v, segments]
    for step in range(ring.shards):  # the key block that device (me - step) started with
        if step:
            kv = _hop(*kv, shards=ring.shards)
        state = _over_tiles(tile, state, q_pos, kv, (me - step) % ring.shards * k.shape[1], window, ring)
    out, top, total = state
    out = (out / total[..., None]).transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [b, tq, kv_heads, group, hd]
    return out, top + jnp.log(total)


def _ring_fwd(q, k, v, segments, window, ring: _Ring):
    out, lse = _forward(q, k, v, segments, window, ring)
    return out, (q, k, v, segments, window, out, lse)


def _ring_bwd(ring: _Ring, residuals, d_out):
    q, k, v, segments, window, out, lse = residuals
    me = jax.lax.axis_index(sharding.CONTEXT)
    tq, dt = q.shape[1], q.dtype
    q_pos = me * tq + jnp.arange(tq)
    d_out = d_out.transpose(0, 2, 3, 1, 4)  # [b, kv_heads, group, tq, hd] as the scores' rows
    # The softmax's backward term: sum over hd of dO * O per query.
    delta = jnp.einsum("bkgqd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def tile(grads, offset, k_pos, k_tile, v_tile, k_seg):  # one tile's share of dq, dk and dv
        dq, dk, dv = grads
        s, allowed = _scores(q, k_tile, q_pos, k_pos, segments, k_seg, window, ring)
        p = jnp.where(allowed, jnp.exp(s - lse[..., None]), 0.0)
        dv_tile = jnp.einsum("bkgqc,bkgqd->bckd", p.astype(dt), d_out.astype(dt), preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bckd->bkgqc", d_out.astype(dt), v_tile, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        if ring.softcap:  # d cap * tanh(u / cap) / du = 1 - tanh^2
            ds = ds * (1 - jnp.square(s / ring.softcap))
        ds = (ds * ring.scale).astype(dt)
        dq = dq + jnp.einsum("bkgqc,bckd->bqkgd", ds, k_tile, preferred_element_type=jnp.float32)
        dk_tile = jnp.einsum("bkgqc,bqkgd->bckd", ds, q, preferred_element_type=jnp.float32)
        return dq, _add_at(dk, dk_tile, offset), _add_at(dv, dv_tile, offset)

    # A key block's gradients travel with it, gathering every device's share, and the last hop
    # brings them home.
    dq = jnp.zeros(q.shape, jnp.float32)
    kv, grads = [k, v, segments], [jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)]
    for step in range(ring.shards):
        if step:
            kv, grads = _hop(*kv, shards=ring.shards), _hop(*grads, shards=ring.shards)
        dq, *grads = _over_tiles(tile, (dq, *grads), q_pos, kv, (me - step) % ring.shards * k.shape[1], window, ring)
    dk, dv = _hop(*grads, shards=ring.shards)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


def _add_at(x: jax.Array, tile: jax.Array, offset: jax.Array) -> jax.Array:
    """x with `tile` added at `offset` along axis 1."""
    return jax.lax.dynamic_update_slice_in_dim(x, jax.lax.dynamic_slice_in_dim(x, offset, tile.shape[1], 1) + tile,
                                               offset, 1)


_ring.defvjp(_ring_fwd, _ring_bwd)
