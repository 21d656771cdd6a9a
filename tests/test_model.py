"""Tests for cpt_jax.models: the LLaMA decoder against an independent float64 numpy reference,
RoPE against explicit rotation matrices, causality, remat equivalence, parameter counts and
config validation. Everything runs on CPU with tiny shapes."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax import checks
from cpt_jax.errors import ConfigError
from cpt_jax.models import SIZES, ModelConfig, flops_per_token, init_params, model_config, spec
from cpt_jax.models.rope import apply_rope, rope_tables
from helpers import small_config

VOCAB = 97  # odd and not a multiple of anything in the 'test' size
BATCH, SEQ = 2, 9

# ---------------------------------------------------------------- helpers


# Compile options for the few big programs (gradients, parameter init): XLA's CPU backend spends
# most of a test's time optimising code that then runs once on tiny shapes. Level 0 halves the
# compile time; it changes no semantics (rematerialisation is decided before XLA sees the program).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@functools.cache
def real_init(cfg: ModelConfig, seed: int = 0) -> dict:
    """init_params(cfg, key) for real, jitted as the trainer runs it (cached per config)."""
    key = jax.random.key(seed)
    return fast_jit(lambda k: init_params(cfg, k), key)(key)


@functools.cache
def logits_fn(cfg: ModelConfig):
    """A jitted (params, tokens, positions) -> logits for `cfg`, used the way the trainer does
    (cached per config so each config compiles once)."""
    graphdef = spec(cfg).graphdef

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def f(params, tokens, positions=None):
        return nnx.merge(graphdef, params)(tokens, positions)

    return f


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """A param dict with the structure of init_params but values scaled so every part of the model
    matters: O(1) activations, peaked attention, non-unit norm weights, nonzero biases. With the
    default init (std 0.02, unit norms, zero biases) attention is near uniform and many mistakes
    would hide under the tolerance."""
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden, cfg.intermediate
    template = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    std = {
        "embed": 1.0, "lm_head": 1.0 / math.sqrt(d),
        "q": 2.0 / math.sqrt(d), "k": 2.0 / math.sqrt(d), "v": 1.0 / math.sqrt(d),
        "o": 1.0 / math.sqrt(cfg.heads * cfg.head_dim),
        "gate": 1.0 / math.sqrt(d), "up": 1.0 / math.sqrt(d), "down": 1.0 / math.sqrt(f),
        "q_bias": 0.5, "k_bias": 0.5, "v_bias": 0.5,
    }

    def make(path, leaf):
        name = path[-1].key
        if name.endswith("norm"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = std[name] * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(make, template)


def tokens_for(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def rope_matrix(pos: float, head_dim: int, theta: float) -> np.ndarray:
    """[head_dim, head_dim] float64 rotation: dims i and i + head_dim/2 rotate by pos * theta^(-2i/head_dim)."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim))
    for i in range(half):
        a = pos * theta ** (-2.0 * i / head_dim)
        c, s = math.cos(a), math.sin(a)
        r[i, i], r[i, i + half] = c, -s
        r[i + half, i], r[i + half, i + half] = s, c
    return r


