"""A LLaMA-style decoder in Flax NNX: RMSNorm, RoPE, a gated MLP, grouped-query attention.

One decoder for every family imported: Llama, Mistral, Qwen2/3, Gemma 2/3 and OLMo 2 differ in a
few explicit fields of ModelConfig (where the norms sit, q/k norms, the MLP's activation, the
embedding scale, soft-capping, which layers attend within a sliding window), not in code paths.

Parameters are float32 and carry logical axis names (metadata `axes`); `sharding.py` maps those
names to mesh axes. The per-layer parameters are always stored stacked along a leading `layers`
axis, whether the forward pass scans over them or unrolls a Python loop, so checkpoints do not
depend on `scan_layers` (the scan-vs-unrolled mismatch is a known pitfall of other trainers).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cpt_jax import dtypes, sharding
from cpt_jax.models import attention, context_parallel, cross_entropy, rope

QK_NORMS = ("", "head", "proj")
NORMS = ("pre", "sandwich", "post")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the numerics and layout knobs of one model."""

    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 0  # 0: hidden // heads
    rope_theta: float = 10000.0
    # HF `rope_scaling` as sorted (key, value) pairs: a rope_type of models.rope.TYPES and its keys.
    rope_scaling: tuple = ()
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 style
    # RMSNorm on q and k before RoPE: "head" over each head's head_dim (Qwen3, Gemma 3), "proj" over
    # the whole projection (OLMo 2), "" none.
    qk_norm: str = ""
    # Each residual branch f: pre x + f(norm(x)) (Llama), sandwich x + norm(f(norm(x))) (Gemma),
    # post x + norm(f(x)) (OLMo 2).
    norms: str = "pre"
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    query_pre_attn_scalar: float = 0.0  # attention logits scaled by its -1/2 power (Gemma); 0: head_dim's
    attn_softcap: float = 0.0  # > 0: attention logits become cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float = 0.0  # > 0: the same on the output logits (Gemma 2)
    sliding_window: int = 0  # > 0: a query sees the last this many positions, itself included (Mistral); 0: all
    full_attention_layers: tuple = ()  # with a window: the layers that still see all positions (Gemma's global)
    local_rope_theta: float = 0.0  # > 0: the windowed layers' own RoPE theta, unscaled (Gemma 3); 0: shared
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype, dtypes.COMPUTE or auto (bfloat16 on GPU/TPU, else float32); params float32
    scan_layers: bool = True
    remat: str = "none"  # a key of REMAT_POLICIES
    attention: str = "auto"  # a kernel of models.attention: auto | xla | cudnn | splash
    loss_chunk: int = 256  # cross-entropy over this many positions at a time; 0: all logits at once

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        object.__setattr__(self, "dtype", compute_dtype(self.dtype))
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads={self.heads} is not a multiple of model.kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {', '.join(attention.IMPLEMENTATIONS)}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk={self.loss_chunk} must be >= 0")
        if self.sliding_window < 0:
            raise ValueError(f"model sliding_window={self.sliding_window} must be >= 0 (0: no window)")
        if isinstance(self.qk_norm, bool):  # metadata written when it was a flag (Qwen3's per-head norm)
            object.__setattr__(self, "qk_norm", "head" if self.qk_norm else "")
        object.__setattr__(self, "full_attention_layers", tuple(int(i) for i in self.full_attention_layers))
        for field, allowed in (("qk_norm", QK_NORMS), ("norms", NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"model {field}={getattr(self, field)!r} is not one of {allowed}")
        if any(not 0 <= i < self.layers for i in self.full_attention_layers):
            raise ValueError(f"model full_attention_layers={self.full_attention_layers} names layers outside "
                             f"0..{self.layers - 1}")
        if self.attn_softcap and self.attention == "cudnn":
            raise ValueError(f"model.attention='cudnn' has no attention soft-capping (attn_softcap="
                             f"{self.attn_softcap}); use auto, xla or splash")
        object.__setattr__(self, "rope_scaling", rope.canonical(self.rope_scaling))
        try:
            rope.check(dict(self.rope_scaling), self.head_dim)
        except ValueError as e:
            raise ValueError(f"model rope_scaling={dict(self.rope_scaling)}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The inverse of `dataclasses.asdict` after a JSON round trip (checkpoint metadata); a
        field added since it was written takes its default."""
        d = dict(d)
        d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling", ()))
        return cls(**d)

    def with_kernel(self, seq_len: int, platform: str | None = None) -> ModelConfig:
        """This config with its attention kernel chosen (once) for `platform` (default: this
        process's) and sequence length: what a run compiles and logs. A config left at "auto"
        chooses at each call."""
        return dataclasses.replace(self, attention=self.kernel(seq_len, platform)[0])

    def kernel(self, seq_len: int, platform: str | None = None) -> tuple[str, str]:
        """(the attention kernel for `platform` (default: this process's) and length, why it is not
        the platform's fast one or "")."""
        return attention.choose(self.attention, platform or jax.default_backend(), self.dtype, self.head_dim,
                                seq_len, self.attn_softcap)

    def windowed(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within the sliding window."""
        return tuple(bool(self.sliding_window) and i not in self.full_attention_layers for i in range(self.layers))

    ARCHITECTURE = ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim",
                    "tie_embeddings", "qkv_bias", "qk_norm", "norms")

    def architecture(self) -> dict:
        """The fields that decide the parameters' shapes: what a checkpoint must match to be restored."""
        return {k: getattr(self, k) for k in self.ARCHITECTURE}

    @classmethod
    def architecture_of(cls, model: dict) -> dict:
        """`architecture()` of a checkpoint's model metadata; a field added since it was written
        reads as its default (what that checkpoint's model is)."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        arch = {k: model.get(k, defaults[k]) for k in cls.ARCHITECTURE}
        if isinstance(arch["qk_norm"], bool):  # written when it was Qwen3's flag
            arch["qk_norm"] = "head" if arch["qk_norm"] else ""
        return arch

    def check_restores(self, theirs: dict, where: str) -> None:
        """The one model-compatibility check (resume and init_from alike): `theirs`, a checkpoint's
        model metadata, must match this architecture in every field; else a ValueError lists each
        differing field as `field: theirs -> this run's`."""
        theirs = self.architecture_of(theirs)
        diff = [f"{k}: {theirs[k]!r} -> {v!r}" for k, v in self.architecture().items() if theirs[k] != v]
        if diff:
            raise ValueError(f"{where} holds another model ({'; '.join(diff)})")

    def param_count(self) -> int:
        """Exact number of parameters of this architecture (no model is built)."""
        return self.non_embedding_params() + (0 if self.tie_embeddings else self.vocab_size * self.hidden)

    def non_embedding_params(self) -> int:
        """All parameters but the input embedding table; the output head counts even when tied,
        because its matmul is real work (this is the N of the MFU formula)."""
        d, f, h, k, hd = self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim
        qk_norm = {"": 0, "head": 2 * hd, "proj": (h + k) * hd}[self.qk_norm]
        attn = d * h * hd * 2 + d * k * hd * 2 + (h * hd + 2 * k * hd if self.qkv_bias else 0) + qk_norm
        block = attn + 3 * d * f + d * (4 if self.norms == "sandwich" else 2)
        return self.layers * block + d + self.vocab_size * d


def compute_dtype(name: str, platform: str | None = None) -> str:
    """`name`, with "auto" made bfloat16 on accelerators and float32 on CPU (`platform`, default:
    this process's; a program compiled here for a TPU topology passes "tpu"); a ValueError naming
    `model.dtype` where it is not auto or one of dtypes.COMPUTE."""
    if name == "auto":
        return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
    if name not in dtypes.COMPUTE:
        why = " (float16 would need loss scaling, which cpt_jax does not do)" if name == "float16" else ""
        raise ValueError(f"model.dtype={name!r} is not a supported compute dtype: auto, "
                         f"{', '.join(dtypes.COMPUTE)}{why}")
    return name


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0, axes: int = 1) -> jax.Array:
    """x scaled to unit RMS over its last `axes` axes (the shape of `weight`), times (offset + weight)."""
    # Statistics in float32 whatever the compute dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=tuple(range(-axes, 0)), keepdims=True) + eps)
    return (y * (offset + weight)).astype(x.dtype)


class Block(nnx.Module):
    """One transformer layer: attention, then the gated MLP, each a residual branch normed as
    `cfg.norms` says."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, h, k, hd, std = cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.init_std
        self.cfg = cfg
        norm = lambda *shape_axes: nnx.Param(jnp.full(shape_axes[0], 1.0 - cfg.norm_offset, jnp.float32),  # noqa: E731
                                             axes=shape_axes[1])
        if cfg.norms != "post":
            self.attn_norm = norm((d,), ("norm",))
            self.mlp_norm = norm((d,), ("norm",))
        if cfg.norms != "pre":
            self.attn_post_norm = norm((d,), ("norm",))
            self.mlp_post_norm = norm((d,), ("norm",))
        self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.k = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.v = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
        self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std)
        if cfg.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((h, hd), jnp.float32), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, hd), jnp.float32), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, hd), jnp.float32), axes=("kv_heads", "head_dim"))
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = norm((hd,), ("norm",)), norm((hd,), ("norm",))
        elif cfg.qk_norm == "proj":
            self.q_norm = norm((h, hd), ("heads", "head_dim"))
            self.k_norm = norm((k, hd), ("kv_heads", "head_dim"))
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), std)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), std)

    def __call__(self, x: jax.Array, tables: tuple, windowed: jax.Array | bool, cache: tuple | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, tuple | None]:
        """`tables`: RoPE's (cos, sin) of the full-attention layers, then of the windowed ones; `windowed`
        (traced when the layers are scanned): whether this layer attends within the sliding window.
        `cache` (decoding only): (k [b, slots, kv_heads, head_dim], v, index, full-attention mask
        [b, t, slots], windowed mask); this step's keys and values are written at slot `index`.
        `segment_ids` [b, t] (training on packed documents): attention stays within each.
        Returns (x, the updated (k, v))."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        w = lambda p: p[...].astype(dt)  # noqa: E731  (params live in float32, compute in dt)
        norm = lambda x, p, axes=1: rms_norm(x, p[...], cfg.norm_eps, cfg.norm_offset, axes)  # noqa: E731

        def pick(full, local):  # this layer's of two alternatives
            if isinstance(windowed, bool):
                return local if windowed else full
            return jax.tree.map(lambda a, b: jnp.where(windowed, b, a), full, local)

        y = x if cfg.norms == "post" else norm(x, self.attn_norm)
        q = jnp.einsum("btd,dhk->bthk", y, w(self.q))
        k = jnp.einsum("btd,dhk->bthk", y, w(self.k))
        v = jnp.einsum("btd,dhk->bthk", y, w(self.v))
        if cfg.qkv_bias:
            q, k, v = q + w(self.q_bias), k + w(self.k_bias), v + w(self.v_bias)
        if cfg.qk_norm:
            axes = 2 if cfg.qk_norm == "proj" else 1
            q, k = norm(q, self.q_norm, axes), norm(k, self.k_norm, axes)
        cos, sin = pick(*tables)
        q = sharding.constrain(rope.apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = sharding.constrain(rope.apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        if cache is None:
            a = context_parallel.causal_attention(q, k, v, cfg.kernel(q.shape[1])[0], segment_ids, cfg.sliding_window,
                                                  windowed, scale, cfg.attn_softcap)
            new_cache = None
        else:
            k_cache, v_cache, index, full_mask, window_mask = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
            a = attention.masked_attention(q, k, v, pick(full_mask, window_mask), scale, cfg.attn_softcap)
            new_cache = (k, v)
        a = jnp.einsum("bthk,hkd->btd", a, w(self.o))
        x = x + (a if cfg.norms == "pre" else norm(a, self.attn_post_norm))
        x = sharding.constrain(x, ("batch", "length", "embed"))

        y = x if cfg.norms == "post" else norm(x, self.mlp_norm)
        hidden = ACTIVATIONS[cfg.activation](y @ w(self.gate)) * (y @ w(self.up))
        hidden = sharding.constrain(hidden, ("batch", "length", "mlp"))
        y = hidden @ w(self.down)
        x = x + (y if cfg.norms == "pre" else norm(y, self.mlp_post_norm))
        return sharding.constrain(x, ("batch", "length", "embed")), new_cache


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """`cfg.layers` Blocks as one Block whose params have a leading `layers` axis."""
    keys = jax.random.split(rngs.params(), cfg.layers)
    state = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(key))))(keys)
    state = jax.tree.map(
        lambda v: v.replace(axes=("layers", *v.get_metadata()["axes"])),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, state)


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding. Rows are left-padded: row b's text starts at
    slot `start[b]`, so prompts of different lengths decode together."""

    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array
    index: jax.Array  # int32 []: slots filled so far
    start: jax.Array  # int32 [batch]

    @classmethod
    def empty(cls, cfg: ModelConfig, start: jax.Array, slots: int) -> KVCache:
        shape = (cfg.layers, start.shape[0], slots, cfg.kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, cfg.dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32), start.astype(jnp.int32))


