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
  5. stability_gap  (from the CPT literature, not the paper) the target loss first rises at the
                    start of CPT before it falls, at every size

Where a sweep repeats runs with other seeds, the seed noise it measures (sigma of log L across
seeds) enters the intervals: savings are recomputed with every point's loss moved by a draw of it.
An undetermined verdict says which runs would decide it.
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
    "stability_gap": "at the start of CPT the target-language loss first rises before it falls (the stability gap)",
    "language_order": "transfer from English depends on the target language: French > Russian > Chinese",
}
PAPER = {
    "transfer": "25-50% fewer FLOPs at equal loss, shrinking with training, growing with size",
    "cpt_law": "gamma = 0.08 on CPT runs (~0 on scratch runs); the CPT law fits CPT runs better",
    "allocation": "a = 0.429 from scratch, 0.385 for CPT: CPT's N_opt is larger over the paper's range",
    "replay": "forgetting falls with replay; about the same target loss at equal target compute for any ratio",
    "stability_gap": "not in the paper (reported by the CPT literature, e.g. Guo et al. 2024)",
    "language_order": "French gains most from English, then Russian, then Chinese (on mC4 subsets)",
}
DECIDE = {  # the runs that would narrow an undetermined verdict's interval
    "transfer": "seeds at the sizes whose interval straddles 0 (seed_study), or CPT budgets past scratch's largest",
    "cpt_law": ("more sizes over a wider range of N (gamma is a slope in N); seeds narrow its interval only where "
                "the seed noise, not the law's misfit, sets it (bench/bootstrap_coverage.py --sweep_dir DIR --config "
                "PLANNED: how often a planned sweep would decide it)"),
    "allocation": "more sizes over a wider range of N (the allocation exponents are slopes in N)",
    "replay": "more budgets at the replay study's size, or seeds of its runs",
    "stability_gap": "denser evals over the first steps of CPT (dense_evals), or seeds at the undetermined sizes",
    "language_order": "seeds at the largest size (seed_study), or a larger size where transfer is larger",
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    name: str
    status: str  # HOLDS, FAILS or UNDETERMINED
    evidence: tuple[str, ...]  # the numbers and the rule, one line each
    numbers: dict = dataclasses.field(default_factory=dict)
    ours: str = ""  # the sweep's figure with its interval, in a few words (the findings table)

    @property
    def claim(self) -> str:
        return CLAIMS[self.name]

    @property
    def paper(self) -> str:
        return PAPER[self.name]

    @property
    def decide(self) -> str:
        """Which runs would decide an undetermined verdict ("" otherwise)."""
        return DECIDE[self.name] if self.status == UNDETERMINED else ""

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


def savings(scratch: dict[int, tuple], cpt: dict[int, tuple]) -> dict[int, list[dict]]:
    """Per size N, per scratch point (budget): the tokens CPT needs to reach that point's loss and
    the share of scratch's tokens it saves (the same share of FLOPs: the same N). A loss CPT does
    not reach within its points saves at most 1 - (CPT's most tokens) / (scratch's): that bound."""
    out = {}
    for n in sorted(scratch):
        if n not in cpt:
            continue
        d_cpt_all = np.asarray(cpt[n][0], float)
        rows = []
        for d_s, l_s in sorted(zip(*(np.asarray(x, float) for x in scratch[n]))):
            d_c, how = tokens_to_reach(*cpt[n], l_s)
            bound = d_c if np.isfinite(d_c) else float(d_cpt_all.max())
            rows.append({"target_loss": float(l_s), "tokens_scratch": float(d_s), "tokens_cpt": d_c, "how": how,
                         "saved": 1 - bound / d_s})
        out[n] = rows
    return out


def saved_text(row: dict) -> str:
    """A saving as text; a bound where CPT's points do not bracket the loss."""
    return {"at": "", "below": ">= ", "never": "<= "}[row["how"]] + f"{row['saved']:+.0%}"


def _moved(points: dict[int, tuple], sigma: float, rng: np.random.Generator) -> dict[int, tuple]:
    """The points with each loss moved by exp(sigma z): one draw of the seed noise."""
    return {n: (d, np.asarray(v, float) * np.exp(sigma * rng.standard_normal(len(v)))) for n, (d, v) in points.items()}


def transfer(scratch: dict[int, tuple], cpt: dict[int, tuple], noise: dict[str, float] | None = None,
             n: int = 1000, level: float = 0.95) -> Verdict:
    """`scratch`, `cpt`: N -> (tokens, target loss) of each size's points; `noise`: "scratch",
    "cpt" -> sigma of log L across seeds. Per size the target is scratch's loss at its most
    tokens; the saving (1 - CPT's tokens to reach it / scratch's) gets an interval over n draws
    of the seed noise (none without it: a point interval). It holds at a size if the interval
    lies above 0, fails there if it lies below 0 or CPT has no points."""
    noise = noise or {}
    table = savings(scratch, cpt)
    rng = np.random.default_rng(0)
    draws = [savings(_moved(scratch, noise.get("scratch", 0.0), rng), _moved(cpt, noise.get("cpt", 0.0), rng))
             for _ in range(n if noise else 0)]
    lines, statuses, rows = [], [], {}
    for size in sorted(scratch):
        if size not in table:
            statuses.append(FAILS)
            lines.append(f"N={size:,}: no CPT points")
            continue
        for i, row in enumerate(table[size]):
            saved = [d[size][i]["saved"] for d in draws] or [row["saved"]]
            row["interval"] = tuple(np.percentile(saved, [(1 - level) / 2 * 100, (1 + level) / 2 * 100]))
        last = table[size][-1]
        lo, hi = last["interval"]
        status = HOLDS if lo > 0 else FAILS if hi < 0 or last["how"] == "never" else UNDETERMINED
        statuses.append(status)
        rows[size] = table[size]
        reach = {"at": f"{last['tokens_cpt']:,.0f} tokens", "below": f"<= {last['tokens_cpt']:,.0f} tokens (its "
                 "first point)", "never": "not within its points"}[last["how"]]
        lines.append(f"N={size:,}: scratch reaches {last['target_loss']:.4f} at {last['tokens_scratch']:,.0f} tokens; "
                     f"CPT {reach}: {saved_text(last)} tokens saved, 95% interval [{lo:+.0%}, {hi:+.0%}] ({status})")
    lines.append(f"Intervals: {n} draws of the seed noise (" + ", ".join(f"{k} sigma {v:.3g}" for k, v in noise.items())
                 + " of log L across seeds)." if noise else "No seed repeats: the intervals are points.")
    lines.append("Rule: holds if at every size the interval of the saving at scratch's largest budget lies above 0; "
                 "does not hold if at any it lies below 0 (or CPT never reaches); else undetermined.")
    ours = ("tokens (= FLOPs) saved at scratch's final loss, by size: "
            + ", ".join(f"{saved_text(r[-1])} [{r[-1]['interval'][0]:+.0%}, {r[-1]['interval'][1]:+.0%}]"
                        for r in rows.values()) if rows else "no points")
    return Verdict("transfer", combine(*statuses) if statuses else FAILS, tuple(lines), rows, ours)


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
                    "held_out_failed": held_out_failed, "failed_resamples": failed, "resamples": n},
                   f"gamma {gamma_cpt:+.3f} {_interval(ci_cpt)} on CPT runs, {gamma_scratch:+.3f} "
                   f"{_interval(ci_scratch)} on scratch; left-out error ratio {ratio:.3g} {_interval(ci_ratio)}")


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
                    "resamples": n},
                   f"a = {full[-2]:.3f} {_interval((lo[-2], hi[-2]))} from scratch, {full[-1]:.3f} "
                   f"{_interval((lo[-1], hi[-1]))} for CPT; N_opt ratio {full[0]:.3g} to {full[points - 1]:.3g} "
                   "over the sweep's compute")


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
                    "relative_spread": spread.tolist(), "tolerance": tolerance, "failed_resamples": failed},
                   f"source-loss rise {rise[least]:+.3f} without replay, {rise[most]:+.3f} at r={most:g}; rho "
                   f"{rho:.3g} {_interval(rho_ci)}; target-loss spread across ratios up to "
                   + (f"{spread.max():.1%}" if spread.size else "n/a"))


