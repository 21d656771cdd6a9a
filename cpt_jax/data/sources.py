"""Named text sources, each read by random access from a prepared TFDS dataset
(array_record; TensorFlow is never needed).

A source is configured as `data.sources.<name> = {"kind": ..., ...}`:

  bible  lang: one of `LANGS`: "en" (KJV), "zh" (CUV), "fr", "de", "ru", "es", "ar" (the
         public-domain editions of parallel_bibles.py). The bundled Bible, one document per
         chapter (builders/bible). eval: the chapters `corpora.split_documents` holds out at
         3%, the same chapters in every language.
  files  paths: glob or list of globs; format: "txt" | "jsonl" | "parquet" (default: from
         the files' extension); text_field: jsonl key / parquet column (default "text");
         eval_fraction (default 0.01). Built by builders/text_files: a txt document is a
         block of lines ended by a blank line (so one per paragraph); jsonl/parquet have one
         per row. eval: documents whose content hash is below a cutoff, about
         eval_fraction of them and at least one. A document that cannot be read as text
         (invalid UTF-8 or JSON, no text field, a null) fails the source, naming file and
         line or row, unless `data.bad_documents = "skip"` (for every files source): then it
         is left out of both splits, counted, and the first few are named by position, in the
         log and in `bad_documents(spec, data_dir)` (kept in the prepared dataset's metadata,
         and by pipeline.build in each store's manifest). A broken file still fails.
  tfds   tfds_name: e.g. "wikipedia/20230601.en" or "c4/en:3.1.0"; split (default
         "train"); eval_split (default "": hold out about eval_fraction of `split` by
         content hash, as files sources do; `prepare` finds those records in one pass over
         the split and keeps their positions in `<data_dir>/holdout`); text_feature (default
         "text"); data_dir (default: TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets). It
         must already be prepared with `tfds build --file_format=array_record`; it is never
         downloaded here. A record
         that is not valid UTF-8 fails, naming the source, split and record index (TFDS wrote
         it from a str, so it is not expected; data.bad_documents does not apply).

Our builders write to `<data_dir>/tfds/<builder>/<config>/<version>`, so a prepared files
or bible source can also be read elsewhere as kind "tfds" with data_dir `<data_dir>/tfds`.
TFDS builds into an `incomplete.*` folder and renames it when done, so an interrupted
build is never read as complete and the next `prepare` builds it again. Jobs that prepare one
source at once build it once: one builds under its lock, the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cpt_jax.data import tfds_features
from cpt_jax.data.builders.bible import EVAL_FRACTION as BIBLE_EVAL_FRACTION
from cpt_jax.data.builders.bible import Bible
from cpt_jax.data.builders.text_files import (
    BAD_DOCUMENTS,
    FORMATS,
    Skipped,
    TextFiles,
    TextFilesConfig,
    good_documents,
    read_documents,
)
from cpt_jax.data.holdout import Positions, content_hash, eval_cutoff
from cpt_jax.data.parallel_bibles import LANGS
from cpt_jax.storage import atomic_path, exclusive

log = logging.getLogger("cpt_jax")

KINDS = ("bible", "files", "tfds")
SPLITS = ("train", "eval")

# Fields each kind accepts (besides "kind") and those it requires.
_FIELDS = {
    "bible": {"lang"},
    "files": {"paths", "format", "text_field", "eval_fraction"},
    "tfds": {"tfds_name", "split", "eval_split", "text_feature", "data_dir", "eval_fraction"},
}
_REQUIRED = {"bible": {"lang"}, "files": {"paths"}, "tfds": {"tfds_name"}}
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One validated `data.sources.<name>` entry; fields unused by `kind` keep their defaults."""

    name: str
    kind: str  # bible | files | tfds
    lang: str = ""  # bible
    paths: tuple[str, ...] = ()  # files: globs
    format: str = ""  # files: txt | jsonl | parquet; "": from the extension
    text_field: str = "text"  # files: jsonl key / parquet column
    eval_fraction: float = 0.01  # files; tfds without eval_split; bible: fixed at 0.03
    tfds_name: str = ""  # tfds: "name[/config][:version]"
    split: str = "train"  # tfds
    eval_split: str = ""  # tfds; "": hold out eval_fraction of `split` by content
    text_feature: str = "text"  # tfds
    data_dir: str = ""  # tfds; "": TFDS's default
    bad_documents: str = "error"  # files: error | skip, from data.bad_documents (see the module docstring)


