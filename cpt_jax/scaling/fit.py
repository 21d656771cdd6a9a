"""Fitting the laws as the paper (after Hoffmann et al.) does: minimise

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i - gamma log N_i, e) - log L_i ),  delta = 1e-3

with L-BFGS from every point of a grid of initialisations and keep the best; A = e^a, B = e^b,
E = e^e. All starts run at once (vmap over a jitted L-BFGS loop), in float64: the 4,500-start
grid takes seconds where a scipy loop over the starts takes minutes.

Parameter vector order: (a, alpha, b, beta, gamma, e). Chinchilla fixes gamma = 0; the CPT law
as the paper fits it freezes a, alpha, e at the scratch fit and fits b', beta', gamma.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpt_jax.scaling.laws import ChinchillaFit, CPTFit

DELTA = 1e-3
SCREEN_STEPS, STEPS = 10, 100  # L-BFGS steps for every start, then for the kept ones
KEEP_FRACTION, KEEP_MIN = 0.05, 32
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


def _objective(theta, logN, logD, logL, weights):
    a, alpha, b, beta, gamma, e = theta
    pred = jax.nn.logsumexp(jnp.stack([a - alpha * logN, b - beta * logD - gamma * logN,
                                       jnp.broadcast_to(e, logN.shape)]), axis=0)
    return jnp.sum(weights * optax.losses.huber_loss(pred, logL, delta=DELTA))


@functools.partial(jax.jit, static_argnames=("free",))
def _minimise(starts, base, logN, logD, logL, weights, free, steps):
    """L-BFGS from every row of `starts` (free parameters only); returns (final params, objective)."""
    idx = jnp.array(free)

    def f(x, w):
        return _objective(base.at[idx].set(x), logN, logD, logL, w)

    def run(x0, w):
        fx = functools.partial(f, w=w)
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(fx)

        def step(_, carry):
            x, state = carry
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fx)
            return optax.apply_updates(x, updates), state

        x, _ = jax.lax.fori_loop(0, steps, step, (x0, opt.init(x0)))  # traced bound: one compile
        return x, fx(x)

    xs, values = jax.vmap(run, in_axes=(0, 0))(starts, weights)
    return xs, jnp.where(jnp.isfinite(values), values, jnp.inf)


def _prepare(N, D, L):
    N, D, L = (np.asarray(x, np.float64).ravel() for x in (N, D, L))
    if not (len(N) == len(D) == len(L)) or len(N) < 3:
        raise ValueError(f"need at least 3 (N, D, L) points of equal length, got {len(N)}, {len(D)}, {len(L)}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("N, D and L must all be positive")
    return np.log(N), np.log(D), np.log(L)


def _run(N, D, L, free: tuple[int, ...], starts: np.ndarray, weights: np.ndarray, steps: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS from each full parameter row of `starts` (only `free` entries move), each with its
    row of point `weights`; returns (params [k, 6], objective [k])."""
    with jax.enable_x64(True):
        logN, logD, logL = _prepare(N, D, L)
        xs, values = _minimise(jnp.asarray(starts[:, list(free)]), jnp.asarray(starts[0]), logN, logD, logL,
                               jnp.asarray(weights, jnp.float64), free, steps)
        full = np.array(starts, np.float64)
        full[:, list(free)] = np.asarray(xs)
        return full, np.asarray(values)


def fit_params(N, D, L, free: tuple[int, ...], base: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The best parameter vector over the grid of starts, and its objective (sum of Hubers).
    Every start takes SCREEN_STEPS L-BFGS steps; the best KEEP of them go on to STEPS (starts
    that are behind after the screen end far from the best: this keeps the full grid at a tenth
    of the cost)."""
    starts = grid(free, np.zeros(6) if base is None else np.asarray(base, np.float64))
    ones = np.ones((len(starts), len(np.ravel(N))))
    full, values = _run(N, D, L, free, starts, ones, SCREEN_STEPS)
    keep = np.argsort(values)[:max(KEEP_MIN, int(KEEP_FRACTION * len(starts)))]
    full, values = _run(N, D, L, free, full[keep], ones[keep], STEPS)
    best = int(np.argmin(values))
    return full[best], float(values[best])


def bootstrap_params(N, D, L, free: tuple[int, ...], theta: np.ndarray, n: int = 200, seed: int = 0) -> np.ndarray:
    """[n, 6]: refits on n resamples of the points (with replacement), each started at `theta`."""
    points = len(np.ravel(N))
    weights = np.random.default_rng(seed).multinomial(points, np.full(points, 1 / points), size=n)
    return _run(N, D, L, free, np.tile(theta, (n, 1)), weights, STEPS)[0]


def _chinchilla(theta: np.ndarray, value: float) -> ChinchillaFit:
    a, alpha, b, beta, _, e = (float(x) for x in theta)
    return ChinchillaFit(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta, huber=value)


def _cpt(theta: np.ndarray, value: float) -> CPTFit:
    a, alpha, b, beta, gamma, e = (float(x) for x in theta)
    return CPTFit(E=np.exp(e), A=np.exp(a), B_prime=np.exp(b), alpha=alpha, beta_prime=beta, gamma=gamma, huber=value)


def theta(fit) -> np.ndarray:
    """The parameter vector (a, alpha, b, beta, gamma, e) of a fit."""
    return np.array([np.log(fit.A), fit.alpha, np.log(fit.data_coef), fit.data_exp, fit.gamma, np.log(fit.E)])


def fit_chinchilla(N, D, L) -> ChinchillaFit:
    """L = E + A / N^alpha + B / D^beta fitted to points (N params, D tokens, L loss)."""
    return _chinchilla(*fit_params(N, D, L, CHINCHILLA_FREE))


def fit_cpt(N, D, L, base: ChinchillaFit | None = None) -> CPTFit:
    """L = E + A / N^alpha + B' / (D^beta' N^gamma). With `base` (the scratch fit) as the paper:
    E, A, alpha frozen, B', beta', gamma fitted; without, all six fitted jointly."""
    if base is None:
        return _cpt(*fit_params(N, D, L, JOINT_FREE))
    return _cpt(*fit_params(N, D, L, CPT_FREE, theta(base)))


def intervals(fit, N, D, L, n: int = 200, level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of every constant of `fit`, each resample refitted from `fit`: all five
    Chinchilla constants, or for a CPT fit B', beta', gamma with E, A, alpha held as the paper
    fits them (so those three show no spread)."""
    free = CPT_FREE if isinstance(fit, CPTFit) else CHINCHILLA_FREE
    return summarise(fit, bootstrap_params(N, D, L, free, theta(fit), n, seed), level)


def summarise(fit, thetas: np.ndarray, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `fit`'s constants over bootstrap parameter vectors [n, 6]."""
    cpt = isinstance(fit, CPTFit)
    fits = [(_cpt if cpt else _chinchilla)(t, np.nan) for t in thetas]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    names = ("E", "A", "B_prime", "alpha", "beta_prime", "gamma") if cpt else ("E", "A", "B", "alpha", "beta")
    return {k: tuple(float(v) for v in np.nanpercentile([getattr(f, k) for f in fits], q)) for k in names}
