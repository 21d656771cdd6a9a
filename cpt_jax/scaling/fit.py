"""Fitting the laws as the paper (after Hoffmann et al.) does: minimise

    mean_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i - gamma log N_i, e) - log L_i ),  delta = 1e-3

with L-BFGS from every point of a grid of initialisations and keep the best; A = e^a, B = e^b,
E = e^e. (The paper writes a sum; the mean has the same minimum and is comparable across point
sets of different sizes.) All starts run at once (vmap over a jitted L-BFGS loop), in float64:
the 4,500-start grid takes seconds where a scipy loop over the starts takes minutes.

Every start runs until a step lowers the objective by less than FTOL of it (scipy's L-BFGS-B
rule, relative), or MAX_STEPS; a fit whose best start hit MAX_STEPS is reported as not converged.

Parameter vector order: (a, alpha, b, beta, gamma, e). Chinchilla fixes gamma = 0; the CPT law
as the paper fits it freezes a, alpha, e at the scratch fit and fits b', beta', gamma.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax.scaling.laws import ChinchillaFit, CPTFit

DELTA = 1e-3
SCREEN_STEPS = 10  # L-BFGS steps for every start of the grid before the best are kept
MAX_STEPS = 1000  # a start still improving after this many steps has not converged (most take < 200)
FTOL = 1e-10  # converged: a step lowered the objective by less than this fraction of it
KEEP_FRACTION, KEEP_MIN = 0.05, 32
CHUNK = 32  # starts per compiled call: a chunk runs until its slowest start stops
REFIT_STARTS = 4  # a refit (bootstrap resample, left-out run) starts from the best few of the full fit's ends
NAMES = ("a", "alpha", "b", "beta", "gamma", "e")
CHINCHILLA_FREE = (0, 1, 2, 3, 5)
CPT_FREE = (2, 3, 4)
JOINT_FREE = (0, 1, 2, 3, 4, 5)

# Hoffmann et al.'s grid: 5 x 5 x 5 x 6 x 6 = 4,500 starts for Chinchilla.
_GRID = {"a": np.arange(0, 30, 5.0), "alpha": np.arange(0, 2.5, 0.5), "b": np.arange(0, 30, 5.0),
         "beta": np.arange(0, 2.5, 0.5), "gamma": np.array([-0.25, 0.0, 0.25]), "e": np.arange(-1, 1.5, 0.5)}


def grid(free: tuple[int, ...], base: np.ndarray) -> np.ndarray:
    """Every combination of the grid values of the free parameters, the rest from `base`.
    Chinchilla's gamma is fixed at 0, so it is not varied there."""
    axes = [_GRID[NAMES[i]] for i in free]
    starts = np.tile(base, (int(np.prod([len(a) for a in axes])), 1))
    starts[:, list(free)] = np.array(list(itertools.product(*axes)))
    return starts


def _residuals(theta, logN, logD, logL):
    a, alpha, b, beta, gamma, e = theta
    pred = jax.nn.logsumexp(jnp.stack([a - alpha * logN, b - beta * logD - gamma * logN,
                                       jnp.broadcast_to(e, logN.shape)]), axis=0)
    return pred - logL


def _objective(theta, logN, logD, logL, weights):
    """The weighted mean Huber loss of log L (weights: a bootstrap's counts, or 0 to leave out)."""
    huber = optax.losses.huber_loss(_residuals(theta, logN, logD, logL), delta=DELTA)
    return jnp.sum(weights * huber) / jnp.sum(weights)


def huber(theta: np.ndarray, N, D, L) -> np.ndarray:
    """Each point's Huber loss of log L under parameter vector `theta` (their mean is a fit's error)."""
    with jax.enable_x64(True):
        return np.asarray(optax.losses.huber_loss(_residuals(jnp.asarray(theta), *_prepare(N, D, L)), delta=DELTA))


@jax.jit
def _minimise(starts, mask, logN, logD, logL, weights, max_steps):
    """L-BFGS from every row of `starts` [rows, 6] with its row of point weights and of log L
    (a resample's own losses), until converged or `max_steps`; only entries where `mask` is 1 move
    (their gradient alone is kept, so L-BFGS's steps stay in that subspace). Returns (params,
    objective, steps)."""
    def run(x0, w, logL):
        def f(x):
            return _objective(mask * x + (1 - mask) * jax.lax.stop_gradient(x), logN, logD, logL, w)

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(f)

        def improving(carry):
            _, _, prev, value, k = carry
            return (k < max_steps) & ((k == 0) | (prev - value > FTOL * jnp.abs(value)))

        def step(carry):
            x, state, _, _, k = carry
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
            x = optax.apply_updates(x, updates)
            return x, state, value, f(x), k + 1

        x, _, _, value, k = jax.lax.while_loop(improving, step, (x0, opt.init(x0), jnp.inf, f(x0), 0))
        return x, value, k

    # One row of losses for all (unbatched: the same program as before resamples had their own), or one each.
    full, values, steps = jax.vmap(run, in_axes=(0, 0, 0 if logL.ndim == 2 else None))(starts, weights, logL)
    return full, jnp.where(jnp.isfinite(values), values, jnp.inf), steps


