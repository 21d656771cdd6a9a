"""The paper's four findings, each judged from a sweep's own numbers: a verdict computed by a
stated rule, never written by hand. Each function takes plain numbers and laws (so a test can
hand it data where the finding is false) and returns a `Verdict` with the numbers it was judged
on. A verdict holds, does not hold, or is undetermined: an interval straddles the rule's
threshold, or more than MAX_FAILED of the bootstrap's resamples failed (no converged refit, or
no compute-optimal allocation), so the intervals cannot be trusted.

  1. transfer       CPT reaches scratch's final target loss with fewer tokens, at every size
  2. cpt_law        gamma > 0 on CPT runs (its 95% interval above 0), gamma ~ 0 on scratch runs (its
                    interval contains 0), and the CPT law predicts left-out CPT runs better than
                    Chinchilla (the interval over runs of the ratio of their errors below 1)
  3. allocation     CPT's compute-optimal N is larger than scratch's: the interval of
                    N_opt,cpt / N_opt,scratch lies above 1 over the sweep's compute range
  4. replay         replay bounds forgetting (the most replay rises less than none, rho's interval
                    > 0), and at equal target tokens every ratio reaches the same target loss
                    (relative spread within a tolerance)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cpt_jax import summary
from cpt_jax.scaling import laws

HOLDS, FAILS, UNDETERMINED = "holds", "does not hold", "undetermined"
MAX_FAILED = 0.1  # past this share of failed resamples a bootstrap verdict is undetermined
# C = 6 N D of the paper's runs: 49M to 5.5B parameters at 20 tokens per parameter.
PAPER_COMPUTE = (6 * 20 * 49e6 ** 2, 6 * 20 * 5534e6 ** 2)

CLAIMS = {
    "transfer": "CPT reaches a target-language loss with fewer tokens than training from scratch, at every size",
    "cpt_law": "the CPT law fits CPT runs better than Chinchilla, with gamma > 0; on scratch runs gamma is ~0",
    "allocation": "CPT's compute-optimal allocation favours larger models (N_opt,cpt > N_opt,scratch)",
    "replay": "replay bounds forgetting, and at equal target-language compute every replay ratio reaches about "
              "the same target loss",
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    name: str
    status: str  # HOLDS, FAILS or UNDETERMINED
    evidence: tuple[str, ...]  # the numbers and the rule, one line each
    numbers: dict = dataclasses.field(default_factory=dict)

    @property
    def claim(self) -> str:
        return CLAIMS[self.name]

    @property
    def holds(self) -> bool:
        return self.status == HOLDS


def combine(*statuses: str) -> str:
    """All parts hold: holds; any part does not: does not hold; else undetermined."""
    return FAILS if FAILS in statuses else UNDETERMINED if UNDETERMINED in statuses else HOLDS


def _interval(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def percentile_interval(samples, level: float = 0.95) -> tuple[tuple[float, float], int]:
    """(interval, failed) of bootstrap samples [n, ...] along the first axis: nan rows are
    failed resamples, left out of the interval and counted."""
    samples = np.asarray(samples, float)
    ok = np.isfinite(samples).all(axis=tuple(range(1, samples.ndim)))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = np.percentile(samples[ok], q, axis=0) if ok.any() else np.full((2, *samples.shape[1:]), np.nan)
    return (ci[0], ci[1]) if samples.ndim > 1 else (float(ci[0]), float(ci[1])), int((~ok).sum())


def _failed_line(failed: int, n: int) -> str:
    return (f"{failed} of {n} resamples failed (no converged refit or no optimum); past {MAX_FAILED:.0%} "
            f"the verdict is undetermined")


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float) -> tuple[float, str]:
    """Tokens at which (tokens, loss) points first reach `target`, linear in log tokens between
    points (cpt_jax.summary.tokens_to_reach): (tokens, how) with how "at" (interpolated), "below"
    (already at the first point: an upper bound) or "never" (inf: not within the points)."""
    order = np.argsort(tokens)
    d, v = np.asarray(tokens, float)[order], np.asarray(loss, float)[order]
    reached = summary.tokens_to_reach(d, v, target, log=True)
    if reached is None:
        return float("inf"), "never"
    return reached, "below" if v[0] <= target else "at"


def transfer(scratch: dict[int, tuple], cpt: dict[int, tuple]) -> Verdict:
    """`scratch`, `cpt`: N -> (tokens, target loss) of each size's points. Per size, the target
    is scratch's loss at its most tokens; it holds at a size if CPT reaches it with fewer."""
    rows, lines, holds = {}, [], True
    for n in sorted(scratch):
        d_s, l_s = (np.asarray(x, float) for x in scratch[n])
        best = int(np.argmax(d_s))
        target, d_scratch = float(l_s[best]), float(d_s[best])
        if n not in cpt:
            holds = False
            lines.append(f"N={n:,}: no CPT points")
            continue
        d_cpt, how = tokens_to_reach(*cpt[n], target)
        ok = d_cpt < d_scratch
        holds &= ok
        rows[n] = {"target_loss": target, "tokens_scratch": d_scratch, "tokens_cpt": d_cpt, "how": how}
        reach = {"at": f"{d_cpt:,.0f} tokens", "below": f"<= {d_cpt:,.0f} tokens (its first point)",
                 "never": "not within its points"}[how]
        saved = f" ({1 - d_cpt / d_scratch:.0%} fewer)" if np.isfinite(d_cpt) else ""
        lines.append(f"N={n:,}: scratch reaches {target:.4f} at {d_scratch:,.0f} tokens; CPT {reach}{saved}")
    lines.append("Rule: holds if at every size CPT reaches scratch's final loss with fewer tokens.")
    return Verdict("transfer", HOLDS if holds and rows else FAILS, tuple(lines), rows)


