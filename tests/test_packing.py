"""Document framing and packing: BOS/EOS by each tokenizer's convention, the rows a store holds,
the segments and positions of packed rows, every attention kernel's document mask against a naive
reference, and a packed row against transformers' logits for each document alone."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from cpt_jax import convert, inference, update
from cpt_jax import models as cpt_models
from cpt_jax.data.packing import Framing, pack
from cpt_jax.data.store import build_store
from cpt_jax.data.tokenizer import HFTokenizer, train_tokenizer
from cpt_jax.models import attention
from cpt_jax.models.cross_entropy import cross_entropy

from helpers import randomised

BOS, EOS = 1, 2


def hf_tokenizer_json(post_processor_bos: bool) -> str:
    """A byte-level BPE tokenizer.json with <s>/</s>; its post-processor prepends <s> if asked (as
    Llama's and Gemma's do)."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS} | {chr(ord("a") + i): 3 + i for i in range(26)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok.to_str()


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize(("post_processor", "config", "bos"), [
    (True, None, BOS),  # no tokenizer_config: the post-processor's <s> decides (Llama 2 style)
    (False, None, None),  # SmolLM2 / Qwen style: nothing prepended
    (True, {"add_bos_token": False}, None),  # tokenizer_config.json says, over the post-processor
    (False, {"add_bos_token": True, "bos_token": "<s>"}, BOS),  # Gemma 3's config says add_bos_token
])
def test_bos_follows_the_hf_tokenizers_own_convention(post_processor, config, bos):
    tok = HFTokenizer(hf_tokenizer_json(post_processor), None if config is None else json.dumps(config))
    framing = Framing.of(tok)
    assert framing == Framing(bos, EOS)
    framed = [BOS, 3, 4, EOS, BOS, 5, EOS] if bos else [3, 4, EOS, 5, EOS]
    assert pack([tok.encode("ab"), tok.encode("c")], len(framed) - 1, framing).ravel().tolist() == framed
    # Explicit choices override the convention; the document end can be any token of the vocabulary.
    assert Framing.of(tok, "never").bos_id is None and Framing.of(tok, "always").bos_id == BOS
    assert Framing.of(tok, eos="<unk>") == Framing(bos, 0)
    with pytest.raises(ValueError, match=r"data.framing.eos='<\|endoftext\|>' is not a token"):
        Framing.of(tok, eos="<|endoftext|>")
    with pytest.raises(ValueError, match="data.framing.bos='sometimes' must be one of auto, always, never"):
        Framing.of(tok, "sometimes")


def test_a_tokenizer_trained_here_adds_no_bos_unless_asked(tmp_path):
    sp = train_tokenizer(["a b c d e f g h"] * 50 + ["abc def"] * 50, tmp_path / "t.model", vocab_size=280)
    assert Framing.of(sp) == Framing(None, sp.eos_id)  # today's framing: text + EOS
    assert Framing.of(sp, "always") == Framing(sp.bos_id, sp.eos_id)
    assert Framing.of(sp, eos="a") == Framing(None, sp.token_to_id("a")) and sp.token_to_id("zzz!") is None


def test_bos_that_is_also_the_separator_is_not_doubled():
    """GPT-2 style: one token (here <s> named as both) separates documents; "always" says why not."""
    tok = HFTokenizer(hf_tokenizer_json(True), json.dumps({"bos_token": "<s>", "eos_token": "<s>"}))
    assert tok.add_bos and Framing.of(tok) == Framing(None, BOS)
    with pytest.raises(ValueError, match="one token .id 1.*set data.framing.bos='never'"):
        Framing.of(tok, "always")


# ---------------------------------------------------------------- the store's rows


class ListSplit:
    def __init__(self, docs):
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def texts(self, start, stop):
        return self.docs[start:stop]


