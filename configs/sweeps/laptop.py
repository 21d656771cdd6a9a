r"""The paper's reproduction in its regime, on 2 CPU cores: nine sizes over 42x in N on the bundled
Bible (English source, Chinese target) at byte level, every source model at 20 tokens per
parameter, scratch and CPT at every size as a WSD stable phase with cooldown branches at 2.5, 5,
10 and 20 tokens per parameter (the smaller sizes on, doubling, to the largest size's tokens),
three seeds at one size, dense evals over the start of every CPT run, and a replay study; then
the report with its findings table.

  python -m cpt_jax.sweep --config configs/sweeps/laptop.py --sweep_dir /tmp/laptop
  python -m cpt_jax.sweep cost --config configs/sweeps/laptop.py   # the plan: runs, FLOPs, epochs

Expected: 185 runs in about 50 minutes on 2 CPU cores; N = 6.8k, 12k, 17.6k, 27k, 33k, 43k, 63k,
146k, 283k non-embedding parameters (the laptop sizes of cpt_jax.models, 260 byte ids, so the
sizes differ in their layers and not in a vocabulary head); no language's training split is read
more than 2 times by any run. Findings 1, 3, 4 and 5 do not hold at this scale, finding 2 is
undetermined: the measured tables are in the README, "Reproducing the paper on a laptop".
"""

import ml_collections

from cpt_jax.config import base


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = base()
    c.base.seq_len = 128
    # UTF-8 bytes: one tokenizer for every language, nothing trained, a loss per token is one per byte.
    c.base.data.tokenizer.model_type = "bytes"
    c.base.data.eval_batches = 50  # 50 x 8 rows x 128: 51k held-out bytes per language, the same rows every eval
    c.base.optimizer.peak_lr = 3e-3  # tiny models take a larger step than the paper's 2e-4
    c.base.optimizer.weight_decay = 0.0
    c.base.log_every = 50
    c.sizes = ("lap0", "lap0h", "lap1", "lap1h", "lap2", "lap2h", "lap3", "lap4", "lap5")
    c.source, c.target = "en", "zh"
    c.source_tokens_per_param = 20.0
    c.tokens_per_param = (2.5, 5.0, 10.0, 20.0)  # 8x, ending at the paper's 20 tokens per parameter
    # and each smaller size's scratch and fitted CPT runs on, doubling, to lap5's 5.7M tokens: points at
    # equal D over every size, which separate the laws' N and D terms (budgets in proportion to N do not)
    c.extend_to_largest = True
    c.branches = True
    c.replay_ratios = (0.05,)  # CPT at every size, with the paper's 5% replay; the CPT law is fitted to these
    c.replay_study = ml_collections.ConfigDict({"size": "lap3", "ratios": (0.0, 0.01, 0.2, 0.5)})
    c.seed_study = ml_collections.ConfigDict({"size": "lap3", "count": 3})  # seed noise, into every interval
    # evals log-spaced over the first 5% of each CPT stable phase: does the target loss rise first?
    c.dense_evals = ml_collections.ConfigDict({"fraction": 0.05, "count": 8})
    c.batch_size = 8  # sequences, at every size: 1k tokens, 17 steps for lap0's shortest budget
    c.eval_points = 4
    c.max_epochs = 4  # no run reads a language's training split more often (checked before any run)
    c.findings = ml_collections.ConfigDict({
        "forgetting_epsilon": 0.1,
        "equal_loss_tolerance": 0.02,
    })
    c.report = True
    c.slurm = ml_collections.ConfigDict()
    return c
