"""A checkpoint's model and tokenizer on one device: how `cpt_jax.load` reads a run's workdir or a
converted model, and how export and extend-vocab read theirs.

It sits above the models package (it reaches checkpoints, run dirs and tokenizers; the models
reach none of them).
"""

from __future__ import annotations

import jax
from etils import epath
from flax import nnx

from cpt_jax import checkpoint
from cpt_jax.data.tokenizer import TokenizerLike, load_tokenizer
from cpt_jax.models import Llama, ModelConfig, spec
from cpt_jax.rundir import RunDir


def read_model(path: str, step: int | None = None, dtype: str | None = None) -> tuple[Llama, TokenizerLike | None]:
    """The model of a run's workdir, its checkpoints dir, or a converted model at `step` (default:
    the latest), on the default device, with the tokenizer saved beside it (None where there is
    none). `model.document_end` is the token that ended the run's training documents (its data
    framing's EOS; None for a converted model). `dtype`: the compute dtype; parameters stay float32."""
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
    model.document_end = None if meta.framing is None else int(meta.framing["eos_id"])

    tokenizer = load_tokenizer(run.tokenizer) if epath.Path(run.tokenizer).is_dir() else None
    if tokenizer is not None and meta.tokenizer not in (None, tokenizer.fingerprint):
        raise ValueError(f"{run.tokenizer} holds tokenizer {tokenizer.fingerprint}, but the checkpoint was "
                         f"trained with {meta.tokenizer}")
    return model, tokenizer