def test_store_rows_are_the_framed_packing_and_default_stores_keep_their_identity(tmp_path):
    tok = HFTokenizer(hf_tokenizer_json(True))
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefgh"), size=n)) for n in rng.integers(1, 30, size=40)]
    framing = Framing.of(tok)
    store = build_store(ListSplit(docs), tok, 16, tmp_path / "bos", source="s", chunk_docs=7, workers=1,
                        framing=framing)
    np.testing.assert_array_equal(store.rows, pack(tok.encode_batch(docs), 16, framing))
    assert store.manifest["bos_id"] == BOS and store.manifest["eos_id"] == EOS
    stream = store.rows.ravel()
    starts = np.flatnonzero(stream == BOS)
    assert stream[0] == BOS and (stream[starts[1:] - 1] == EOS).all()  # every document opens with BOS

    plain = build_store(ListSplit(docs), tok, 16, tmp_path / "plain", source="s", workers=1)
    assert "bos_id" not in plain.manifest and not (plain.rows == BOS).any()  # as stores were before framing
    np.testing.assert_array_equal(plain.rows, pack(tok.encode_batch(docs), 16, EOS))
    assert framing.suffix(tok) == "-bos1" and Framing(None, EOS).suffix(tok) == "" and \
        Framing(None, 0).suffix(tok) == "-eos0"


# ---------------------------------------------------------------- segments and positions


def test_segments_positions_and_weights_of_hand_built_rows():
    # Row 0: the tail of a document continued from the row before, EOS, a BOS-framed document, EOS,
    # another starting. Row 1: one document throughout (no EOS): one segment, positions 0..t-1.
    e = 9
    rows = jnp.array([[5, 6, e, 1, 7, 8, e, 1, 4],
                      [1, 3, 3, 3, 3, 3, 3, 3, 3]], jnp.int32)
    segments, positions, weights = jax.device_get(update.document_layout(rows, e))
    assert segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3], [1] * 9]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1], list(range(9))]
    # The position whose input is EOS would predict the next document's first token: not counted.
    assert weights.tolist() == [[1, 1, 0, 1, 1, 1, 0, 1, 1], [1] * 9]


# ---------------------------------------------------------------- attention kernels