# ---------------------------------------------------------------- config


def _paths(where: str, value: Any) -> tuple[str, ...]:
    paths = (value,) if isinstance(value, str) else value
    if not isinstance(paths, Sequence) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{where}.paths: expected a glob or a non-empty list of globs, got {value!r}")
    return tuple(paths)


def _check_values(where: str, spec: SourceSpec, given: set[str]) -> None:
    """Type and range checks on the fields the user gave."""
    for field in given - {"paths", "eval_fraction"}:
        if not isinstance(getattr(spec, field), str):
            raise ValueError(f"{where}.{field}: expected a string, got {getattr(spec, field)!r}")
    for field in given & {"text_field", "tfds_name", "split", "text_feature"}:
        if not getattr(spec, field):
            raise ValueError(f"{where}.{field}: must not be empty")
    if "lang" in given and spec.lang not in LANGS:
        raise ValueError(f"{where}.lang: must be one of {LANGS}, got {spec.lang!r}")
    if "format" in given and spec.format not in ("", *FORMATS):
        raise ValueError(f"{where}.format: must be one of {FORMATS} (or empty: from the extension), got {spec.format!r}")
    fraction = spec.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"{where}.eval_fraction: must be a number in (0, 0.5], got {fraction!r}")
    if spec.eval_split and spec.eval_split == spec.split:
        raise ValueError(f"{where}.eval_split: must differ from split {spec.split!r}, or train and eval would overlap")


def check_bad_documents(mode: Any) -> str:
    """`data.bad_documents`, validated."""
    if mode not in BAD_DOCUMENTS:
        raise ValueError(f"data.bad_documents: must be one of {BAD_DOCUMENTS}, got {mode!r}")
    return mode


def source_spec(name: str, cfg: Any, bad_documents: str = "error") -> SourceSpec:
    """Validate one `data.sources.<name>` entry (a dict or ConfigDict); `bad_documents` is
    `data.bad_documents`, kept by files sources.

    Raises ValueError naming `data.sources.<name>.<field>` for an unknown, missing or
    invalid field."""
    where = f"data.sources.{name}"
    check_bad_documents(bad_documents)
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping of fields, got {cfg!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}.kind: must be one of {KINDS}, got {kind!r}")
    fields = {k: v for k, v in raw.items() if k != "kind"}
    unknown = sorted(set(fields) - _FIELDS[kind])
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field for kind {kind!r} (allowed: {sorted(_FIELDS[kind])})")
    missing = sorted(_REQUIRED[kind] - set(fields))
    if missing:
        raise ValueError(f"{where}.{missing[0]}: required for kind {kind!r}")
    if "paths" in fields:
        fields["paths"] = _paths(where, fields["paths"])
    if kind == "bible":
        fields["eval_fraction"] = BIBLE_EVAL_FRACTION  # the corpus' own held-out chapters
    if kind == "files":
        fields["bad_documents"] = bad_documents
    spec = SourceSpec(name=name, kind=kind, **fields)
    _check_values(where, spec, set(raw) - {"kind"})
    return spec


# ---------------------------------------------------------------- identity


def _digest(identity: Any) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _resolve_files(spec: SourceSpec) -> tuple[list[str], str]:
    """Absolute paths the globs match (sorted per glob, first occurrence kept) and their format."""
    files: dict[str, None] = {}
    for pattern in spec.paths:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"data.sources.{spec.name}.paths: {pattern!r} matches no files")
        files.update(dict.fromkeys(os.path.abspath(p) for p in matches))
    if spec.format:
        return list(files), spec.format
    formats = {_EXTENSIONS.get(Path(p).suffix.lower()) for p in files}
    if len(formats) != 1 or None in formats:
        examples = sorted({Path(p).suffix or Path(p).name for p in files})[:5]
        raise ValueError(f"data.sources.{spec.name}.format: cannot tell it from the file extensions "
                         f"{examples}; set it to one of {FORMATS}")
    return list(files), formats.pop()


