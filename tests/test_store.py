"""Tests for cpt_jax.data.store with a real sentencepiece tokenizer on English/Chinese Bible chapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpt_jax.data import EOS_ID, pack, train_tokenizer
from cpt_jax.data.store import MANIFEST, PARTS, build_store, open_store, store_ready

SEQ = 64


class ListSplit:
    """A text split over a list; logs which ranges were read, and can fail on one of them."""

    def __init__(self, docs: list[str], fail_at: int | None = None):
        self.docs, self.fail_at, self.reads = docs, fail_at, []

    def __len__(self) -> int:
        return len(self.docs)

    def texts(self, start: int, stop: int) -> list[str]:
        if start == self.fail_at:
            raise RuntimeError(f"source went away at document {start}")
        self.reads.append(start)
        return self.docs[start:stop]


class CountingTokenizer:
    """Delegates to a tokenizer and counts encode_batch calls (in-process builds only)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.eos_id, self.vocab_size, self.fingerprint = tok.eos_id, tok.vocab_size, tok.fingerprint

    def encode_batch(self, texts):
        self.calls += 1
        return self.tok.encode_batch(texts)


class OutOfVocabTokenizer(CountingTokenizer):
    """Appends the id vocab_size to one document (module level, so it pickles into workers)."""

    def __init__(self, tok, bad_text: str):
        super().__init__(tok)
        self.bad_text = bad_text

    def encode_batch(self, texts):
        return [ids + [self.vocab_size] if t == self.bad_text else ids
                for t, ids in zip(texts, self.tok.encode_batch(texts))]


class WordTokenizer:
    """One id per whitespace-separated word, so the token count is known exactly."""

    eos_id, vocab_size, fingerprint = 3, 100, "words"

    def encode_batch(self, texts):
        return [[10] * len(t.split()) for t in texts]


@pytest.fixture(scope="module")
def docs(bible) -> list[str]:
    chapters = [d.text for pair in zip(bible["en"][:24], bible["zh"][:24]) for d in pair]
    # Odd ones too: empty, repeated and leading spaces, fullwidth punctuation, a newline.
    return chapters[:20] + ["", "  two  spaces，全形標點！", "line one\nline two"] + chapters[20:]


@pytest.fixture(scope="module")
def tok(bible, tmp_path_factory):
    lines = [v for lang in ("en", "zh") for d in bible[lang][:60] for v in d.verses]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=2000)


@pytest.fixture(scope="module")
def reference(docs, tok) -> np.ndarray:
    return pack(tok.encode_batch(docs), SEQ, tok.eos_id)


def _mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_rows_are_pack_of_all_documents_and_decode_back(docs, tok, reference, tmp_path):
    store = build_store(ListSplit(docs), tok, SEQ, tmp_path, source="bible", meta={"split": "train"},
                        chunk_docs=8, workers=1)
    np.testing.assert_array_equal(store.rows, reference)
    assert isinstance(store.rows, np.memmap) and not store.rows.flags.writeable
    assert store.rows.dtype == np.int32 and store.rows.shape == (reference.shape[0], SEQ + 1)

    n_tokens = sum(len(ids) + 1 for ids in tok.encode_batch(docs))
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m == store.manifest
    assert m["n_docs"] == len(docs) and m["n_tokens"] == n_tokens and m["n_rows"] == n_tokens // (SEQ + 1)
    assert m["dropped_tokens"] == n_tokens % (SEQ + 1)
    assert (m["source"], m["seq_len"], m["eos_id"], m["dtype"]) == ("bible", SEQ, EOS_ID, "int32")
    assert (m["tokenizer_fingerprint"], m["vocab_size"], m["meta"]) == (tok.fingerprint, 2000, {"split": "train"})
    assert not (tmp_path / PARTS).exists()  # scratch is gone once the manifest exists

    # Every document that ends inside the rows decodes back to its text.
    flat = np.asarray(store.rows).reshape(-1)
    ends = np.flatnonzero(flat == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert len(ends) > len(docs) - 3
    for i, (a, b) in enumerate(zip(starts, ends)):
        assert tok.decode(flat[a:b]) == docs[i]

    # Random access: a row read by index is the same as in the reference.
    reopened = open_store(tmp_path, expect={"seq_len": SEQ, "tokenizer_fingerprint": tok.fingerprint})
    np.testing.assert_array_equal(reopened.rows[[5, 0, len(reference) - 1]], reference[[5, 0, len(reference) - 1]])


def test_workers_and_chunking_do_not_change_rows(docs, tok, reference, tmp_path):
    a = build_store(ListSplit(docs), tok, SEQ, tmp_path / "a", source="bible", chunk_docs=5, workers=2)
    b = build_store(ListSplit(docs), tok, SEQ, tmp_path / "b", source="bible", chunk_docs=1000, workers=1)
    np.testing.assert_array_equal(a.rows, reference)
    np.testing.assert_array_equal(b.rows, reference)
    assert a.manifest == b.manifest


def test_second_build_is_a_noop(docs, tok, tmp_path):
    build_store(ListSplit(docs), tok, SEQ, tmp_path, source="bible", chunk_docs=8, workers=1)
    before = _mtimes(tmp_path)
    split, counting = ListSplit(docs), CountingTokenizer(tok)
    build_store(split, counting, SEQ, tmp_path, source="bible", chunk_docs=8, workers=1)
    assert _mtimes(tmp_path) == before and counting.calls == 0 and split.reads == []
    assert store_ready(tmp_path, {"source": "bible", "seq_len": SEQ})


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_build_resumes_from_finished_parts(docs, tok, reference, tmp_path, workers):
    chunk, n_chunks = 5, -(-len(docs) // 5)
    with pytest.raises(RuntimeError, match="went away"):
        build_store(ListSplit(docs, fail_at=3 * chunk), tok, SEQ, tmp_path, source="bible",
                    chunk_docs=chunk, workers=workers)
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: not a prepared token store"):
        open_store(tmp_path)
    assert not store_ready(tmp_path, {})

    finished = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / PARTS).glob("part-*.npy"))
    if workers == 1:
        assert finished == [0, 1, 2]
    else:  # chunks already handed to a worker finish; ones not started are cancelled
        assert finished and set(finished) <= {0, 1, 2}

    split = ListSplit(docs)
    counting = CountingTokenizer(tok) if workers == 1 else tok  # calls in workers are not countable here
    store = build_store(split, counting, SEQ, tmp_path, source="bible", chunk_docs=chunk, workers=workers)
    assert sorted(split.reads) == [i * chunk for i in range(n_chunks) if i not in finished]
    if workers == 1:
        assert counting.calls == n_chunks - len(finished)
    np.testing.assert_array_equal(store.rows, reference)


