"""The data config end to end: sources -> tokenizer -> token stores -> mixture, as the trainer
builds it, on real text."""

import json

import ml_collections
import numpy as np
import pytest

from cpt_jax.config import base
from cpt_jax.errors import ConfigError
from cpt_jax.data import pipeline


def _dcfg(tmp_path, **sources) -> ml_collections.ConfigDict:
    d = base().data
    d.dir = str(tmp_path / "data")
    if sources:
        d.sources = ml_collections.ConfigDict(sources)
    return d


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """Real English and Chinese chapters (the bundled Bible) written as a user's own files."""
    from cpt_jax.data.corpora import default_cache_dir, load_bible
    docs = load_bible(default_cache_dir())
    root = tmp_path_factory.mktemp("corpus")
    with open(root / "en.jsonl", "w", encoding="utf-8") as f:
        for d in docs["en"][:300]:
            f.write(json.dumps({"text": d.text}) + "\n")
    (root / "zh").mkdir()
    for i in range(3):  # several txt files, documents separated by blank lines
        chunk = docs["zh"][i * 100:(i + 1) * 100]
        (root / "zh" / f"part{i}.txt").write_text("\n\n".join(d.text for d in chunk), encoding="utf-8")
    return root


def test_files_sources_build_once_and_are_reused(tmp_path, corpus_files):
    d = _dcfg(tmp_path,
              en={"kind": "files", "paths": [str(corpus_files / "en.jsonl")], "eval_fraction": 0.05},
              zh={"kind": "files", "paths": [str(corpus_files / "zh" / "*.txt")], "eval_fraction": 0.05})
    d.tokenizer.vocab_size = 3000
    data = pipeline.build(d, seq_len=64, workers=2)
    for split in ("train", "eval"):
        for name in ("en", "zh"):
            rows = getattr(data, split)[name]
            assert rows.dtype == np.int32 and rows.shape[1] == 65 and rows.shape[0] > 0
            assert rows.max() < data.tokenizer.vocab_size
            assert data.manifests[f"{name}/{split}"]["tokenizer_fingerprint"] == data.tokenizer.fingerprint
            assert data.manifests[f"{name}/{split}"]["meta"] == {}  # no bad_documents record: identity as before
    # Held out means never trained on: no eval row appears among the training rows.
    for name in ("en", "zh"):
        train = {r.tobytes() for r in np.asarray(data.train[name])}
        assert not any(r.tobytes() in train for r in np.asarray(data.eval[name]))
    zh_text = data.tokenizer.decode(np.asarray(data.train["zh"][0]).tolist())
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in zh_text) > 20  # real Chinese, round-tripped

    # A second build reads what is there: nothing is rewritten.
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = pipeline.build(d, seq_len=64, workers=2)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
    assert all(np.array_equal(again.train[n], data.train[n]) for n in ("en", "zh"))


def test_skipped_bad_documents_reach_the_manifests_and_every_runs_log(tmp_path, corpus_files, caplog):
    lines = (corpus_files / "en.jsonl").read_bytes().splitlines()[:100]
    lines[10] = b'{"text": "a bad \xff byte"}'
    lines[20] = b'{"text": null}'
    path = tmp_path / "web.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    byte = sum(len(line) + 1 for line in lines[:10]) + lines[10].index(b"\xff")
    d = _dcfg(tmp_path, web={"kind": "files", "paths": [str(path)], "eval_fraction": 0.05})
    d.tokenizer.vocab_size = 500

    d.bad_documents = "drop"
    with pytest.raises(ValueError, match=r"^data\.bad_documents: must be one of \('error', 'skip'\), got 'drop'$"):
        pipeline.build(d, seq_len=64, workers=1)
    d.bad_documents = "error"
    with pytest.raises(ValueError, match=rf"web\.jsonl: invalid UTF-8 at byte {byte} \(line 11\)$"):
        pipeline.build(d, seq_len=64, workers=1)
    # both fail before anything is written: at most the (private) data dir itself, empty
    assert not (tmp_path / "data").exists() or not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]

    d.bad_documents = "skip"
    line = (f"skipped 2 bad documents of source web: {path}: line 11 (invalid UTF-8 at byte {byte}), "
            f"{path}: line 21 (field 'text' is NoneType, not a string)")
    with caplog.at_level("INFO", logger="cpt_jax"):
        data = pipeline.build(d, seq_len=64, workers=1)
    assert [r.getMessage() for r in caplog.records if "bad documents" in r.getMessage()] == [line, line]  # prepare, run
    record = {"count": 2, "first": [f"{path}: line 11 (invalid UTF-8 at byte {byte})",
                                    f"{path}: line 21 (field 'text' is NoneType, not a string)"]}
    for split in ("train", "eval"):  # the source's count, in each split's manifest
        assert data.manifests[f"web/{split}"]["meta"] == {"bad_documents": record}
    assert data.manifests["web/train"]["n_docs"] + data.manifests["web/eval"]["n_docs"] == 98

    caplog.clear()  # a later run, reusing everything, still says so
    with caplog.at_level("INFO", logger="cpt_jax"):
        pipeline.build(d, seq_len=64, workers=1)
    assert [r.getMessage() for r in caplog.records if "bad documents" in r.getMessage()] == [line]

    from cpt_jax.data.prepare import prepare  # the prepare CLI's summary says it, and names a bad mode
    config = base()
    config.seq_len, config.data = 64, d
    (summary,) = prepare(config)
    assert summary["stores"]["web/train"]["bad_documents"] == summary["stores"]["web/eval"]["bad_documents"] == 2
    config.data.bad_documents = "yes"
    with pytest.raises(ConfigError, match=r"^data\.bad_documents: must be one of"):
        prepare(config)


