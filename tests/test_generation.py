"""Generation with the KV cache against a naive reference: argmax of a full forward pass over the
whole sequence, repeated for every new token; nucleus (top-p) sampling against a naive numpy
reference and transformers' warpers; where `generate` stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import cpt_jax
from cpt_jax import convert, models
from cpt_jax.data.tokenizer import ByteTokenizer
from cpt_jax.generation import PROMPT_BUCKET, generate_ids, nucleus, sample

VOCAB = 97


def random_model(**overrides) -> models.Llama:
    # A large init scale makes logits decisive, so argmax does not hinge on rounding.
    cfg = models.model_config("test", VOCAB, init_std=0.5, **overrides)
    return models.Llama(cfg, nnx.Rngs(0))


@nnx.jit
def full_forward(model, tokens):
    return model(tokens)


def naive_greedy(model, prompt: list[int], n: int, width: int = 64) -> list[int]:
    """Causal attention: the logits at position p ignore what follows, so one fixed-width buffer
    (one compile) serves every step."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(prompt)] = prompt
    for p in range(len(prompt), len(prompt) + n):
        tokens[0, p] = int(jnp.argmax(full_forward(model, jnp.asarray(tokens))[0, p - 1]))
    return tokens[0, len(prompt):len(prompt) + n].tolist()


@pytest.mark.parametrize(("scan_layers", "window"), [(True, 0), (False, 0), (True, 6)])
def test_cached_greedy_equals_repeated_full_forward(scan_layers, window):
    """window: a sliding-window model, whose prompts and outputs are longer than its window."""
    model = random_model(scan_layers=scan_layers, sliding_window=window)
    rng = np.random.default_rng(0)
    # Different lengths in one batch (left padding), one past a prompt bucket.
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, PROMPT_BUCKET + 5, 11)]
    got = generate_ids(model, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, got):
        assert out == naive_greedy(model, prompt, 12)
    assert generate_ids(model, prompts[:1], max_new_tokens=12) == got[:1]  # batch-independent


# Small models of each family's differences (a global layer among windowed ones, own thetas, caps).
FAMILIES = {
    "gemma3": dict(norms="sandwich", norm_offset=1.0, activation="gelu_tanh", embed_scale=True, qk_norm="head",
                   sliding_window=6, full_attention_layers=(1,), local_rope_theta=100.0, query_pre_attn_scalar=24.0,
                   tie_embeddings=True),
    "gemma2": dict(norms="sandwich", norm_offset=1.0, activation="gelu_tanh", embed_scale=True, sliding_window=6,
                   full_attention_layers=(1,), attn_softcap=3.0, final_softcap=5.0),
    "olmo2": dict(norms="post", qk_norm="proj"),
}


@pytest.mark.parametrize(("family", "scan_layers"), [("gemma3", True), ("gemma3", False), ("gemma2", True),
                                                     ("olmo2", True)])
def test_each_family_decodes_as_repeated_full_forward(family, scan_layers):
    model = random_model(scan_layers=scan_layers, **FAMILIES[family])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (3, 11)]  # past the window of 6
    got = generate_ids(model, prompts, max_new_tokens=10)
    for prompt, out in zip(prompts, got):
        assert out == naive_greedy(model, prompt, 10)


def test_cache_logits_equal_full_forward_logits():
    model = random_model(qkv_bias=True, tie_embeddings=True)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)))
    full = full_forward(model, tokens)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    cache = models.llama.KVCache.empty(model.cfg, jnp.zeros(2, jnp.int32), 16)
    first, cache = step(model, tokens[:, :5], cache)
    rest, cache = step(model, tokens[:, 5:], cache)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 9


def test_eos_stops_and_sampling_is_seeded():
    model = random_model()
    prompt = [[5, 6, 7, 8]]
    greedy = generate_ids(model, prompt, max_new_tokens=10)[0]
    eos = greedy[3]
    stopped = generate_ids(model, prompt, max_new_tokens=10, stop_ids=[eos])[0]
    assert stopped == greedy[:greedy.index(eos) + 1]
    assert generate_ids(model, prompt, 10, temperature=1.0, top_k=1)[0] == greedy
    a = generate_ids(model, prompt * 4, 10, temperature=1.0, seed=3)
    assert a == generate_ids(model, prompt * 4, 10, temperature=1.0, seed=3)
    assert a != generate_ids(model, prompt * 4, 10, temperature=1.0, seed=4)


