"""TFDS builder over local text files: one example `{"text": str}` per document.

Documents by format (whitespace-only documents are skipped):
  txt      blocks of non-blank lines; one or more blank lines separate documents, so a
           file of paragraphs gives one document per paragraph, and a file with no blank
           lines is one document
  jsonl    one JSON object per non-blank line; the document is its `text_field` string
  parquet  one row per document; the document is its `text_field` string column

Splits `train` and `eval`: a document is held out iff a 64-bit hash of its content is
below the config's `eval_cutoff` (cpt_jax.data.holdout), so copies of one document never
straddle the two splits. Documents keep their file order.

A bad document is one that cannot be read as text: invalid UTF-8 in a txt block (the whole
block) or a jsonl line, invalid JSON, a jsonl row that is no object or lacks `text_field`, a
text that is no string or holds lone surrogates, a null parquet value. `read_documents`
yields it as a `BadDocument`; `good_documents` fails on it (config `bad_documents="error"`)
or leaves it out of both splits and counts it ("skip"; the count and the first few positions
go into the dataset's `info.metadata["bad_documents"]`). A broken file (unreadable parquet,
missing or non-string column) is no document: it always fails.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath

from cpt_jax.data.builders import text_info
from cpt_jax.data.holdout import content_hash

FORMATS = ("txt", "jsonl", "parquet")
BAD_DOCUMENTS = ("error", "skip")  # what `good_documents` does with a bad document
FIRST_NAMED = 5  # bad documents named by position in a skip record


@dataclasses.dataclass(frozen=True)
class BadDocument:
    """A document that cannot be read as text. `error` is the message mode "error" fails
    with; str() names it for a skip record: "path: line N (reason)"."""

    where: str  # "path: line N" or "path: row N"
    reason: str  # e.g. "invalid JSON (Expecting value)"
    error: str

    def __str__(self) -> str:
        return f"{self.where} ({self.reason})"


def _bad(where: str, reason: str) -> BadDocument:
    return BadDocument(where, reason, f"{where}: {reason}")


def _utf8_lines(path: str) -> Iterator[tuple[int, str | BadDocument]]:
    """(line number, line) pairs; a line of invalid UTF-8 is a BadDocument naming its byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"invalid UTF-8 at byte {offset + e.start}"
                line = BadDocument(f"{path}: line {lineno}", reason, f"{path}: {reason} (line {lineno})")
            offset += len(raw)
            if lineno == 1 and isinstance(line, str):
                line = line.removeprefix("\ufeff")  # a byte-order mark is not text
            yield lineno, line


def _txt_documents(path: str) -> Iterator[str | BadDocument]:
    block: list[str] = []
    bad: BadDocument | None = None  # the block's first undecodable line: the whole block is bad
    for _, line in _utf8_lines(path):
        if isinstance(line, BadDocument):
            bad = bad or line
        elif line.strip():
            block.append(line.rstrip("\r\n"))
        elif block or bad:
            yield bad or "\n".join(block)
            block, bad = [], None
    if block or bad:
        yield bad or "\n".join(block)


def _jsonl_documents(path: str, text_field: str) -> Iterator[str | BadDocument]:
    for lineno, line in _utf8_lines(path):
        if isinstance(line, BadDocument):
            yield line
            continue
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield _bad(where, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or text_field not in row:
            yield _bad(where, f"no field {text_field!r}")
            continue
        text = row[text_field]
        if not isinstance(text, str):
            yield _bad(where, f"field {text_field!r} is {type(text).__name__}, not a string")
            continue
        try:
            text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
        except UnicodeEncodeError as e:
            yield _bad(where, f"field {text_field!r} is not valid Unicode ({e.reason})")
            continue
        yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str | BadDocument]:
    try:
        table = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    schema = table.schema_arrow
    if text_field not in schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {schema.names})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} has type {kind}, not string")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield _bad(f"{path}: row {row}", f"{text_field!r} is null") if text is None else text
            row += 1


def read_documents(path: str, format: str, text_field: str) -> Iterator[str | BadDocument]:
    """The non-empty documents of one file, each a str or a BadDocument naming the file and
    the line, byte or row. A broken file (unreadable, no such column) raises ValueError."""
    if format == "txt":
        docs = _txt_documents(path)
    elif format == "jsonl":
        docs = _jsonl_documents(path, text_field)
    elif format == "parquet":
        docs = _parquet_documents(path, text_field)
    else:
        raise ValueError(f"{path}: unknown format {format!r}; expected one of {FORMATS}")
    return (d for d in docs if isinstance(d, BadDocument) or d.strip())


@dataclasses.dataclass
class Skipped:
    """The bad documents `good_documents` left out: how many, and the first few by position."""

    count: int = 0
    first: list[str] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        """As kept in a prepared dataset's metadata and a store's manifest."""
        return {"count": self.count, "first": list(self.first)}


def good_documents(docs: Iterable[str | BadDocument], mode: str, skipped: Skipped) -> Iterator[str]:
    """`docs` without the bad ones: mode "error" raises ValueError with the first one's message,
    "skip" counts them into `skipped`."""
    for doc in docs:
        if not isinstance(doc, BadDocument):
            yield doc
        elif mode == "skip":
            skipped.count += 1
            if len(skipped.first) < FIRST_NAMED:
                skipped.first.append(str(doc))
        else:
            raise ValueError(doc.error)


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    """One source's files. A prepared config is reused as is, so its name must change
    whenever the files do (cpt_jax.data.sources hashes paths, sizes and mtimes into it)."""

    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # TFDS logs the repr
    format: str = "txt"
    text_field: str = "text"
    eval_cutoff: int = 0  # from holdout.eval_cutoff; documents hashing below it are held out
    bad_documents: str = "error"  # error | skip (see `good_documents`)


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Documents of local txt/jsonl/parquet files, split into `train` and `eval`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: list[TextFilesConfig] = []  # one per source, made at run time
    # TFDS derives this itself through the `importlib_resources` backport, which it only
    # requires on Python < 3.9; naming the file directly needs nothing extra.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # metadata["bad_documents"] (mode skip): set while generating, saved with the dataset.
        return text_info(self, __doc__, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local: nothing to download
        return {"train": self._generate_examples(held_out=False), "eval": self._generate_examples(held_out=True)}

    def _generate_examples(self, held_out: bool):
        config = self.builder_config
        key = 0  # increasing int keys keep file order under disable_shuffling
        skipped = Skipped()
        for path in config.files:
            for text in good_documents(read_documents(path, config.format, config.text_field),
                                       config.bad_documents, skipped):
                if (content_hash(text.encode("utf-8")) < config.eval_cutoff) == held_out:
                    yield key, {"text": text}
                    key += 1
        if config.bad_documents == "skip":  # of the source: a bad document is in neither split
            self.info.metadata["bad_documents"] = skipped.record()
