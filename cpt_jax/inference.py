"""The Colab loader: `model, tokenizer = cpt_jax.load(DIR)` reads the model of a run's workdir, its
checkpoints dir, or a converted model, with the tokenizer saved beside it.

It sits above the models package (it reaches checkpoints, run dirs and tokenizers; the models
reach none of them). `cpt_jax.models.load` is its old name, kept for one release.
"""

from __future__ import annotations

import jax
from etils import epath
from flax import nnx

from cpt_jax import checkpoint, models
from cpt_jax.data.tokenizer import TokenizerLike, load_tokenizer
from cpt_jax.models import Llama, ModelConfig, spec
from cpt_jax.rundir import RunDir


def load(path: str, step: int | None = None, dtype: str | None = None) -> tuple[Llama, TokenizerLike | None]:
    """`model, tokenizer = load(DIR)`: the model of a run's workdir, its checkpoints dir, or a
    converted model (`python -m cpt_jax.convert import`), on the default device; `model(tokens)`
    gives float32 logits. The tokenizer is None where none was saved beside the checkpoints.
    `dtype`: the compute dtype ("bfloat16" on accelerators); parameters stay float32."""
    run = RunDir.of(path)
    latest = run.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{path}: no checkpoint there (a run's workdir or a converted model's dir)")
    ckpt = checkpoint.Checkpointer(run.checkpoints, read_only=True)
    step = latest if step is None else step
    meta = ckpt.meta(step)
    # The kernel the run compiled may not exist here (cuDNN in a CPU notebook): chosen anew.
    cfg = ModelConfig.from_dict({**meta.model, "dtype": dtype or meta.model["dtype"], "attention": "auto"})
    graphdef, abstract, _ = spec(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params, _, _ = ckpt.restore(step, abstract)
    model = nnx.merge(graphdef, params)

    tokenizer = load_tokenizer(run.tokenizer) if epath.Path(run.tokenizer).is_dir() else None
    if tokenizer is not None and meta.tokenizer not in (None, tokenizer.fingerprint):
        raise ValueError(f"{run.tokenizer} holds tokenizer {tokenizer.fingerprint}, but the checkpoint was "
                         f"trained with {meta.tokenizer}")
    return model, tokenizer


models.load = load  # the old name (cpt_jax/__init__.py imports this module before it hands out `models`)
