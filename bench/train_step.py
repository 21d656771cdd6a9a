"""Train-step throughput and MFU of one model size on the devices at hand; prints one JSON object.

  python bench/train_step.py --size tiny --seq_len 128 --batch_size 16                     # CPU
  python bench/train_step.py --size 1085m --seq_len 2048 --batch_size 8 --dtype bfloat16 \
      --attention cudnn --remat dots_no_batch                                               # one GPU

MFU = tokens/s x (6 x non-embedding params + 12 x layers x hidden x seq) / (peak FLOP/s x devices),
reported only for devices with a known peak (cpt_jax.metrics.PEAK_FLOPS). The data is random
tokens: this measures the compiled step, not the input pipeline.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import models, sharding, train
from cpt_jax.config import base
from cpt_jax.metrics import peak_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default="xla")
    p.add_argument("--remat", default="none")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    a = p.parse_args()

    mcfg = models.model_config(a.size, a.vocab_size, dtype=a.dtype, attention=a.attention, remat=a.remat)
    opt = base().optimizer
    opt.grad_accum = a.grad_accum
    mesh = sharding.make_mesh([int(x) for x in a.mesh.split(",")])
    t0 = time.perf_counter()
    steps = train.compile_steps(mcfg, opt, 1000, mesh, a.batch_size, a.seq_len, num_sources=1)
    compile_s = time.perf_counter() - t0

    with jax.set_mesh(mesh):
        params = steps.init_params(jax.random.key(0))
        state = train.TrainState(jnp.zeros((), jnp.int32), params, steps.init_opt_state(params))
        tokens = np.random.default_rng(0).integers(0, a.vocab_size, (a.batch_size, a.seq_len + 1), np.int32)
        batch = jax.device_put({"tokens": tokens, "source": np.zeros(a.batch_size, np.int32)},
                               {k: steps.batch_sharding[k] for k in ("tokens", "source")})
        for _ in range(2):
            state, m = steps.train(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = steps.train(state, batch)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / a.steps

    tps = a.batch_size * a.seq_len / step_s
    peak = peak_flops(jax.devices()[0])
    mem = steps.memory
    print(json.dumps({
        "size": a.size, "params": mcfg.param_count(), "non_embedding_params": mcfg.non_embedding_params(),
        "seq_len": a.seq_len, "batch_size": a.batch_size, "dtype": a.dtype, "attention": a.attention,
        "remat": a.remat, "mesh": dict(mesh.shape), "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "compile_s": round(compile_s, 2), "step_s": step_s,
        "tokens_per_s": tps, "tokens_per_s_per_device": tps / jax.device_count(),
        "mfu": tps * models.flops_per_token(mcfg, a.seq_len) / (peak * jax.device_count()) if peak else None,
        "temp_gib_per_device": mem.temp_size_in_bytes / 2**30 if mem else None,
    }))


if __name__ == "__main__":
    main()
