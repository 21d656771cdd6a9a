"""The compute-optimal plan for a FLOPs budget, from scratch and by CPT:

    python -m cpt_jax.scaling.plan --compute 1e18,1e20 [--fits SWEEP/report.json] [--json]

For each budget C (C = 6 N D): scratch's and CPT's N_opt, D_opt and loss under the paper's laws
(default) or a sweep's fitted laws (the report.json `sweep report` writes), the FLOPs CPT needs
to reach scratch's optimal loss, and for each the two rows of the paper's size table nearest its
N_opt with the tokens C buys them. The paper's constants check formulas, not outcomes: they put
CPT above scratch at large D (README, Size sweep), so trust a sweep's own fits for the savings.

N is the paper's parameter figure (its Table 4 "M" column) under the paper's laws, and the
non-embedding count at the paper's 32,000-piece vocabulary under a sweep's fits (the sweep's N).
A budget that is not a positive number, or a report without fits, exits 2 with one line.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from cpt_jax import cli
from cpt_jax.errors import ConfigError
from cpt_jax.models import sizes
from cpt_jax.scaling import laws

CLI = cli.Command(__doc__, label="plan error")
COMPUTE = flags.DEFINE_list("compute", None, "FLOPs budgets, comma-separated: 1e18,1e20.", flag_values=CLI.flags)
FITS = flags.DEFINE_string("fits", "", "A sweep's report.json: plan with its fitted laws (default: the paper's).",
                           flag_values=CLI.flags)
JSON = flags.DEFINE_bool("json", False, "Print a JSON list, one object per budget.", flag_values=CLI.flags)


def budgets(values: list[str] | None) -> list[float]:
    """The budgets as floats; ConfigError naming the first that is not a positive number."""
    if not values:
        raise ConfigError("--compute: give one or more FLOPs budgets, e.g. --compute 1e18,1e20")
    out = []
    for v in values:
        try:
            c = float(v)
        except ValueError:
            c = math.nan
        if not (math.isfinite(c) and c > 0):
            raise ConfigError(f"--compute: {v!r} is not a positive number of FLOPs")
        out.append(c)
    return out


def load_fits(path: str) -> tuple[laws.ChinchillaFit, laws.CPTFit]:
    """The scratch and CPT laws of a sweep's report.json."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--fits {path}: cannot read it as JSON ({e})") from None
    if not isinstance(report, dict) or "scratch_fit" not in report or "cpt_fit" not in report:
        raise ConfigError(f"--fits {path}: no fitted laws in it (scratch_fit and cpt_fit; the sweep had too few "
                          "points to fit?)")
    try:
        return laws.ChinchillaFit(**report["scratch_fit"]), laws.CPTFit(**report["cpt_fit"])
    except TypeError as e:
        raise ConfigError(f"--fits {path}: scratch_fit or cpt_fit is not a fitted law ({e})") from None


def size_rows(paper_n: bool) -> list[tuple[str, float]]:
    """(name, N) of the paper's sizes: its own figure, or the non-embedding count at its vocabulary."""
    return sorted((r["size"], r["paper_m"] * 1e6 if paper_n else float(r["non_embedding"]))
                  for r in sizes.table() if r["paper_m"] is not None)


def nearest(rows: list[tuple[str, float]], n_opt: float, C: float) -> list[dict]:
    """The rows just below and just above N_opt (one at either end of the table), each with the
    tokens C buys it."""
    rows = sorted(rows, key=lambda r: r[1])
    i = int(np.searchsorted([n for _, n in rows], n_opt))
    return [{"size": name, "N": n, "D": C / (6 * n)} for name, n in rows[max(i - 1, 0):i + 1]]


def plan(scratch: laws.Fit, cpt: laws.Fit, C: float, rows: list[tuple[str, float]]) -> dict:
    """One budget's plan: each law's N_opt, D_opt, loss and nearest sizes; CPT's FLOPs to scratch's loss."""
    out: dict = {"compute": C}
    for name, law in (("scratch", scratch), ("cpt", cpt)):
        n, d = (float(x) for x in laws.compute_optimal(law, C))
        out[name] = {"N": n, "D": d, "loss": float(laws.predict(law, n, d)), "nearest": nearest(rows, n, C)}
    c_cpt = float(laws.compute_for_loss(cpt, out["scratch"]["loss"])[0])
    out["cpt_flops_to_scratch_loss"] = c_cpt
    out["saved"] = 1 - c_cpt / C
    return out


def text(p: dict) -> list[str]:
    lines = [f"C = {p['compute']:.3g} FLOPs"]
    for name, label in (("scratch", "scratch"), ("cpt", "CPT    ")):
        law = p[name]
        sizes = ", ".join(f"{r['size']} (N {r['N']:.3g}, {r['D']:.3g} tokens)" for r in law["nearest"])
        lines.append(f"  {label}  N_opt {law['N']:.3g}  D_opt {law['D']:.3g} tokens  loss {law['loss']:.4f}"
                     f"   nearest sizes: {sizes}")
    c = p["cpt_flops_to_scratch_loss"]
    lines.append(f"  CPT reaches scratch's optimal loss {p['scratch']['loss']:.4f} with {c:.3g} FLOPs"
                 + (f" ({p['saved']:.0%} fewer)" if p["saved"] >= 0 else f" ({-p['saved']:.0%} more)")
                 if math.isfinite(c) else "  CPT's law never reaches scratch's optimal loss")
    return lines


def print_plans() -> None:
    C = budgets(COMPUTE.value)
    scratch, cpt = load_fits(FITS.value) if FITS.value else (laws.PAPER_SCRATCH, laws.PAPER_CPT)
    rows = size_rows(paper_n=not FITS.value)
    try:
        plans = [plan(scratch, cpt, c, rows) for c in C]
    except ValueError as e:  # a fitted law with no compute-optimal allocation
        raise ConfigError(f"--fits {FITS.value}: {e}") from None
    if JSON.value:
        print(json.dumps(plans, indent=2))
        return
    source = f"the laws fitted in {FITS.value}" if FITS.value else "the paper's laws (arXiv 2407.02118)"
    n_is = "non-embedding count at a 32,000 vocabulary" if FITS.value else "the paper's figure"
    print(f"Compute-optimal plans under {source}; C = 6 N D, size N as {n_is}.")
    for p in plans:
        print("\n".join(text(p)))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt_jax.scaling.plan ARGS...` in this process (argv without the program name): the exit code."""
    return CLI.run(print_plans, argv)


if __name__ == "__main__":
    sys.exit(main())