def error_ratio(errors, reference, level: float = 0.95, n: int = 2000) -> tuple[float, tuple[float, float]]:
    """sum(errors) / sum(reference) over paired runs, and its percentile interval over n
    resamples of the runs (a fixed seed: the same numbers give the same verdict)."""
    errors, reference = np.asarray(errors, float), np.asarray(reference, float)
    idx = np.random.default_rng(0).integers(0, len(errors), (n, len(errors)))
    with np.errstate(invalid="ignore", divide="ignore"):
        ci, _ = percentile_interval(errors[idx].sum(1) / reference[idx].sum(1), level)
        return float(errors.sum() / reference.sum()), ci


def cpt_law(gamma_cpt: float, gamma_cpt_samples, gamma_scratch: float, gamma_scratch_samples,
            held_out_chinchilla, held_out_cpt_law, held_out_failed: int = 0, level: float = 0.95) -> Verdict:
    """gamma of the CPT law fitted to CPT points and to scratch points, with their bootstrap
    samples (nan: a failed resample), and both laws' errors on each left-out CPT run (and how
    many of those refits did not converge)."""
    ci_cpt, failed = percentile_interval(gamma_cpt_samples, level)
    ci_scratch, _ = percentile_interval(gamma_scratch_samples, level)
    n = len(gamma_cpt_samples)
    trusted = n > 0 and failed <= MAX_FAILED * n
    positive = (HOLDS if ci_cpt[0] > 0 else FAILS if ci_cpt[1] < 0 else UNDETERMINED) if trusted else UNDETERMINED
    near_zero = (HOLDS if ci_scratch[0] <= 0 <= ci_scratch[1] else FAILS) if trusted else UNDETERMINED
    ratio, ci_ratio = error_ratio(held_out_cpt_law, held_out_chinchilla, level)
    better = (UNDETERMINED if held_out_failed else HOLDS if ci_ratio[1] < 1 else FAILS if ci_ratio[0] > 1
              else UNDETERMINED)
    lines = (f"gamma on CPT runs {gamma_cpt:+.3f}, 95% interval {_interval(ci_cpt)} (above 0: {positive})",
             f"gamma on scratch runs {gamma_scratch:+.3f}, 95% interval {_interval(ci_scratch)} "
             f"(contains 0: {near_zero})",
             f"error on left-out CPT runs, CPT law / Chinchilla: {ratio:.3g}, 95% interval {_interval(ci_ratio)} over "
             f"{len(np.ravel(held_out_cpt_law))} runs (below 1: {better}"
             + (f"; {held_out_failed} left-out refits did not converge" if held_out_failed else "") + ")",
             _failed_line(failed, n),
             "Rule: holds if all three hold; does not hold if any does not; else undetermined.")
    return Verdict("cpt_law", combine(positive, near_zero, better), lines,
                   {"gamma_cpt": gamma_cpt, "gamma_cpt_interval": ci_cpt, "gamma_scratch": gamma_scratch,
                    "gamma_scratch_interval": ci_scratch, "held_out_ratio": ratio, "held_out_ratio_interval": ci_ratio,
                    "held_out_failed": held_out_failed, "failed_resamples": failed, "resamples": n})


def _allocation_numbers(scratch: laws.Fit, cpt: laws.Fit, C: np.ndarray) -> np.ndarray:
    """[N_opt,cpt / N_opt,scratch at each C..., a_scratch, a_cpt]; all nan where either law has
    no compute-optimal allocation."""
    try:
        (_, a_s, _), (_, a_c, _) = laws.allocation(scratch), laws.allocation(cpt)
    except ValueError:
        return np.full(len(C) + 2, np.nan)
    return np.append(laws.compute_optimal(cpt, C)[0] / laws.compute_optimal(scratch, C)[0], [a_s, a_c])


def crossing(scratch: laws.Fit, cpt: laws.Fit) -> float:
    """The C where N_opt,cpt = N_opt,scratch, i.e. G_c (C/6)^a_c = G_s (C/6)^a_s; nan if never."""
    (g_s, a_s, _), (g_c, a_c, _) = laws.allocation(scratch), laws.allocation(cpt)
    with np.errstate(divide="ignore", over="ignore"):
        return float(6 * (g_s / g_c) ** (1 / (a_c - a_s))) if a_c != a_s else float("nan")