def np_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def reference_logits(cfg: ModelConfig, params: dict, tokens, positions=None, *, theta=None,
                     kv_head_of=None, drop_bias=False) -> np.ndarray:
    """Naive float64 forward pass of the whole decoder from the param dict. The keyword arguments
    deliberately break one thing (rope theta, the GQA head mapping, the biases) so tests can show
    the comparison is sensitive to it."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    lp = p["layers"]
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    positions = np.asarray(positions)
    theta = cfg.rope_theta if theta is None else theta
    H, K, hd = cfg.heads, cfg.kv_heads, cfg.head_dim
    group = H // K
    kv_head_of = kv_head_of or (lambda h: h // group)
    kv_index = [kv_head_of(h) for h in range(H)]
    rot = np.array([[rope_matrix(positions[i, j], hd, theta) for j in range(t)] for i in range(b)])  # [b,t,hd,hd]
    causal = np.tril(np.ones((t, t), bool))

    x = p["embed"][tokens]  # [b, t, d]
    for i in range(cfg.layers):
        y = np_rms_norm(x, lp["attn_norm"][i], cfg.norm_eps)
        q = np.einsum("btd,dhk->bthk", y, lp["q"][i])
        k = np.einsum("btd,dhk->bthk", y, lp["k"][i])
        v = np.einsum("btd,dhk->bthk", y, lp["v"][i])
        if cfg.qkv_bias and not drop_bias:
            q, k, v = q + lp["q_bias"][i], k + lp["k_bias"][i], v + lp["v_bias"][i]
        q = np.einsum("btij,bthj->bthi", rot, q)
        k = np.einsum("btij,bthj->bthi", rot, k)
        k, v = k[:, :, kv_index], v[:, :, kv_index]  # repeat kv heads -> [b, t, H, hd]
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("bhqs,bshk->bqhk", probs, v)
        x = x + np.einsum("bqhk,hkd->bqd", attn, lp["o"][i])

        y = np_rms_norm(x, lp["mlp_norm"][i], cfg.norm_eps)
        g = y @ lp["gate"][i]
        x = x + (g / (1.0 + np.exp(-g)) * (y @ lp["up"][i])) @ lp["down"][i]
    x = np_rms_norm(x, p["final_norm"], cfg.norm_eps)
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def assert_close_to_reference(cfg, params, tokens, positions=None):
    got = np.asarray(logits_fn(cfg)(params, jnp.asarray(tokens), positions))
    want = reference_logits(cfg, params, tokens, positions)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return got


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_dtype_and_float32_params(dtype):
    cfg = model_config("test", VOCAB, dtype=dtype)
    params = real_init(model_config("test", VOCAB))
    leaves = jax.tree.leaves(params)
    assert leaves and all(a.dtype == jnp.float32 for a in leaves)
    # Parameters stay float32 whatever the compute dtype (dtypes are fixed when tracing init,
    # so the abstract evaluation of init_params under this config shows them exactly).
    for abstract in (jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), spec(cfg).abstract_params):
        assert jax.tree.structure(abstract) == jax.tree.structure(params)
        for a, p in zip(jax.tree.leaves(abstract), leaves):
            assert a.shape == p.shape and a.dtype == jnp.float32
    logits = logits_fn(cfg)(params, jnp.asarray(tokens_for(0, 3, 5)))
    assert logits.shape == (3, 5, VOCAB) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_spec_axes_name_every_dimension():
    cfg = model_config("test", VOCAB, qkv_bias=True)
    s = spec(cfg)
    shapes = jax.tree.leaves(s.abstract_params)
    axes = jax.tree.leaves(s.axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(shapes) == len(axes)
    for sd, ax in zip(shapes, axes):
        assert len(ax) == len(sd.shape)
    for name, ax in s.axes["layers"].items():
        assert ax[0] == "layers" and s.abstract_params["layers"][name].shape[0] == cfg.layers, name


def test_bfloat16_compute_close_to_float32():
    cfg32 = model_config("test", VOCAB)
    cfg16 = model_config("test", VOCAB, dtype="bfloat16")
    params = random_params(cfg32, seed=1)
    tokens = jnp.asarray(tokens_for(1))
    l32 = np.asarray(logits_fn(cfg32)(params, tokens))
    l16 = np.asarray(logits_fn(cfg16)(params, tokens))
    assert l16.dtype == np.float32
    scale = float(np.max(np.abs(l32)))
    err = max_diff(l16, l32)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2%); after two layers of matmuls the
    # logits should agree to a few percent of their largest magnitude.  Tolerance: 5% of max|logit|.
    assert err < 0.05 * scale, (err, scale)
    # ...and the compute dtype is really used (bf16 rounding is far above float32 noise).
    assert err > 1e-4 * scale, (err, scale)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False, "qkv_bias": True}])
def test_causal(overrides):
    cfg = model_config("test", VOCAB, **overrides)
    params = random_params(cfg, seed=2)
    f = logits_fn(cfg)
    tokens = tokens_for(2)
    cut = 4
    changed = tokens.copy()
    changed[:, cut + 1:] = (changed[:, cut + 1:] + 1 + np.arange(SEQ - cut - 1)) % VOCAB
    a = np.asarray(f(params, jnp.asarray(tokens)))
    b = np.asarray(f(params, jnp.asarray(changed)))
    np.testing.assert_allclose(b[:, :cut + 1], a[:, :cut + 1], rtol=0, atol=1e-6)
    per_position = np.abs(b - a)[:, cut + 1:].max(axis=(0, 2))
    assert np.all(per_position > 1e-3), per_position


# ---------------------------------------------------------------- against the numpy reference


def test_reference_gqa_test_size():
    cfg = model_config("test", VOCAB)
    assert cfg.kv_heads < cfg.heads  # grouped-query attention is exercised
    params = random_params(cfg, seed=3)
    tokens = tokens_for(3)
    got = assert_close_to_reference(cfg, params, tokens)
    # The comparison can tell the right GQA mapping (h // group) from an interleaved one (h % K).
    wrong = reference_logits(cfg, params, tokens, kv_head_of=lambda h: h % cfg.kv_heads)
    assert max_diff(got, wrong) > 1e-2


def test_reference_default_init_params():
    cfg = model_config("test", VOCAB)
    params = real_init(cfg)
    assert_close_to_reference(cfg, params, tokens_for(4))


def test_reference_qkv_bias():
    cfg = model_config("test", VOCAB, qkv_bias=True)
    params = real_init(cfg)
    for name in ("q_bias", "k_bias", "v_bias"):  # init gives zero biases: the test would be vacuous
        assert not np.any(np.asarray(params["layers"][name]))
    params = random_params(cfg, seed=5)
    for name in ("q_bias", "k_bias", "v_bias"):
        assert np.all(np.abs(np.asarray(params["layers"][name])).max() > 0.1)
    tokens = tokens_for(5)
    got = assert_close_to_reference(cfg, params, tokens)
    assert max_diff(got, reference_logits(cfg, params, tokens, drop_bias=True)) > 1e-2


def test_reference_tied_embeddings():
    cfg = model_config("test", VOCAB, tie_embeddings=True)
    params = random_params(cfg, seed=6)
    assert "lm_head" not in params
    assert_close_to_reference(cfg, params, tokens_for(6))


def test_reference_rope_theta():
    cfg = model_config("test", VOCAB, rope_theta=500.0)
    params = random_params(cfg, seed=7)
    tokens = tokens_for(7)
    got = assert_close_to_reference(cfg, params, tokens)
    assert max_diff(got, reference_logits(cfg, params, tokens, theta=10000.0)) > 1e-2


def test_reference_norm_eps_and_head_dim_override():
    # A large eps is visible in the output; head_dim set explicitly so heads*head_dim != hidden.
    cfg = ModelConfig(vocab_size=VOCAB, hidden=48, intermediate=80, layers=2, heads=6, kv_heads=2,
                      head_dim=12, norm_eps=0.5)
    params = random_params(cfg, seed=8)
    assert params["layers"]["q"].shape == (2, 48, 6, 12) and params["layers"]["o"].shape == (2, 6, 12, 48)
    assert_close_to_reference(cfg, params, tokens_for(8))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_reference_scan_and_unrolled(scan_layers):
    cfg = model_config("test", VOCAB, scan_layers=scan_layers, qkv_bias=True)
    params = random_params(cfg, seed=9)
    assert_close_to_reference(cfg, params, tokens_for(9))


def test_reference_explicit_positions_and_shift_invariance():
    cfg = model_config("test", VOCAB)
    params = random_params(cfg, seed=10)
    tokens = tokens_for(10)
    positions = np.stack([np.arange(SEQ) + 3, np.arange(SEQ) * 2 + 1]).astype(np.int32)
    assert_close_to_reference(cfg, params, tokens, jnp.asarray(positions))
    # RoPE is relative: shifting every position by the same amount leaves logits unchanged.
    f = logits_fn(cfg)
    base = np.asarray(f(params, jnp.asarray(tokens)))
    shifted = np.asarray(f(params, jnp.asarray(tokens), jnp.asarray(np.arange(SEQ)[None].repeat(BATCH, 0) + 17)))
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- RoPE alone


@pytest.mark.parametrize("theta", [10000.0, 123.0])
def test_rope_matches_rotation_matrices(theta):
    rng = np.random.default_rng(11)
    b, t, h, hd = 2, 6, 3, 8
    x = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 3, 40, 0, 11, 2]], np.int32)
    cos, sin = rope_tables(jnp.asarray(positions), hd, theta)
    assert cos.shape == sin.shape == (b, t, hd // 2)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.zeros((b, t, h, hd))
    for i in range(b):
        for j in range(t):
            r = rope_matrix(positions[i, j], hd, theta)
            for k in range(h):
                want[i, j, k] = r @ x[i, j, k].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Position 0 is the identity; rotations preserve norms.
    np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # The dtype is kept.
    assert apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin).dtype == jnp.bfloat16


def test_rope_scores_depend_only_on_relative_offset():
    rng = np.random.default_rng(12)
    hd = 16
    q = jnp.asarray(rng.standard_normal((1, 1, 1, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, hd)), jnp.float32)

    def score(m, n):
        cq, sq = rope_tables(jnp.array([[m]]), hd, 10000.0)
        ck, sk = rope_tables(jnp.array([[n]]), hd, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    for m, n in [(5, 2), (3, 3), (1, 9)]:
        ref = score(m, n)
        for shift in (1, 7, 30):
            assert score(m + shift, n + shift) == pytest.approx(ref, abs=1e-4)
    # ...and does depend on the offset.
    assert abs(score(5, 2) - score(5, 3)) > 1e-2
    assert abs(score(0, 4) - score(4, 0)) > 1e-3  # the sign of the offset matters too


# ---------------------------------------------------------------- remat


@functools.cache
def loss_and_grads(remat: str, scan_layers: bool):
    cfg = model_config("test", VOCAB, remat=remat, scan_layers=scan_layers)
    params = random_params(cfg, seed=13)
    tokens = jnp.asarray(tokens_for(13))
    weights = jnp.asarray(np.random.default_rng(13).standard_normal((BATCH, SEQ, VOCAB)), jnp.float32)
    graphdef = spec(cfg).graphdef

    def loss(p):  # a weighted mean of the logits, so every parameter gets a nontrivial gradient
        return jnp.mean(nnx.merge(graphdef, p)(tokens) * weights)

    return fast_jit(jax.value_and_grad(loss), params)(params)


# Each policy is checked once, full with the scanned layers (the usual large-model setting) and dots
# with the unrolled loop (the prevent_cse path); every extra gradient program costs seconds of compile.
@pytest.mark.parametrize(("remat", "scan_layers"), [("full", True), ("dots", False)])
def test_remat_same_loss_and_grads(remat, scan_layers):
    base_loss, base_grads = loss_and_grads("none", scan_layers)
    loss, grads = loss_and_grads(remat, scan_layers)
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(base_grads)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), g0 in zip(flat, jax.tree.leaves(base_grads)):
        assert float(jnp.max(jnp.abs(g0))) > 1e-6, path  # no dead parameter
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-5, atol=1e-5, err_msg=str(path))


def test_unrolled_and_scanned_grads_agree():
    (l0, g0), (l1, g1) = loss_and_grads("none", True), loss_and_grads("none", False)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- parameter counts


def _leaf_count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize(("size", "overrides", "real"), [
    ("test", {}, True), ("tiny", {}, True), ("test", {"qkv_bias": True}, True),
    ("test", {"tie_embeddings": True}, False), ("tiny", {"qkv_bias": True, "tie_embeddings": True}, False),
    ("test", {"qk_norm": "head", "head_dim": 32}, False), ("test", {"norms": "sandwich", "qk_norm": "head"}, False),
    ("test", {"norms": "post", "qk_norm": "proj"}, False),
])
def test_param_count_matches_params(size, overrides, real):
    cfg = model_config(size, VOCAB, **overrides)
    params = real_init(cfg) if real else jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert cfg.param_count() == _leaf_count(params)
    embedding = VOCAB * cfg.hidden
    # non_embedding_params counts the output head even when it is the tied embedding.
    assert cfg.non_embedding_params() == _leaf_count(params) - embedding + (embedding if cfg.tie_embeddings else 0)


def test_metadata_written_before_the_families_reads_as_llama():
    """A checkpoint's model metadata from before the family fields (qk_norm a flag, no norms)."""
    old = {k: v for k, v in dataclasses.asdict(model_config("test", VOCAB)).items()
           if k not in ("norms", "norm_offset", "activation", "embed_scale", "full_attention_layers")}
    cfg = ModelConfig.from_dict({**old, "qk_norm": False})
    assert (cfg.qk_norm, cfg.norms, cfg.norm_offset, cfg.activation) == ("", "pre", 0.0, "silu")
    assert ModelConfig.architecture_of({**old, "qk_norm": True})["qk_norm"] == "head"
    assert ModelConfig.architecture_of(old) == model_config("test", VOCAB).architecture()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("norms", "middle", "model norms='middle' is not one of"), ("qk_norm", "all", "model qk_norm='all' is not one of"),
    ("activation", "relu", "model activation='relu' is not one of"),
    ("full_attention_layers", (2,), r"model full_attention_layers=\(2,\) names layers outside 0..1"),
])
def test_bad_family_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        model_config("test", VOCAB, **{field: value})
    with pytest.raises(ValueError, match="model.attention='cudnn' has no attention soft-capping"):
        model_config("test", VOCAB, attention="cudnn", attn_softcap=50.0)


