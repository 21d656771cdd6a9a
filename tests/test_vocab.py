"""Vocabulary extension (sentencepiece proto merge here; HF added tokens in test_convert), and a
converted model continued by the main job with `model.size="init_from"`."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm

import cpt_jax
from cpt_jax import convert, inference, models
from cpt_jax.config import base
from cpt_jax.convert.vocab import extend_vocab
from cpt_jax.data.corpora import default_cache_dir, load_bible, split_documents
from cpt_jax.data.tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGLISH = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def english_model(tmp_path_factory):
    """A 'test'-size model whose 600-piece tokenizer has seen only English: Chinese is bytes."""
    train, _ = split_documents(load_bible(default_cache_dir())["en"])
    root = tmp_path_factory.mktemp("english")
    tok = train_tokenizer([v for d in train[::4] for v in d.verses], root / "sp.model", vocab_size=600)
    cfg = models.model_config("test", tok.vocab_size)
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
    convert.save_model(root / "model", cfg, params, tok)
    return str(root / "model")


def test_sentencepiece_extension_keeps_old_rows_and_old_text(english_model, tmp_path):
    report = extend_vocab(english_model, str(tmp_path / "ext"), base().data, "zh", 4000)
    old, old_tok = inference.load(english_model)
    new, new_tok = inference.load(str(tmp_path / "ext"))
    v = old_tok.vocab_size
    assert report["added"] > 500 and new.cfg.vocab_size == new_tok.vocab_size == v + report["added"]
    assert report["tokens_per_char_after"] < 0.6 * report["tokens_per_char_before"]
    np.testing.assert_array_equal(new.embed[...][:v], old.embed[...])
    np.testing.assert_array_equal(new.lm_head[...][:, :v], old.lm_head[...])
    ids = old_tok.encode(ENGLISH)
    assert new_tok.encode(ENGLISH) == ids  # old text segments as before...
    tokens = np.asarray([ids])
    np.testing.assert_allclose(new(tokens)[..., :v], old(tokens), atol=1e-5, rtol=0)  # ...and scores the same
    # A new piece starts as the mean of its old tokenization's rows.
    sp = spm.SentencePieceProcessor(model_proto=new_tok.files["tokenizer.model"])
    new_id, old_pieces = sp.piece_to_id("以色列"), old_tok.encode("以色列")[1:]  # less the word-start "▁"
    assert new_id >= v and len(old_pieces) == 9  # three characters, three UTF-8 bytes each
    np.testing.assert_allclose(new.embed[...][new_id], np.asarray(old.embed[...])[old_pieces].mean(axis=0), rtol=1e-5)


def test_main_continues_an_extended_model_and_load_reads_the_run(english_model, tmp_path):
    ext = str(tmp_path / "ext")
    assert subprocess.run([sys.executable, "-m", "cpt_jax.convert", "extend-vocab", "--src", english_model,
                           "--dst", ext, "--source", "zh", "--vocab_size", "4000"], cwd=ROOT).returncode == 0
    run = subprocess.run(
        [sys.executable, "-m", "cpt_jax.main", "--workdir", str(tmp_path / "run"), "--config", "configs/bible.py:test",
         "--config.model.size=init_from", f"--config.init_from={ext}", "--config.total_steps=4",
         "--config.batch_size=8", "--config.seq_len=32", "--config.data.eval_batches=1", "--config.log_every=2",
         "--config.eval_every=4", "--config.checkpoint_every=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"initialised params from {ext}" in run.stderr
    model, tok = inference.load(str(tmp_path / "run"))
    _, ext_tok = inference.load(ext)
    assert tok.fingerprint == ext_tok.fingerprint and model.cfg.vocab_size == ext_tok.vocab_size
    assert isinstance(cpt_jax.generate(model, tok, "起初，神创造天地。", max_new_tokens=3), str)


def test_init_from_size_needs_init_from(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cpt_jax.main", "--workdir", str(tmp_path / "w"), "--config",
                          "configs/bible.py:test", "--config.model.size=init_from"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "model.size='init_from'" in run.stderr
    assert not (tmp_path / "w").exists()


def test_sentencepiece_models_export_to_an_equivalent_tokenizer_json(english_model, tmp_path):
    import torch
    import transformers

    ext = str(tmp_path / "ext")
    extend_vocab(english_model, ext, base().data, "zh", 4000)  # appended pieces must merge last, as in sentencepiece
    convert.export_model(ext, str(tmp_path / "hf"))
    model, tok = inference.load(ext)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bible = load_bible(default_cache_dir())
    texts = ["  two  spaces, then\ta tab\nand a line", " lead", "trail  ", "é ü © ☃", "   "]
    texts += [v for lang in ("en", "zh") for d in split_documents(bible[lang])[1][:3] for v in d.verses]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.asarray([tok.encode(texts[-1])])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-5, rtol=0)