def allocation(scratch: laws.Fit, cpt: laws.Fit, resamples: Sequence[tuple[laws.Fit, laws.Fit] | None],
               compute: tuple[float, float], level: float = 0.95, points: int = 9) -> Verdict:
    """Judged on N_opt,cpt / N_opt,scratch at `points` log-spaced C over `compute` (the sweep's
    span), with intervals over the bootstrap's (scratch, cpt) laws (None: a failed resample);
    the paper's span is reported beside it, not judged (a sweep's laws extrapolated that far)."""
    C = np.geomspace(*compute, points)
    shown = {"sweep's least": compute[0], "sweep's middle": float(np.sqrt(compute[0] * compute[1])),
             "sweep's most": compute[1], "paper's least": PAPER_COMPUTE[0], "paper's most": PAPER_COMPUTE[1]}
    at = np.concatenate([C, list(shown.values())])
    rule = (f"Rule: holds if the interval of N_opt,cpt / N_opt,scratch lies above 1 at {points} compute values "
            "over the sweep's range; does not hold if it lies below 1 at any; else undetermined.")
    full = _allocation_numbers(scratch, cpt, at)
    if not np.isfinite(full).all():
        return Verdict("allocation", UNDETERMINED, ("the full fits have no compute-optimal allocation", rule))
    boot = np.array([_allocation_numbers(*r, at) if r else np.full(len(at) + 2, np.nan) for r in resamples])
    (lo, hi), failed = percentile_interval(boot.reshape(len(resamples), len(at) + 2), level)
    n = len(resamples)
    status = (UNDETERMINED if not n or failed > MAX_FAILED * n else HOLDS if (lo[:points] > 1).all()
              else FAILS if (hi[:points] < 1).any() else UNDETERMINED)
    cross = crossing(scratch, cpt)
    where = ("never crosses 1" if not np.isfinite(cross) else f"crosses 1 at C = {cross:.3g} "
             f"({'inside' if compute[0] <= cross <= compute[1] else 'outside'} the sweep's range)")
    a = [f"{name} {full[i]:.3f} {_interval((lo[i], hi[i]))}" for i, name in ((-2, "a_scratch"), (-1, "a_cpt"))]
    lines = (f"N_opt = G (C/6)^a: {', '.join(a)}; the ratio {where}",
             *(f"N_opt,cpt / N_opt,scratch at C = {c:.3g} ({what}): {full[points + i]:.3g}, 95% interval "
               f"{_interval((lo[points + i], hi[points + i]))}" for i, (what, c) in enumerate(shown.items())),
             _failed_line(failed, n), rule)
    return Verdict("allocation", status, lines,
                   {"compute": C.tolist(), "ratio": full[:points].tolist(),
                    "ratio_interval": [lo[:points].tolist(), hi[:points].tolist()],
                    "a_scratch": float(full[-2]), "a_cpt": float(full[-1]), "a_scratch_interval": (lo[-2], hi[-2]),
                    "a_cpt_interval": (lo[-1], hi[-1]), "crossing": cross, "failed_resamples": failed,
                    "resamples": n})


def replay(rise: dict[float, float], rho: float, rho_ci, relative_spread, tolerance: float,
           failed: int = 0, resamples: int = 0) -> Verdict:
    """`rise`: replay ratio -> the source-loss rise at the end of the largest budget; `rho`: the
    replay law's exponent and interval (over `resamples`, of which `failed` could not be refitted);
    `relative_spread`: of target loss across ratios at each common target-token count
    (cpt_jax.scaling.replay.equal_compute)."""
    ratios = sorted(rise)
    least, most = ratios[0], ratios[-1]
    less = rise[most] < rise[least]
    damped = (UNDETERMINED if failed > MAX_FAILED * resamples else HOLDS if rho_ci[0] > 0
              else FAILS if rho_ci[1] <= 0 else UNDETERMINED)
    bounded = combine(HOLDS if less else FAILS, damped)
    spread = np.asarray(relative_spread, float)
    same = HOLDS if spread.size and np.all(spread <= tolerance) else FAILS
    lines = ("source-loss rise at the largest budget: "
             + ", ".join(f"r={r:g}: {rise[r]:+.3f}" for r in ratios),
             f"replay law rho {rho:.3g}, 95% interval {_interval(rho_ci)}; the most replay (r={most:g}) rises "
             f"{'less' if less else 'no less'} than r={least:g} (bounded: {bounded})",
             "relative spread of target loss across ratios at equal target tokens: "
             + (", ".join(f"{s:.1%}" for s in spread) if spread.size else "no common token counts")
             + f" (within {tolerance:.0%}: {same})",
             *([_failed_line(failed, resamples)] if resamples else []),
             "Rule: holds if forgetting is bounded (rho's interval above 0) and the spread is within the "
             "tolerance everywhere.")
    return Verdict("replay", combine(bounded, same), lines,
                   {"rise": {str(r): v for r, v in rise.items()}, "rho": rho, "rho_interval": tuple(rho_ci),
                    "relative_spread": spread.tolist(), "tolerance": tolerance, "failed_resamples": failed})