@pytest.mark.parametrize("size", ["49m", "1393m", "5534m"])
def test_param_count_matches_abstract_params_of_paper_sizes(size):
    cfg = model_config(size)
    abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert cfg.param_count() == _leaf_count(abstract)
    assert _leaf_count(spec(cfg).abstract_params) == cfg.param_count()


def test_paper_rows():
    rows = {name: s for name, s in SIZES.items() if s.paper_m is not None}
    assert len(rows) == 42
    assert len({s.paper_m for s in rows.values()}) == 42
    for name, s in rows.items():
        assert name == f"{s.paper_m}m"
        d, L, f, V = s.hidden, s.layers, s.intermediate, 32000
        # The paper's column is 16 L d^2 + 32000 d (in millions, rounded down).
        assert abs(16 * L * d * d + V * d - s.paper_m * 1e6) < 1.5e6, name
        cfg = model_config(name, V, tie_embeddings=False)
        assert cfg.heads * cfg.head_dim == d and cfg.kv_heads == cfg.heads, name
        # Hand count: full multi-head attention (4 d^2), SwiGLU (3 d f), two norms per layer,
        # final norm, untied embedding and head.
        true = L * (4 * d * d + 3 * d * f + 2 * d) + d + 2 * V * d
        assert cfg.param_count() == true, name
        # The FFN is wider than 8d/3 and the head is counted: the true count is larger than the
        # paper's figure, but by well under 2x.
        assert 1.2 * s.paper_m * 1e6 < true < 1.7 * s.paper_m * 1e6, (name, true)


