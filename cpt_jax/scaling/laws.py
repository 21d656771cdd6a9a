"""The two loss laws, their compute-optimal allocation under C = 6 N D, and CPT's savings.

  Chinchilla (scratch):  L(N, D) = E + A / N^alpha + B / D^beta
  CPT (arXiv 2407.02118): L(N, D) = E + A / N^alpha + B' / (D^beta' N^gamma)

The CPT law's data term shrinks with model size (gamma > 0): larger models transfer more. Setting
gamma = 0 gives back Chinchilla, so one set of formulas serves both. Plain numpy in and out.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber: float = float("nan")  # the fit's mean Huber loss on log L (the paper's "fit error")
    converged: bool = True  # False: the fit's best start stopped at fit.MAX_STEPS, still improving

    @property
    def gamma(self) -> float:
        return 0.0

    @property
    def data_coef(self) -> float:
        return self.B

    @property
    def data_exp(self) -> float:
        return self.beta


@dataclasses.dataclass(frozen=True)
class CPTFit:
    E: float
    A: float
    B_prime: float
    alpha: float
    beta_prime: float
    gamma: float
    huber: float = float("nan")
    converged: bool = True

    @property
    def data_coef(self) -> float:
        return self.B_prime

    @property
    def data_exp(self) -> float:
        return self.beta_prime


Fit = ChinchillaFit | CPTFit

# The paper's fitted constants (its Table of scaling-law constants).
PAPER_SCRATCH = ChinchillaFit(E=1.55, A=420.0, B=719.5, alpha=0.40, beta=0.30)
PAPER_CPT = CPTFit(E=1.55, A=420.0, B_prime=433.3, alpha=0.40, beta_prime=0.20, gamma=0.08)


def predict(fit: Fit, N, D) -> np.ndarray:
    """Loss at N parameters and D tokens."""
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return fit.E + fit.A / N ** fit.alpha + fit.data_coef / (D ** fit.data_exp * N ** fit.gamma)


def allocation(fit: Fit) -> tuple[float, float, float]:
    """(G, a, b) of N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b: minimising L at fixed C = 6 N D
    gives alpha A / N^alpha = (beta' - gamma) B' / (D^beta' N^gamma)."""
    alpha, beta, gamma = fit.alpha, fit.data_exp, fit.gamma
    if beta <= gamma or alpha <= gamma:
        raise ValueError(f"no compute-optimal allocation: needs beta' > gamma and alpha > gamma "
                         f"(alpha={alpha:.3f}, beta'={beta:.3f}, gamma={gamma:.3f})")
    s = alpha + beta - gamma
    G = (alpha * fit.A / ((beta - gamma) * fit.data_coef)) ** (1 / s)
    return G, beta / s, (alpha - gamma) / s


def compute_optimal(fit: Fit, C) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) for compute C (FLOPs, C = 6 N D)."""
    G, a, b = allocation(fit)
    C = np.asarray(C, np.float64)
    return G * (C / 6) ** a, (C / 6) ** b / G


def optimal_loss(fit: Fit, C) -> np.ndarray:
    """The loss of the compute-optimal model at compute C."""
    return predict(fit, *compute_optimal(fit, C))


def tokens_for_loss(fit: Fit, N, loss) -> np.ndarray:
    """Tokens a model of N parameters needs to reach `loss` (inf where it never does)."""
    N, loss = np.asarray(N, np.float64), np.asarray(loss, np.float64)
    gap = loss - fit.E - fit.A / N ** fit.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        D = (fit.data_coef / (np.where(gap > 0, gap, np.nan) * N ** fit.gamma)) ** (1 / fit.data_exp)
    return np.where(gap > 0, D, np.inf)


LOG_C_RANGE = (-10.0, 80.0)  # compute_for_loss searches C from 1e-10 to 1e80 FLOPs


def compute_for_loss(fit: Fit, loss) -> np.ndarray:
    """The least compute reaching `loss` on the compute-optimal frontier (bisection in log C over
    LOG_C_RANGE, where the frontier's loss falls monotonically); inf where it needs more than
    1e80 FLOPs or lies at or below the law's floor E."""
    loss = np.atleast_1d(np.asarray(loss, np.float64))
    lo, hi = np.full(loss.shape, LOG_C_RANGE[0]), np.full(loss.shape, LOG_C_RANGE[1])
    for _ in range(200):
        mid = (lo + hi) / 2
        above = optimal_loss(fit, 10 ** mid) > loss
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where((loss > fit.E) & (optimal_loss(fit, 10 ** hi) <= loss * (1 + 1e-9)), 10 ** hi, np.inf)


def savings(scratch: Fit, cpt: Fit, losses) -> dict[str, np.ndarray]:
    """FLOPs and tokens each law needs for each loss on its compute-optimal frontier, and CPT's
    saving of FLOPs (1 - C_cpt / C_scratch; the paper reports 25%-50%)."""
    c_scratch, c_cpt = compute_for_loss(scratch, losses), compute_for_loss(cpt, losses)
    with np.errstate(invalid="ignore", over="ignore"):
        saved = 1 - c_cpt / c_scratch
        tokens = {name: np.where(np.isfinite(c), compute_optimal(f, np.where(np.isfinite(c), c, 1.0))[1], np.inf)
                  for name, f, c in (("scratch", scratch, c_scratch), ("cpt", cpt, c_cpt))}
    return {"loss": np.asarray(losses, np.float64), "flops_scratch": c_scratch, "flops_cpt": c_cpt,
            "tokens_scratch": tokens["scratch"], "tokens_cpt": tokens["cpt"], "saved": saved}