def test_mixture_stages_from_config(tmp_path):
    d = _dcfg(tmp_path)
    d.replay_ratio = 0.3
    d.stages = ((0.1, 0.05), (900, {"zh": 1.0}))
    assert pipeline.mixture_stages(d, total_steps=1000) == [
        (0, {"en": 0.3, "zh": 0.7}), (100, {"en": 0.05, "zh": 0.95}), (900, {"en": 0.0, "zh": 1.0})]
    d.weights = {"en": 0.2, "zh": 0.8}
    d.stages = ()
    assert pipeline.mixture_stages(d, 10) == [(0, {"en": 0.2, "zh": 0.8})]
    d.weights = {"fr": 1.0}
    with pytest.raises(ValueError, match="fr"):
        pipeline.mixture_stages(d, 10)
    d.weights = {"en": 0.2, "zh": 0.7}
    with pytest.raises(ValueError, match="sum to 1"):
        pipeline.mixture_stages(d, 10)
    d.weights, d.stages = {}, ((500, 0.1), (0.4, 0.0))  # 0.4 of 1000 steps is before step 500
    with pytest.raises(ValueError, match="increase"):
        pipeline.mixture_stages(d, 1000)
    d.stages, d.target = (), "fr"
    with pytest.raises(ValueError, match="data.target"):
        pipeline.mixture_stages(d, 1000)


def test_a_stage_replaces_the_mixture_before_it(tmp_path):
    """docs/data.md's example: three weighted sources, then a stage given as a replay ratio, which
    is target + replay alone (the third source leaves at the switch)."""
    d = _dcfg(tmp_path, zh={"kind": "bible", "lang": "zh"}, en={"kind": "bible", "lang": "en"},
              bible_en={"kind": "bible", "lang": "en"})
    d.target, d.replay = "zh", "en"
    d.weights = {"zh": 0.9, "en": 0.07, "bible_en": 0.03}
    d.stages = ((0.1, 0.05),)
    assert pipeline.mixture_stages(d, total_steps=1000) == [
        (0, {"zh": 0.9, "en": 0.07, "bible_en": 0.03}), (100, {"zh": 0.95, "en": 0.05, "bible_en": 0.0})]


def test_bad_sources_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.sources.x"):
        pipeline.source_specs(_dcfg(tmp_path, x={"kind": "nope"}))
    missing = _dcfg(tmp_path, en={"kind": "files", "paths": [str(tmp_path / "none" / "*.txt")]})
    with pytest.raises(ValueError, match="none"):
        pipeline.build(missing, seq_len=32)
    assert not (tmp_path / "data" / "stores").exists()  # nothing half-built


def test_prepare_imports_nothing_above_the_data_layer():
    """`python -m cpt_jax.data.prepare` runs on CPU nodes before a job: no model, trainer or
    converter stack (the cli it shares with main is below them)."""
    import subprocess
    import sys

    code = ("import sys, cpt_jax.data.prepare; "
            "print(' '.join(m for m in sys.modules if m.startswith('cpt_jax')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "cpt_jax.data.prepare" in loaded and "cpt_jax.cli" in loaded
    above = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in (
        "main", "trainer", "train", "models", "convert", "sweep", "checkpoint", "sharding", "generation", "scaling")]
    assert not above, above