# ---------------------------------------------------------------- config validation


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        ModelConfig(vocab_size=10, hidden=64, intermediate=128, layers=1, heads=6, kv_heads=4)


def test_unknown_remat():
    with pytest.raises(ValueError, match="remat"):
        model_config("test", VOCAB, remat="everything")


def test_unknown_size():
    with pytest.raises(ValueError, match="size"):
        model_config("7b", VOCAB)


def test_odd_head_dim_and_unknown_attention():
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(vocab_size=10, hidden=60, intermediate=128, layers=1, heads=4, kv_heads=4)
    with pytest.raises(ValueError, match="attention"):
        model_config("test", VOCAB, attention="flash")


def test_float16_compute_is_refused_naming_the_field():
    """float16 has no loss scaling here: refused with one error naming model.dtype (the trainer
    makes it a ConfigError); the supported compute dtypes still build."""
    stored = dataclasses.asdict(model_config("test", VOCAB))
    for make in (lambda: model_config("test", VOCAB, dtype="float16"),
                 lambda: ModelConfig.from_dict({**stored, "dtype": "float16"})):
        with pytest.raises(ValueError, match=r"^model.dtype='float16' is not a supported compute dtype: auto, float32, "
                                             r"bfloat16 \(float16 would need loss scaling"):
            make()
    assert [model_config("test", VOCAB, dtype=d).dtype for d in ("float32", "bfloat16")] == ["float32", "bfloat16"]


