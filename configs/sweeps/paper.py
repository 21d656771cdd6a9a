r"""The paper's sweep: 42 sizes (49M-5.5B), English pretraining, Chinese from scratch and Chinese
CPT with 5% English replay, 20 tokens per parameter, the paper's batch sizes (1M tokens up to 1B
parameters, 2M up to 2.5B, 4M above), seq 2048, peak LR 2e-4 with 5% warmup and cosine decay.

  python -m cpt_jax.sweep --config configs/sweeps/paper.py --sweep_dir /ckpt/paper --backend slurm
  python -m cpt_jax.sweep --config configs/sweeps/paper.py --sweep_dir /ckpt/paper --backend print  # TPU pods
  python -m cpt_jax.sweep report --sweep_dir /ckpt/paper

Expected: 126 runs; the paper's fits (scratch E=1.55, A=420, B=719.5, alpha=0.40, beta=0.30; CPT
B'=433.3, beta'=0.20, gamma=0.08) on its corpora. Point `base.data.sources` at your English and
Chinese corpora (TFDS or files): the bundled Bible is ~1M tokens per language, far too small.
Time: unmeasured here (the largest run is 110B tokens on a 5.5B model); the paper used GPUs.
"""

import ml_collections

from cpt_jax.config import base
from cpt_jax.models import SIZES


def get_config() -> ml_collections.ConfigDict:
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
    c.report = True
    # #SBATCH options of every run; `prepare`: those of the data-preparation job that differ ("": none)
    c.slurm = ml_collections.ConfigDict({"partition": "", "gpus-per-node": 8, "nodes": 1, "time": "48:00:00",
                                         "prepare": {"gpus-per-node": ""}})
    return c
