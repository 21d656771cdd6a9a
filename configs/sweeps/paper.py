r"""The paper's sweep: 42 sizes (49M-5.5B), English pretraining, Chinese from scratch and Chinese
CPT with 5% English replay, 20 tokens per parameter, the paper's batch sizes (1M tokens up to 1B
parameters, 2M up to 2.5B, 4M above), seq 2048, peak LR 2e-4 with 5% warmup and cosine decay.
N is the non-embedding parameter count, as in every sweep; the paper's "M" figure is a formula,
16 L d^2 + 32000 d, that these FFN widths exceed: N is 1.23-1.33x it, so 20x N tokens is 25-27x M.

  python -m cpt_jax.sweep --config configs/sweeps/paper.py --sweep_dir /ckpt/paper --backend slurm
  python -m cpt_jax.sweep --config configs/sweeps/paper.py --sweep_dir /ckpt/paper --backend print  # TPU pods
  python -m cpt_jax.sweep report --sweep_dir /ckpt/paper
  python -m cpt_jax.sweep cost --config configs/sweeps/paper.py[:branched]  # the arithmetic below

Two protocols (`cost`, C = 6 N D, sources included):
  paper      126 runs, one per (size, kind), each a point at its end and 19 intermediate (not
             decayed) evals: 9.73e22 FLOPs.
  branched   (`paper.py:branched`) WSD: per (size, kind) one stable phase to 16x N that keeps a
             checkpoint at each branch point, and a 1-sqrt cooldown over the last 20% of each
             budget of 2.5, 5, 10 and 20x N: 4 decayed points per (size, kind), 336 in all, for
             1.09e23 FLOPs, where a whole run per point would take 1.54e23 (29.5% less).

Expected: the paper's fits (scratch E=1.55, A=420, B=719.5, alpha=0.40, beta=0.30; CPT
B'=433.3, beta'=0.20, gamma=0.08) on its corpora. Point `base.data.sources` at your English and
Chinese corpora (TFDS or files): the bundled Bible is ~1M tokens per language, far too small.
Time: unmeasured here (the largest run is 141B tokens on the 5534m model); the paper used GPUs.
"""

import ml_collections

from cpt_jax.config import base
from cpt_jax.models import SIZES


def get_config(protocol: str = "paper") -> ml_collections.ConfigDict:
    if protocol not in ("paper", "branched"):
        raise ValueError(f"configs/sweeps/paper.py:{protocol}: the protocols are paper and branched")
    c = ml_collections.ConfigDict()
    c.base = base()
    c.base.seq_len = 2048
    c.base.model.remat = "dots_no_batch"
    c.base.model.vocab_size = 32000
    c.base.data.tokenizer.vocab_size = 32000
    c.base.mesh.shape = (1, -1, 1)  # fully sharded data parallel over every device
    c.base.keep_every = 0
    c.sizes = tuple(name for name, s in SIZES.items() if s.paper_m is not None)
    c.source, c.target = "en", "zh"
    c.source_tokens_per_param = 20
    c.tokens_per_param = (20,)
    c.replay_ratios = (0.05,)
    c.batch_size = 0  # the paper's batch for each size
    c.eval_points = 20
    if protocol == "branched":  # a 1-sqrt cooldown over the last 20% of each budget, from one stable phase
        c.branches = True
        c.tokens_per_param = (2.5, 5, 10, 20)
    c.report = True
    # #SBATCH options of every run; `prepare`: those of the data-preparation job that differ ("": none)
    c.slurm = ml_collections.ConfigDict({"partition": "", "gpus-per-node": 8, "nodes": 1, "time": "48:00:00",
                                         "prepare": {"gpus-per-node": ""}})
    return c
