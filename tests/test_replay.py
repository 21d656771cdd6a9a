"""The forgetting law with replay: its critical ratio, fits recovering known constants, bootstrap
intervals, and target loss compared at equal target tokens."""

import numpy as np
import pytest

from cpt_jax import scaling as sc
from cpt_jax.scaling import replay as rp

TRUE = rp.ReplayFit(K=0.8, kappa=0.3, r0=0.02, rho=1.2)
# Five replay ratios x four target-token budgets spanning 8x, as a replay sweep's final evals.
R = np.tile([0.0, 0.01, 0.05, 0.2, 0.5], 4)
D = np.repeat(1e6 * np.array([1.0, 2.0, 4.0, 8.0]), 5)


def test_law_and_critical_ratio_at_known_values():
    assert rp.predict_rise(TRUE, 0.0, rp.D_REF) == TRUE.K
    assert rp.predict_rise(TRUE, 0.0, 8 * rp.D_REF) == pytest.approx(0.8 * 8 ** 0.3)
    assert rp.predict_rise(TRUE, 0.02, rp.D_REF) == pytest.approx(0.8 / 2 ** 1.2)  # r = r0 halves the base
    # No replay needed when the rise without it is already within epsilon (boundary included).
    assert rp.critical_ratio(rp.ReplayFit(K=0.05, kappa=0.3, r0=0.02, rho=1.2), rp.D_REF, 0.1) == 0.0
    assert rp.critical_ratio(TRUE, rp.D_REF, 0.8) == 0.0
    # Replay that does not damp forgetting never gets there.
    for rho in (0.0, -0.5):
        assert rp.critical_ratio(rp.ReplayFit(K=0.8, kappa=0.3, r0=0.02, rho=rho), rp.D_REF, 0.1) == np.inf
    for d, eps in ((rp.D_REF, 0.1), (8e6, 0.1), (3e7, 0.02)):
        r_star = rp.critical_ratio(TRUE, d, eps)
        assert r_star > 0
        assert rp.predict_rise(TRUE, r_star, d) == pytest.approx(eps, abs=1e-9)
        assert rp.predict_rise(TRUE, 0.99 * r_star, d) > eps  # and it is the least such r


def test_noise_free_fit_is_exact():
    fit = rp.fit_replay(R, D, rp.predict_rise(TRUE, R, D))
    assert fit.rmse < 1e-6
    for name in ("K", "kappa", "r0", "rho"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=1e-3)


def test_noisy_fit_recovers_constants_and_bootstrap_covers_the_critical_ratio():
    # 5% multiplicative noise: the law is fitted in log space, where a power law's errors are relative
    rise = rp.predict_rise(TRUE, R, D) * np.exp(np.random.default_rng(0).normal(0, 0.05, R.shape))
    fit = rp.fit_replay(R, D, rise)
    assert fit.K == pytest.approx(0.8, rel=0.05) and abs(fit.kappa - 0.3) < 0.03
    assert fit.r0 == pytest.approx(0.02, rel=0.3) and abs(fit.rho - 1.2) < 0.15
    assert 0.025 < fit.rmse < 0.075  # about the noise's sd, in log rise
    b = rp.bootstrap(R, D, rise, epsilon=0.1, at_tokens=8e6, n=200)  # its time: bench/replay.py
    assert b["fit"] == fit and b["n_used"] == 200
    assert b["critical"] == rp.critical_ratio(fit, 8e6, 0.1)
    lo, hi = b["critical_interval"]
    assert np.isfinite(hi) and 0 < lo < rp.critical_ratio(TRUE, 8e6, 0.1) < hi < 3 * lo
    assert b["rho_interval"][0] < fit.rho < b["rho_interval"][1]
    assert b["kappa_interval"][0] < fit.kappa < b["kappa_interval"][1]


