"""Rotary position embeddings (RoPE) and their extensions to longer contexts, as transformers
defines them (`modeling_rope_utils.py`, one function per `rope_type`): a model imported with its
own scaling computes what transformers computes, and exports back unchanged.

A scaling is HF's `rope_scaling` dict, which ModelConfig holds as sorted (key, value) pairs (the
config is static under jit, so hashable). `rope_type`:

    default   theta ** (-2i / head_dim). A raised theta is Llama 2 Long's "adjusted base frequency";
              the static NTK-aware scaling (no transformers type) is theta * factor ** (d / (d - 2)).
    linear    position interpolation: every frequency divided by `factor`.
    dynamic   NTK-aware, from the batch's length L (its largest position + 1, a traced value: one
              compiled program for every L): past `original_max_position_embeddings` (transformers
              reads it from max_position_embeddings) theta becomes
              theta * (factor * L / original - factor + 1) ** (d / (d - 2)).
    yarn      frequencies divided by `factor` below a ramp between `beta_slow` and `beta_fast`
              rotations over the original context, kept above it; cos and sin multiplied by
              `attention_factor` (default 0.1 ln(factor) + 1: YaRN's attention temperature).
    llama3    Llama 3.1's: long wavelengths divided by `factor`, short ones kept, a band between.
    longrope  frequencies divided per dimension by `long_factor` once L passes the original
              context, by `short_factor` within it; cos and sin times an attention factor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# rope_type -> (its required keys, its optional ones), beside rope_type itself: transformers'.
TYPES = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "longrope": (("factor", "short_factor", "long_factor", "original_max_position_embeddings"), ("attention_factor",)),
}
LENGTH_DEPENDENT = ("dynamic", "longrope")  # their frequencies depend on the batch's length


def canonical(scaling: dict | tuple) -> tuple:
    """A scaling (dict or pairs) as ModelConfig holds it: sorted pairs, lists (longrope's factors,
    after a JSON round trip) as tuples, since the config is hashed under jit; rope_type "default" alone as ()."""
    s = {str(k): tuple(v) if isinstance(v, list) else v for k, v in dict(scaling).items()}
    return () if s == {"rope_type": "default"} else tuple(sorted(s.items()))


def check(scaling: dict, head_dim: int | None) -> None:
    """A ValueError saying why, where `scaling` is not a rope_type of TYPES with its keys
    (`head_dim`, where known, checks longrope's per-dimension factors)."""
    if not scaling:
        return
    kind = scaling.get("rope_type")
    if kind not in TYPES:
        raise ValueError(f"rope_type {kind!r} is not one of {', '.join(TYPES)}")
    required, optional = TYPES[kind]
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {', '.join(missing)}")
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not a key of rope_type {kind!r} (its keys: "
                         f"{', '.join((*required, *optional)) or 'none'})")
    if "factor" in required and not (isinstance(scaling["factor"], (int, float)) and scaling["factor"] > 0):
        raise ValueError(f"factor={scaling['factor']!r} must be a number > 0")
    for key in ("short_factor", "long_factor"):
        if key in scaling and head_dim and len(scaling[key]) != head_dim // 2:
            raise ValueError(f"{key} has {len(scaling[key])} values, not one per frequency (head_dim // 2 = "
                             f"{head_dim // 2})")


def override(theta: float, scaling: tuple, parameters: dict, head_dim: int | None) -> tuple[float, tuple]:
    """(theta, scaling) with transformers' `rope_parameters` applied over them: its rope_theta
    replaces theta; its rope_type, with that type's keys, replaces the scaling ("default": none).
    Errors name model.rope_parameters."""
    rest = dict(parameters)
    theta = rest.pop("rope_theta", theta)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"model.rope_parameters={parameters}: rope_theta={theta!r} must be a number > 0")
    if not rest:
        return float(theta), scaling
    if "rope_type" not in rest:  # which scaling would the keys amend?
        raise ValueError(f"model.rope_parameters={parameters}: {', '.join(sorted(rest))} without a rope_type")
    try:
        check(rest, head_dim)
    except ValueError as e:
        raise ValueError(f"model.rope_parameters={parameters}: {e}") from None
    return float(theta), canonical(rest)


def attention_factor(scaling: tuple) -> float:
    """What transformers multiplies cos and sin by (its `attention_scaling`): so q.k by its square."""
    s = dict(scaling)
    kind, factor = s.get("rope_type"), s.get("factor")
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    if kind == "yarn":
        mscale = lambda m: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0  # noqa: E731
        if s.get("mscale") and s.get("mscale_all_dim"):  # DeepSeek's form
            return mscale(s["mscale"]) / mscale(s["mscale_all_dim"])
        return mscale(1)
    if kind == "longrope":
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(s["original_max_position_embeddings"]))
    return 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = (), length: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies [head_dim // 2] in float32, in transformers' order of operations;
    `length` (the batch's largest position + 1) for the LENGTH_DEPENDENT types."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / theta ** exponents
    s = dict(scaling)
    kind = s.get("rope_type", "default")
    original = s.get("original_max_position_embeddings")
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "dynamic":  # within the original context transformers keeps the unscaled frequencies
        factor = s["factor"]
        base = theta * (factor * length.astype(jnp.float32) / original - (factor - 1)) ** (head_dim / (head_dim - 2))
        return jnp.where(length > original, 1.0 / base ** exponents, inv_freq)
    if kind == "yarn":
        return _yarn(s, head_dim, theta, exponents)
    if kind == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return jnp.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    if kind == "longrope":
        factors = jnp.where(length > original, jnp.asarray(s["long_factor"], jnp.float32),
                            jnp.asarray(s["short_factor"], jnp.float32))
        return 1.0 / (factors * theta ** exponents)
    return inv_freq


def _yarn(s: dict, head_dim: int, theta: float, exponents: jax.Array) -> jax.Array:
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def dimension(rotations: float) -> float:  # whose wavelength turns `rotations` times in the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    # transformers' `or`: a beta of 0 (or None) is the paper's default
    low, high = dimension(s.get("beta_fast") or 32), dimension(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp  # the share of each frequency extrapolated (left as it is), the rest interpolated
    pos_freqs = theta ** exponents
    return 1.0 / (factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scaling: tuple = ()) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [batch, seq, head_dim // 2] for the half-rotation (HF LLaMA) layout, times
    the scaling's attention factor as transformers applies it."""
    kind = dict(scaling).get("rope_type")
    length = jnp.max(positions) + 1 if kind in LENGTH_DEPENDENT else None  # transformers': over the whole batch
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta, scaling, length)
    factor = attention_factor(scaling)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; rotates the two halves of head_dim (HF convention)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
