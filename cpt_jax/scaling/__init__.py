"""Scaling laws of pretraining from scratch (Chinchilla) and of continual pre-training (the
paper's CPT law), fitted as the paper fits them; compute-optimal allocation; CPT's savings."""

from cpt_jax.scaling.fit import fit_chinchilla, fit_cpt, intervals
from cpt_jax.scaling.laws import (
    PAPER_CPT, PAPER_SCRATCH, ChinchillaFit, CPTFit, allocation, compute_for_loss, compute_optimal, optimal_loss,
    predict, savings, tokens_for_loss,
)

__all__ = ["PAPER_CPT", "PAPER_SCRATCH", "CPTFit", "ChinchillaFit", "allocation", "compute_for_loss",
           "compute_optimal", "fit_chinchilla", "fit_cpt", "intervals", "optimal_loss", "predict",
           "savings", "tokens_for_loss"]