class Llama(nnx.Module):
    """Decoder-only LM: tokens [batch, seq] -> logits [batch, seq, vocab] (float32)."""

    # The token that ended the documents these weights were trained on, where a loader knows it
    # (a run's data framing): generation stops there as at the tokenizer's EOS.
    document_end: int | None = None

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden), ("vocab", "embed"), cfg.init_std)
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = nnx.Param(jnp.full((cfg.hidden,), 1.0 - cfg.norm_offset, jnp.float32), axes=("norm",))
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None,
                      segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [b, t, hidden]. `positions` [b, t] default to 0..t-1 (or follow
        the cache); `segment_ids` [b, t] keep attention within each packed document."""
        cfg = self.cfg
        masks = None
        if cache is not None:
            slots = cache.index + jnp.arange(tokens.shape[1])  # the slots these tokens fill
            keys = jnp.arange(cache.k.shape[2])[None, None, :]
            # A query sees its row's slots from `start` up to itself (a pad query sees itself only).
            query = slots[None, :, None]
            full = (keys <= query) & ((keys >= cache.start[:, None, None]) | (keys == query))
            masks = (full, full & (keys > query - cfg.sliding_window) if cfg.sliding_window else full)
            if positions is None:
                positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        tables = local_tables = rope.rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if cfg.local_rope_theta:  # Gemma 3's windowed layers: their own theta, unscaled
            local_tables = rope.rope_tables(positions, cfg.head_dim, cfg.local_rope_theta)
        # Gather, then cast: the backward pass then sums a token's occurrences into its float32 row
        # (cast first, a frequent token's row would be a long sum in the compute dtype).
        x = self.embed[...][tokens].astype(cfg.dtype)
        if cfg.embed_scale:  # sqrt(hidden) rounded to the compute dtype first, as Gemma does
            x = x * jnp.asarray(cfg.hidden ** 0.5, cfg.dtype)
        x = sharding.constrain(x, ("batch", "length", "embed"))

        graphdef, stacked = nnx.split(self.layers)
        windowed = cfg.windowed()
        uniform = len(set(windowed)) == 1  # then a constant, not a per-layer input

        def layer(x, xs):
            params, kv, windowed_i = xs
            return nnx.merge(graphdef, params)(x, (tables, local_tables), windowed[0] if uniform else windowed_i,
                                               None if kv is None else (*kv, cache.index, *masks), segment_ids)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        xs = (stacked, None if cache is None else (cache.k, cache.v), None if uniform else jnp.asarray(windowed))
        if cfg.scan_layers:
            x, kv = jax.lax.scan(layer, x, xs)
        else:
            kvs = []
            for i in range(cfg.layers):
                x, kv_i = layer(x, jax.tree.map(lambda a: a[i], xs[:2]) + (windowed[i],))
                kvs.append(kv_i)
            kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
        if cache is not None:
            cache = cache._replace(k=kv[0], v=kv[1], index=cache.index + tokens.shape[1])
        return rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_offset), cache

    def head_weight(self) -> jax.Array:
        """[hidden, vocab] output projection (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None,
                 segment_ids: jax.Array | None = None):
        """Logits [batch, seq, vocab] in float32; with a `cache`, (logits, the updated cache)."""
        x, new_cache = self.hidden_states(tokens, positions, cache, segment_ids)
        logits = cross_entropy.logits(x, self.head_weight(), self.cfg.final_softcap)
        return logits if cache is None else (logits, new_cache)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params + 12 x layers x heads*head_dim x keys,
    the project's MFU numerator (6N + 12 x layers x hidden x seq where heads*head_dim = hidden
    and every layer attends to all seq keys, as in the PaLM paper's convention, which counts the
    whole score matrix, not its causal half). `keys` is the mean over layers of the keys a query
    is scored against: seq for a full-attention layer, min(sliding_window, seq) for a windowed one
    (Gemma 3: 5 windowed layers to 1 full), so the second term is 12 x heads*head_dim x the sum of
    the layers' keys."""
    keys = sum(min(cfg.sliding_window, seq_len) if w else seq_len for w in cfg.windowed())
    return 6.0 * cfg.non_embedding_params() + 12.0 * cfg.heads * cfg.head_dim * keys

