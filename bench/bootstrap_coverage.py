"""How often the report's 95% intervals (cpt_jax.scaling.analysis: runs resampled within each
size, the scratch law refitted in each resample, the seed noise drawn) contain the truth, on
synthetic sweeps with a finished sweep's design; JSON on stdout.

    python bench/bootstrap_coverage.py --sweep_dir /tmp/laptop [--datasets 60] [--resamples 100]
    python bench/bootstrap_coverage.py --sweep_dir /tmp/laptop --config configs/sweeps/X.py --nowild

With --config, the synthetic sweeps have that sweep config's design instead (its plan, nothing
trained: a point per cooldown branch or whole run), the truth and noise still the finished
sweep's: how often a planned sweep would decide gamma if the laws are what DIR measured.

Truth: the sweep's own full fits (Chinchilla to its scratch points, the CPT law to its CPT
points). Each synthetic sweep has the same (N, D) points and runs, with log L = the law + a
per-size effect + per-point noise, their variances estimated from the sweep's residuals (law
misfit counts as noise here). For comparison, a wild cluster bootstrap (Webb's six-point weights
per size on the full fit's residuals, the design kept fixed) on the same data: its intervals are
narrower, and the coverage says whether they are right. Also: how often gamma's interval lies
below or above 0, the chance that such a sweep decides finding 2's gamma rule.
"""

import dataclasses
import json
import sys
import time

import numpy as np
from absl import flags

from cpt_jax import cli, sweep
from cpt_jax.errors import ConfigError
from cpt_jax.scaling import analysis, laws, report
from cpt_jax.scaling import fit as fitting

CLI = cli.Command(__doc__, label="bench error", config="A sweep config whose design the synthetic sweeps take "
                  "(default: the finished sweep's own).")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "A finished sweep (its sweep.json and runs).",
                                 flag_values=CLI.flags)
_DATASETS = flags.DEFINE_integer("datasets", 60, "Synthetic sweeps.", flag_values=CLI.flags)
_RESAMPLES = flags.DEFINE_integer("resamples", 100, "Bootstrap resamples per synthetic sweep.", flag_values=CLI.flags)
_WILD = flags.DEFINE_boolean("wild", True, "Also the wild cluster bootstrap, for comparison.", flag_values=CLI.flags)

WEBB = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])


def fitted_log_loss(theta: np.ndarray, p: analysis.Points) -> np.ndarray:
    """log L of a parameter vector at the points (a Chinchilla vector has gamma 0: the same law)."""
    return np.log(laws.predict(fitting.as_fit(theta, cpt=True), p.N, p.D))


def noise_components(p: analysis.Points, theta: np.ndarray) -> tuple[float, float]:
    """(tau, sigma): the sd of a per-size effect and of per-point noise in log L, from the
    residuals' size means and their spread within sizes (one-way random effects, moments)."""
    r = np.log(p.L) - fitted_log_loss(theta, p)
    sizes = np.unique(p.N)
    within = np.concatenate([r[p.N == n] - r[p.N == n].mean() for n in sizes])
    sigma2 = float(np.sum(within ** 2) / (len(r) - len(sizes)))
    means = np.array([r[p.N == n].mean() for n in sizes])
    tau2 = max(0.0, float(means.var(ddof=1)) - sigma2 / float(np.mean([np.sum(p.N == n) for n in sizes])))
    return float(np.sqrt(tau2)), float(np.sqrt(sigma2))


def design(config) -> tuple[analysis.Points, analysis.Points]:
    """The (N, D) points of a sweep config's scratch and fitted CPT runs into its first target
    (loss nan; a point per cooldown branch or whole run), from its plan alone."""
    runs = [{f.name: getattr(r, f.name) for f in dataclasses.fields(r)} for r in sweep.expand(config, "SWEEP_DIR")]
    target = sweep.targets(config)[0]

    def of(kind: str, ratio: float | None) -> analysis.Points:
        rows = [(r["params"], r["tokens"], np.nan, i) for i, r in enumerate(runs)
                if report.fitted(r, kind, target, ratio)]
        return analysis.Points.of(np.array(rows, dtype=float).reshape(-1, 4))
    return of("scratch", None), of("cpt", sweep.fit_ratio(config))


def synthetic(p: analysis.Points, theta: np.ndarray, tau: float, sigma: float, rng) -> analysis.Points:
    _, size = np.unique(p.N, return_inverse=True)
    noise = tau * rng.standard_normal(size.max() + 1)[size] + sigma * rng.standard_normal(len(p.N))
    return analysis.Points(p.N, p.D, np.exp(fitted_log_loss(theta, p) + noise), p.run)


