"""Vocabulary extension (sentencepiece proto merge here; HF added tokens in test_convert), and a
converted model continued by the main job with `model.size="init_from"`."""

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from sentencepiece import sentencepiece_model_pb2 as pb

import cpt_jax
from cpt_jax import convert, inference, models
from cpt_jax.config import base
from cpt_jax.convert.gguf import GGUFFile
from cpt_jax.convert.vocab import extend_vocab, grow, merge
from cpt_jax.convert.__main__ import main as convert_main
from cpt_jax.data.corpora import split_documents

from helpers import run_main

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


def gguf_vocabulary(tok, path):
    """`tok` as llama.cpp writes a sentencepiece vocabulary into a GGUF, read back by the importer."""
    m = pb.ModelProto.FromString(tok.files["tokenizer.model"])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in m.pieces])
    w.add_token_scores([p.score for p in m.pieces])
    w.add_token_types([int(p.type) for p in m.pieces])
    w.add_unk_token_id(tok.unk_id)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(str(path)).tokenizer()


@pytest.mark.parametrize("vocabulary", ["sentencepiece", "gguf"])
def test_new_rows_are_the_mean_of_the_pieces_old_segmentation_inside_a_text(english_model, vocabulary, tmp_path):
    """Rows by hand: a word-start piece "▁X" is what the old model makes of the text "X" (its dummy
    prefix makes it "▁X"); an inner piece, sentencepiece's BPE over the old pieces (checked here
    against the old model on the word-start ones); Chinese, its UTF-8 bytes."""
    model, sp_tok = inference.load(english_model)
    old = sp_tok if vocabulary == "sentencepiece" else gguf_vocabulary(sp_tok, tmp_path / "v.gguf")
    sp = spm.SentencePieceProcessor(model_proto=sp_tok.files["tokenizer.model"])
    score = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size()) if not (
        sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))}

    def bpe(text: str) -> list[int]:  # merge the best-scoring adjacent pair, the leftmost first
        syms = list(text)
        while pairs := [(score[a + b], -i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in score]:
            i = -max(pairs)[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return [i for s in syms for i in ([sp.piece_to_id(s)] if s in score else byte_ids(s))]

    def byte_ids(text: str) -> list[int]:
        return [sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]

    expected = {"▁Jerusalem": sp.encode("Jerusalem"), "▁righteousness": sp.encode("righteousness"),
                "▁以色列": [sp.piece_to_id("▁"), *byte_ids("以色列")],
                "salem": bpe("salem"), "eousness": bpe("eousness"), "以色列": byte_ids("以色列")}
    for piece, ids in expected.items():
        assert piece not in score and len(ids) > 1, piece  # a new piece, of several old ones
        if piece.startswith("▁"):
            assert bpe(piece) == ids, piece
    assert bpe("▁salem") != expected["salem"] and bpe("▁eousness") != expected["eousness"]  # no word starts

    new, added = merge(old, list(expected))
    params = grow(jax.tree.map(np.asarray, models.params_of(model)), old, added, new.vocab_size)
    embed, head = np.asarray(model.embed[...]), np.asarray(model.lm_head[...])
    sp_new = spm.SentencePieceProcessor(model_proto=new.files["tokenizer.model"])
    for piece, ids in expected.items():
        i = sp_new.piece_to_id(piece)
        assert i >= old.vocab_size, piece
        np.testing.assert_allclose(params["embed"][i], embed[ids].mean(axis=0), rtol=1e-6, err_msg=piece)
        np.testing.assert_allclose(params["lm_head"][:, i], head[:, ids].mean(axis=1), rtol=1e-6, err_msg=piece)


def test_main_continues_an_extended_model_and_load_reads_the_run(english_model, tmp_path, capsys):
    """extend-vocab, then the main job from its result: both command lines in this process."""
    ext = str(tmp_path / "ext")
    assert convert_main(["extend-vocab", "--src", english_model, "--dst", ext, "--source", "zh",
                         "--vocab_size", "4000"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] > 500  # the report, printed
    assert run_main(tmp_path / "run", "--config", "configs/bible.py:test", "--config.model.size=init_from",
                    f"--config.init_from={ext}", "--config.total_steps=2", "--config.batch_size=8",
                    "--config.seq_len=32", "--config.data.eval_batches=1", "--config.log_every=2",
                    "--config.eval_every=2", "--config.checkpoint_every=2") == 0
    assert f"initialised params from {ext}" in capsys.readouterr().err
    model, tok = inference.load(str(tmp_path / "run"))
    _, ext_tok = inference.load(ext)
    assert tok.fingerprint == ext_tok.fingerprint and model.cfg.vocab_size == ext_tok.vocab_size
    # Greedy decoding by hand, a whole forward pass per token (no cache): what generate must give.
    prompt, new = tok.encode("起初，神创造天地。"), []
    while len(new) < 3 and tok.eos_id not in new:
        new.append(int(np.argmax(np.asarray(model(jnp.asarray([prompt + new])))[0, -1])))
    assert cpt_jax.generate(model, tok, "起初，神创造天地。", max_new_tokens=3) == tok.decode(
        [t for t in new if t != tok.eos_id])


def test_init_from_size_needs_init_from(tmp_path, capsys):
    assert run_main(tmp_path / "w", "--config", "configs/bible.py:test", "--config.model.size=init_from") == 2
    assert "model.size='init_from'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_sentencepiece_models_export_to_an_equivalent_tokenizer_json(english_model, bible, tmp_path):
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