@dataclasses.dataclass(frozen=True)
class Result:
    """The best of a multi-start fit, and every start's end (the starts of later refits)."""
    theta: np.ndarray  # [6]
    value: float  # the objective: mean Huber of log L
    converged: bool
    ends: np.ndarray  # [k, 6] the kept starts' ends, best first


def _prepare(N, D, L):
    """log N, log D [points] and log L [points], or [rows, points] where each row has its own losses."""
    N, D = (np.asarray(x, np.float64).ravel() for x in (N, D))
    L = np.asarray(L, np.float64)
    L = L if L.ndim == 2 else L.ravel()
    if not (len(N) == len(D) == L.shape[-1]) or len(N) < 3:
        raise ValueError(f"need at least 3 (N, D, L) points of equal length, got {len(N)}, {len(D)}, {L.shape[-1]}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("N, D and L must all be positive")
    return np.log(N), np.log(D), np.log(L)


def _bucket(k: int, least: int) -> int:
    """k rounded up to a power of two (at least `least`): few distinct shapes, few compilations."""
    return max(least, 1 << (k - 1).bit_length())


def run_starts(N, D, L, free: tuple[int, ...], starts: np.ndarray, weights: np.ndarray | None = None,
               max_steps: int = MAX_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS from each full parameter row of `starts` (only `free` entries move; the others stay
    as that row has them), each with its row of point `weights` (default all 1) and of `L` where
    it is [k, points]. Returns (params [k, 6], objective [k], converged [k]). Points are padded
    (weight 0) to a power of two and rows run in chunks of CHUNK, so one compilation serves every
    law and most data sets."""
    starts = np.asarray(starts, np.float64)
    logN, logD, logL = _prepare(N, D, L)
    k, p = len(starts), len(logN)
    padded = _bucket(p, 16)
    logN, logD = (np.pad(x, (0, padded - p)) for x in (logN, logD))
    logL = np.pad(logL, [(0, 0)] * (logL.ndim - 1) + [(0, padded - p)])
    w = np.zeros((k, padded))
    w[:, :p] = 1.0 if weights is None else weights
    mask = np.isin(np.arange(6), free).astype(np.float64)
    out = []
    with jax.enable_x64(True):
        for i in range(0, k, CHUNK):
            rows = np.arange(i, i + CHUNK) % k  # the last chunk wraps round: its extra rows are dropped
            out.append([np.asarray(v)[:min(CHUNK, k - i)] for v in _minimise(
                starts[rows], mask, logN, logD, logL[rows] if logL.ndim == 2 else logL, w[rows], max_steps)])
    full, values, steps = (np.concatenate(v) for v in zip(*out))
    return full, values, (steps < max_steps) & np.isfinite(values)


def fit_params(N, D, L, free: tuple[int, ...], base: np.ndarray | None = None) -> Result:
    """The best parameter vector over the grid of starts. Every start takes SCREEN_STEPS L-BFGS
    steps; the best KEEP of them go on until converged (starts that are behind after the screen
    end far from the best: this keeps the full grid at a fraction of the cost)."""
    starts = grid(free, np.zeros(6) if base is None else np.asarray(base, np.float64))
    screened, values, _ = run_starts(N, D, L, free, starts, max_steps=SCREEN_STEPS)
    keep = np.argsort(values)[:max(KEEP_MIN, int(KEEP_FRACTION * len(starts)))]
    full, values, converged = run_starts(N, D, L, free, screened[keep])
    order = np.argsort(values)
    return Result(full[order[0]], float(values[order[0]]), bool(converged[order[0]]), full[order])


def refit_starts(result: Result, frozen: np.ndarray | None = None, free: tuple[int, ...] = ()) -> np.ndarray:
    """The starts of a refit: the best REFIT_STARTS distinct ends of `result`; with `frozen` [6],
    every parameter outside `free` taken from it (a CPT refit on a refitted scratch law)."""
    ends = np.unique(np.round(result.ends, 6), axis=0, return_index=True)[1]
    starts = result.ends[np.sort(ends)[:REFIT_STARTS]].copy()
    if frozen is not None:
        fixed = [i for i in range(6) if i not in free]
        starts[:, fixed] = np.asarray(frozen)[fixed]
    return starts


def refit(N, D, L, free: tuple[int, ...], starts: np.ndarray, weights: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One refit per row of `weights` [m, points] (and of `L` where it is [m, points]: each
    resample's own losses), each from every row of `starts` [s, 6] or of `starts` [m, s, 6] (its
    own starts); the best of each. Returns (params [m, 6], objective [m], converged [m])."""
    m = len(weights)
    starts = np.broadcast_to(starts, (m, *np.shape(starts)[-2:]))
    s = starts.shape[1]
    L = np.asarray(L, np.float64)
    L = np.repeat(L, s, axis=0) if L.ndim == 2 else L
    full, values, converged = run_starts(N, D, L, free, starts.reshape(m * s, 6), np.repeat(weights, s, axis=0))
    best = np.argmin(values.reshape(m, s), axis=1)
    pick = np.arange(m) * s + best
    return full[pick], values[pick], converged[pick]


def _chinchilla(theta: np.ndarray, value: float, converged: bool = True) -> ChinchillaFit:
    a, alpha, b, beta, _, e = (float(x) for x in theta)
    return ChinchillaFit(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta, huber=value,
                         converged=converged)


def _cpt(theta: np.ndarray, value: float, converged: bool = True) -> CPTFit:
    a, alpha, b, beta, gamma, e = (float(x) for x in theta)
    return CPTFit(E=np.exp(e), A=np.exp(a), B_prime=np.exp(b), alpha=alpha, beta_prime=beta, gamma=gamma,
                  huber=value, converged=converged)


def as_fit(theta: np.ndarray, cpt: bool, value: float = float("nan"), converged: bool = True):
    """The law of a parameter vector: a CPTFit if `cpt`, else a ChinchillaFit."""
    return (_cpt if cpt else _chinchilla)(theta, value, converged)


def theta(fit) -> np.ndarray:
    """The parameter vector (a, alpha, b, beta, gamma, e) of a fit."""
    return np.array([np.log(fit.A), fit.alpha, np.log(fit.data_coef), fit.data_exp, fit.gamma, np.log(fit.E)])


def fit_chinchilla(N, D, L) -> ChinchillaFit:
    """L = E + A / N^alpha + B / D^beta fitted to points (N params, D tokens, L loss)."""
    r = fit_params(N, D, L, CHINCHILLA_FREE)
    return _chinchilla(r.theta, r.value, r.converged)


def fit_cpt(N, D, L, base: ChinchillaFit | None = None) -> CPTFit:
    """L = E + A / N^alpha + B' / (D^beta' N^gamma). With `base` (the scratch fit) as the paper:
    E, A, alpha frozen, B', beta', gamma fitted; without, all six fitted jointly."""
    r = fit_params(N, D, L, JOINT_FREE) if base is None else fit_params(N, D, L, CPT_FREE, theta(base))
    return _cpt(r.theta, r.value, r.converged)


def intervals(fit, N, D, L, n: int = 200, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of a Chinchilla fit's constants: n refits on resamples of the points
    (with replacement), each from the fit's own starts. Points here are independent; a sweep's
    points are not (cpt_jax.scaling.analysis resamples runs, and refits the CPT law nested)."""
    if not isinstance(fit, ChinchillaFit):
        raise TypeError("intervals() takes a Chinchilla fit; the CPT law's intervals are nested "
                        "(cpt_jax.scaling.analysis)")
    result = fit_params(N, D, L, CHINCHILLA_FREE)
    points = len(np.ravel(N))
    weights = np.random.default_rng(seed).multinomial(points, np.full(points, 1 / points), size=n)
    thetas, _, converged = refit(N, D, L, CHINCHILLA_FREE, refit_starts(result), weights)
    return summarise(fit, np.where(converged[:, None], thetas, np.nan), level)


def summarise(fit, thetas: np.ndarray, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `fit`'s constants over bootstrap parameter vectors [n, 6]; rows
    with a nan (failed refits, counted where they are made) are left out."""
    cpt = isinstance(fit, CPTFit)
    names = ("E", "A", "B_prime", "alpha", "beta_prime", "gamma") if cpt else ("E", "A", "B", "alpha", "beta")
    fits = [as_fit(t, cpt) for t in np.asarray(thetas) if np.isfinite(t).all()]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: tuple(float(v) for v in np.percentile([getattr(f, k) for f in fits], q)) if fits
            else (float("nan"), float("nan")) for k in names}
