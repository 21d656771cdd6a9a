"""From a run's `data` config to what the trainer reads: sources -> tokenizer -> token stores.

Everything lands under one data dir (`data.dir`, default $CPT_JAX_CACHE/data or
~/.cache/cpt_jax/data), keyed by content so that runs share what they can and never read
something built for other inputs:

    tfds/                                       sources prepared as TFDS array_record datasets
    holdout/<source fp>-<records>.npy           the records a tfds source without eval_split holds out
    tokenizers/<hash of sources + options>/     a sentencepiece model trained on the train splits
    stores/<source>-<source fp>/<tokenizer fp>-seq<L>[-bos<id>][-eos<id>]/{train,eval}/
                                                packed rows + manifest (suffixes: a framing other
                                                than no BOS and the tokenizer's EOS, `packing.py`)

Jobs started at once on one data dir (a SLURM array on an empty cache, say) share the work: each
source, tokenizer and store is built by one of them while the others wait for it (a lock per
unit, `cpt_jax.storage.exclusive`), then read by all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cpt_jax.data import sources as src_lib
from cpt_jax.data.corpora import default_cache_dir
from cpt_jax.data.mixture import Mixture
from cpt_jax.data.packing import Framing
from cpt_jax.data.store import Store, build_store, open_store, store_ready
from cpt_jax.data.tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer
from cpt_jax.storage import exclusive, private_dir, write_atomic

log = logging.getLogger("cpt_jax")

SPLITS = ("train", "eval")
# sentencepiece skips training lines over 4 KB; documents are cut into pieces this long.
_TOKENIZER_PIECE_CHARS = 1000


@dataclasses.dataclass
class Data:
    tokenizer: object
    framing: Framing  # BOS and EOS around each document, as the stores were built
    train: dict[str, np.ndarray]  # source -> int32 rows [n, seq_len + 1] (memory-mapped)
    eval: dict[str, np.ndarray]  # held-out rows of each source, never trained on
    manifests: dict[str, dict]  # "<source>/<split>" -> the store's manifest


def data_dir(dcfg) -> Path:
    """`data.dir`, or the cache's `data`: its tokenizers and stores are trusted on their markers,
    so others must not be able to write it (storage.private_dir; created 0755 less the umask)."""
    return private_dir(dcfg.dir, mode=0o755) if dcfg.dir else default_cache_dir() / "data"


def source_specs(dcfg) -> dict[str, src_lib.SourceSpec]:
    """Parses every `data.sources.<name>` (and `data.bad_documents`); raises ValueError naming the field."""
    if not dcfg.sources:
        raise ValueError("data.sources is empty: name at least one source")
    bad = src_lib.check_bad_documents(dcfg.get("bad_documents", "error"))
    return {name: src_lib.source_spec(name, cfg, bad) for name, cfg in dcfg.sources.items()}


def mixture_stages(dcfg, total_steps: int) -> list[tuple[int, dict[str, float]]]:
    """[(start_step, {source: weight})]. `data.weights` (any number of sources) overrides
    target + replay at `replay_ratio`; `data.stages` entries are (start, replay ratio or weights),
    start a step or a fraction of total_steps."""
    names = list(dcfg.sources)

    def weights(spec) -> dict[str, float]:
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ValueError(f"data.weights/stages name {unknown}, which are not in data.sources {names}")
            return {n: float(spec.get(n, 0.0)) for n in names}
        r = float(spec)
        if not 0.0 <= r < 1.0:
            raise ValueError(f"replay ratio {r} must be in [0, 1)")
        for field in ("target", "replay"):
            if dcfg[field] not in names:
                raise ValueError(f"data.{field}={dcfg[field]!r} is not one of data.sources {names}")
        w = {n: 0.0 for n in names}
        w[dcfg.target] = 1.0 - r
        if r > 0:
            w[dcfg.replay] = r
        return w

    first = dict(dcfg.weights) if dcfg.weights else dcfg.replay_ratio
    stages = [(0, weights(first))]
    for start, spec in dcfg.stages:
        step = int(round(start * total_steps)) if isinstance(start, float) and start < 1 else int(start)
        stages.append((step, weights(spec)))
    # Checked here, not only by Mixture, so that a bad config fails before any data is prepared.
    for (a, _), (b, _) in zip(stages, stages[1:]):
        if b <= a:
            raise ValueError(f"data.stages must start after step 0 and increase, got starts {[s for s, _ in stages]}")
    for start, w in stages:
        if any(v < 0 for v in w.values()) or abs(sum(w.values()) - 1.0) > 1e-6:
            raise ValueError(f"data weights from step {start} must be >= 0 and sum to 1, got {w}")
    return stages


def tokenizer(dcfg, specs: dict[str, src_lib.SourceSpec], root: Path):
    """`data.tokenizer.path`, else UTF-8 bytes (model_type "bytes"), else a sentencepiece model
    trained on the sources' train splits (cached under the data dir by a hash of the sources and
    options)."""
    t = dcfg.tokenizer
    if t.path:
        return load_tokenizer(t.path)
    if t.model_type == "bytes":
        return ByteTokenizer()
    train_on = list(t.train_on) or list(specs)
    options = {"vocab_size": t.vocab_size, "character_coverage": t.character_coverage,
               "byte_fallback": t.byte_fallback, "model_type": t.model_type, "max_docs": t.max_docs,
               "sources": {n: src_lib.fingerprint(specs[n]) for n in train_on}}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    path = root / "tokenizers" / key / "tokenizer.model"
    if path.exists():  # written atomically, and last: present means complete
        return load_tokenizer(path)
    with exclusive(path.parent):  # one job trains it; jobs started with it wait, then load it
        if path.exists():
            return load_tokenizer(path)
        log.info("training a %d-piece %s tokenizer on %s", t.vocab_size, t.model_type, ", ".join(train_on))
        lines: list[str] = []
        for name in train_on:
            split = src_lib.open_split(specs[name], "train", root)
            n = len(split)
            stride = max(1, n // t.max_docs) if t.max_docs else 1  # an even sample of a big source
            for i in range(0, n, stride):
                for doc in split.texts(i, i + 1):
                    for line in doc.splitlines():
                        lines += _pieces(line)
        write_atomic(path.parent / "options.json", json.dumps(options, indent=2, sort_keys=True))
        return train_tokenizer(lines, path, t.vocab_size, model_type=t.model_type,
                               character_coverage=t.character_coverage, byte_fallback=t.byte_fallback)


def _pieces(line: str) -> list[str]:
    """A long line cut at spaces or sentence ends, so no training piece splits a word."""
    out = []
    while len(line) > _TOKENIZER_PIECE_CHARS:
        head = line[:_TOKENIZER_PIECE_CHARS]
        cut = max(head.rfind(" "), head.rfind("。"), head.rfind("."))
        cut = cut + 1 if cut > 0 else _TOKENIZER_PIECE_CHARS
        out.append(line[:cut])
        line = line[cut:]
    return out + [line] if line else out


def framing(dcfg, tokenizer) -> Framing:
    """`data.framing` for this tokenizer; raises ValueError naming the field."""
    return Framing.of(tokenizer, dcfg.framing.bos, dcfg.framing.eos)


def store_dir(root: Path, name: str, spec: src_lib.SourceSpec, tokenizer, seq_len: int, split: str,
              framed: Framing | None = None) -> Path:
    suffix = framed.suffix(tokenizer) if framed else ""
    return (root / "stores" / f"{name}-{src_lib.fingerprint(spec)}" / f"{tokenizer.fingerprint}-seq{seq_len}{suffix}"
            / split)


def build(dcfg, seq_len: int, workers: int | None = None) -> Data:
    """Prepares whatever is missing (sources, tokenizer, stores) and opens the stores.
    Bad input fails here, before the trainer compiles anything."""
    specs = source_specs(dcfg)  # before data_dir makes the folder: bad input writes nothing
    root = data_dir(dcfg)
    for spec in specs.values():
        src_lib.prepare(spec, root)
    tok = tokenizer(dcfg, specs, root)
    framed = framing(dcfg, tok)
    workers = workers or dcfg.workers
    out: dict[str, dict[str, Store]] = {s: {} for s in SPLITS}
    for name, spec in specs.items():
        bad = _bad_documents(name, spec, root)
        for split in SPLITS:
            path = store_dir(root, name, spec, tok, seq_len, split, framed)
            expect = {"tokenizer_fingerprint": tok.fingerprint, "seq_len": seq_len, "eos_id": framed.eos_id}
            if not store_ready(path, expect):  # build_store logs it when it builds (not while it waits)
                build_store(src_lib.open_split(spec, split, root), tok, seq_len, path, source=name, workers=workers,
                            framing=framed, meta={"bad_documents": bad} if bad is not None else None)
            out[split][name] = open_store(path, expect=expect)
    return Data(
        tokenizer=tok,
        framing=framed,
        train={n: s.rows for n, s in out["train"].items()},
        eval={n: s.rows for n, s in out["eval"].items()},
        manifests={f"{n}/{split}": s.manifest for split in SPLITS for n, s in out[split].items()},
    )


def _bad_documents(name: str, spec: src_lib.SourceSpec, root: Path) -> dict | None:
    """The source's skip record (None unless data.bad_documents="skip"), logged when it skipped
    any, so that every run's log says so; stores keep it in their manifest's meta (of the source,
    since a bad document is in neither split). Only then: other stores keep their identity."""
    bad = src_lib.bad_documents(spec, root)
    if bad and bad["count"]:
        log.warning("%s", src_lib.skipped_line(name, bad))
    return bad


def mixture(dcfg, data: Data, total_steps: int, seed: int) -> Mixture:
    """The training stream over the sources with a positive weight in some stage."""
    stages = mixture_stages(dcfg, total_steps)
    used = [n for n in dcfg.sources if any(w[n] > 0 for _, w in stages)]
    return Mixture({n: data.train[n] for n in used}, [(s, {n: w[n] for n in used}) for s, w in stages], seed=seed)