def test_points_without_forgetting_are_left_out_of_the_fit():
    rise = rp.predict_rise(TRUE, R, D)
    with_none = rp.fit_replay(np.append(R, [0.9, 0.9]), np.append(D, [1e6, 8e6]), np.append(rise, [0.0, -0.05]))
    assert with_none.rho == pytest.approx(TRUE.rho, rel=1e-3) and with_none.rmse < 1e-6


def test_bootstrap_skips_resamples_that_cannot_be_fitted():
    r, d = np.array([0.0, 0.0, 0.0, 0.05, 0.2]), 1e6 * np.array([1.0, 2.0, 4.0, 8.0, 8.0])
    b = rp.bootstrap(r, d, rp.predict_rise(TRUE, r, d), epsilon=0.1, at_tokens=8e6, n=50)
    assert 0 < b["n_used"] < 50  # draws of fewer than 3 ratios are skipped, not raised


def test_bad_points_raise():
    with pytest.raises(ValueError, match=r"3 distinct replay ratios.*r=0\.05"):
        rp.fit_replay(np.full(8, 0.05), D[:8], np.ones(8))
    with pytest.raises(ValueError, match=r"3 distinct replay ratios.*r=0, 0\.2$"):  # two: a ridge of exact fits
        rp.fit_replay(np.tile([0.0, 0.2], 4), D[:8], np.ones(8))
    with pytest.raises(ValueError, match="positive"):
        rp.fit_replay(R, np.where(np.arange(20) == 3, -1e6, D), np.ones(20))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rp.fit_replay(np.where(np.arange(20) == 0, 1.0, R), D, np.ones(20))
    with pytest.raises(ValueError, match="at least 4"):
        rp.fit_replay(R[:3], D[:3], np.ones(3))
    with pytest.raises(ValueError, match="equal length"):
        rp.fit_replay(R, D, np.ones(19))


CURVES = {0.0: ([1e6, 4e6, 16e6], [3.0, 2.6, 2.3]), 0.25: ([2e6, 8e6, 32e6], [3.1, 2.8, 2.5])}


def test_equal_compute_interpolates_in_log_tokens():
    out = rp.equal_compute(CURVES, [1e6, 2e6, 4e6, 8e6, 16e6, 32e6])
    # Exact at each curve's own points, halfway in log tokens between them, nan outside.
    np.testing.assert_array_equal(out["loss"][0.0][[0, 2, 4]], [3.0, 2.6, 2.3])
    np.testing.assert_array_equal(out["loss"][0.25][[1, 3, 5]], [3.1, 2.8, 2.5])
    np.testing.assert_allclose(out["loss"][0.0][[1, 3]], [2.8, 2.45], rtol=1e-12)
    np.testing.assert_allclose(out["loss"][0.25][[2, 4]], [2.95, 2.65], rtol=1e-12)
    assert np.isnan(out["loss"][0.0][5]) and np.isnan(out["loss"][0.25][0])
    # A spread needs two ratios with a value.
    np.testing.assert_allclose(out["spread"], [np.nan, 0.3, 0.35, 0.35, 0.35, np.nan], rtol=1e-12)
    np.testing.assert_allclose(out["relative_spread"][1:5], [0.3 / 2.95, 0.35 / 2.775, 0.35 / 2.625, 0.35 / 2.475],
                               rtol=1e-12)


def test_common_tokens_lie_in_the_overlap():
    at = rp.common_tokens(CURVES, k=3)
    np.testing.assert_allclose(at, [2e6, np.sqrt(2e6 * 16e6), 16e6], rtol=1e-12)
    assert np.isfinite(rp.equal_compute(CURVES, at)["spread"]).all()
    assert rp.common_tokens({0.0: ([1e6, 2e6], [3.0, 2.9]), 0.5: ([4e6, 8e6], [3.0, 2.9])}).size == 0


def test_exports():
    assert (sc.ReplayFit, sc.fit_replay, sc.predict_rise, sc.critical_ratio) == (
        rp.ReplayFit, rp.fit_replay, rp.predict_rise, rp.critical_ratio)