def _files_identity(spec: SourceSpec) -> tuple[list[str], str, str]:
    """The files, their format, and a digest of everything that decides the prepared
    data, file sizes and mtimes included, so that changed files get a fresh build."""
    files, fmt = _resolve_files(spec)
    stats = [os.stat(p) for p in files]
    identity = {
        "version": str(TextFiles.VERSION),
        "files": [[p, st.st_size, st.st_mtime_ns] for p, st in zip(files, stats)],
        "format": fmt,
        "text_field": spec.text_field,
        "eval_fraction": spec.eval_fraction,
    }
    if spec.bad_documents != "error":  # only then: sources prepared before the option keep their identity
        identity["bad_documents"] = spec.bad_documents
    return files, fmt, _digest(identity)


def _files_config(spec: SourceSpec) -> TextFilesConfig:
    files, fmt, digest = _files_identity(spec)
    slug = re.sub(r"[^\w.-]+", "_", spec.name)  # TFDS config names allow only these
    return TextFilesConfig(name=f"{slug}-{digest}", description=f"source {spec.name!r}: {len(files)} {fmt} files",
                           files=tuple(files), format=fmt, text_field=spec.text_field,
                           bad_documents=spec.bad_documents)


def fingerprint(spec: SourceSpec) -> str:
    """16 hex chars that change when the source's content identity changes: for files
    their paths, sizes and mtimes; for tfds the prepared dataset's name/config/version
    and the splits read (and how eval is held out); for bible the language and builder version."""
    if spec.kind == "files":
        return _files_identity(spec)[2]
    if spec.kind == "bible":
        version = Bible.builder_configs[spec.lang].version or Bible.VERSION  # editions have their own
        return _digest(["bible", spec.lang, str(version)])
    info = _prepared_tfds(spec).info
    # "content:": held out by content hash; sources held out by index ("hash:") get fresh stores.
    holdout = spec.eval_split or f"content:{spec.eval_fraction}"
    return _digest(["tfds", info.full_name, spec.split, holdout, spec.text_feature])


# ---------------------------------------------------------------- TFDS datasets


def _tfds_dir(data_dir: str | os.PathLike) -> str:
    return os.fspath(Path(data_dir) / "tfds")


def _text_files(config: TextFilesConfig, data_dir: str | os.PathLike) -> TextFiles:
    return TextFiles(config=config, data_dir=_tfds_dir(data_dir), file_format="array_record")


