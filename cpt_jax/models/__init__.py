"""Models: the LLaMA-family decoder, its size registry, and the functional view the trainer uses.

The trainer keeps parameters as a plain nested dict of arrays; `spec(cfg)` gives the static
graph definition, the abstract parameters and their logical axes, and `nnx.merge(graphdef,
params)` rebuilds a callable model inside a jitted function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx

from cpt_jax.models.llama import Llama, ModelConfig, flops_per_token
from cpt_jax.models.sizes import SIZES, model_config


class ModelSpec(NamedTuple):
    graphdef: Any  # nnx.GraphDef, static
    abstract_params: dict  # ShapeDtypeStructs
    axes: dict  # logical axis names per parameter


def spec(cfg: ModelConfig) -> ModelSpec:
    """Everything about a model but its values, without allocating any."""
    model = nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return ModelSpec(graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes))


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random float32 parameters as a pure dict (jit this with out_shardings to init sharded)."""
    return params_of(Llama(cfg, nnx.Rngs(key)))


def params_of(model: Llama) -> dict:
    """A model's parameters as the pure dict that checkpoints hold."""
    return nnx.to_pure_dict(nnx.state(model))


def load(path: str, step: int | None = None, dtype: str | None = None) -> tuple[Llama, Any]:
    """`model, tokenizer = load(DIR)`: the model of a run's workdir, its checkpoints dir, or a
    converted model (`python -m cpt_jax.convert import`), on the default device; `model(tokens)`
    gives float32 logits. The tokenizer is None where none was saved beside the checkpoints.
    `dtype`: the compute dtype ("bfloat16" on accelerators); parameters stay float32."""
    from cpt_jax import checkpoint
    from cpt_jax.rundir import RunDir

    run = RunDir.of(path)
    latest = run.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{path}: no checkpoint there (a run's workdir or a converted model's dir)")
    ckpt = checkpoint.Checkpointer(run.checkpoints, read_only=True)
    step = latest if step is None else step
    meta = ckpt.meta(step)
    # The kernel the run compiled may not exist here (cuDNN in a CPU notebook): chosen anew.
    cfg = ModelConfig.from_dict({**meta["model"], "dtype": dtype or meta["model"]["dtype"], "attention": "auto"})
    graphdef, abstract, _ = spec(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params, _, _ = ckpt.restore(step, abstract)
    model = nnx.merge(graphdef, params)

    tokenizer = run.load_tokenizer()
    if tokenizer is not None and meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise ValueError(f"{run.tokenizer} holds tokenizer {tokenizer.fingerprint}, but the checkpoint was "
                         f"trained with {meta['tokenizer']}")
    return model, tokenizer


__all__ = ["Llama", "ModelConfig", "ModelSpec", "SIZES", "flops_per_token", "init_params", "load", "model_config",
           "params_of", "spec"]
