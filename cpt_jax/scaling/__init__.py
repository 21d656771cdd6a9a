"""Scaling laws of pretraining from scratch (Chinchilla) and of continual pre-training (the
paper's CPT law), fitted as the paper fits them; compute-optimal allocation; CPT's savings;
forgetting with replay and the critical replay ratio (replay)."""

from cpt_jax.scaling.fit import fit_chinchilla, fit_cpt, intervals
from cpt_jax.scaling.laws import (
    PAPER_CPT, PAPER_SCRATCH, ChinchillaFit, CPTFit, allocation, compute_for_loss, compute_optimal, optimal_loss,
    predict, savings, tokens_for_loss,
)
from cpt_jax.scaling.replay import ReplayFit, critical_ratio, fit_replay, predict_rise

__all__ = ["PAPER_CPT", "PAPER_SCRATCH", "CPTFit", "ChinchillaFit", "ReplayFit", "allocation", "compute_for_loss",
           "compute_optimal", "critical_ratio", "fit_chinchilla", "fit_cpt", "fit_replay", "intervals",
           "optimal_loss", "predict", "predict_rise", "savings", "tokens_for_loss"]
