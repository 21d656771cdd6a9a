"""Vocabulary extension (sentencepiece proto merge here; HF added tokens in test_convert), and a
converted model continued by the main job with `model.size="init_from"`."""

import json

import numpy as np
import pytest
import sentencepiece as spm

import cpt_jax
from cpt_jax import convert, inference, trainer
from cpt_jax.config import base
from cpt_jax.convert.__main__ import main as convert_main
from cpt_jax.convert.vocab import extend_vocab
from cpt_jax.data.corpora import split_documents
from cpt_jax.errors import ConfigError

from helpers import config_of
ENGLISH = "In the beginning God created the heaven and the earth."


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


def test_main_continues_an_extended_model_and_load_reads_the_run(english_model, tmp_path, capsys):
    """extend-vocab as its command line parses it (in process), then a run from the result."""
    ext = str(tmp_path / "ext")
    assert convert_main(["extend-vocab", "--src", english_model, "--dst", ext, "--source", "zh",
                         "--vocab_size", "4000"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] > 500  # the report, printed
    config = config_of(["--config", "configs/bible.py:test", "--config.model.size=init_from",
                        f"--config.init_from={ext}", "--config.total_steps=2", "--config.batch_size=8",
                        "--config.seq_len=32", "--config.data.eval_batches=1", "--config.log_every=2",
                        "--config.eval_every=2", "--config.checkpoint_every=2"])
    trainer.run_all(config, str(tmp_path / "run"))
    assert f"initialised params from {ext}" in capsys.readouterr().err  # logging as the command line set it up
    model, tok = inference.load(str(tmp_path / "run"))
    _, ext_tok = inference.load(ext)
    assert tok.fingerprint == ext_tok.fingerprint and model.cfg.vocab_size == ext_tok.vocab_size
    assert isinstance(cpt_jax.generate(model, tok, "起初，神创造天地。", max_new_tokens=3), str)


def test_init_from_size_needs_init_from(tmp_path):
    config = config_of(["--config", "configs/bible.py:test", "--config.model.size=init_from"])
    with pytest.raises(ConfigError, match=r"model\.size='init_from'"):
        trainer.run_all(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_sentencepiece_models_export_to_an_equivalent_tokenizer_json(english_model, bible, tmp_path):
    import torch
    import transformers

    ext = str(tmp_path / "ext")
    extend_vocab(english_model, ext, base().data, "zh", 4000)  # appended pieces must merge last, as in sentencepiece
    convert.export_model(ext, str(tmp_path / "hf"))
    model, tok = inference.load(ext)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["  two  spaces, then\ta tab\nand a line", " lead", "trail  ", "é ü © ☃", "   "]
    texts += [v for lang in ("en", "zh") for d in split_documents(bible[lang])[1][:3] for v in d.verses]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.asarray([tok.encode(texts[-1])])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-5, rtol=0)