def stability_gap(start: dict[int, float], dense: dict[int, tuple], source: dict[int, tuple] | None = None
                  ) -> Verdict:
    """`start`: N -> the source model's target loss (CPT's step 0); `dense`: N -> (tokens, target
    loss) of the evals over the first steps of that size's CPT run; `source`: N -> (tokens, source
    loss) at the same evals, reported beside it (the old language's transient). It holds at a
    size if some eval's target loss is above the start (the loss first rises), fails where every
    eval is below it; the evals are of fixed rows, so there is no noise to straddle."""
    lines, statuses, rows = [], [], {}
    for n in sorted(dense):
        d, v = (np.asarray(x, float) for x in dense[n])
        if n not in start or not len(v):
            lines.append(f"N={n:,}: no dense evals or no source model")
            statuses.append(UNDETERMINED)
            continue
        rise = float(v.max() - start[n])
        above = d[v > start[n]]
        status = HOLDS if rise > 0 else FAILS
        statuses.append(status)
        row = {"start": start[n], "peak": float(v.max()), "rise": rise,
               "tokens_above": float(above.max()) if len(above) else 0.0, "first_loss": float(v[0]),
               "first_tokens": float(d[0])}
        text = (f"N={n:,}: target loss {start[n]:.3f} at the start, {v[0]:.3f} after {d[0]:,.0f} tokens, "
                + (f"above the start until {row['tokens_above']:,.0f} tokens (peak {v.max():.3f})" if rise > 0
                   else f"never above it in {len(v)} evals to {d.max():,.0f} tokens"))
        if source and n in source and len(source[n][1]):
            sd, sv = (np.asarray(x, float) for x in source[n])
            row |= {"source_start": float(sv[0]), "source_peak": float(sv.max()), "source_end": float(sv[-1]),
                    "source_peak_tokens": float(sd[int(np.argmax(sv))])}
            text += (f"; source loss peaks at {sv.max():.3f} after {row['source_peak_tokens']:,.0f} tokens and is "
                     f"{sv[-1]:.3f} at {sd[-1]:,.0f}")
        rows[n] = row
        lines.append(text + f" ({status})")
    lines.append("Rule: holds if at every size the target loss of some early eval is above its start; does not hold "
                 "if at any size none is.")
    rises = [r["rise"] for r in rows.values()]
    ours = (f"target loss rises at {sum(r > 0 for r in rises)} of {len(rises)} sizes (largest rise "
            f"{max(rises):+.3f})" if rises else "no dense evals")
    return Verdict("stability_gap", combine(*statuses) if statuses else UNDETERMINED, tuple(lines), rows, ours)
