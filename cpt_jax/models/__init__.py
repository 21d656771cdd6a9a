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


__all__ = ["Llama", "ModelConfig", "ModelSpec", "SIZES", "flops_per_token", "init_params", "model_config",
           "params_of", "spec"]
