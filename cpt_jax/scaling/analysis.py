"""Both laws fitted to a sweep's scratch and CPT points, with the uncertainty the findings are
judged on (cpt_jax.scaling.findings):

- a nested bootstrap over runs: each resample draws runs with replacement within each size (a
  run's evals are correlated, so they go together; every size stays in), refits Chinchilla to
  its scratch runs, and refits the CPT law to its CPT runs and to its scratch runs with E, A,
  alpha frozen at that resample's own scratch refit, so the CPT law's intervals carry the
  scratch fit's uncertainty too. A resample whose refits did not converge is a failed one: its
  row is nan and the judges count it.
- seed noise: where a sweep repeats runs with other seeds (its seed study), each resample also
  moves every run's losses by a draw of that noise (log L + sigma z, one z per run, sigma the
  spread of log L across seeds), so the intervals carry what a rerun with another seed changes.
- leave-one-run-out errors: each CPT run's points predicted by the CPT law and by Chinchilla
  fitted without that run (mean Huber of log L), to compare laws with different free parameters
  out of sample (findings.cpt_law puts an interval on the comparison over runs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cpt_jax.scaling import fit as fitting
from cpt_jax.scaling import laws


@dataclasses.dataclass(frozen=True)
class Points:
    """(N, D, L) points and the run each comes from."""
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    run: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray) -> Points:
        """From rows (N, D, L, run)."""
        rows = np.asarray(rows, float).reshape(-1, 4)
        return cls(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3].astype(int))

    @property
    def ndl(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.N, self.D, self.L


def resample_runs(points: Points, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, points] bootstrap weights: per size, its runs drawn with replacement; a point weighs
    as many times as its run was drawn."""
    weights = np.zeros((n, len(points.L)))
    for size in np.unique(points.N):
        runs = np.unique(points.run[points.N == size])
        counts = rng.multinomial(len(runs), np.full(len(runs), 1 / len(runs)), size=n)  # [n, runs]
        for j, r in enumerate(runs):
            weights[:, points.run == r] = counts[:, j:j + 1]
    return weights


def seed_noise(points: Points, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, points] losses: each run's moved by exp(sigma z), one z per (resample, run)."""
    runs, index = np.unique(points.run, return_inverse=True)
    z = rng.standard_normal((n, len(runs)))
    return points.L[None, :] * np.exp(sigma * z[:, index])


def leave_one_run_out(points: Points, free: tuple[int, ...], starts: np.ndarray) -> tuple[np.ndarray, int]:
    """[runs] each run's mean Huber of log L under the law refitted without it (from `starts`),
    and how many of those refits did not converge."""
    runs = np.unique(points.run)
    weights = (points.run[None, :] != runs[:, None]).astype(float)
    thetas, _, converged = fitting.refit(*points.ndl, free, starts, weights)
    errors = [fitting.huber(t, *points.ndl)[points.run == r].mean() for t, r in zip(thetas, runs)]
    return np.array(errors), int((~converged).sum())


@dataclasses.dataclass
class Fits:
    """Both laws fitted to both point sets, the nested bootstrap's parameter vectors [n, 6] of
    each (nan rows: failed resamples) and the leave-one-run-out errors on the CPT points."""
    scratch: laws.ChinchillaFit
    cpt: laws.CPTFit
    cpt_on_scratch: laws.CPTFit  # the CPT law fitted to the scratch points: its gamma should be ~0
    chinchilla_on_cpt: laws.ChinchillaFit
    boot: dict[str, np.ndarray]  # "scratch", "cpt", "cpt_on_scratch" -> [n, 6]
    held_out: dict[str, np.ndarray]  # "cpt_law", "chinchilla" -> [runs] mean Huber of each left-out CPT run
    held_out_failed: int  # left-out refits that did not converge
    compute: tuple[float, float]  # the points' span of C = 6 N D

    @classmethod
    def of(cls, scratch_pts: Points, cpt_pts: Points, n: int, seed: int = 0,
           noise: dict[str, float] | None = None) -> Fits:
        """`noise`: "scratch", "cpt" -> sigma of log L across seeds (none: resample runs only)."""
        s = fitting.fit_params(*scratch_pts.ndl, fitting.CHINCHILLA_FREE)
        c = fitting.fit_params(*cpt_pts.ndl, fitting.CPT_FREE, s.theta)
        o = fitting.fit_params(*scratch_pts.ndl, fitting.CPT_FREE, s.theta)
        h = fitting.fit_params(*cpt_pts.ndl, fitting.CHINCHILLA_FREE)

        rng = np.random.default_rng(seed)
        ws, wc = resample_runs(scratch_pts, n, rng), resample_runs(cpt_pts, n, rng)
        noise = noise or {}
        ls, lc = (seed_noise(p, noise.get(k, 0.0), n, rng) for k, p in (("scratch", scratch_pts), ("cpt", cpt_pts)))
        th_s, _, ok_s = fitting.refit(scratch_pts.N, scratch_pts.D, ls, fitting.CHINCHILLA_FREE,
                                      fitting.refit_starts(s), ws)

        def nested(result: fitting.Result, pts: Points, losses: np.ndarray, weights: np.ndarray):
            starts = np.stack([fitting.refit_starts(result, t, fitting.CPT_FREE) for t in th_s])
            return fitting.refit(pts.N, pts.D, losses, fitting.CPT_FREE, starts, weights)

        th_c, _, ok_c = nested(c, cpt_pts, lc, wc)
        th_o, _, ok_o = nested(o, scratch_pts, ls, ws)
        failed = ~(ok_s & ok_c & ok_o)
        boot = {k: np.where(failed[:, None], np.nan, v) for k, v in
                (("scratch", th_s), ("cpt", th_c), ("cpt_on_scratch", th_o))}

        err_c, fail_c = leave_one_run_out(cpt_pts, fitting.CPT_FREE, fitting.refit_starts(c))
        err_h, fail_h = leave_one_run_out(cpt_pts, fitting.CHINCHILLA_FREE, fitting.refit_starts(h))
        C = 6 * np.concatenate([scratch_pts.N * scratch_pts.D, cpt_pts.N * cpt_pts.D])
        return cls(fitting.as_fit(s.theta, False, s.value, s.converged), fitting.as_fit(c.theta, True, c.value,
                   c.converged), fitting.as_fit(o.theta, True, o.value, o.converged),
                   fitting.as_fit(h.theta, False, h.value, h.converged), boot,
                   {"cpt_law": err_c, "chinchilla": err_h}, fail_c + fail_h, (float(C.min()), float(C.max())))

    def interval(self, name: str) -> dict:
        fit = {"scratch": self.scratch, "cpt": self.cpt, "cpt_on_scratch": self.cpt_on_scratch}[name]
        return fitting.summarise(fit, self.boot[name])

    def resamples(self, name: str) -> list[laws.Fit | None]:
        """The bootstrap's laws of `name`, None for a failed resample."""
        cpt = name != "scratch"
        return [fitting.as_fit(t, cpt) if np.isfinite(t).all() else None for t in self.boot[name]]

    def unconverged(self) -> list[str]:
        """The full fits that stopped before converging."""
        return [k for k in ("scratch", "cpt", "cpt_on_scratch", "chinchilla_on_cpt") if not getattr(self, k).converged]