def _own_builder(spec: SourceSpec, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
    """The builder of a bible or files source, prepared or not."""
    if spec.kind == "bible":
        return Bible(config=spec.lang, data_dir=_tfds_dir(data_dir), file_format="array_record")
    return _text_files(_files_config(spec), data_dir)


def _prepared_tfds(spec: SourceSpec) -> tfds.core.DatasetBuilder:
    """The already prepared dataset of a tfds source, read from its files alone (no
    builder code, so no catalog imports and no downloads), checked for our use."""
    where = f"data.sources.{spec.name}"
    data_dir = spec.data_dir or tfds.core.constants.DATA_DIR
    try:
        tfds_features.check(data_dir, spec.tfds_name)  # before TFDS imports what its files name
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    try:
        builder = tfds.core.read_only_builder.builder_from_files(spec.tfds_name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"{where}.tfds_name: TFDS dataset {spec.tfds_name!r} is not prepared in {data_dir}. It is never "
            f"downloaded here; prepare it first with: tfds build {spec.tfds_name} --data_dir={data_dir} "
            f"--file_format=array_record") from None
    info = builder.info
    if not info.available_file_formats() & tfds.core.FileFormat.with_random_access():
        raise ValueError(f"{where}: {info.full_name} in {data_dir} is stored as {info.file_format.value}, which "
                         f"has no random access; rebuild it with tfds build --file_format=array_record")
    for field in ("split", "eval_split"):
        split = getattr(spec, field)
        if split and split not in info.splits:
            raise ValueError(f"{where}.{field}: {info.full_name} has no split {split!r} (splits: {list(info.splits)})")
    features = info.features
    names = list(features.keys()) if isinstance(features, tfds.features.FeaturesDict) else []
    if spec.text_feature not in names or not isinstance(features[spec.text_feature], tfds.features.Text):
        raise ValueError(f"{where}.text_feature: {info.full_name} has no text feature {spec.text_feature!r} "
                         f"(features: {names})")
    if not spec.eval_split and info.splits[spec.split].num_examples < 2:
        raise ValueError(f"{where}.split: {spec.split!r} has fewer than 2 examples; one is held out for eval")
    return builder


def _files_eval_cutoff(spec: SourceSpec, config: TextFilesConfig) -> tuple[int, Skipped]:
    """Read every document once: validates all files before anything is written. Also returns
    the bad documents skipped (the builder skips the same ones)."""
    docs = (d for path in config.files for d in read_documents(path, config.format, config.text_field))
    skipped = Skipped()
    hashes = (content_hash(d.encode("utf-8")) for d in good_documents(docs, config.bad_documents, skipped))
    try:
        return eval_cutoff(hashes, spec.eval_fraction), skipped
    except ValueError as e:
        also = f" ({skipped_line(spec.name, skipped.record())})" if skipped.count else ""
        raise ValueError(f"data.sources.{spec.name} (paths {list(spec.paths)}): {e}{also}") from None


def skipped_line(name: str, record: dict) -> str:
    """A skip record (`bad_documents`) as one log line."""
    more = ", ..." if record["count"] > len(record["first"]) else ""
    return f"skipped {record['count']} bad documents of source {name}: {', '.join(record['first'])}{more}"


def bad_documents(spec: SourceSpec, data_dir: str | os.PathLike) -> dict | None:
    """What preparing a files source with bad_documents="skip" left out, as kept with its
    prepared dataset: {"count": n, "first": ["path: line N (reason)", ...]}; None for any
    other source, whose bad documents fail it."""
    if spec.kind != "files" or spec.bad_documents != "skip":
        return None
    builder = _own_builder(spec, data_dir)
    if not builder.is_prepared():
        raise ValueError(f"data.sources.{spec.name}: not prepared in {_tfds_dir(data_dir)}; call prepare() first")
    return dict(builder.info.metadata.items())["bad_documents"]  # items(): the lazy dict's get() would not load


def prepare(spec: SourceSpec, data_dir: str | os.PathLike) -> None:
    """Build a bible or files source into `<data_dir>/tfds` unless already built (then
    it is reused as is), or wait for another process building it; check that a tfds source is
    prepared, and without an eval split choose its held-out records (`_hold_out`). Bad input
    raises a ValueError naming the source and the file or field, before anything is written."""
    if spec.kind == "tfds":
        builder = _prepared_tfds(spec)
        if not spec.eval_split:
            _hold_out(spec, builder, data_dir)
        return
    builder = _own_builder(spec, data_dir)
    if builder.is_prepared():
        return
    if spec.kind == "files":  # validated (every document read) before the lock: bad input writes nothing
        config = builder.builder_config
        cutoff, skipped = _files_eval_cutoff(spec, config)
        builder = _text_files(dataclasses.replace(config, eval_cutoff=cutoff), data_dir)
    else:
        skipped = Skipped()
    # One process builds; TFDS would fail renaming its build onto one another process renamed first.
    with exclusive(builder.data_dir):
        if builder.is_prepared():  # built by another process while this one validated or waited
            return
        # Nothing to fetch: without this, TFDS first asks GCS whether a prepared copy exists. TFDS
        # prints its progress to stdout, which belongs to callers (JSON of the prepare CLI, benches).
        log.info("preparing source %s into %s", spec.name, builder.data_dir)
        if skipped.count:
            log.warning("%s", skipped_line(spec.name, skipped.record()))
        tfds.disable_progress_bar()  # bars flood the logs of cluster jobs
        with contextlib.redirect_stdout(sys.stderr):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _held_out_path(spec: SourceSpec, records: Any, data_dir: str | os.PathLike) -> Path:
    """The held-out positions of a tfds source without an eval split, by its identity and record count."""
    return Path(data_dir) / "holdout" / f"{fingerprint(spec)}-{len(records)}.npy"


def _hold_out(spec: SourceSpec, builder: tfds.core.DatasetBuilder, data_dir: str | os.PathLike) -> None:
    """The positions of the records of `spec.split` held out by content, found in one pass over
    the split (unless found already, or by another process meanwhile) and kept in `data_dir`."""
    records = builder.as_data_source(spec.split)
    path = _held_out_path(spec, records, data_dir)
    if path.exists():  # written atomically: present means complete
        return
    with exclusive(path):
        if path.exists():
            return
        n, chunk = len(records), 1024
        log.info("holding out about %g of the %d records of source %s by content", spec.eval_fraction, n, spec.name)
        hashes = np.empty(n, np.uint64)
        for start in range(0, n, chunk):
            rows = records.__getitems__(list(range(start, min(n, start + chunk))))
            hashes[start:start + len(rows)] = [content_hash(row[spec.text_feature]) for row in rows]
        try:
            cutoff = eval_cutoff(map(int, hashes), spec.eval_fraction)
        except ValueError as e:
            raise ValueError(f"data.sources.{spec.name}: {builder.info.full_name} split {spec.split!r}: {e}") from None
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.flatnonzero(hashes < np.uint64(cutoff)))