# ---------------------------------------------------------------- FLOPs per token


def test_flops_per_token_counts_heads_times_head_dim_and_the_window():
    """By hand: 6 x non-embedding params + 12 x heads*head_dim x the keys of every layer."""
    # Qwen3-0.6B-like: hidden 1024 but 16 heads of 128; 28 layers, all full attention.
    qwen3 = ModelConfig(vocab_size=151936, hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8,
                        head_dim=128, qk_norm="head", tie_embeddings=True)
    # q, o: 1024 x 2048; k, v: 1024 x 1024; q/k norms 2 x 128; MLP 3 x 1024 x 3072; norms 2 x 1024
    per_layer = 2 * 2_097_152 + 2 * 1_048_576 + 256 + 9_437_184 + 2048
    n = 28 * per_layer + 1024 + 151936 * 1024  # + final norm + the (tied) head's matmul
    assert n == 596_049_920 and qwen3.non_embedding_params() == n
    assert flops_per_token(qwen3, 4096) == 6 * n + 12 * 2048 * 28 * 4096
    assert (6 * n + 12 * 1024 * 28 * 4096) / flops_per_token(qwen3, 4096) == pytest.approx(0.78, abs=0.005)
    # Gemma-3-1B-like: 4 heads of 256 on hidden 1152; 26 layers, window 512 but in layers 5, 11, 17, 23.
    gemma3 = ModelConfig(vocab_size=262144, hidden=1152, intermediate=6912, layers=26, heads=4, kv_heads=1,
                         head_dim=256, qk_norm="head", norms="sandwich", sliding_window=512,
                         full_attention_layers=(5, 11, 17, 23), tie_embeddings=True)
    per_layer = 2 * 1_179_648 + 2 * 294_912 + 512 + 23_887_872 + 4 * 1152
    n = 26 * per_layer + 1152 + 262144 * 1152
    assert n == 999_885_952 and gemma3.non_embedding_params() == n
    assert flops_per_token(gemma3, 8192) == 6 * n + 12 * 1024 * (4 * 8192 + 22 * 512)
    assert flops_per_token(gemma3, 256) == 6 * n + 12 * 1024 * 26 * 256  # a window past the sequence is all of it


def test_a_float16_run_is_refused_by_the_config_check():
    with pytest.raises(ConfigError, match=r"^model.dtype='float16' is not a supported compute dtype"):
        checks.check_config(small_config("--config.model.dtype=float16"))