def wild_cluster(scratch: analysis.Points, cpt: analysis.Points, n: int, sigmas: dict, rng) -> dict[str, np.ndarray]:
    """[n, 6] parameter vectors of the wild cluster bootstrap, nested as analysis.Fits nests."""
    def losses(p, theta, sigma):
        fitted = fitted_log_loss(theta, p)
        _, size = np.unique(p.N, return_inverse=True)
        _, run = np.unique(p.run, return_inverse=True)
        v = rng.choice(WEBB, size=(n, size.max() + 1))[:, size]
        z = sigma * rng.standard_normal((n, run.max() + 1))[:, run]
        return np.exp(fitted + v * (np.log(p.L) - fitted) + z)

    s = fitting.fit_params(*scratch.ndl, fitting.CHINCHILLA_FREE)
    c = fitting.fit_params(*cpt.ndl, fitting.CPT_FREE, s.theta)
    o = fitting.fit_params(*scratch.ndl, fitting.CPT_FREE, s.theta)
    ls, lc = losses(scratch, s.theta, sigmas.get("scratch", 0.0)), losses(cpt, c.theta, sigmas.get("cpt", 0.0))
    ones = lambda p: np.ones((n, len(p.L)))  # noqa: E731
    th_s, _, ok_s = fitting.refit(scratch.N, scratch.D, ls, fitting.CHINCHILLA_FREE, fitting.refit_starts(s),
                                  ones(scratch))

    def nested(result, p, L):
        starts = np.stack([fitting.refit_starts(result, t, fitting.CPT_FREE) for t in th_s])
        return fitting.refit(p.N, p.D, L, fitting.CPT_FREE, starts, ones(p))

    (th_c, _, ok_c), (th_o, _, ok_o) = nested(c, cpt, lc), nested(o, scratch, ls)
    failed = ~(ok_s & ok_c & ok_o)
    return {k: np.where(failed[:, None], np.nan, v) for k, v in
            (("scratch", th_s), ("cpt", th_c), ("cpt_on_scratch", th_o))}


def allocation_exponent(theta: np.ndarray) -> float:
    """a of N_opt ~ C^a under a Chinchilla parameter vector (nan where there is no optimum)."""
    try:
        return laws.allocation(fitting.as_fit(theta, cpt=False))[1]
    except ValueError:
        return float("nan")


def quantities(boot: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gamma on CPT points, gamma on scratch points, scratch's allocation exponent a."""
    return {"gamma": boot["cpt"][:, 4], "gamma_on_scratch": boot["cpt_on_scratch"][:, 4],
            "a_scratch": np.array([allocation_exponent(t) for t in boot["scratch"]])}


def bench() -> None:
    if not _SWEEP_DIR.value:
        raise ConfigError("--sweep_dir: give a finished sweep's directory")
    plan, curves = report.collect(_SWEEP_DIR.value)
    scratch = analysis.Points.of(report.points(plan, curves, "scratch", plan["target"]))
    cpt = analysis.Points.of(report.points(plan, curves, "cpt", plan["target"], plan["fit_replay_ratio"]))
    sigmas = {k: v["sigma"] for k, v in report.seed_noise(plan, curves).items()}
    s = fitting.fit_params(*scratch.ndl, fitting.CHINCHILLA_FREE)
    c = fitting.fit_params(*cpt.ndl, fitting.CPT_FREE, s.theta)
    truth = {"gamma": float(c.theta[4]), "gamma_on_scratch": 0.0, "a_scratch": allocation_exponent(s.theta)}
    noise = {"scratch": noise_components(scratch, s.theta), "cpt": noise_components(cpt, c.theta)}
    if CLI.config.value is not None:
        try:
            scratch, cpt = design(CLI.config.value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    n, t0 = _RESAMPLES.value, time.perf_counter()
    methods = ("runs", "wild_cluster") if _WILD.value else ("runs",)
    hits = {m: {k: [] for k in truth} for m in methods}
    widths = {m: {k: [] for k in truth} for m in hits}
    decided = {m: {"below_0": 0, "above_0": 0} for m in hits}
    for i in range(_DATASETS.value):
        rng = np.random.default_rng(i)
        sp, cp = synthetic(scratch, s.theta, *noise["scratch"], rng), synthetic(cpt, c.theta, *noise["cpt"], rng)
        boots = {"runs": analysis.Fits.of(sp, cp, n, seed=i, noise=sigmas).boot}
        if _WILD.value:
            boots["wild_cluster"] = wild_cluster(sp, cp, n, sigmas, rng)
        for method, boot in boots.items():
            for k, samples in quantities(boot).items():
                lo, hi = np.nanpercentile(samples, [2.5, 97.5])
                hits[method][k].append(lo <= truth[k] <= hi)
                widths[method][k].append(hi - lo)
                if k == "gamma":
                    decided[method]["below_0"] += int(hi < 0)
                    decided[method]["above_0"] += int(lo > 0)
    print(json.dumps({
        "sweep_dir": _SWEEP_DIR.value,
        "design": {"sizes": len(np.unique(cpt.N)), "N": [float(cpt.N.min()), float(cpt.N.max())],
                   "points": {"scratch": len(scratch.N), "cpt": len(cpt.N)}},
        "datasets": _DATASETS.value, "resamples": n, "truth": truth,
        "noise_tau_sigma_of_log_L": noise, "seed_noise": sigmas, "seconds": round(time.perf_counter() - t0, 1),
        **{method: {"coverage": {k: round(float(np.mean(v)), 3) for k, v in hits[method].items()},
                    "median_width": {k: round(float(np.median(v)), 4) for k, v in widths[method].items()},
                    "gamma_interval": {k: v / _DATASETS.value for k, v in decided[method].items()}}
           for method in hits}}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`python bench/bootstrap_coverage.py ARGS` in this process: the exit code."""
    return CLI.run(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