# ---------------------------------------------------------------- reading


class TextSplit:
    """Random access to the documents of one split of a source, as str."""

    def __init__(self, records: Any, feature: str, positions: Sequence[int] | None = None, *,
                 where: str = "records"):
        self._records = records  # a TFDS data source: len() and __getitems__ over dicts
        self._feature = feature
        self._positions = positions if positions is not None else range(len(records))
        self._where = where  # names the records in errors: "data.sources.<name>, TFDS split 'train'"

    def __len__(self) -> int:
        return len(self._positions)

    def texts(self, start: int, stop: int) -> list[str]:
        """Documents [start, stop), decoded."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"texts({start}, {stop}) out of range for a split of {len(self)} documents")
        indices = [self._positions[k] for k in range(start, stop)]
        rows = self._records.__getitems__(indices)
        try:
            return [row[self._feature].decode("utf-8") for row in rows]
        except UnicodeDecodeError:
            for index, row in zip(indices, rows):
                try:
                    row[self._feature].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self._where}: record {index} is not valid UTF-8 ({e.reason} at byte "
                                     f"{e.start} of its {self._feature!r})") from None
            raise


def open_split(spec: SourceSpec, split: str, data_dir: str | os.PathLike) -> TextSplit:
    """The `train` or `eval` documents of a source; bible and files sources, and tfds sources
    without an eval split, must have been prepared into `data_dir` (with their current files) by
    `prepare`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.kind == "tfds":
        builder = _prepared_tfds(spec)
        if spec.eval_split:
            tfds_split = {"train": spec.split, "eval": spec.eval_split}[split]
            return TextSplit(builder.as_data_source(tfds_split), spec.text_feature,
                             where=f"data.sources.{spec.name}: {builder.info.full_name} split {tfds_split!r}")
        records = builder.as_data_source(spec.split)
        path = _held_out_path(spec, records, data_dir)
        if not path.exists():
            raise ValueError(f"data.sources.{spec.name}: its held-out records are not chosen in {path.parent}; "
                             f"call prepare() first")
        return TextSplit(records, spec.text_feature, Positions(len(records), np.load(path), split == "eval"),
                         where=f"data.sources.{spec.name}: {builder.info.full_name} split {spec.split!r}")
    builder = _own_builder(spec, data_dir)
    if not builder.is_prepared():
        raise ValueError(f"data.sources.{spec.name}: not prepared in {_tfds_dir(data_dir)} (or its files changed "
                         f"since); call prepare() first")
    return TextSplit(builder.as_data_source(split), "text", where=f"data.sources.{spec.name}: split {split!r}")
