r"""One run on the bundled bilingual Bible: by default Chinese CPT data (target zh, 5% English
replay) for a model size given after the colon; flags turn it into the other runs of the study.

  # Chinese from scratch, the tiny size, on a laptop CPU:
  python -m cpt_jax.main --config configs/bible.py:tiny --workdir /tmp/zh --config.data.replay_ratio=0
  # the English source model, then CPT from it with 5% replay:
  python -m cpt_jax.main --config configs/bible.py:tiny --workdir /tmp/en \
      --config.data.target=en --config.data.replay_ratio=0
  python -m cpt_jax.main --config configs/bible.py:tiny --workdir /tmp/cpt --config.init_from=/tmp/en
  # a paper size on one GPU (bf16 compute and cuDNN attention by default there), 2048 context
  python -m cpt_jax.main --config configs/bible.py:137m --workdir /tmp/137m --config.seq_len=2048

Expected (measured, `tiny`, default flags): the Chinese eval loss falls from 9.00 (uniform over the
8000-piece vocabulary) to 6.34 in the 300 default steps; English, at 5% replay, to 5.91.
Time: 3.8 minutes on 2 CPU cores for `tiny`; larger
sizes are for accelerators. The corpus is ~1M English and ~0.7M Chinese tokens: a paper size at
20 tokens per parameter would loop it many times, so use it for pipeline checks, not scaling fits.
"""

import ml_collections

from cpt_jax.config import base


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    c = base()
    c.model.size = size
    c.total_steps = 300
    c.batch_size = 16
    c.seq_len = 128
    c.optimizer.peak_lr = 3e-3 if size in ("test", "tiny", "small") else 2e-4
    c.data.eval_batches = 8
    c.log_every = 25
    c.eval_every = 100
    c.checkpoint_every = 100
    return c
