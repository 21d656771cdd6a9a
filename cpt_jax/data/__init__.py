"""Data: named text sources -> tokenizer -> packed token stores -> a mixture that is a pure
function of (seed, step, slot).

    sources.py   what a source is (bundled Bible, local files, TFDS datasets) and its splits
    corpora.py   the bundled Bible in en (KJV) and zh (CUV); parallel_bibles.py adds fr/de/ru/es/ar
    tokenizer.py one interface over sentencepiece models and HF tokenizer.json
    packing.py   how documents are framed (BOS/EOS) and packed into rows
    store.py     tokenize once, pack, memory-map; manifest written last
    mixture.py   weighted, staged, exact-count sampling of rows by step
    pipeline.py  the data config -> all of the above, prepared on first use
    prepare.py   `python -m cpt_jax.data.prepare --config ...`
"""

from cpt_jax.data.corpora import default_cache_dir, load_bible, split_documents
from cpt_jax.data.mixture import Mixture
from cpt_jax.data.packing import Framing, pack
from cpt_jax.data.parallel_bibles import LANGS, load_language
from cpt_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "LANGS", "PAD_ID", "UNK_ID", "Framing", "Mixture", "Tokenizer", "default_cache_dir",
    "load_bible", "load_language", "load_tokenizer", "pack", "split_documents", "train_tokenizer",
]
