r"""Does transfer depend on the target language? The paper's last claim (French gains most from
English, then Russian, then Chinese), on parallel Bibles: one English source model per size, then
scratch and CPT into French, German, Russian, Spanish, Arabic and Chinese, byte level, so every
language is cut the same way and a loss per token is a loss per UTF-8 byte.

  python -m cpt_jax.sweep --config configs/sweeps/languages.py --sweep_dir /tmp/languages
  python -m cpt_jax.sweep cost --config configs/sweeps/languages.py

The Bibles are translations of one text (cpt_jax/data/parallel_bibles.py: public-domain editions,
aligned by chapter, the same chapters held out in every language), so languages differ here in
language and script, not in content, which the paper's mC4 subsets could not control. Expected:
3 sizes (lap2, lap3, lap4: N 33k to 146k) x 6 targets, WSD branches at 2.5, 5 and 10 tokens per
parameter, CPT without replay (transfer alone), 3 seeds at lap2; the report's languages section
gives per language the effective data transferred (Hernandez et al. 2021) and the savings at equal
loss with intervals, the verdict on the paper's order, and transfer against byte n-gram overlap
with English. Measured results and time: README, "Reproducing the paper on a laptop".
"""

import ml_collections

from cpt_jax.config import base
from cpt_jax.data.parallel_bibles import LANGS

TARGETS = ("fr", "de", "ru", "es", "ar", "zh")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = base()
    c.base.seq_len = 128
    c.base.data.sources = ml_collections.ConfigDict({lang: {"kind": "bible", "lang": lang} for lang in LANGS})
    c.base.data.tokenizer.model_type = "bytes"  # one tokenizer policy for every language
    c.base.data.eval_batches = 50  # 51k held-out bytes per language, the same rows every eval
    c.base.optimizer.peak_lr = 3e-3
    c.base.optimizer.weight_decay = 0.0
    c.base.log_every = 50
    c.sizes = ("lap2", "lap3", "lap4")
    c.source, c.target, c.targets = "en", TARGETS[0], TARGETS
    c.source_tokens_per_param = 20.0
    c.tokens_per_param = (2.5, 5.0, 10.0)
    c.branches = True
    c.replay_ratios = (0.0,)  # transfer alone, as Hernandez et al. measure it
    c.seed_study = ml_collections.ConfigDict({"size": "lap2", "count": 3})
    c.batch_size = 8
    c.eval_points = 4
    c.max_epochs = 4
    c.findings = ml_collections.ConfigDict({"forgetting_epsilon": 0.1, "equal_loss_tolerance": 0.02,
                                            "paper_order": ("fr", "ru", "zh")})
    c.report = True
    c.slurm = ml_collections.ConfigDict()
    return c
