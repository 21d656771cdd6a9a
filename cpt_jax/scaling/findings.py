"""The paper's four findings, each judged from a sweep's own numbers: a verdict computed by a
stated rule, never written by hand. Each function takes plain numbers (so a test can hand it
data where the finding is false) and returns a `Verdict` with the numbers it was judged on.

  1. transfer       CPT reaches scratch's final target loss with fewer tokens, at every size
  2. cpt_law        the CPT law's gamma > 0 on CPT runs (its 95% interval), above scratch's gamma
                    (intervals apart), and the CPT law fits the CPT runs better than Chinchilla
  3. allocation     a_cpt < a_scratch: CPT's compute-optimal N grows faster (interval of the gap > 0)
  4. replay         replay bounds forgetting (the most replay rises less than none, rho's interval
                    > 0), and at equal target tokens every ratio reaches the same target loss
                    (relative spread within a tolerance)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cpt_jax import summary

CLAIMS = {
    "transfer": "CPT reaches a target-language loss with fewer tokens than training from scratch, at every size",
    "cpt_law": "the CPT law fits CPT runs better than Chinchilla, with gamma > 0; on scratch runs gamma is ~0",
    "allocation": "CPT's compute-optimal allocation favours larger models (a_cpt < a_scratch)",
    "replay": "replay bounds forgetting, and at equal target-language compute every replay ratio reaches about "
              "the same target loss",
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    name: str
    holds: bool
    evidence: tuple[str, ...]  # the numbers and the rule, one line each
    numbers: dict = dataclasses.field(default_factory=dict)

    @property
    def claim(self) -> str:
        return CLAIMS[self.name]


def _interval(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


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
    return Verdict("transfer", bool(holds and rows), tuple(lines), rows)


def cpt_law(gamma_cpt: float, gamma_cpt_ci, gamma_scratch: float, gamma_scratch_ci,
            error_chinchilla: float, error_cpt_law: float) -> Verdict:
    """gamma of the CPT law fitted to CPT points and to scratch points (each with its bootstrap
    interval), and both laws' fit errors on the CPT points."""
    positive = gamma_cpt_ci[0] > 0
    apart = gamma_cpt_ci[0] > gamma_scratch_ci[1]
    better = error_cpt_law < error_chinchilla
    lines = (f"gamma on CPT runs {gamma_cpt:+.3f}, 95% interval {_interval(gamma_cpt_ci)} (> 0: {positive})",
             f"gamma on scratch runs {gamma_scratch:+.3f}, 95% interval {_interval(gamma_scratch_ci)} "
             f"(below CPT's interval: {apart})",
             f"fit error on CPT runs (sum of Huber): CPT law {error_cpt_law:.3g}, Chinchilla {error_chinchilla:.3g} "
             f"(CPT law better: {better})",
             "Rule: holds if all three.")
    return Verdict("cpt_law", bool(positive and apart and better), lines,
                   {"gamma_cpt": gamma_cpt, "gamma_cpt_interval": tuple(gamma_cpt_ci), "gamma_scratch": gamma_scratch,
                    "gamma_scratch_interval": tuple(gamma_scratch_ci), "error_chinchilla": error_chinchilla,
                    "error_cpt_law": error_cpt_law})


def allocation_exponent(alpha, beta, gamma) -> np.ndarray:
    """a of N_opt ~ C^a: beta / (alpha + beta - gamma); nan where no optimum exists."""
    alpha, beta, gamma = (np.asarray(x, float) for x in (alpha, beta, gamma))
    with np.errstate(invalid="ignore", divide="ignore"):
        a = beta / (alpha + beta - gamma)
    return np.where((beta > gamma) & (alpha > gamma), a, np.nan)


def allocation(a_scratch: float, a_cpt: float, gap_samples, level: float = 0.95) -> Verdict:
    """`gap_samples`: bootstrap samples of a_scratch - a_cpt (nan: a resample with no optimum)."""
    gap = np.asarray(gap_samples, float)
    gap = gap[np.isfinite(gap)]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = tuple(float(x) for x in np.percentile(gap, q)) if gap.size else (float("nan"),) * 2
    holds = bool(np.isfinite(a_scratch) and np.isfinite(a_cpt) and gap.size and ci[0] > 0)
    lines = (f"a_scratch {a_scratch:.3f}, a_cpt {a_cpt:.3f}; a_scratch - a_cpt {a_scratch - a_cpt:+.3f}, "
             f"95% interval {_interval(ci)} over {gap.size} resamples",
             "Rule: holds if the interval of a_scratch - a_cpt lies above 0.")
    return Verdict("allocation", holds, lines, {"a_scratch": a_scratch, "a_cpt": a_cpt, "gap_interval": ci})


def replay(rise: dict[float, float], rho: float, rho_ci, relative_spread, tolerance: float) -> Verdict:
    """`rise`: replay ratio -> the source-loss rise at the end of the largest budget; `rho`: the
    replay law's exponent and interval; `relative_spread`: of target loss across ratios at each
    common target-token count (cpt_jax.scaling.replay.equal_compute)."""
    ratios = sorted(rise)
    least, most = ratios[0], ratios[-1]
    bounded = rise[most] < rise[least] and rho_ci[0] > 0
    spread = np.asarray(relative_spread, float)
    same = bool(spread.size and np.all(spread <= tolerance))
    lines = ("source-loss rise at the largest budget: "
             + ", ".join(f"r={r:g}: {rise[r]:+.3f}" for r in ratios),
             f"replay law rho {rho:.3g}, 95% interval {_interval(rho_ci)}; the most replay (r={most:g}) rises "
             f"{'less' if rise[most] < rise[least] else 'no less'} than r={least:g} (bounded: {bounded})",
             "relative spread of target loss across ratios at equal target tokens: "
             + (", ".join(f"{s:.1%}" for s in spread) if spread.size else "no common token counts")
             + f" (within {tolerance:.0%}: {same})",
             "Rule: holds if forgetting is bounded and the spread is within the tolerance everywhere.")
    return Verdict("replay", bool(bounded and same), lines,
                   {"rise": {str(r): v for r, v in rise.items()}, "rho": rho, "rho_interval": tuple(rho_ci),
                    "relative_spread": spread.tolist(), "tolerance": tolerance})
