"""The memory `optimizer.freeze` saves: the compiled train step's per-device argument and temp
sizes (XLA's memory analysis) and the AdamW state's bytes, one JSON object per freeze, one per line.

  python bench/freeze_memory.py                                  # 'small' at a 32000 vocab, CPU, seconds
  python bench/freeze_memory.py --size ref125m --seq_len 512     # bigger, still compiles on CPU

Freezes compared: none; the embeddings and head; the first half of the layers; and the
extend-vocab case, everything but the rows past --old_vocab (a partly frozen leaf keeps its
moments whole, so that one saves the layers' moments only). Compile only: nothing is run.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import flags

from cpt_jax import cli, freeze, models, sharding, update
from cpt_jax.config import base

CLI = cli.Command(__doc__, label="bench error")
flags.DEFINE_string("size", "small", "A name of cpt_jax.models.SIZES.", flag_values=CLI.flags)
flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.", flag_values=CLI.flags)
flags.DEFINE_integer("old_vocab", 24000, "Rows before extend-vocab, for old_vocab.", flag_values=CLI.flags)
flags.DEFINE_integer("batch_size", 8, "Rows per step.", flag_values=CLI.flags)
flags.DEFINE_integer("seq_len", 128, "Tokens per row.", flag_values=CLI.flags)

MIB = 2**20


def measure(mcfg, patterns: tuple[str, ...], a: flags.FlagValues, mesh) -> dict:
    spec = models.spec(mcfg)
    mask = freeze.resolve(patterns, spec.abstract_params, a.old_vocab)
    opt = base().optimizer
    opt.freeze = patterns
    steps = update.compile_steps(mcfg, opt, 1000, mesh, a.batch_size, a.seq_len, num_sources=1, frozen=mask)
    mem = steps.memory
    opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(steps.abstract_state.opt_state))
    return {"size": a.size, "vocab_size": a.vocab_size, "batch_size": a.batch_size, "seq_len": a.seq_len,
            "devices": jax.device_count(), "freeze": list(patterns), "params": mcfg.param_count(),
            "frozen_params": freeze.frozen_count(mask, spec.abstract_params) if mask is not None else 0,
            "opt_state_bytes": opt_bytes, "compiled_args_bytes": mem.argument_size_in_bytes,
            "compiled_temp_bytes": mem.temp_size_in_bytes}


def bench() -> None:
    a = CLI.flags
    mcfg = models.model_config(a.size, a.vocab_size, dtype="float32").with_kernel(a.seq_len)
    mesh = sharding.make_mesh((-1, 1, 1))
    half = f"layers/0-{mcfg.layers // 2 - 1}"
    base_row = None
    for patterns in ((), ("embed", "lm_head"), (half,), ("layers", "final_norm", "old_vocab")):
        row = measure(mcfg, patterns, a, mesh)
        base_row = base_row or row
        for k in ("opt_state_bytes", "compiled_args_bytes", "compiled_temp_bytes"):
            row[k.replace("_bytes", "_mib")] = round(row[k] / MIB, 2)
        row["saved_args_mib"] = round((base_row["compiled_args_bytes"] - row["compiled_args_bytes"]) / MIB, 2)
        row["saved_temp_mib"] = round((base_row["compiled_temp_bytes"] - row["compiled_temp_bytes"]) / MIB, 2)
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python bench/freeze_memory.py ARGS...` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
