"""Train-step throughput and MFU on the devices at hand: one JSON object per size, one per line.

  python bench/train_step.py --sizes tiny --seq_len 128 --batch_size 16                  # CPU, seconds
  python bench/train_step.py --sizes ref125m --batch_size 16                             # one GPU: the
  python bench/train_step.py --sizes ref1100m --batch_size 8 --remat dots_no_batch       #   PyTorch bar's shapes
  python bench/train_step.py --sizes paper --batch_size 8 --remat dots_no_batch          # paper rows 49m..1393m
  python bench/train_step.py --sizes 5534m --compile_only                                # compile time and memory
  python bench/train_step.py --sizes tiny --seq_len 128 --batch_size 16 --packing documents   # the document mask's cost
  python bench/train_step.py --sizes ref1100m --seq_len 131072 --batch_size 1 --mesh 1,1,1,8 --compile_only
                                                                # a 128k row split over a context axis of 8

It times the real train step of `cpt_jax.update.compile_steps` (jitted ahead of time over the mesh,
state donated, bf16 compute with float32 params and AdamW state on accelerators, the platform's
attention kernel, the fused chunked cross-entropy) after compilation and warm-up, on random
tokens: this measures the compiled step, not the input pipeline (bench/data.py does that). With
`--packing documents` the rows hold documents of `--doc_len` tokens (an EOS ends each) and the step
masks attention, positions and the loss by document, as `data.packing="documents"` does.

MFU = tokens/s x (6 x non-embedding params + 12 x layers x heads*head_dim x keys) / (peak FLOP/s x
devices), keys = seq (min(window, seq) for a sliding-window layer, averaged over the layers; see
cpt_jax.models.flops_per_token), with the device's bf16 dense peak from cpt_jax.metrics.PEAK_FLOPS or
--peak_flops.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from cpt_jax import cli, models, sharding, update
from cpt_jax.config import base
from cpt_jax.metrics import mfu, peak_flops

PAPER_ONE_GPU = [n for n, s in models.SIZES.items() if s.paper_m is not None and s.paper_m <= 1393]

CLI = cli.Command(__doc__, label="bench error")
flags.DEFINE_list("sizes", ["tiny"], "Comma-separated names of cpt_jax.models.SIZES, or 'paper': the rows that fit "
                    f"one GPU ({PAPER_ONE_GPU[0]}..{PAPER_ONE_GPU[-1]}).", flag_values=CLI.flags)
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.", flag_values=CLI.flags)
flags.DEFINE_integer("seq_len", 2048, "Tokens per row.", flag_values=CLI.flags)
flags.DEFINE_integer("batch_size", 16, "Rows per step.", flag_values=CLI.flags)
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.", flag_values=CLI.flags)
flags.DEFINE_string("dtype", "auto", "auto: bfloat16 on GPU/TPU, float32 on CPU.", flag_values=CLI.flags)
flags.DEFINE_enum("attention", "auto", models.attention.IMPLEMENTATIONS, "The attention kernel.", flag_values=CLI.flags)
flags.DEFINE_enum("remat", "none", list(models.llama.REMAT_POLICIES), "What the backward pass recomputes.",
                  flag_values=CLI.flags)
flags.DEFINE_integer("loss_chunk", 256, "Positions per cross-entropy chunk; 0: plain.", flag_values=CLI.flags)
flags.DEFINE_bool("unrolled", False, "A Python loop over layers instead of scan.", flag_values=CLI.flags)
flags.DEFINE_enum("packing", "concat", ["concat", "documents"], "How rows hold documents.", flag_values=CLI.flags)
flags.DEFINE_integer("doc_len", 1000, "--packing documents: tokens per document (with EOS).", flag_values=CLI.flags)
flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor[,context]", flag_values=CLI.flags)
flags.DEFINE_integer("steps", 10, "Timed steps.", flag_values=CLI.flags)
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", flag_values=CLI.flags)
flags.DEFINE_float("peak_flops", 0.0, "Per device; default: the known peak of the device.", flag_values=CLI.flags)
flags.DEFINE_bool("compile_only", False, "Report compile time and memory, run nothing.", flag_values=CLI.flags)


def bench(size: str, a: flags.FlagValues, mesh) -> dict:
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


def bench_sizes() -> None:
    a = CLI.flags
    sizes = PAPER_ONE_GPU if a.sizes == ["paper"] else a.sizes
    mesh = sharding.make_mesh([int(x) for x in a.mesh])
    for size in sizes:
        print(json.dumps(bench(size, a, mesh)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python bench/train_step.py ARGS...` in this process: the exit code."""
    return CLI.run(bench_sizes, argv)


if __name__ == "__main__":
    sys.exit(main())
