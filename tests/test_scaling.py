"""Scaling laws: the paper's constants give the paper's allocation; fits recover known constants."""

import numpy as np
import pytest

from cpt_jax import scaling as sc

# A grid of sizes and token counts like a sweep's: 10 sizes, 10 checkpoints each.
N = np.repeat(np.geomspace(5e7, 5e9, 10), 10)
D = np.tile(np.geomspace(1e9, 1e11, 10), 10)


def noisy(fit, seed):
    return sc.predict(fit, N, D) * np.exp(np.random.default_rng(seed).normal(0, 0.002, N.shape))


def test_paper_constants_give_the_paper_allocation():
    for fit, a, b, n_coef, d_coef in [(sc.PAPER_SCRATCH, 0.429, 0.571, 0.324, 0.514),
                                      (sc.PAPER_CPT, 0.385, 0.615, 4.79, 0.035)]:
        G, got_a, got_b = sc.allocation(fit)
        assert round(got_a, 3) == a and round(got_b, 3) == b
        # N_opt = G (C/6)^a = (G / 6^a) C^a, and D_opt = (1 / (G 6^b)) C^b
        assert G / 6 ** got_a == pytest.approx(n_coef, rel=2e-3)
        assert 1 / (G * 6 ** got_b) == pytest.approx(d_coef, rel=2e-2)
        n, d = sc.compute_optimal(fit, 1e21)
        assert 6 * n * d == pytest.approx(1e21)


def test_compute_optimal_is_the_minimum_at_fixed_compute():
    for fit in (sc.PAPER_SCRATCH, sc.PAPER_CPT):
        n_opt, _ = sc.compute_optimal(fit, 1e21)
        ns = n_opt * np.geomspace(0.5, 2, 41)
        losses = sc.predict(fit, ns, 1e21 / (6 * ns))
        assert np.argmin(losses) == 20


def test_savings_and_inverses():
    loss = sc.optimal_loss(sc.PAPER_SCRATCH, 1e21)
    assert sc.compute_for_loss(sc.PAPER_SCRATCH, loss)[0] == pytest.approx(1e21, rel=1e-6)
    d = sc.tokens_for_loss(sc.PAPER_CPT, 1e9, 2.5)
    assert sc.predict(sc.PAPER_CPT, 1e9, d) == pytest.approx(2.5)
    assert np.isinf(sc.tokens_for_loss(sc.PAPER_CPT, 1e9, 1.0))  # below the floor
    s = sc.savings(sc.PAPER_SCRATCH, sc.PAPER_CPT, [2.3, 2.6])
    assert np.allclose(s["saved"], 1 - s["flops_cpt"] / s["flops_scratch"])
    n, d = sc.compute_optimal(sc.PAPER_CPT, s["flops_cpt"])
    np.testing.assert_allclose(s["tokens_cpt"], d)
    np.testing.assert_allclose(sc.predict(sc.PAPER_CPT, n, d), [2.3, 2.6], rtol=1e-6)


