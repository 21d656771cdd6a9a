"""Causal self-attention, by the fastest kernel the platform has.

- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
  bfloat16/float16, head_dim a multiple of 8 up to 128, or 256 from Hopper on);
- `splash`: the Pallas splash-attention kernel (TPU; elsewhere it runs in Pallas interpret mode,
  which is slow and only for tests), inside `shard_map` so each device attends over its own batch
  rows and heads;
- `xla`: the plain softmax(QK^T)V that XLA fuses as it can (any platform, any dtype).

`auto` (the default) picks the first that fits the platform, dtype and shapes, so one config runs
everywhere. Note that `jax.nn.dot_product_attention(implementation=None)` means XLA today.

A sliding window (`window` > 0, Mistral's): XLA and cuDNN through `local_window_size`, splash
through its LocalMask. Attention-logit soft-capping (Gemma 2): splash natively; cuDNN has none,
so `auto` takes XLA then (`choose` says why, and the run logs it), through the plain softmax
written out here, as `jax.nn.dot_product_attention` has no cap either. Head dims up to 256 (Gemma):
splash, and cuDNN from Hopper (compute capability 9.0) on; before that, XLA.

Packed documents (`segment_ids` [b, t]: a query sees only keys of its own segment): XLA takes them
as a boolean mask; splash natively (`SegmentIds`, no mask in memory); cuDNN through the mask of
`jax.nn.dot_product_attention`, which jax 0.10 hands to cuDNN as a dense [b, 1, t, t] bias (its
packed-sequence layout is not public API), so its flash kernel runs, at t^2 bias memory per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cpt_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 512  # splash tile size along the sequence (smaller sequences use one tile)


def choose(impl: str, platform: str, dtype: str, head_dim: int, seq_len: int, softcap: float = 0.0
           ) -> tuple[str, str]:
    """(the kernel `impl` means on `platform` ("cpu", "gpu", "tpu") for these shapes, why that is
    XLA where the platform has a fused kernel, else "")."""
    if impl != "auto":
        return impl, ""
    if platform == "gpu":
        limit = 256 if _compute_capability() >= 9.0 else 128
        why = ("attention soft-capping, which cuDNN does not do" if softcap
               else f"{dtype} compute (cuDNN takes bfloat16 or float16)" if dtype not in ("bfloat16", "float16")
               else f"head_dim {head_dim} (cuDNN takes multiples of 8 up to {limit} here)"
               if head_dim % 8 or head_dim > limit else "")
        return ("xla", why) if why else ("cudnn", "")
    if platform == "tpu":
        if splash_fits(seq_len):
            return "splash", ""
        return "xla", f"sequence length {seq_len} (splash tiles multiples of 128, and of {SPLASH_BLOCK} above it)"
    return "xla", ""


def _compute_capability() -> float:
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)


def splash_fits(seq_len: int) -> bool:
    """Whether splash tiles `seq_len` (multiples of 128, and of SPLASH_BLOCK beyond it)."""
    return seq_len % 128 == 0 and (seq_len <= SPLASH_BLOCK or seq_len % SPLASH_BLOCK == 0)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, segment_ids: jax.Array | None = None,
                     window: int = 0, scale: float | None = None, softcap: float = 0.0) -> jax.Array:
    """q [b, t, heads, hd], k and v [b, t, kv_heads, hd] -> [b, t, heads, hd]; `impl` as resolved.
    With `segment_ids` [b, t] int32, attention stays within each segment (a packed document);
    with `window` > 0, within the last `window` positions (itself included). Logits are scaled by
    `scale` (default hd^-1/2) and, with `softcap` > 0, capped to softcap * tanh(logits / softcap)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "splash":
        return _splash(q, k, v, segment_ids, window=window, scale=scale, softcap=softcap)
    if softcap:
        t = jnp.arange(q.shape[1])
        mask = t[None, :] <= t[:, None]
        if window:
            mask &= t[None, :] > t[:, None] - window
        mask = mask[None, None] if segment_ids is None else mask & segment_mask(segment_ids)
        return masked_attention(q, k, v, mask[:, 0], scale, softcap)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl,
                                        local_window_size=(window - 1, 0) if window else None)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
                     softcap: float = 0.0) -> jax.Array:
    """Attention of q [b, t, heads, hd] over k, v [b, s, kv_heads, hd] where mask [b, t, s] allows
    (the KV cache's decoding, soft-capped training), in XLA; logits and softmax in float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not softcap:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
    b, t, h, hd = q.shape
    groups = q.reshape(b, t, k.shape[2], h // k.shape[2], hd)  # grouped-query heads share their kv head
    logits = jnp.einsum("btkgd,bskd->bkgts", groups, k, preferred_element_type=jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[b, t] -> bool [b, 1, t, t]: query i may see key j of the same segment (causality apart)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def _splash_kernel(heads: int, seq_len: int, interpret: bool, window: int = 0, softcap: float = 0.0):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = min(SPLASH_BLOCK, seq_len)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    shape = (seq_len, seq_len)
    one = sa.LocalMask(shape, (window - 1, 0), offset=0) if window else sa.CausalMask(shape)
    mask = sa.MultiHeadMask([one for _ in range(heads)])
    return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret,
                              attn_logits_soft_cap=softcap or None)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
            interpret: bool | None = None, window: int = 0, scale: float | None = None, softcap: float = 0.0
            ) -> jax.Array:
    # The kernel takes one example as [heads, t, hd] (grouped-query heads natively) and does not
    # scale q. Heads are split over the mesh as the kv heads are, so each shard keeps whole groups.
    if not splash_fits(q.shape[1]):
        raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple of 128 "
                         f"(and of {SPLASH_BLOCK} above it), not {q.shape[1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = ((x * scale if x is q else x).swapaxes(1, 2) for x in (q, k, v))  # [b, heads, t, hd]
    if interpret is None:  # Mosaic compiles it for a TPU mesh (also one of a topology compiled for here)
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
        interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"

    def local(q, k, v, segments):
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        kernel = _splash_kernel(q.shape[1], q.shape[2], interpret, window, softcap)
        if segments is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s)))(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch, heads = sharding.logical_spec(("batch", "kv_heads"), (q.shape[0], k.shape[1]), mesh)
        spec = P(batch, heads, None, None)
        local = jax.shard_map(local, in_specs=(spec, spec, spec, None if segment_ids is None else P(batch, None)),
                              out_specs=spec, check_vma=False)
    return local(q, k, v, segment_ids).swapaxes(1, 2)
