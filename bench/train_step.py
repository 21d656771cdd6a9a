"""Train-step throughput and MFU on the devices at hand: one JSON object per size, one per line.

  python bench/train_step.py --sizes tiny --seq_len 128 --batch_size 16                  # CPU, seconds
  python bench/train_step.py --sizes ref125m --batch_size 16                             # one GPU: the
  python bench/train_step.py --sizes ref1100m --batch_size 8 --remat dots_no_batch       #   PyTorch bar's shapes
  python bench/train_step.py --sizes paper --batch_size 8 --remat dots_no_batch          # paper rows 49m..1393m
  python bench/train_step.py --sizes 5534m --compile_only                                # compile time and memory
  python bench/train_step.py --sizes tiny --seq_len 128 --batch_size 16 --packing documents   # the document mask's cost

It times the real train step of `cpt_jax.update.compile_steps` (jitted ahead of time over the mesh,
state donated, bf16 compute with float32 params and AdamW state on accelerators, the platform's
attention kernel, the fused chunked cross-entropy) after compilation and warm-up, on random
tokens: this measures the compiled step, not the input pipeline (bench/data.py does that). With
`--packing documents` the rows hold documents of `--doc_len` tokens (an EOS ends each) and the step
masks attention, positions and the loss by document, as `data.packing="documents"` does.

MFU = tokens/s x (6 x non-embedding params + 12 x layers x hidden x seq) / (peak FLOP/s x devices),
with the device's bf16 dense peak from cpt_jax.metrics.PEAK_FLOPS or --peak_flops.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import models, sharding, update
from cpt_jax.config import base
from cpt_jax.metrics import mfu, peak_flops

PAPER_ONE_GPU = [n for n, s in models.SIZES.items() if s.paper_m is not None and s.paper_m <= 1393]


def bench(size: str, a: argparse.Namespace, mesh) -> dict:
    mcfg = models.model_config(size, a.vocab_size, dtype=a.dtype, attention=a.attention, remat=a.remat,
                               loss_chunk=a.loss_chunk, scan_layers=not a.unrolled).with_kernel(a.seq_len)
    opt = base().optimizer
    opt.grad_accum = a.grad_accum
    t0 = time.perf_counter()
    eos = a.vocab_size - 1 if a.packing == "documents" else None
    steps = update.compile_steps(mcfg, opt, 1000, mesh, a.batch_size, a.seq_len, num_sources=1, document_end=eos)
    compile_s = time.perf_counter() - t0
    mem = steps.memory
    out = {
        "size": size, "params": mcfg.param_count(), "non_embedding_params": mcfg.non_embedding_params(),
        "flops_per_token": models.flops_per_token(mcfg, a.seq_len), "seq_len": a.seq_len,
        "batch_size": a.batch_size, "grad_accum": a.grad_accum, "dtype": mcfg.dtype,
        "attention": mcfg.attention, "packing": a.packing, "doc_len": a.doc_len if eos is not None else None,
        "remat": a.remat, "scan_layers": mcfg.scan_layers, "loss_chunk": a.loss_chunk, "mesh": dict(mesh.shape),
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "compile_s": round(compile_s, 2),
        # XLA's estimate for the step (per device): state in, temporaries; the state is donated.
        "compiled_args_gib": mem.argument_size_in_bytes / 2**30 if mem else None,
        "compiled_temp_gib": mem.temp_size_in_bytes / 2**30 if mem else None,
    }
    if a.compile_only:
        return out

    with jax.set_mesh(mesh):
        params = steps.init_params(jax.random.key(0))
        state = update.TrainState(jnp.zeros((), jnp.int32), params, steps.init_opt_state(params))
        tokens = np.random.default_rng(0).integers(0, a.vocab_size - 1, (a.batch_size, a.seq_len + 1), np.int32)
        if eos is not None:
            tokens[:, a.doc_len - 1::a.doc_len] = eos
        batch = jax.device_put({"tokens": tokens, "source": np.zeros(a.batch_size, np.int32)},
                               {k: steps.batch_sharding[k] for k in ("tokens", "source")})
        for _ in range(a.warmup):
            state, m = steps.train(state, batch)
        jax.block_until_ready((state, m))
        t0 = time.perf_counter()
        for _ in range(a.steps):  # dispatched back to back: no host sync until the end
            state, m = steps.train(state, batch)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / a.steps
        loss = float(m["loss"])
        del state, params

    tps = a.batch_size * a.seq_len / step_s
    peak = a.peak_flops or peak_flops(jax.devices()[0])
    stats = jax.devices()[0].memory_stats() or {}
    out.update({
        "step_s": step_s, "tokens_per_s": tps, "tokens_per_s_per_device": tps / jax.device_count(),
        "peak_flops_per_device": peak,
        "mfu": mfu(tps, out["flops_per_token"], peak, jax.device_count()),
        "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
        "loss": loss,  # finite, else the timing is of a broken step
    })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny", help=f"comma-separated names of cpt_jax.models.SIZES, or 'paper': the "
                   f"rows that fit one GPU ({PAPER_ONE_GPU[0]}..{PAPER_ONE_GPU[-1]})")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--attention", default="auto", choices=models.attention.IMPLEMENTATIONS)
    p.add_argument("--remat", default="none", choices=list(models.llama.REMAT_POLICIES))
    p.add_argument("--loss_chunk", type=int, default=256, help="positions per cross-entropy chunk; 0: plain")
    p.add_argument("--unrolled", action="store_true", help="a Python loop over layers instead of scan")
    p.add_argument("--packing", default="concat", choices=["concat", "documents"])
    p.add_argument("--doc_len", type=int, default=1000, help="--packing documents: tokens per document (with EOS)")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak_flops", type=float, default=0.0, help="per device; default: the known peak of the device")
    p.add_argument("--compile_only", action="store_true", help="report compile time and memory, run nothing")
    a = p.parse_args()

    sizes = PAPER_ONE_GPU if a.sizes == "paper" else a.sizes.split(",")
    mesh = sharding.make_mesh([int(x) for x in a.mesh.split(",")])
    for size in sizes:
        print(json.dumps(bench(size, a, mesh)), flush=True)


if __name__ == "__main__":
    main()