def test_fits_recover_known_constants():
    scratch = sc.fit_chinchilla(N, D, noisy(sc.PAPER_SCRATCH, 0))
    assert abs(scratch.alpha - 0.40) < 0.02 and abs(scratch.beta - 0.30) < 0.02 and abs(scratch.E - 1.55) < 0.05
    # The CPT law as the paper fits it: E, A, alpha frozen at the scratch fit.
    cpt = sc.fit_cpt(N, D, noisy(sc.PAPER_CPT, 1), base=scratch)
    assert (cpt.E, cpt.A, cpt.alpha) == (scratch.E, scratch.A, scratch.alpha)
    assert abs(cpt.beta_prime - 0.20) < 0.02 and abs(cpt.gamma - 0.08) < 0.02
    # On data without transfer the CPT law's gamma comes out near zero, as the paper's -0.005.
    assert abs(sc.fit_cpt(N, D, noisy(sc.PAPER_SCRATCH, 2), base=scratch).gamma) < 0.02
    ci = sc.intervals(scratch, N, D, noisy(sc.PAPER_SCRATCH, 0), n=50)
    assert ci["alpha"][0] < scratch.alpha < ci["alpha"][1] and ci["beta"][0] < 0.30 < ci["beta"][1]


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        sc.fit_chinchilla([1e8, 1e9], [1e9, 1e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="positive"):
        sc.fit_chinchilla([1e8, 1e9, 0], [1e9] * 3, [3.0] * 3)


# --- Convergence, the fit error, frozen parameters, the compute search ----------------------------
# 3 sizes x 3 budgets like the mini sweep's points (losses 10.2 down to 5.6, a steep N term); on
# these a fixed 10 + 100 L-BFGS steps stopped 2e-5 above the optimum.
N9 = np.repeat([152736.0, 330048.0, 688800.0], 3)
D9 = N9 * np.tile([0.25, 0.5, 1.0], 3)
L9 = sc.predict(sc.ChinchillaFit(E=5.0, A=1e12, B=50.0, alpha=2.2, beta=0.35), N9, D9) * np.exp(
    np.random.default_rng(0).normal(0, 0.01, 9))


def _huber(r, delta=1e-3):
    return np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))


def _mean_huber(x, free, theta):
    t = np.array(theta, float)
    t[list(free)] = x
    a, alpha, b, beta, gamma, e = t
    pred = np.logaddexp(np.logaddexp(a - alpha * np.log(N9), b - beta * np.log(D9) - gamma * np.log(N9)), e)
    return _huber(pred - np.log(L9)).mean()


def test_fit_reaches_scipys_optimum_and_reports_its_error_as_a_mean():
    from scipy.optimize import minimize

    from cpt_jax.scaling import fit
    got = sc.fit_chinchilla(N9, D9, L9)
    theta = fit.theta(got)
    free = fit.CHINCHILLA_FREE
    ours = _mean_huber(theta[list(free)], free, theta)
    assert got.converged and got.huber == pytest.approx(ours, rel=1e-9)  # the mean, not the sum, of the Hubers
    # scipy's L-BFGS-B from our optimum, with tolerances near machine precision, finds nothing lower
    res = minimize(_mean_huber, theta[list(free)], args=(free, theta), method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-14, "maxiter": 20000})
    assert ours <= res.fun * (1 + 1e-6)
    np.testing.assert_allclose(res.x, theta[list(free)], rtol=1e-3, atol=1e-3)


def test_fits_that_stop_early_are_reported():
    from cpt_jax.scaling import fit
    starts = fit.grid(fit.CHINCHILLA_FREE, np.zeros(6))[:3]
    _, _, converged = fit.run_starts(N9, D9, L9, fit.CHINCHILLA_FREE, starts, max_steps=3)
    assert not converged.any()
    _, _, converged = fit.run_starts(N9, D9, L9, fit.CHINCHILLA_FREE, starts)
    assert converged.all()


def test_each_refit_keeps_its_own_frozen_parameters():
    """Nested bootstrap: the CPT law's a, alpha, e come from each resample's scratch refit."""
    from cpt_jax.scaling import fit
    base = fit.theta(sc.fit_chinchilla(N9, D9, L9))
    starts = np.stack([base + [da, 0.01 * da, 0, 0, 0, 0.01 * da] for da in (-0.2, 0.0, 0.2)])[:, None, :]
    thetas, _, converged = fit.refit(N9, D9, L9, fit.CPT_FREE, starts, np.ones((3, 9)))
    np.testing.assert_array_equal(thetas[:, [0, 1, 5]], starts[:, 0, [0, 1, 5]])
    assert converged.all() and len(np.unique(thetas[:, 2])) == 3  # each fitted B' to its own frozen terms


def test_compute_for_loss_searches_below_1e10_flops():
    C = np.array([1e6, 1e9, 1e12])
    loss = sc.optimal_loss(sc.PAPER_SCRATCH, C)
    np.testing.assert_allclose(sc.compute_for_loss(sc.PAPER_SCRATCH, loss), C, rtol=1e-6)
