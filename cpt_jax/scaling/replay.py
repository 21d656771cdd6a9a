"""Forgetting in cross-lingual CPT with replay, and the critical replay ratio.

The rise of the source-language eval loss over its value at the start of CPT, after D target-
language tokens with a share r of the sequences replayed from the source language (0 <= r < 1):

  rise(r, D) = K (D / D_REF)^kappa / (1 + r / r0)^rho,   D_REF = 1e6

so K is the rise without replay at 1M target tokens; forgetting grows as a power law in target
tokens (the paper: "forgetting follows a power law"), and replay damps it as a power law in the
mixture ratio past r0 (after Gu et al. 2024's critical mixture ratio). The critical ratio is the
least r that keeps the rise at D within epsilon. The law is fitted in log space, where a power
law's errors are relative: forgetting without replay can be a hundred times that with plenty,
and a fit of the raw rise would see only the former. Plain numpy in and out; scipy fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping

import numpy as np
from scipy.optimize import least_squares

D_REF = 1e6
TOL = 1e-10  # least_squares ftol / xtol / gtol: noise-free points are fitted to ~1e-9

# Starts for (kappa, log r0, rho); log K starts at the log of the mean positive rise.
_KAPPAS = (0.0, 0.5, 1.0)
_LOG_R0S = (math.log(0.003), math.log(0.03), math.log(0.3))
_RHOS = (0.5, 1.0, 2.0)


@dataclasses.dataclass(frozen=True)
class ReplayFit:
    K: float
    kappa: float
    r0: float
    rho: float
    rmse: float = float("nan")  # root mean square residual of log rise on the fitted points


def predict_rise(fit: ReplayFit, r, D) -> np.ndarray:
    """rise(r, D) = K (D / D_REF)^kappa / (1 + r / r0)^rho."""
    r, D = np.asarray(r, np.float64), np.asarray(D, np.float64)
    return fit.K * (D / D_REF) ** fit.kappa / (1 + r / fit.r0) ** fit.rho


def critical_ratio(fit: ReplayFit, D: float, epsilon: float) -> float:
    """The least r >= 0 with rise(r, D) <= epsilon: 0 if no replay is needed, inf if replay never
    gets there (rho <= 0, or epsilon <= 0 which the positive law never reaches), else

      r* = r0 ((K (D / D_REF)^kappa / epsilon)^(1 / rho) - 1).

    A value >= 1 means no mixture with any target data reaches epsilon."""
    rise0 = fit.K * (D / D_REF) ** fit.kappa
    if rise0 <= epsilon:
        return 0.0
    if fit.rho <= 0 or epsilon <= 0:
        return math.inf
    try:
        return fit.r0 * ((rise0 / epsilon) ** (1 / fit.rho) - 1)
    except OverflowError:  # a rho near 0: replay barely damps forgetting
        return math.inf


def _prepare(r, D, rise) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, D, rise = (np.asarray(x, np.float64).ravel() for x in (r, D, rise))
    if not (len(r) == len(D) == len(rise)) or len(r) < 4:
        raise ValueError(f"need at least 4 (r, D, rise) points of equal length, got {len(r)}, {len(D)}, {len(rise)}")
    if not np.isfinite(rise).all():
        raise ValueError("rise must be finite")
    if not (D > 0).all():
        raise ValueError(f"target tokens D must be positive, got min {D.min()}")
    if not ((r >= 0) & (r < 1)).all():
        raise ValueError(f"replay ratios r must lie in [0, 1), got {r.min()} .. {r.max()}")
    r, D, rise = r[rise > 0], D[rise > 0], rise[rise > 0]  # no forgetting: nothing for a power law
    if len(r) < 4:
        raise ValueError(f"need at least 4 points whose rise is > 0, got {len(r)}")
    distinct = np.unique(r)
    if len(distinct) < 3:  # two leave (r0, rho) on a ridge: any point of it fits them exactly
        raise ValueError(f"need at least 3 distinct replay ratios to fit rho and r0, got only r="
                         f"{', '.join(f'{x:g}' for x in distinct)}")
    return r, D, rise


def _solve(r, D, rise, starts) -> ReplayFit:
    """Least squares on log rise over theta = (log K, kappa, log r0, rho) from each start; the best."""
    logx, target = np.log(D / D_REF), np.log(rise)

    def residuals(theta):
        logk, kappa, logr0, rho = theta
        return logk + kappa * logx - rho * np.log1p(r / np.exp(logr0)) - target

    def jacobian(theta):
        q, rho = r / np.exp(theta[2]), theta[3]
        return np.stack([np.ones_like(r), logx, rho * q / (1 + q), -np.log1p(q)], axis=1)

    best = None
    for x0 in starts:
        sol = least_squares(residuals, x0, jac=jacobian, ftol=TOL, xtol=TOL, gtol=TOL)
        if np.isfinite(sol.cost) and (best is None or sol.cost < best.cost):
            best = sol
    logk, kappa, logr0, rho = (float(x) for x in best.x)
    return ReplayFit(K=math.exp(logk), kappa=kappa, r0=math.exp(logr0), rho=rho,
                     rmse=float(np.sqrt(np.mean(best.fun ** 2))))


def _theta(fit: ReplayFit) -> np.ndarray:
    return np.array([math.log(fit.K), fit.kappa, math.log(fit.r0), fit.rho])


def fit_replay(r, D, rise) -> ReplayFit:
    """The law fitted to points (r replay ratio, D target tokens, rise of the source loss) by
    least squares on log rise, from every start of a 3 x 3 x 3 grid; the best is kept. Points
    whose source loss ended at or below its start (no forgetting to fit) are left out. It needs
    3 or more distinct ratios: with 2, (r0, rho) lie on a ridge of exact fits."""
    r, D, rise = _prepare(r, D, rise)
    logk = math.log(rise.mean())
    starts = [np.array([logk, kappa, logr0, rho]) for kappa, logr0, rho in itertools.product(_KAPPAS, _LOG_R0S, _RHOS)]
    return _solve(r, D, rise, starts)


def _interval(values, level: float) -> tuple[float, float]:
    # Rank ends ("lower"/"higher"), not interpolated: linear interpolation next to inf gives nan.
    if len(values) == 0:
        return (math.nan, math.nan)
    lo = np.percentile(values, (1 - level) / 2 * 100, method="lower")
    hi = np.percentile(values, (1 + level) / 2 * 100, method="higher")
    return (float(lo), float(hi))


def bootstrap(r, D, rise, epsilon: float, at_tokens: float, n: int = 200, level: float = 0.95,
              seed: int = 0) -> dict:
    """The fit on all points and its critical ratio at `at_tokens`, with percentile intervals of
    the critical ratio, rho and kappa over n refits on resamples of the points (with replacement),
    each started at the full fit. Resamples that cannot be fitted (one distinct ratio drawn) are
    skipped; "n_used" counts the rest. The critical interval's upper end may be inf."""
    r, D, rise = _prepare(r, D, rise)
    fit = fit_replay(r, D, rise)
    start = [_theta(fit)]
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n):
        idx = rng.integers(0, len(r), len(r))
        try:
            fits.append(_solve(*_prepare(r[idx], D[idx], rise[idx]), start))
        except ValueError:
            continue
    return {"fit": fit, "critical": critical_ratio(fit, at_tokens, epsilon),
            "critical_interval": _interval([critical_ratio(f, at_tokens, epsilon) for f in fits], level),
            "rho_interval": _interval([f.rho for f in fits], level),
            "kappa_interval": _interval([f.kappa for f in fits], level), "n_used": len(fits)}