def naive_attention(q, k, v, segments, window=0, scale=None, softcap=0.0):
    """float64 softmax(cap(q k^T * scale)) v (scale 1/sqrt(d) by default) over keys that are
    causal, in the query's segment and, with a window, among the last `window` positions."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    k, v = (np.repeat(a, h // a.shape[2], axis=2) for a in (k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * (scale or 1 / math.sqrt(d))
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    causal = np.tril(np.ones((t, t), bool)) & (np.triu(np.ones((t, t), bool), -(window - 1)) if window else True)
    allowed = causal[None] & (segments[:, :, None] == segments[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


KERNELS = ["xla", "splash", pytest.param("cudnn", marks=pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU"))]


@pytest.mark.parametrize(("window", "softcap", "head_dim"), [(0, 0.0, 16), (40, 0.0, 16), (40, 2.0, 16), (0, 0.0, 256)])
@pytest.mark.parametrize("impl", KERNELS)
def test_each_kernel_keeps_attention_within_documents(impl, window, softcap, head_dim):
    """And, with a sliding window (Mistral's), within the last `window` positions too; with a
    soft-cap (Gemma 2's: cuDNN has none) and Gemma's scale and head_dim 256 as well."""
    if softcap and impl == "cudnn":
        pytest.skip("cuDNN does not soft-cap: a soft-capped model runs XLA attention on GPUs")
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 128, 4, 2, head_dim
    q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    cuts = [[0, 30, 31, 90], [0, 64]]  # a one-token document included
    segments = np.stack([np.cumsum(np.isin(np.arange(t), c)) for c in cuts]).astype(np.int32)
    scale = 0.4 if softcap else None  # large logits, so the cap bites
    want = naive_attention(q, k, v, segments, window, scale, softcap)
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    got = jax.jit(lambda q, k, v, s: attention.causal_attention(q, k, v, impl, s, window, scale, softcap))(
        *(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(segments))
    tol = 2e-2 if impl == "cudnn" else 1e-5  # bfloat16 keeps 8 bits
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol)
    unmasked = naive_attention(q, k, v, np.ones_like(segments), window, scale, softcap)
    assert np.abs(unmasked - want).max() > 0.1  # the segments matter to this comparison
    if window:
        assert np.abs(naive_attention(q, k, v, segments, 0, scale, softcap) - want).max() > 0.1  # and the window
    if softcap:
        assert np.abs(naive_attention(q, k, v, segments, window, scale) - want).max() > 0.1  # and the cap


# ---------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers Llama (weights N(0, 0.2) so every layer matters), imported."""
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      max_position_embeddings=512, rope_theta=5000.0, bos_token_id=BOS,
                                      eos_token_id=EOS)
    ref = randomised(transformers.LlamaForCausalLM, config)
    src = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(src)
    Tokenizer.from_str(hf_tokenizer_json(True)).save(os.path.join(src, "tokenizer.json"))
    dst = str(tmp_path_factory.mktemp("ckpt") / "model")
    convert.import_model(str(src), dst)
    return ref, dst


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_packed_row_gives_each_document_the_logits_transformers_gives_it_alone(hf_llama, impl):
    ref, path = hf_llama
    loaded, _ = inference.load(path)
    cfg = dataclasses.replace(loaded.cfg, attention=impl)
    model = nnx.merge(cpt_models.spec(cfg).graphdef, cpt_models.params_of(loaded))
    rng = np.random.default_rng(1)
    a = [BOS, *rng.integers(3, 96, 50), EOS]
    b = [BOS, *rng.integers(3, 96, 128 - len(a) - 1)]  # the row: 128 positions (splash tiles)
    row = jnp.asarray([a + b], jnp.int32)

    with torch.no_grad():
        want_b = ref(torch.tensor([b])).logits.numpy()[0]
        want_a = ref(torch.tensor([a])).logits.numpy()[0]
    segments, positions, _ = update.document_layout(row, EOS)
    got = np.asarray(jax.jit(lambda r, p, s: model(r, p, segment_ids=s))(row, positions, segments))[0]
    err_b = np.abs(got[len(a):] - want_b).max()
    concat = np.asarray(jax.jit(lambda r: model(r))(row))[0]  # data.packing="concat": B sees A
    err_concat = np.abs(concat[len(a):] - want_b).max()
    print(f"max |logit difference| on B's positions ({impl}): documents {err_b:.2e}, concat {err_concat:.2e}")
    assert err_b < 1e-4, err_b
    assert np.abs(got[:len(a)] - want_a).max() < 1e-4
    assert err_concat > 1e-2


# ---------------------------------------------------------------- the loss over counted positions


@pytest.mark.parametrize("chunk", [0, 8])
def test_weighted_loss_and_gradients_equal_optax_on_the_counted_positions(chunk):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 11)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, (2, 16)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 16)) > 0.3, jnp.float32)

    def ours(x, w):
        return cross_entropy(x, w, labels, chunk, weights)[0]

    def reference(x, w):
        losses = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
        return (losses * weights).sum() / weights.sum()

    (got, got_g), (want, want_g) = (jax.value_and_grad(f, argnums=(0, 1))(x, w) for f in (ours, reference))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, h in zip(got_g, want_g):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- a run packed by documents


@pytest.mark.slow  # two runs and BOS-framed stores of the whole corpus: about a minute
def test_a_documents_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path, caplog):
    """data.packing=documents with BOS framing on the real corpus: the run logs how it packs, and a
    run resumed from a mid-run Orbax checkpoint ends with the metrics and params of the whole run."""
    from helpers import small_config

    from cpt_jax import trainer
    from cpt_jax.data import pipeline

    config = small_config("--config.data.packing=documents", "--config.data.framing.bos=always",
                          "--config.seq_len=64", "--config.total_steps=6", "--config.checkpoint_every=3",
                          "--config.keep_checkpoints=3", "--config.eval_every=3", "--config.log_every=2")
    with caplog.at_level("INFO", "cpt_jax"):
        whole = trainer.train_run(config, str(tmp_path / "whole"))
    assert "documents framed as BOS (id 2) + text + EOS (id 3), packed as documents: XLA attention" in caplog.text
    rows = pipeline.build(config.data, config.seq_len).train["zh"]  # the stores the run built
    assert (rows[:, 0] == 2).any() and (rows[:, 1:] == 2).any()  # BOS opens documents, also inside rows

    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")  # as if preempted after step 3's save
    resumed = trainer.train_run(config, str(tmp_path / "resumed"))
    assert "resumed" in caplog.text
    perf = lambda recs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in recs]  # noqa: E731
    assert perf(resumed) == perf(whole) and whole[-1]["step"] == 6
    a, b = (cpt_models.params_of(inference.load(str(tmp_path / d))[0]) for d in ("whole", "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
