"""The smallest TPU slice of each generation that fits a paper size, by real compiles for the
topology (`python -m cpt_jax.aot`, libtpu; no TPU needed). One JSON object per compile, one a
line, to --out; then the table of docs/tpu.md on stdout.

  pip install -e '.[tpu]'
  python bench/tpu_slices.py --out /tmp/tpu_slices.jsonl        # ~1-2 h on 2 cores
  python bench/tpu_slices.py --out /tmp/tpu_slices.jsonl --table  # the table of what is there

Each run is the paper sweep's (configs/sweeps/paper.py): seq 2048, vocabulary 32000, remat
dots_no_batch, FSDP over the slice (mesh (1,-1,1)), the paper's tokens per batch (1M up to 1B
parameters, 2M up to 2.5B, 4M above). Per generation the slices are tried smallest first; on each,
the largest microbatch per chip (8, 4, 2, 1 sequences; grad_accum makes up the batch) that the
estimate below lets fit is compiled, and a smaller one if the compile says it does not fit. A
slice on which the state alone (params and AdamW moments, 12 bytes a parameter, split over its
chips) exceeds HBM is not compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

from absl import flags

from cpt_jax import aot, cli, models
from cpt_jax.sweep import paper_batch_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("49m", "301m", "1393m", "2791m", "5534m")
SLICES = {"v5e": ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8"),
          "v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4"),
          "v6e": ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8")}
SEQ, VOCAB = 2048, 32000


def estimate(mcfg: models.ModelConfig, chips: int, micro: int) -> float:
    """Bytes per chip, roughly: state and gradients (20 bytes a parameter, sharded), the matmul
    outputs dots_no_batch keeps per layer (bf16), the logits of a loss chunk (f32, x3)."""
    d, f = mcfg.hidden, mcfg.intermediate
    return (20 * mcfg.param_count() / chips + micro * SEQ * mcfg.layers * (6 * d + 2 * f) * 2
            + micro * 256 * VOCAB * 4 * 3)


def compile_one(size: str, topology: str, batch: int, accum: int) -> dict:
    flags = [f"--config.seq_len={SEQ}", f"--config.model.vocab_size={VOCAB}", "--config.model.remat=dots_no_batch",
             "--config.mesh.shape=(1,-1,1)", f"--config.batch_size={batch}", f"--config.optimizer.grad_accum={accum}"]
    cmd = [sys.executable, "-m", "cpt_jax.aot", "--config", f"{ROOT}/configs/bible.py:{size}", "--topology", topology,
           "--json", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode not in (0, 2) or not r.stdout.strip():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    out["command"] = "python -m cpt_jax.aot --config configs/bible.py:" + size + f" --topology {topology} " + " ".join(
        f"'{f}'" if "(" in f else f for f in flags)
    return out


def search(size: str, generation: str, out_path: str, done: dict) -> None:
    mcfg = models.model_config(size, VOCAB)
    batch = paper_batch_tokens(mcfg.non_embedding_params()) // SEQ
    for topology in SLICES[generation]:
        topo = aot.parse_topology(topology)
        if 12 * mcfg.param_count() / topo.chips > topo.hbm_bytes:
            continue
        for micro in (8, 4, 2, 1):
            if micro > 1 and estimate(mcfg, topo.chips, micro) > 0.9 * topo.hbm_bytes:
                continue
            accum = batch // (micro * topo.chips)
            key = (size, topology, accum)
            row = done.get(key)
            if row is None:
                row = compile_one(size, topology, batch, accum)
                with open(out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{size} {topology} accum {accum}: {row['total_bytes'] / 2**30:.1f} GiB, fits {row['fits']}, "
                      f"{row['compile_s']} s", file=sys.stderr, flush=True)
            if row["fits"]:
                return


def table(rows: list[dict]) -> str:
    """The smallest fitting slice of each (size, generation), as markdown."""
    best = {}
    for r in rows:
        if not r["fits"]:
            continue
        key = (r["model"]["size"], r["topology"].split(":")[0])
        if key not in best or (r["chips"], -r["model"]["batch"] // r["model"]["grad_accum"]) < (
                best[key]["chips"], -best[key]["model"]["batch"] // best[key]["model"]["grad_accum"]):
            best[key] = r
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    micro = lambda r: r["model"]["batch"] // r["model"]["grad_accum"] // r["chips"]  # noqa: E731
    failed = {}  # (size, generation) -> the compiles that did not fit
    for r in rows:
        if not r["fits"]:
            failed.setdefault((r["model"]["size"], r["topology"].split(":")[0]), []).append(
                f"{r['topology']} x{micro(r)}: {gib(max(r['total_bytes'], r['eval']['total_bytes']))}")
    lines = ["| size | params | batch (seqs x 2048) | slice | chips | mesh (data, fsdp, tensor) | grad_accum | per-chip microbatch | state+batch GiB "
             "| temporaries GiB | total GiB / HBM | eval total GiB | compile s | compiled, did not fit (slice x "
             "microbatch: GiB) |", "|" + "---|" * 14]
    for size in SIZES:
        for gen in SLICES:
            r = best.get((size, gen))
            if r is None:
                continue
            m = r["model"]
            lines.append(f"| {size} | {m['params'] / 1e9:.2f}B | {m['batch']} | {r['topology']} | {r['chips']} | "
                         f"({', '.join(str(v) for v in r['mesh'].values())}) | {m['grad_accum']} | {micro(r)} | {gib(r['argument_bytes'])} | "
                         f"{gib(r['temp_bytes'])} | {gib(r['total_bytes'])} / {r['hbm_bytes'] >> 30} | "
                         f"{gib(r['eval']['total_bytes'])} | {r['compile_s']:.0f} | "
                         f"{'; '.join(failed.get((size, gen), [])) or '-'} |")
    return "\n".join(lines)


CLI = cli.Command(__doc__, label="bench error", required=("out",))
_OUT = flags.DEFINE_string("out", None, "JSON lines, appended; compiles already there are not repeated.",
                           flag_values=CLI.flags)
_SIZES = flags.DEFINE_list("sizes", list(SIZES), "Paper sizes to place.", flag_values=CLI.flags)
_GENERATIONS = flags.DEFINE_list("generations", list(SLICES), "TPU generations to try.", flag_values=CLI.flags)
_TABLE = flags.DEFINE_bool("table", False, "Only print the table of --out.", flag_values=CLI.flags)


def bench() -> None:
    out = _OUT.value
    rows = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    if not _TABLE.value:
        done = {(r["model"]["size"], r["topology"], r["model"]["grad_accum"]): r for r in rows}
        for size in _SIZES.value:
            for gen in _GENERATIONS.value:
                search(size, gen, out, done)
        rows = [json.loads(line) for line in open(out)]
    print(table(rows))


def main(argv: Sequence[str] | None = None) -> int:
    """`python bench/tpu_slices.py ARGS...` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
