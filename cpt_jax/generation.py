"""Text generation with a KV cache: one jitted prefill, then one jitted token at a time.

    model, tokenizer = cpt_jax.load("/tmp/smollm2")
    cpt_jax.generate(model, tokenizer, "The capital of France is", max_new_tokens=8)

Prompts of different lengths are left-padded into one batch (the cache masks the padding), and
their lengths are rounded up to a multiple of `PROMPT_BUCKET`, so a notebook that changes its
prompt does not recompile for every new length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.data.tokenizer import TokenizerLike
from cpt_jax.models.llama import KVCache, Llama

PROMPT_BUCKET = 32


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]: argmax at temperature 0, else a draw from
    the temperature-scaled distribution restricted to the `top_k` most likely (0: all), then to
    the nucleus of `top_p` (1: all), in transformers' order."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1:
        logits = nucleus(logits, top_p)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Logits [batch, vocab] outside the nucleus set to -inf: the most likely tokens whose
    probabilities reach `top_p`, each kept while the mass of those more likely is below it (so
    the most likely always stays)."""
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, tokens, start, key, stop_ids, *, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache = KVCache.empty(model.cfg, start, prompt_len + max_new_tokens)
    logits, cache = model(tokens, cache=cache)
    key, sub = jax.random.split(key)
    first = sample(logits[:, -1], sub, temperature, top_k, top_p)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, key, done = carry
        logits, cache = model(jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1), cache=cache)
        key, sub = jax.random.split(key)
        token = jnp.where(done, -1, sample(logits[:, -1], sub, temperature, top_k, top_p))
        return i + 1, out.at[:, i].set(token), cache, key, done | jnp.isin(token, stop_ids)

    _, out, _, _, _ = jax.lax.while_loop(cond, body, (1, out, cache, key, jnp.isin(first, stop_ids)))
    return out


def generate_ids(model: Llama, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = ()
                 ) -> list[list[int]]:
    """New token ids for each prompt (token ids), stopping after any of `stop_ids` (kept) or
    `max_new_tokens`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1, temperature={temperature} and "
                         f"top_k={top_k} >= 0, top_p={top_p} in (0, 1]")
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, p in zip(tokens, prompts):
        row[width - len(p):] = p
    start = np.array([width - len(p) for p in prompts], np.int32)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(start), jax.random.key(seed),
                    jnp.asarray(sorted(set(stop_ids)), jnp.int32).reshape(-1), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return [[int(t) for t in row if t >= 0] for row in np.asarray(out)]


def stop_tokens(model: Llama, tokenizer: TokenizerLike) -> list[int]:
    """Where generation stops by default: the tokenizer's EOS and the end of the documents the
    model was trained on (`model.document_end`, where they differ: an Instruct model's EOS ends
    chat turns, while a run may have ended its documents with the base model's <|endoftext|>)."""
    return sorted({t for t in (tokenizer.eos_id, model.document_end) if t is not None})


def generate(model: Llama, tokenizer: TokenizerLike, prompt: str | list[str], max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             add_bos: bool | None = None) -> str | list[str]:
    """The continuation of `prompt` (or of each of a list of prompts), without the prompt.

    Greedy at temperature 0; else sampled at `temperature` from the `top_k` most likely tokens
    (0: all) and the nucleus of `top_p` (1: all). Stops at the tokenizer's EOS or the run's
    document end (`stop_tokens`). `add_bos=None` prepends BOS where the tokenizer's own config asks
    for it (Llama 2), not for tokenizers trained here."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    bos = getattr(tokenizer, "add_bos", False) if add_bos is None else add_bos
    if bos and tokenizer.bos_id is None:
        raise ValueError("add_bos=True, but the tokenizer has no BOS token")
    ids = [([tokenizer.bos_id] if bos else []) + tokenizer.encode(p) for p in prompts]
    stops = stop_tokens(model, tokenizer)
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stops)
    texts = [tokenizer.decode(row[:-1] if row and row[-1] in stops else row) for row in new]
    return texts[0] if isinstance(prompt, str) else texts