def test_changed_plan_discards_old_parts(docs, tok, reference, tmp_path):
    with pytest.raises(RuntimeError):
        build_store(ListSplit(docs, fail_at=10), tok, SEQ, tmp_path, source="bible", chunk_docs=5, workers=1)
    split = ListSplit(docs)
    store = build_store(split, tok, SEQ, tmp_path, source="bible", chunk_docs=7, workers=1)
    assert split.reads == list(range(0, len(docs), 7))  # parts cut at another chunk size are not reused
    np.testing.assert_array_equal(store.rows, reference)


def test_mismatched_expectation_names_the_key(docs, tok, tmp_path):
    build_store(ListSplit(docs), tok, SEQ, tmp_path, source="bible", chunk_docs=8, workers=1)
    with pytest.raises(ValueError, match=rf"tokenizer_fingerprint='{tok.fingerprint}', "
                                         r"expected tokenizer_fingerprint='0000000000000000'"):
        open_store(tmp_path, expect={"tokenizer_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match=rf"seq_len={SEQ}, expected seq_len=128"):
        open_store(tmp_path, expect={"seq_len": 128})
    with pytest.raises(ValueError, match="store has revision='<missing>'"):
        open_store(tmp_path, expect={"revision": "abc"})
    assert not store_ready(tmp_path, {"seq_len": 128})

    # Building again with another seq_len replaces the store in place.
    store = build_store(ListSplit(docs), tok, 128, tmp_path, source="bible", chunk_docs=8, workers=1)
    np.testing.assert_array_equal(store.rows, pack(tok.encode_batch(docs), 128, tok.eos_id))
    assert open_store(tmp_path, expect={"seq_len": 128}).manifest["seq_len"] == 128


@pytest.mark.parametrize("workers", [1, 2])
def test_token_id_outside_vocab_raises(docs, tok, tmp_path, workers):
    bad = OutOfVocabTokenizer(tok, docs[7])
    with pytest.raises(ValueError, match=r"source 'bible': document 7 has token id 2000, outside \[0, vocab_size=2000\)"):
        build_store(ListSplit(docs), bad, SEQ, tmp_path, source="bible", chunk_docs=5, workers=workers)
    assert not (tmp_path / MANIFEST).exists()


def test_unpicklable_tokenizer_needs_one_worker(docs, tok, tmp_path):
    unpicklable = CountingTokenizer(tok)
    unpicklable.hook = lambda: None
    with pytest.raises(TypeError, match="pass workers=1"):
        build_store(ListSplit(docs), unpicklable, SEQ, tmp_path, source="bible", workers=2)


def test_source_smaller_than_one_row_raises(tok, tmp_path):
    with pytest.raises(ValueError, match=r"source 'tiny' is too small to pack: 5 tokens .* 2 documents.* "
                                         r"seq_len \+ 1 = 65"):
        build_store(ListSplit(["a b", "c"]), WordTokenizer(), SEQ, tmp_path, source="tiny", workers=1)
    with pytest.raises(ValueError, match=r"source 'none' is too small to pack: 0 tokens"):
        build_store(ListSplit([]), tok, SEQ, tmp_path / "none", source="none", workers=1)
    with pytest.raises(FileNotFoundError, match="not a prepared token store"):
        open_store(tmp_path)

