r"""The whole sweep pipeline on a laptop: three tiny sizes on the bundled Bible (English source,
Chinese target, 5% replay), then the scaling-law report.

  python -m cpt_jax.sweep --config configs/sweeps/mini.py --sweep_dir /tmp/mini_sweep

Expected: 9 runs (source, scratch, CPT for sizes test, micro, tiny; 0.2 tokens per parameter
each, far below the paper's 20), then /tmp/mini_sweep/report.md with plots. Measured: final zh
loss scratch 6.47 / 6.22 / 6.05 and CPT 6.50 / 6.35 / 5.99 for the three sizes; the fits show the
pipeline, not the paper's constants (at 0.2 tokens per parameter CPT saves nothing: -10% to -24%
FLOPs); English under 5% replay rises by 0.40-0.67. Time: 10.5 minutes on 2 CPU cores.
"""

import ml_collections

from cpt_jax.config import base


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = base()
    c.base.seq_len = 128
    c.base.data.tokenizer.vocab_size = 4000
    c.base.data.eval_batches = 4
    c.base.optimizer.peak_lr = 3e-3  # tiny models take a larger step than the paper's 2e-4
    c.base.log_every = 20
    c.sizes = ("test", "micro", "tiny")
    c.source, c.target = "en", "zh"
    c.source_tokens_per_param = 0.2
    c.tokens_per_param = (0.2,)  # token budgets of the scratch and CPT runs, x N
    c.replay_ratios = (0.05,)
    c.batch_size = 16  # sequences; 0: the paper's 1M/2M/4M-token batches
    c.eval_points = 8  # evals per run: the (N, D, L) points of the fits
    c.report = True  # write the report when every run is done
    c.slurm = ml_collections.ConfigDict()
    return c
