"""Vocabulary extension for a new language (Chinese-LLaMA's recipe): train a tokenizer on the
target language, add its new pieces to the model's tokenizer, and grow the embeddings.

Pieces join a sentencepiece tokenizer through its model proto (appended after every old piece,
scored below them, so old text segments as before), and an HF tokenizer as added tokens. Added
tokens match anywhere in the text, so only pieces written wholly in non-ASCII characters (the
target script) are added there: an added "the" would cut "other" apart. Each new embedding row
(and output column) starts as the mean of the old rows of the piece's old tokenization (as
inside a text: a sentencepiece word-start piece "▁us" from those of "▁us", without the
old model's dummy prefix), so a new token begins close to the text it replaces.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections
import numpy as np
import tokenizers

from cpt_jax.rundir import RunDir
from cpt_jax.convert import check_destination, save_model
from cpt_jax.data import pipeline
from cpt_jax.data import sources as src_lib
from cpt_jax.data.tokenizer import (
    HF_CONFIG_FILE,
    HF_FILE,
    SP_FILE,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerLike,
)
from cpt_jax.models import params_of
from cpt_jax.restore import read_model

log = logging.getLogger(__name__)


def target_pieces(tok: SentencePieceTokenizer) -> list[str]:
    """The normal pieces of a sentencepiece model, as text, in its own order (best first)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto.FromString(tok.files[SP_FILE])
    return [p.piece for p in m.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]


def merge(old, pieces: list[str]):
    """`old` with the pieces it lacks; returns (new tokenizer, [(id, text) of each added piece])."""
    if SP_FILE in old.files:
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto.FromString(old.files[SP_FILE])
        have = {p.piece for p in m.pieces}
        score = min((p.score for p in m.pieces), default=0.0)
        added = [p for p in dict.fromkeys(pieces) if p not in have]
        for i, p in enumerate(added):
            m.pieces.add(piece=p, score=score - 1 - i, type=pb.ModelProto.SentencePiece.NORMAL)
        m.trainer_spec.vocab_size = len(m.pieces)
        first = len(m.pieces) - len(added)
        return SentencePieceTokenizer(m.SerializeToString(), old.add_bos), [(first + i, p.replace("\u2581", " "))
                                                               for i, p in enumerate(added)]
    files = old.files
    tok = tokenizers.Tokenizer.from_str(files[HF_FILE].decode())
    added = [p for p in dict.fromkeys(q.replace("\u2581", "") for q in pieces)
             if p and all(ord(c) > 127 and not c.isspace() for c in p) and len(old.encode(p)) > 1]
    tok.add_tokens([tokenizers.AddedToken(p, normalized=False) for p in added])
    config = files.get(HF_CONFIG_FILE)
    new = HFTokenizer(tok.to_str(), config.decode() if config else None, source="extended tokenizer")
    return new, [(tok.token_to_id(p), p) for p in added]


def in_text(old: TokenizerLike) -> TokenizerLike:
    """`old` as it segments a piece of text inside a document. A sentencepiece model loses its
    dummy prefix (the "▁" it puts before a whole text): a new word-start piece "▁us" (the
    text " us") is then read as the pieces of "▁us", not of "▁▁us", and an inner piece "us"
    as those of "us", not of the word-start "▁us"."""
    if SP_FILE not in old.files:
        return old
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto.FromString(old.files[SP_FILE])
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False  # a piece's leading space is its own
    return SentencePieceTokenizer(m.SerializeToString())


def grow(params: dict, old, added: list[tuple[int, str]], vocab_size: int) -> dict:
    """Params with `vocab_size` rows; every old row kept, each added token's row (and output
    column) the mean of its old tokenization's rows (the mean of all rows if it has none)."""
    params = dict(params)
    segment = in_text(old)
    rows = {new_id: segment.encode(text) for new_id, text in added}

    def extend(table: np.ndarray) -> np.ndarray:  # [vocab, hidden]
        out = np.zeros((vocab_size, table.shape[1]), np.float32)
        out[:table.shape[0]] = table
        mean = table[:old.vocab_size].mean(axis=0)
        for new_id, old_ids in rows.items():
            out[new_id] = table[old_ids].mean(axis=0) if old_ids else mean
        return out

    params["embed"] = extend(np.asarray(params["embed"]))
    if "lm_head" in params:
        params["lm_head"] = extend(np.asarray(params["lm_head"]).T).T
    return params


def tokens_per_char(tok, docs: list[str]) -> float:
    return sum(len(ids) for ids in tok.encode_batch(docs)) / max(1, sum(len(d) for d in docs))


def extend_vocab(src: str, dst: str, dcfg: ml_collections.ConfigDict, source: str, vocab_size: int,
                 eval_docs: int = 2000) -> dict:
    """`src` (a converted model or run) with its vocabulary extended by a `vocab_size`-piece
    tokenizer trained on the train split of data source `source` -> `dst`. Returns the report:
    tokens per character on the source's eval split before and after, and pieces added."""
    check_destination(dst)
    specs = pipeline.source_specs(dcfg)
    if source not in specs:
        raise ValueError(f"--source {source!r} is not one of the config's data.sources: {', '.join(specs)}")
    model, old = read_model(src)
    if old is None:
        raise ValueError(f"{src} has no tokenizer dir to extend")
    root = pipeline.data_dir(dcfg)
    src_lib.prepare(specs[source], root)
    t = ml_collections.ConfigDict(dcfg.to_dict())
    t.tokenizer.update(path="", train_on=(source,), vocab_size=vocab_size)
    target = pipeline.tokenizer(t, specs, root)

    new, added = merge(old, target_pieces(target))
    cfg = dataclasses.replace(model.cfg, vocab_size=max(model.cfg.vocab_size, new.vocab_size))
    params = grow(jax.tree.map(np.asarray, params_of(model)), old, added, cfg.vocab_size)

    split = src_lib.open_split(specs[source], "eval", root)
    docs = list(split.texts(0, min(len(split), eval_docs)))
    # The rows below the first added token are the old model's (optimizer.freeze "old_vocab").
    old_vocab = min((i for i, _ in added), default=model.cfg.vocab_size)
    report = {"source": source, "added": len(added), "vocab_size": cfg.vocab_size, "old_vocab_size": old_vocab,
              "tokens_per_char_before": tokens_per_char(old, docs), "tokens_per_char_after": tokens_per_char(new, docs)}
    meta = RunDir.of(src).meta()
    save_model(dst, cfg, params, new, hf_config=meta.hf_config, converted_from=meta.converted_from,
               vocab_extension=report)
    log.info("extended %s -> %s: %d pieces added; %s eval tokens/char %.3f -> %.3f", src, dst, len(added), source,
             report["tokens_per_char_before"], report["tokens_per_char_after"])
    return report
