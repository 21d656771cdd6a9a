"""The Colab loader: `model, tokenizer = cpt_jax.load(PATH)` reads any model cpt_jax knows in one
call: a run's workdir (or its checkpoints dir), a converted model, an HF model dir, a GGUF file, or
a bundled model's name. `cpt_jax.models.load` is its old name, kept for one release.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from cpt_jax import convert, models
from cpt_jax.data.tokenizer import TokenizerLike
from cpt_jax.models import Llama, spec
from cpt_jax.restore import read_model
from cpt_jax.rundir import RunDir


def load(path: str, step: int | None = None, dtype: str | None = None) -> tuple[Llama, TokenizerLike | None]:
    """`model, tokenizer = load(PATH)`, on the default device; `model(tokens)` gives float32 logits.

    PATH: a run's workdir or its checkpoints dir, or a converted model (`step`: which checkpoint,
    default the latest); an HF model dir (config.json + safetensors + tokenizer files) or a .gguf
    file, converted in memory as `python -m cpt_jax.convert import` converts it, nothing written;
    or a bundled model's name (`convert.BUNDLED`), converted once into the cache. The tokenizer is
    None where none was saved beside the checkpoints. `dtype`: the compute dtype ("bfloat16" on
    accelerators); parameters stay float32."""
    path = str(path)
    if RunDir.of(path).latest_step() is None:
        if convert.is_pretrained(path):
            if step is not None:
                raise ValueError(f"step={step}: {path} is a pretrained model, not a run with checkpoints")
            return _from_pretrained(convert.read_pretrained(path), dtype)
        if path not in convert.BUNDLED or os.path.exists(path):
            raise FileNotFoundError(f"{path}: no checkpoint there, and neither an HF model dir (config.json and "
                                    f"safetensors) nor a .gguf file nor one of {', '.join(convert.BUNDLED)}")
        path = convert.bundled_model(path)
    return read_model(path, step, dtype)


def _from_pretrained(p: convert.Pretrained, dtype: str | None) -> tuple[Llama, TokenizerLike]:
    cfg = p.cfg if dtype is None else dataclasses.replace(p.cfg, dtype=dtype)
    return nnx.merge(spec(cfg).graphdef, p.params), p.tokenizer


models.load = load  # the old name (cpt_jax/__init__.py imports this module before it hands out `models`)