def _curve(tokens, loss) -> tuple[np.ndarray, np.ndarray]:
    tokens, loss = np.asarray(tokens, np.float64).ravel(), np.asarray(loss, np.float64).ravel()
    if len(tokens) != len(loss) or len(tokens) == 0:
        raise ValueError(f"a curve needs tokens and losses of one nonzero length, got {len(tokens)}, {len(loss)}")
    if not (tokens > 0).all() or not (np.diff(tokens) > 0).all():
        raise ValueError("a curve's target tokens must be positive and strictly increasing")
    return tokens, loss


def equal_compute(curves: Mapping[float, tuple], at) -> dict:
    """Target loss of each replay ratio at equal target tokens `at`: each curve (ratio -> (target
    tokens, target loss)) interpolated linearly in log tokens, nan outside its range. Returns
    {"at", "loss": {ratio: [len(at)]}, "spread": max - min over the ratios with a value,
    "relative_spread": spread / their mean}; spread is nan where fewer than 2 ratios have a value."""
    if not curves:
        raise ValueError("need at least one curve")
    at = np.atleast_1d(np.asarray(at, np.float64))
    if not (at > 0).all():
        raise ValueError("`at` target tokens must be positive")
    loss = {}
    for ratio, (tokens, values) in curves.items():
        tokens, values = _curve(tokens, values)
        loss[ratio] = np.interp(np.log(at), np.log(tokens), values, left=np.nan, right=np.nan)
    table = np.array(list(loss.values()))
    have = np.isfinite(table).sum(axis=0)
    # fmax / fmin skip nan (and stay nan where every ratio is nan) without nanmax's warnings.
    spread = np.where(have >= 2, np.fmax.reduce(table, axis=0) - np.fmin.reduce(table, axis=0), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(np.isfinite(table), table, 0.0).sum(axis=0) / have
    return {"at": at, "loss": loss, "spread": spread, "relative_spread": spread / mean}


def common_tokens(curves: Mapping[float, tuple], k: int = 3) -> np.ndarray:
    """k log-spaced target-token values in the range every curve covers (endpoints included);
    empty if the ranges do not overlap."""
    if not curves:
        raise ValueError("need at least one curve")
    ranges = [_curve(tokens, values)[0][[0, -1]] for tokens, values in curves.values()]
    lo, hi = max(t[0] for t in ranges), min(t[1] for t in ranges)
    if lo > hi:
        return np.array([])
    return np.unique(np.geomspace(lo, hi, k))
