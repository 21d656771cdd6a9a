"""Tests for cpt_jax.data.tokenizer: sentencepiece and HF tokenizer.json behind one interface.
Everything is trained here on a small bilingual corpus; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cpt_jax.data.tokenizer import (
    EOS_ID,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerLike,
    load_tokenizer,
    train_tokenizer,
)

TEXT = "In the beginning 起初，神創造天地。 rare: 𠀀"  # the last char is in no vocabulary: bytes

EN = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "And God said, Let there be a firmament in the midst of the waters.",
    "And God made the firmament, and divided the waters which were under the firmament.",
    "And God called the firmament Heaven. And the evening and the morning were the second day.",
    "And God said, Let the waters under the heaven be gathered together unto one place.",
    "And God called the dry land Earth; and God saw that it was good.",
]
ZH = [
    "起初，神創造天地。",
    "地是空虛混沌，淵面黑暗；神的靈運行在水面上。",
    "神說：「要有光」，就有了光。",
    "神看光是好的，就把光暗分開了。",
    "神稱光為「晝」，稱暗為「夜」。有晚上，有早晨，這是頭一日。",
    "神說：「諸水之間要有空氣，將水分為上下。」",
    "神就造出空氣，將空氣以下的水、空氣以上的水分開了。事就這樣成了。",
    "神稱空氣為「天」。有晚上，有早晨，是第二日。",
    "神說：「天下的水要聚在一處，使旱地露出來。」事就這樣成了。",
    "神稱旱地為「地」，稱水的聚處為「海」。神看着是好的。",
]


@pytest.fixture(scope="module")
def lines() -> list[str]:
    # 600 verse-like lines in both languages.
    return [line for c in range(1, 31) for v in range(10)
            for line in (f"Genesis {c}:{v + 1} {EN[v]}", f"創世記 {c}:{v + 1} {ZH[v]}")]


@pytest.fixture(scope="module")
def sp_tok(lines, tmp_path_factory) -> SentencePieceTokenizer:
    return train_tokenizer(lines, tmp_path_factory.mktemp("sp") / "sp.model", vocab_size=500)


def _train_hf(lines: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    # Byte-level BPE with all 256 bytes in the alphabet, so any UTF-8 text round-trips.
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(lines, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    _train_hf(lines, vocab_size=600).save(str(path / "tokenizer.json"))
    return path


def _tiny_hf(specials: list[str]) -> str:
    """tokenizer.json text of a minimal tokenizer with the given added special tokens."""
    tok = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.add_special_tokens(specials)
    return tok.to_str()


def _check_round_trip(tok: TokenizerLike) -> None:
    assert isinstance(tok, TokenizerLike)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.unk_id not in ids
    assert tok.eos_id not in ids and tok.bos_id not in ids  # encode adds no specials
    assert all(0 <= i < tok.vocab_size for i in ids)
    texts = [TEXT, "起初", "light", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0


def test_sentencepiece_round_trip(sp_tok):
    _check_round_trip(sp_tok)
    assert sp_tok.eos_id == EOS_ID and sp_tok.vocab_size == 500


def test_hf_round_trip(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    _check_round_trip(tok)
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>") == 0
    assert (tok.bos_id, tok.pad_id, tok.unk_id) == (None, None, None)
    assert tok.vocab_size == 600
    assert tok.decode(tok.encode("起初") + [tok.eos_id]) == "起初"  # special tokens dropped


def test_save_reload_same_fingerprint(sp_tok, hf_dir, lines, tmp_path):
    hf_tok = load_tokenizer(hf_dir / "tokenizer.json")
    for tok in (sp_tok, hf_tok):
        saved = tok.save(tmp_path / type(tok).__name__)
        again = load_tokenizer(saved)
        assert type(again) is type(tok) and again.fingerprint == tok.fingerprint
        assert again.encode(TEXT) == tok.encode(TEXT) and again.eos_id == tok.eos_id
    # HF: the fingerprint is of the canonical JSON, not its formatting.
    pretty = json.dumps(json.loads(hf_tok.files["tokenizer.json"]), indent=4)
    assert HFTokenizer(pretty).fingerprint == hf_tok.fingerprint
    # Different tokenizers, different fingerprints.
    other_hf = HFTokenizer(_train_hf(lines, vocab_size=700).to_str())
    assert len({sp_tok.fingerprint, hf_tok.fingerprint, other_hf.fingerprint}) == 3


def test_hf_special_tokens_discovered():
    tok = HFTokenizer(_tiny_hf(["<unk>", "<s>", "</s>", "<pad>"]))
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 4, 5)
    tok = HFTokenizer(_tiny_hf(["<|begin_of_text|>", "<|end_of_text|>"]))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, None)
    # A base model's document separator wins over the chat-turn end.
    assert HFTokenizer(_tiny_hf(["<|im_end|>", "<|endoftext|>"])).eos_id == 3


@pytest.mark.parametrize("form", ["string", "dict"])
def test_hf_config_overrides(form, tmp_path):
    def token(content):
        return content if form == "string" else {"content": content, "special": True}

    (tmp_path / "tokenizer.json").write_text(_tiny_hf(["<|endoftext|>", "<|im_end|>", "<s>"]))
    discovered = load_tokenizer(tmp_path)
    assert (discovered.eos_id, discovered.bos_id) == (2, 4)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": token("<|im_end|>"), "bos_token": None, "pad_token": token("<|endoftext|>")}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (3, None, 2)
    assert tok.fingerprint != discovered.fingerprint  # same vocabulary, other EOS
    again = load_tokenizer(tok.save(tmp_path / "copy"))  # the config travels with it
    assert (again.eos_id, again.fingerprint) == (3, tok.fingerprint)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": token("<nope>")}))
    with pytest.raises(ValueError, match="<nope>"):
        load_tokenizer(tmp_path)


def test_hf_errors_name_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(_tiny_hf(["<s>"]))
    with pytest.raises(ValueError, match=f"{path}: no EOS token"):
        load_tokenizer(path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    assert load_tokenizer(path).eos_id == 2
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_dispatch(sp_tok, hf_dir, tmp_path):
    sp_tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.model"), SentencePieceTokenizer)
    # HF model folders often carry both files; tokenizer.json is preferred.
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
    # The original sentencepiece entry points still work.
    assert Tokenizer.load(tmp_path / "tokenizer.model").fingerprint == sp_tok.fingerprint
    assert Tokenizer(sp_tok.files["tokenizer.model"]).fingerprint == sp_tok.fingerprint


def test_byte_tokenizer_is_utf8_bytes_and_saves(tmp_path):
    tok = ByteTokenizer()
    _check_round_trip(tok)
    # Independent of the class: its ids are the text's UTF-8 bytes after the four special ids.
    assert tok.encode(TEXT) == [b + 4 for b in TEXT.encode("utf-8")] and tok.vocab_size == 260
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.decode(tok.encode("起初") + [tok.eos_id]) == "起初"
    assert tok.token_to_id("a") == ord("a") + 4 and tok.token_to_id("起") is None
    again = load_tokenizer(tok.save(tmp_path))
    assert isinstance(again, ByteTokenizer) and again.fingerprint == tok.fingerprint
    (tmp_path / "byte_tokenizer.json").write_text('{"type": "utf8_bytes", "offset": 3}')
    with pytest.raises(ValueError, match="byte_tokenizer.json: not this version's byte tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text_file"])
def test_load_tokenizer_bad_path(make, tmp_path):
    path = tmp_path / "x"
    if make == "empty_dir":
        path.mkdir()
    elif make == "text_file":
        path.write_text("not a tokenizer")
    with pytest.raises(ValueError, match=f"{path} .*expected a sentencepiece .model file"):
        load_tokenizer(path)


def test_train_tokenizer_options(lines, sp_tok, tmp_path):
    def train(name, **options):
        return train_tokenizer(lines, tmp_path / f"{name}.model", vocab_size=500, **options)

    assert train("same").fingerprint == sp_tok.fingerprint  # defaults: bpe, 0.9995, byte fallback
    variants = {"unigram": {"model_type": "unigram"}, "coverage": {"character_coverage": 0.98},
                "no_bytes": {"byte_fallback": False}}
    fingerprints = {sp_tok.fingerprint}
    for name, options in variants.items():
        tok = train(name, **options)
        assert train(name + "_again", **options).fingerprint == tok.fingerprint  # deterministic
        fingerprints.add(tok.fingerprint)
        if name == "no_bytes":  # the rare char has no byte pieces to fall back to
            assert tok.unk_id in tok.encode(TEXT)
        else:
            assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(fingerprints) == 4

    with pytest.raises(ValueError, match="model_type"):
        train("bad", model_type="word")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(lines, tmp_path / "small.model", vocab_size=300)
    assert not (tmp_path / "small.model").exists()
    with pytest.raises(ValueError, match="too large"):
        train_tokenizer(lines, tmp_path / "large.model", vocab_size=5000)