def test_bad_arguments_are_named():
    model = random_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_ids(model, [[1]], 0)
    with pytest.raises(ValueError, match=r"top_p=0 in \(0, 1\]"):
        generate_ids(model, [[1]], 4, temperature=1.0, top_p=0)


# Fixed logits: rows of several spreads (flat to peaked), 50 tokens, no ties.
LOGITS = np.random.default_rng(0).normal(0.0, 1.0, (4, 50)).astype(np.float32) * np.array([[0.5], [1], [2], [4]],
                                                                                           np.float32)


def naive_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The definition: per row, the most likely tokens taken one by one until their probability
    reaches top_p; the rest -inf."""
    out = np.full_like(logits, -np.inf)
    for r, row in enumerate(logits.astype(np.float64)):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        total = 0.0
        for i in np.argsort(-row):
            out[r, i] = logits[r, i]
            total += probs[i]
            if total >= top_p:
                break
    return out


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_equals_a_naive_reference_and_transformers(top_p):
    want = naive_nucleus(LOGITS, top_p)
    got = np.asarray(nucleus(jnp.asarray(LOGITS), top_p))
    np.testing.assert_array_equal(got, want)
    hf = TopPLogitsWarper(top_p)(None, torch.tensor(LOGITS)).numpy()
    np.testing.assert_array_equal(got, hf)
    kept = np.isfinite(got).sum(axis=1)
    if top_p >= 0.5:  # a real cut: more than one token kept somewhere, fewer than all everywhere
        assert kept.max() > 1 and kept.max() < LOGITS.shape[1], kept


def test_sampling_draws_from_transformers_filtered_distribution():
    """temperature, top_k, then top_p (transformers' order): 20,000 draws of one row land only on
    the tokens transformers' warpers keep, at their renormalised probabilities."""
    row, n = LOGITS[2], 20_000
    scores = torch.tensor(row[None])
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.8)):
        scores = warper(None, scores)
    want = torch.softmax(scores, dim=-1).numpy()[0]
    assert 1 < (want > 0).sum() < 8  # top_p cuts inside top_k
    draws = np.asarray(jax.jit(sample, static_argnums=(2, 3, 4))(
        jnp.tile(jnp.asarray(row), (n, 1)), jax.random.key(0), 0.7, 8, 0.8))
    freq = np.bincount(draws, minlength=row.size) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_generate_stops_at_the_tokenizer_eos_and_at_the_runs_document_end(tmp_path):
    """The run's document end comes with its checkpoint (meta.framing, which cpt_jax.load reads);
    a stop token is not part of the text."""
    tok = ByteTokenizer()
    model = models.Llama(models.model_config("test", tok.vocab_size, init_std=0.5), nnx.Rngs(0))
    prompt = "In the beginning"
    greedy = generate_ids(model, [tok.encode(prompt)], max_new_tokens=12)[0]
    assert cpt_jax.generate(model, tok, prompt, max_new_tokens=12) == tok.decode(greedy)  # no stop on the way
    # A byte the continuation reaches after others, standing for the stop.
    end = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i] and t >= tok.OFFSET)
    cut = greedy.index(end)

    class EndsThere(ByteTokenizer):
        eos_id = end

    assert cpt_jax.generate(model, EndsThere(), prompt, max_new_tokens=12) == tok.decode(greedy[:cut])
    convert.save_model(tmp_path / "m", model.cfg, models.params_of(model), tok,
                       framing={"bos_id": None, "eos_id": end, "packing": "concat"})
    loaded, loaded_tok = cpt_jax.load(str(tmp_path / "m"))
    assert (loaded.document_end, loaded_tok.eos_id) == (end, tok.eos_id)
    assert cpt_jax.generate(loaded, loaded_tok, prompt, max_new_tokens=12) == tok.decode(greedy[:cut])
